// A vhost-user-blk export: the device the Session talks to. It owns the queue workers (spawned
// at start-up), the block node they serve and the config space.
import type { Logger } from '../log.js';
import type { BackendChannel, InflightRegion, RegionWithFd, VhostBackend, VringSetup } from '../protocol/backend.js';
import { blkConfigSpace, blkFeatures, blkProtocolFeatures, WCE_OFFSET } from '../blk/config.js';
import type { NodeSpec } from '../graph/nodes.js';
import { DrainBarrier, type Drainable } from '../graph/drain.js';
import type { GraphConsumer } from '../graph/graph.js';
import { QueueWorkerHandle } from './handle.js';
import { StatIndex } from './messages.js';

export interface ExportOptions {
  id: string;
  generation: number;
  numQueues: number;
  maxQueueSize: number;
  node: NodeSpec;
  readOnly: boolean;
  serial: string;
  aio: 'io_uring' | 'sync';
  blockSize: number;
  pollUs: number;
  logLevel: string;
}

export class BlkExport implements VhostBackend, GraphConsumer, Drainable {
  readonly id: string;
  readonly barrier: DrainBarrier;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly readOnly: boolean;
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  readonly workers: QueueWorkerHandle[];
  private node: NodeSpec;
  private writeback = true;
  private started = new Set<number>();
  private channel: BackendChannel | null = null;

  constructor(
    private readonly opts: ExportOptions,
    private readonly log: Logger,
  ) {
    this.id = opts.id;
    this.barrier = new DrainBarrier(this);
    this.numQueues = opts.numQueues;
    this.readOnly = opts.readOnly;
    this.maxQueueSize = opts.maxQueueSize;
    this.node = opts.node;
    this.features = blkFeatures(opts.readOnly);
    this.protocolFeatures = blkProtocolFeatures();
    const serial = new TextEncoder().encode(opts.serial).subarray(0, 20);
    this.workers = Array.from(
      { length: opts.numQueues },
      (_, i) =>
        new QueueWorkerHandle(
          {
            queueIndex: i,
            aio: opts.aio,
            maxQueueSize: opts.maxQueueSize,
            node: opts.node,
            generation: opts.generation,
            serial,
            writeback: true,
            readOnly: opts.readOnly,
            logLevel: opts.logLevel,
            pollUs: opts.pollUs,
          },
          log,
        ),
    );
  }

