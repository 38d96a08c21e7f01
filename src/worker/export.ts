// A vhost-user-blk export: the device the Session talks to. It places its queues on the worker
// pool (threads made at start-up), and owns the block node they serve and the config space.
import type { Logger } from '../log.js';
import { DeviceRefusal, type BackendChannel, type DirtyLogRegion, type InflightRegion, type RegionWithFd, type VhostBackend, type VringSetup } from '../protocol/backend.js';
import { blkConfigSpace, blkFeatures, blkProtocolFeatures, WCE_OFFSET } from '../blk/config.js';
import type { NodeSpec } from '../graph/nodes.js';
import { DrainBarrier, type Drainable } from '../graph/drain.js';
import type { GraphConsumer } from '../graph/graph.js';
import { GuestMemoryMap, GuestMemoryMapError } from '../virtio/memory-map.js';
import { ProtocolError } from '../protocol/codec.js';
import type { QueueHandle } from './handle.js';
import type { WorkerPool } from './pool.js';
import { QueueState, StatIndex } from './messages.js';
import { releaseSpec, retainSpec } from '../graph/fd-refs.js';
import { F, hasBit } from '../protocol/constants.js';
import { TreeClaim } from '../graph/tree-claim.js';
import { ImageLockError } from '../graph/image-lock.js';
import { DirtyLogControl } from './dirty-log-control.js';

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
  /** the worker threads its queues run on */
  pool: WorkerPool;
  /** per queue, the pool worker serving it (an iothread-vq-mapping); default round robin */
  mapping?: readonly number[];
  /** offer RING_PACKED, and so not INFLIGHT_SHMFD (see blkFeatures) */
  ringPacked?: boolean;
  /** the configured write-cache mode (default write-back, as QEMU's block layer); a reset returns to it */
  writeback?: boolean;
}

export class BlkExport implements VhostBackend, GraphConsumer, Drainable {
  readonly id: string;
  readonly barrier: DrainBarrier;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly readOnly: boolean;
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  readonly workers: QueueHandle[];
  /** per queue, the pool worker it is placed on */
  readonly placement: readonly number[];
  private node: NodeSpec;
  private generation: number;
  /** the configured write-cache mode: what a new session or RESET_DEVICE starts from */
  private readonly configuredWriteback: boolean;
  /** the mode the workers run in (and the config space shows) */
  private writeback: boolean;
  /** what the guest wrote to the config space's writeback byte since the last reset */
  private guestWriteback: boolean | null = null;
  /** features of this session's SET_FEATURES; null before it */
  private ackedFeatures: bigint | null = null;
  private started = new Set<number>();
  private channel: BackendChannel | null = null;
  /** the memory table the workers were last given; its chunks stay mapped while it is current */
  private memory: GuestMemoryMap | null = null;
  private readonly dirtyLog: DirtyLogControl;

  constructor(
    private readonly opts: ExportOptions,
    private readonly log: Logger,
  ) {
    this.id = opts.id;
    this.barrier = new DrainBarrier(this);
    this.dirtyLog = new DirtyLogControl(
      this.barrier,
      async (log, enabled) => void (await Promise.all(this.workers.map((w) => w.request({ type: 'dirty-log', log, enabled })))),
      log,
    );
    this.numQueues = opts.numQueues;
    this.readOnly = opts.readOnly;
    this.maxQueueSize = opts.maxQueueSize;
    this.node = opts.node;
    this.generation = opts.generation;
    this.configuredWriteback = opts.writeback ?? true;
    this.writeback = this.configuredWriteback;
    this.features = blkFeatures(opts.readOnly, opts.ringPacked ?? false);
    this.protocolFeatures = blkProtocolFeatures(opts.ringPacked ?? false);
    this.serial = new TextEncoder().encode(opts.serial).subarray(0, 20);
    this.placement = opts.pool.place(opts.numQueues, opts.mapping);
    this.workers = Array.from({ length: opts.numQueues }, (_, i) => this.spawn(i));
  }

  private readonly serial: Uint8Array;
  /** per queue: the node tree its worker runs (the worker holds references on its fds) */
  private readonly held: NodeSpec[] = [];
  private lostListener: ((reason: Error) => void) | null = null;
  /** the write lock on the images is held only while a frontend has the device started (live migration hands it over) */
  private readonly claim = new TreeClaim(() => this.node);

