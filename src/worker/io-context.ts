// What block nodes use to run a request inside a queue worker: the I/O engine, deferred starts
// (throttling) and continuations (a node chaining a second operation, as the mirror does).
import { PENDING, type CompletionSource, type IoContext, type SourceRegistry } from '../graph/nodes.js';
import type { IoEngine } from '../graph/io-engine.js';

interface Timer {
  due: bigint;
  fn: () => void;
}

export class WorkerIoContext implements IoContext, SourceRegistry {
  /** a plain field: the hot path reads it per request */
  engine: IoEngine = null as unknown as IoEngine; // set before the first request starts
  /** deferred starts, sorted by due time */
  private readonly timers: Timer[] = [];
  /** per tag: continuations registered by nodes, innermost last */
  private readonly conts: ((res: number) => number)[][] = [];

  /** completion sources of the node tree in use (rbd, nbd); empty for file and null trees */
  readonly sources: CompletionSource[] = [];

  addSource(src: CompletionSource): void {
    this.sources.push(src);
  }

  /** Lets every source complete what it can (through engine.done). */
  serviceSources(): void {
    const s = this.sources;
    for (let i = 0; i < s.length; i++) s[i]!.service();
  }

  /** The tree they belong to is gone: nothing of it is in flight (swaps and removals are drained). */
  closeSources(): void {
    for (const src of this.sources.splice(0)) src.close();
  }

  constructor(readonly logError: (msg: string, data: Record<string, unknown>) => void = () => {}) {}

  defer(_tag: number, delayNs: number, fn: () => void): void {
    const due = process.hrtime.bigint() + BigInt(Math.ceil(delayNs));
    const t = this.timers;
    let i = t.length;
    while (i > 0 && t[i - 1]!.due > due) i--;
    t.splice(i, 0, { due, fn });
  }

  then(tag: number, next: (res: number) => number): void {
    (this.conts[tag] ??= []).push(next);
  }

  /** Feeds a completion through the tag's continuations: the request's result, or PENDING. */
  runContinuations(tag: number, res: number): number {
    const stack = this.conts[tag];
    while (stack !== undefined && stack.length > 0) {
      res = stack.pop()!(res);
      if (res === PENDING) return PENDING;
    }
    return res;
  }

  /** Forgets every deferred start and continuation (the requests they belong to were abandoned). */
  reset(): void {
    this.timers.length = 0;
    this.conts.length = 0;
  }

  /** Runs deferred starts that are due; returns true if any ran. */
  runDueTimers(): boolean {
    if (this.timers.length === 0) return false;
    const now = process.hrtime.bigint();
    let ran = false;
    while (this.timers.length > 0 && this.timers[0]!.due <= now) {
      this.timers.shift()!.fn();
      ran = true;
    }
    return ran;
  }

  /**
   * Runs every deferred start now, due or not; returns true if any ran. A drain or a stop must not
   * wait out the throttle schedule: QEMU releases throttled requests at once when it drains
   * (throttle_group_restart_tgm), and their reservations stay charged, so the bucket is overdrawn.
   */
  runAllTimers(): boolean {
    if (this.timers.length === 0) return false;
    // Only those queued now, in order: a start that defers again (a chained operation) runs on
    // the next pass, and one that throws leaves the rest queued.
    const ran = this.timers.length;
    for (let i = 0; i < ran; i++) this.timers.shift()!.fn();
    return true;
  }

  hasDueTimer(): boolean {
    return this.timers.length > 0 && this.timers[0]!.due <= process.hrtime.bigint();
  }

  /** poll(2) timeout until the next deferred start: -1 when there is none */
  msToNextTimer(): number {
    let ms = -1;
    if (this.timers.length > 0) {
      const ns = this.timers[0]!.due - process.hrtime.bigint();
      ms = ns <= 0n ? 0 : Math.ceil(Number(ns) / 1e6);
    }
    for (const s of this.sources) {
      const w = s.msToNextWake();
      if (w >= 0 && (ms < 0 || w < ms)) ms = w;
    }
    return ms;
  }
}