  /**
   * Resolves once every queue worker runs its loop (threads are made ahead of time, and a
   * worker that cannot start is a start-up failure, not a first-request failure).
   */
  async ready(timeoutMs = 10000): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`queue workers did not start within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([Promise.all(this.workers.map((w) => w.request({ type: 'ready' }))), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  get nodeSpec(): NodeSpec {
    return this.node;
  }

  getConfig(): Uint8Array {
    return blkConfigSpace({
      capacityBytes: this.node.size,
      blockSize: this.opts.blockSize,
      numQueues: this.numQueues,
      writeback: this.writeback,
      readOnly: this.opts.readOnly,
    });
  }

  setConfig(offset: number, data: Uint8Array, flags: number): boolean {
    // Only the writeback-cache toggle is guest-writable; migration writes (flags=1) are refused.
    if (flags !== 0 || offset !== WCE_OFFSET || data.byteLength !== 1 || data[0]! > 1) {
      this.log.warn({ offset, size: data.byteLength, flags }, 'SET_CONFIG refused: only the wce byte is writable');
      return false;
    }
    this.writeback = data[0] === 1;
    this.log.info({ writeback: this.writeback }, 'guest changed the write cache mode');
    void Promise.all(this.workers.map((w) => w.request({ type: 'set-writeback', writeback: this.writeback }))).catch((err) =>
      this.log.error({ err }, 'could not apply the write cache mode'),
    );
    return true;
  }

  setAckedFeatures(features: bigint): void {
    this.log.debug({ features: '0x' + features.toString(16) }, 'features acked');
  }

  async setMemTable(regions: readonly RegionWithFd[]): Promise<void> {
    const specs = regions.map((r) => ({ ...r }));
    await Promise.all(this.workers.map((w) => w.request({ type: 'memtable', regions: specs })));
    this.log.info({ regions: regions.map((r) => ({ gpa: r.guestPhysAddr, size: r.size })) }, 'guest memory mapped');
  }

  async configureQueue(setup: VringSetup): Promise<void> {
    const w = this.workers[setup.index]!;
    await w.request({ type: 'configure', setup });
    if (!this.started.has(setup.index)) {
      this.started.add(setup.index);
      this.log.info({ queue: setup.index, size: setup.size, enabled: setup.enabled, eventIdx: setup.eventIdx, packed: setup.packed }, 'queue started');
    }
  }

  async stopQueue(index: number): Promise<number> {
    const ack = await this.workers[index]!.request({ type: 'stop' });
    this.started.delete(index);
    this.log.info({ queue: index, lastAvail: ack.lastAvail }, 'queue stopped');
    return ack.lastAvail ?? 0;
  }

  async reset(): Promise<void> {
    for (const i of [...this.started]) await this.stopQueue(i);
    await Promise.all(this.workers.map((w) => w.request({ type: 'reset' })));
  }

  async setInflight(region: InflightRegion | null): Promise<void> {
    await Promise.all(this.workers.map((w) => w.request({ type: 'inflight', region })));
  }

  setBackendChannel(channel: BackendChannel | null): void {
    this.channel = channel;
  }

  async drainQueues(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.request({ type: 'drain' })));
  }

  async undrainQueues(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.request({ type: 'undrain' })));
  }

  /** Runs a new node tree on every queue. The graph calls this only while drained. */
  async apply(spec: NodeSpec, generation: number): Promise<void> {
    await Promise.all(this.workers.map((w) => w.request({ type: 'set-node', node: spec, generation })));
    const resized = spec.size !== this.node.size;
    this.node = spec;
    if (resized) {
      this.log.info({ sizeBytes: spec.size }, 'capacity changed; telling the frontend');
      this.channel?.configChanged();
    }
  }

  stats(): Record<string, number | string | Record<string, number>>[] {
    return this.workers.map((w) => ({
      queue: w.index,
      readOps: Atomics.load(w.stats, StatIndex.READ_OPS),
      writeOps: Atomics.load(w.stats, StatIndex.WRITE_OPS),
      flushOps: Atomics.load(w.stats, StatIndex.FLUSH_OPS),
      otherOps: Atomics.load(w.stats, StatIndex.OTHER_OPS),
      errors: Atomics.load(w.stats, StatIndex.ERRORS),
      inFlight: Atomics.load(w.stats, StatIndex.IN_FLIGHT),
      kicks: Atomics.load(w.stats, StatIndex.KICKS),
      notifies: Atomics.load(w.stats, StatIndex.NOTIFIES),
      staleCompletions: Atomics.load(w.stats, StatIndex.STALE),
      readKiB: Atomics.load(w.stats, StatIndex.READ_KIB),
      writeKiB: Atomics.load(w.stats, StatIndex.WRITE_KIB),
      state: ['idle', 'running', 'drained', 'broken'][Atomics.load(w.stats, StatIndex.STATE)] ?? 'unknown',
      latencyHistogramUs: histogram(w.stats),
    }));
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/** Non-empty buckets of a queue's latency histogram, keyed by their upper bound ("<=Nus"). */
function histogram(stats: Int32Array): Record<string, number> {
  const out: Record<string, number> = {};
  for (let b = 0; b < StatIndex.HIST_BUCKETS; b++) {
    const n = Atomics.load(stats, StatIndex.HIST_BASE + b);
    if (n > 0) out[`<${2 ** b}us`] = n;
  }
  return out;
}