  /** Queue i on its worker, serving the current node tree; `stats` keeps a dead predecessor's counters. */
  private spawn(i: number, stats?: SharedArrayBuffer): QueueHandle {
    retainSpec(this.node);
    this.held[i] = this.node;
    const handle: QueueHandle = this.opts.pool.addQueue(
      this.placement[i]!,
      {
        exportId: this.id,
        queueIndex: i,
        aio: this.opts.aio,
        maxQueueSize: this.opts.maxQueueSize,
        node: this.node,
        generation: this.generation,
        serial: this.serial,
        writeback: this.writeback,
        readOnly: this.opts.readOnly,
        logicalBlockSize: this.opts.blockSize,
      },
      this.log,
      (err) => this.workerDied(i, handle, err),
      stats,
    );
    return handle;
  }

  /**
   * A worker thread ended unasked. Its queue's requests cannot be answered from here, but they are
   * recorded in the inflight region: the session ends (QEMU reconnects), the worker is replaced
   * before the next session, and that session resubmits them.
   */
  private workerDied(i: number, handle: QueueHandle, err: Error): void {
    // The thread's 'exit' can come after a session already re-placed the queue: the report is then
    // about a handle that is no longer ours (its node tree was released when it was replaced).
    if (this.workers[i] !== handle) return;
    this.log.error({ queue: i, err: err.message }, 'queue worker died; ending the session and replacing the worker before the next one');
    this.queueStopped(i);
    const held = this.held[i];
    delete this.held[i];
    if (held !== undefined) releaseSpec(held); // the thread is gone: nothing uses these fds through it any more
    const listener = this.lostListener;
    this.lostListener = null;
    if (listener) listener(new Error(`queue worker ${i} died (${err.message})`));
    // No session to end (it ended first, e.g. on a message the dying thread could not answer):
    // re-place the queue now, so the next frontend finds it served.
    else void this.recover().catch((e: unknown) => this.log.error({ err: e }, 'the queue could not be re-placed after its worker died'));
  }

  onLost(listener: ((reason: Error) => void) | null): void {
    this.lostListener = listener;
  }

  /** Re-places every queue whose worker died. Runs one at a time (a session end and a death report can both ask). */
  recover(): Promise<void> {
    const run = this.recovering.then(() => this.replaceDeadQueues());
    this.recovering = run.catch(() => undefined);
    return run;
  }

  private recovering: Promise<void> = Promise.resolve();

  private async replaceDeadQueues(): Promise<void> {
    for (let i = 0; i < this.workers.length; i++) {
      const old = this.workers[i]!;
      if (!old.isDead) continue;
      const held = this.held[i];
      delete this.held[i];
      // Replaced before its thread's exit was reported: release its node tree once the thread is gone.
      if (held !== undefined) void old.threadExited.then(() => releaseSpec(held));
      Atomics.store(old.stats, StatIndex.STATE, QueueState.IDLE);
      Atomics.store(old.stats, StatIndex.IN_FLIGHT, 0);
      const w = this.spawn(i, old.stats.buffer as SharedArrayBuffer);
      this.workers[i] = w;
      await w.added;
      this.log.info({ queue: i, worker: w.workerIndex }, 'queue worker replaced');
    }
  }

