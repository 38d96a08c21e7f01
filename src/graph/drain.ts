// The drained barrier (DESIGN.md invariant 3): queues stop popping, in-flight requests finish and
// their completions are published, then the caller changes the graph, then the queues resume and
// re-check their rings without waiting for a kick. Drains nest; a drain that does not complete in
// time fails cleanly and resumes the queues.

export interface Drainable {
  /** resolves when every queue stopped popping and has nothing in flight */
  drainQueues(): Promise<void>;
  undrainQueues(): Promise<void>;
}

export class DrainTimeoutError extends Error {}

export type DrainState = 'running' | 'draining' | 'drained';

const KEEP_SAMPLES = 4096;

/** Upper bounds (ms) of the drain-duration histogram; the drain timeout is 5 s. */
export const DRAIN_BUCKETS_MS: readonly number[] = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

export interface DrainLatency {
  count: number;
  p50: number;
  p99: number;
  max: number;
  /** every completed drain since start, unlike p50/p99/max (the last KEEP_SAMPLES only) */
  'sum-ms': number;
  /** cumulative: drains that took at most `le-ms`; the +Inf bucket is `count` */
  buckets: { 'le-ms': number; count: number }[];
}

export class DrainBarrier {
  private depth = 0;
  private pending: Promise<void> | null = null;
  private draining = false;
  /** milliseconds from drain request to drained, most recent last */
  readonly samples: number[] = [];
  drains = 0;
  timeouts = 0;
  /** non-cumulative counts per DRAIN_BUCKETS_MS bucket, and one past the last for longer drains */
  private readonly bucketCounts = new Array<number>(DRAIN_BUCKETS_MS.length + 1).fill(0);
  private sumMs = 0;

  constructor(private readonly target: Drainable) {}

  get state(): DrainState {
    if (this.depth === 0) return 'running';
    return this.draining ? 'draining' : 'drained';
  }

  get nesting(): number {
    return this.depth;
  }

  async drain(timeoutMs: number): Promise<void> {
    this.depth++;
    if (this.depth > 1) {
      await this.pending;
      return;
    }
    const t0 = performance.now();
    this.draining = true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new DrainTimeoutError(`drain did not complete within ${timeoutMs} ms`)), timeoutMs);
    });
    this.pending = Promise.race([this.target.drainQueues(), timeout]).finally(() => clearTimeout(timer));
    try {
      await this.pending;
      this.drains++;
      const ms = performance.now() - t0;
      this.samples.push(ms);
      this.sumMs += ms;
      const b = DRAIN_BUCKETS_MS.findIndex((le) => ms <= le);
      this.bucketCounts[b < 0 ? DRAIN_BUCKETS_MS.length : b]!++;
      if (this.samples.length > KEEP_SAMPLES) this.samples.shift();
    } catch (e) {
      this.depth = 0;
      this.timeouts++;
      await this.target.undrainQueues();
      throw e;
    } finally {
      this.draining = false;
    }
  }

  async undrain(): Promise<void> {
    if (this.depth === 0) return;
    if (--this.depth === 0) await this.target.undrainQueues();
  }

  /** p50/p99/max of the recorded drain latencies and a histogram of all of them, in milliseconds */
  latency(): DrainLatency {
    const s = [...this.samples].sort((a, b) => a - b);
    const at = (q: number): number => (s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))]! : 0);
    let cum = 0;
    const buckets = DRAIN_BUCKETS_MS.map((le, i) => ({ 'le-ms': le, count: (cum += this.bucketCounts[i]!) }));
    return { count: this.drains, p50: at(0.5), p99: at(0.99), max: s.length ? s[s.length - 1]! : 0, 'sum-ms': this.sumMs, buckets };
  }
}