  /**
   * Resolves once every queue is placed on its worker (a queue that cannot be placed is a
   * start-up failure, not a first-request failure).
   */
  async ready(timeoutMs = 10000): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`queue workers did not start within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([Promise.all(this.workers.map((w) => w.added)), timeout]);
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

  async setConfig(offset: number, data: Uint8Array, flags: number): Promise<boolean> {
    // Only the writeback-cache toggle is guest-writable; migration writes (flags=1) are refused.
    if (flags !== 0 || offset !== WCE_OFFSET || data.byteLength !== 1 || data[0]! > 1) {
      this.log.warn({ offset, size: data.byteLength, flags }, 'SET_CONFIG refused: only the wce byte is writable');
      return false;
    }
    const acked = this.ackedFeatures;
    if (acked !== null && !hasBit(acked, F.BLK_CONFIG_WCE)) {
      this.log.warn('SET_CONFIG refused: the driver did not negotiate CONFIG_WCE, the write cache mode is not writable');
      return false;
    }
    if (data[0] === 1 && acked !== null && !hasBit(acked, F.BLK_FLUSH)) {
      this.log.warn('SET_CONFIG refused: write-back for a driver that did not negotiate FLUSH (it could never make its writes durable)');
      return false;
    }
    this.guestWriteback = data[0] === 1;
    return this.applyCacheMode('guest changed the write cache mode');
  }

  /**
   * The write-cache mode the spec and QEMU (virtio_blk_set_status) give this session: write-back
   * needs a driver that can flush; with CONFIG_WCE the driver may choose, else the configured mode.
   */
  private cacheMode(): boolean {
    const acked = this.ackedFeatures;
    if (acked === null) return this.guestWriteback ?? this.configuredWriteback;
    if (!hasBit(acked, F.BLK_FLUSH)) return false;
    if (hasBit(acked, F.BLK_CONFIG_WCE)) return this.guestWriteback ?? this.configuredWriteback;
    return this.configuredWriteback;
  }

  /** Puts every live worker in cacheMode(); resolves true once all of them acknowledged it. */
  private async applyCacheMode(why: string): Promise<boolean> {
    const writeback = this.cacheMode();
    const changed = writeback !== this.writeback;
    this.writeback = writeback; // a worker spawned from now on starts in it
    const live = this.workers.filter((w) => !w.isDead);
    const results = await Promise.allSettled(live.map((w) => w.request({ type: 'set-writeback', writeback })));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      this.log.error({ err: failed.reason, writeback }, 'could not apply the write cache mode on every queue');
      return false;
    }
    if (changed) this.log.info({ writeback }, why);
    return true;
  }

  async setAckedFeatures(features: bigint): Promise<void> {
    this.log.debug({ features: '0x' + features.toString(16) }, 'features acked');
    this.ackedFeatures = features;
    if (!(await this.applyCacheMode('write cache mode set by feature negotiation'))) throw new Error('the write cache mode could not be applied');
    await this.dirtyLog.setEnabled(hasBit(features, F.LOG_ALL));
  }

  async setDirtyLog(region: DirtyLogRegion): Promise<void> {
    await this.dirtyLog.setRegion(region);
  }

  /**
   * Maps the table once for the process (chunks of regions the current table has already stay),
   * then every worker takes its views. A worker keeps viewing the old table until the requests it
   * started with it are done, so the old table's own references can go as soon as all have acked.
   */
  async setMemTable(regions: readonly RegionWithFd[]): Promise<void> {
    let next: GuestMemoryMap;
    try {
      next = GuestMemoryMap.map(regions, this.memory);
    } catch (e) {
      if (e instanceof GuestMemoryMapError) throw new ProtocolError(`guest memory cannot be mapped: ${e.message}`);
      throw e;
    }
    try {
      await Promise.all(this.workers.map((w) => w.request({ type: 'memtable', chunks: next.chunks })));
    } catch (e) {
      next.release(); // workers that took views hold their own references
      throw e;
    }
    this.memory?.release();
    this.memory = next;
    this.log.info({ regions: regions.map((r) => ({ gpa: r.guestPhysAddr, size: r.size })), chunks: next.chunks.length }, 'guest memory mapped');
  }

  async configureQueue(setup: VringSetup): Promise<void> {
    const w = this.workers[setup.index]!;
    const starting = this.started.size === 0;
    if (starting) this.claimImages(setup.index);
    try {
      await w.request({ type: 'configure', setup });
    } catch (e) {
      if (starting && this.started.size === 0) this.claim.deactivate();
      throw e;
    }
    if (!this.started.has(setup.index)) {
      this.started.add(setup.index);
      this.log.info({ queue: setup.index, size: setup.size, enabled: setup.enabled, eventIdx: setup.eventIdx, packed: setup.packed }, 'queue started');
    }
  }

  async stopQueue(index: number): Promise<number> {
    const ack = await this.workers[index]!.request({ type: 'stop' });
    this.log.info({ queue: index, lastAvail: ack.lastAvail }, 'queue stopped');
    this.queueStopped(index);
    return ack.lastAvail ?? 0;
  }

  /** Stops and resets every live worker, even when one of them fails (it is reported afterwards). */
  async reset(): Promise<void> {
    const failures: unknown[] = [];
    try {
      for (const i of [...this.started]) {
        try {
          await this.stopQueue(i);
        } catch (e) {
          this.queueStopped(i);
          failures.push(e);
        }
      }
      const live = this.workers.filter((w) => !w.isDead);
      for (const r of await Promise.allSettled(live.map((w) => w.request({ type: 'reset' })))) {
        if (r.status === 'rejected') failures.push(r.reason);
      }
    } finally {
      this.memory?.release(); // a worker still viewing it holds its own references
      this.memory = null;
      this.dirtyLog.forget(); // the workers' reset dropped their views of it
    }
    // The next driver starts from the configured mode, whatever this one chose or negotiated.
    this.guestWriteback = null;
    this.ackedFeatures = null;
    if (!(await this.applyCacheMode('write cache mode back to the configured one'))) failures.push(new Error('the write cache mode could not be reset'));
    if (failures.length > 0) throw failures[0];
  }

  /** The device starts: the images it runs get the write lock, or the start is refused. */
  private claimImages(queue: number): void {
    try {
      this.claim.activate();
    } catch (e) {
      if (!(e instanceof ImageLockError)) throw e;
      this.log.error({ queue, err: e.message }, 'refusing to start the device: another process holds the image');
      throw new DeviceRefusal(`cannot start the device: ${e.message}`);
    }
    this.log.info({ queue }, 'device started: image write lock taken');
  }

  private queueStopped(index: number): void {
    if (!this.started.delete(index) || this.started.size > 0 || !this.claim.isActive) return;
    this.claim.deactivate();
    this.log.info('device stopped: image write lock released');
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
    this.claim.beginSwap(spec);
    try {
      await this.applyAll(spec, generation);
    } catch (e) {
      this.claim.endSwap(false, this.node);
      throw e;
    }
    const old = this.node;
    const resized = spec.size !== this.node.size;
    this.node = spec;
    this.generation = generation;
    this.claim.endSwap(true, old);
    if (resized) {
      this.log.info({ sizeBytes: spec.size }, 'capacity changed; telling the frontend');
      this.channel?.configChanged();
    }
  }

  /**
   * All or nothing: if any worker refuses the new tree, the ones that took it go back to the old
   * one, so no worker is left using a node the graph no longer holds.
   */
  private async applyAll(spec: NodeSpec, generation: number): Promise<void> {
    const all = this.workers.map((_, i) => i);
    const failed = await this.setNode(all, spec, generation);
    if (failed.length === 0) return;
    const took = all.filter((i) => !failed.some((f) => f.queue === i));
    for (const f of await this.setNode(took, this.node, this.generation)) {
      this.log.error({ queue: f.queue, err: f.error }, 'a queue could not return to the previous node tree');
    }
    throw failed[0]!.error;
  }

  /** Sends a tree to some workers; each holds references on the fds of the tree it acked. */
  private async setNode(queues: number[], spec: NodeSpec, generation: number): Promise<{ queue: number; error: unknown }[]> {
    const results = await Promise.allSettled(
      queues.map(async (i) => {
        retainSpec(spec);
        try {
          await this.workers[i]!.request({ type: 'set-node', node: spec, generation });
        } catch (e) {
          releaseSpec(spec);
          throw e;
        }
        const old = this.held[i];
        this.held[i] = spec;
        if (old !== undefined) releaseSpec(old);
      }),
    );
    return results.flatMap((r, k) => (r.status === 'rejected' ? [{ queue: queues[k]!, error: r.reason }] : []));
  }

  stats(): Record<string, number | string | Record<string, number>>[] {
    return this.workers.map((w) => ({
      queue: w.index,
      worker: w.workerIndex,
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
      engine: ['none', 'sync', 'io_uring'][Atomics.load(w.stats, StatIndex.ENGINE)] ?? 'unknown',
      latencyHistogramUs: histogram(w.stats),
    }));
  }

  /** Takes every queue off its worker (the workers stay in the pool for other exports). */
  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.remove()));
    this.workers.forEach((w, i) => {
      if (this.held[i] === undefined) return;
      releaseSpec(this.held[i]!);
      delete this.held[i];
    });
    this.memory?.release();
    this.memory = null;
    this.dirtyLog.forget();
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
