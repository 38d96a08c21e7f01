// One (export, queue) served by a pool worker: it views the guest memory the main thread mapped,
// owns its ring indices, in-flight table and I/O engine. The worker loop (worker-loop.ts) steps
// every context it holds and sleeps in one poll covering all their kicks and completions.
import { performance } from 'node:perf_hooks';
import { native } from '../native/index.js';
import { GuestMemory } from '../virtio/memory.js';
import { DescriptorChain } from '../virtio/chain.js';
import { BrokenQueueError, SplitQueue } from '../virtio/split-queue.js';
import { PackedQueue } from '../virtio/packed-queue.js';
import { SplitInflight, inflightQueueBytes } from '../virtio/inflight.js';
import { BlkRequestHandler, BlkSlot, BlkType } from '../blk/request.js';
import { MAX_CHAIN_DESCRIPTORS } from '../blk/config.js';
import { buildNode, flushNodeStats, PENDING, type BlockNode, type NodeSpec } from '../graph/nodes.js';
import { createEngine, type IoEngine } from '../graph/io-engine.js';
import { WorkerIoContext } from './io-context.js';
import type { InflightRegion, VringSetup } from '../protocol/backend.js';
import { QueueState, StatIndex, type FromWorker, type QueueInit, type ToQueue } from './messages.js';
import { faultInjection } from './fault-injection.js';
import { DirtyLog, ringLogRanges } from '../virtio/dirty-log.js';

const MAX_SEGS = 256;
/** completions handled per reap call */
const BATCH = 64;
/** requests started between two used-ring publishes: the first completions reach the driver early, so it refills while we work */
const CHUNK = 8;
/** requests started before control messages and timers are looked at again */
const ROUND = 256;

export class QueueContext {
  readonly qid: number;
  readonly init: QueueInit;
  readonly stats: Int32Array;
  private memory: GuestMemory | null = null;
  queue: SplitQueue | PackedQueue | null = null;
  setup: VringSetup | null = null;
  private node: BlockNode;
  /** what node was built from (rebuilt when in-flight requests are abandoned) */
  private nodeSpec: NodeSpec;
  engine: IoEngine | null = null;
  private readonly handler: BlkRequestHandler;
  /** request slots made so far (tags 0..length-1); more are made as the driver keeps more in flight, up to tagLimit */
  private slots: BlkSlot[] = [];
  private freeTags: number[] = [];
  /** the ring size the engine was made for: the most requests in flight at once */
  private tagLimit = 0;
  inFlight = 0;
  private inflightRegion: { spec: InflightRegion; buffer: ArrayBuffer } | null = null;
  private tracker: SplitInflight | null = null;
  /** heads recovered from the inflight region, resubmitted before new avail entries */
  private resubmit: number[] = [];
  private stopSeq = -1;
  private drainSeq = -1;
  private drained = false;
  private broken = false;
  private needNotify = false;
  /** a notification was due while the ring had no call fd */
  private notifyOwed = false;
  private readonly completions = new Float64Array(2 * BATCH);
  /** graph generation of the node tree in use; requests remember the one they started under */
  private generation = 0;
  readonly ctx: WorkerIoContext;
  /** stats counted since the last publish; added to the shared block before the used index moves */
  private readonly acc = new Int32Array(StatIndex.COUNT);
  private accDirty = false;
  /** performance.now() of the current pop chunk / reap call (one clock read per batch, not per request) */
  private reapMs = 0;
  /** native.sigbusRescues() when last looked at */
  private sigbusSeen = native.sigbusRescues();
  /** a SIGBUS was caught while this queue served: completions may describe data that never landed */
  private memoryLost = false;
  /** this thread's view of the dirty-log bitmap (SET_LOG_BASE), and whether VHOST_F_LOG_ALL is on */
  private logView: ArrayBuffer | null = null;
  /** non-null only while logging: every page this queue writes is marked in it */
  private dirty: DirtyLog | null = null;
  /** [gpa, len, ...] of the ring areas we write, for the dirty log; null = recompute */
  private ringLog: number[] | null = null;
  private logOutsideWarned = false;

  constructor(
    qid: number,
    init: QueueInit,
    private readonly post: (m: FromWorker) => void,
  ) {
    this.qid = qid;
    this.init = init;
    this.stats = new Int32Array(init.stats);
    this.ctx = new WorkerIoContext((msg, data) => this.log('error', msg, data));
    this.nodeSpec = init.node;
    this.node = buildNode(init.node, this.ctx);
    this.handler = new BlkRequestHandler({ serial: init.serial, writeback: init.writeback, readOnly: init.readOnly, logicalBlockSize: init.logicalBlockSize });
    this.generation = init.generation;
  }

  log(level: 'warn' | 'error' | 'info', msg: string, data?: Record<string, unknown>): void {
    this.post({ type: 'log', level, msg, qid: this.qid, data: { queue: this.init.queueIndex, ...data } });
  }

  private ensureEngine(queueSize: number): IoEngine {
    if (this.engine && this.tagLimit >= queueSize) return this.engine;
    if (this.inFlight > 0) throw new Error('cannot grow the request table with requests in flight');
    this.engine?.close();
    this.engine = null;
    this.engine = createEngine(this.init.aio, Math.min(queueSize, 1024), queueSize, MAX_SEGS, (m) => this.log('warn', m));
    this.ctx.engine = this.engine;
    Atomics.store(this.stats, StatIndex.ENGINE, this.engine.kind === 'io_uring' ? 2 : 1);
    // A slot holds ~10 KiB of segment arrays (MAX_SEGS): made the first time that many requests
    // are in flight, not one per ring entry up front (2.5 MiB per 256-entry queue, most never used).
    this.slots = [];
    this.freeTags = [];
    this.tagLimit = queueSize;
    return this.engine;
  }

  /** true if a slot is free, making one when every slot made so far is in flight (below tagLimit) */
  private haveFreeSlot(): boolean {
    if (this.freeTags.length > 0) return true;
    const t = this.slots.length;
    if (t >= this.tagLimit) return false;
    this.slots.push(new BlkSlot(t, new DescriptorChain(MAX_SEGS), MAX_SEGS));
    this.freeTags.push(t);
    return true;
  }

  /** The queue leaves its worker: what is still in flight is abandoned, its mappings dropped. */
  close(): void {
    if (this.inFlight > 0) this.abandonInFlight();
    this.ctx.closeSources();
    this.engine?.close();
    this.engine = null;
    this.setDirtyLog(null, false);
    this.queue = null;
    this.setup = null;
    this.memory?.retire();
    this.memory = null;
    this.replaceInflightRegion(null);
  }

  /**
   * One pass: due timers, then pop/start/reap/publish rounds, then a stop or drain that became
   * complete. Returns true if anything moved (the loop goes round again without sleeping).
   */
  step(): boolean {
    if (faultInjection.armed) faultInjection.maybeThrow(this.init.exportId, this.init.queueIndex, this.stats, () => this.hasRequests());
    // Draining or stopping (GET_VRING_BASE): throttled requests start now, not on schedule.
    let progressed = this.stopSeq >= 0 || this.drained ? this.ctx.runAllTimers() : this.ctx.runDueTimers();
    progressed = this.serviceRound() || progressed;
    this.finishStopOrDrain();
    return progressed;
  }

  /** Before sleeping: asks the driver for a kick; returns true if requests arrived meanwhile. */
  armKick(): boolean {
    if (!this.canPop()) return false;
    try {
      try {
        return this.queue!.armKick();
      } finally {
        if (this.dirty !== null) this.markRing(); // armKick wrote avail_event / the event area
      }
    } catch (e) {
      this.markBroken(e);
      return false;
    }
  }

  /** The worker's busy poll: new avail entries, or completions reaped (published on the next step). */
  pollOnce(): boolean {
    if (this.canPop() && this.queue!.hasPending()) return true;
    return this.inFlight > 0 && this.engine !== null && (this.engine.pollFd >= 0 || this.ctx.sources.length > 0) && this.reap();
  }

  /** the kick fd to sleep on, or -1 */
  get kickFd(): number {
    return this.canPop() ? this.setup!.kickFd : -1;
  }

  /** the engine's completion fd to sleep on, or -1 */
  get ioFd(): number {
    return this.inFlight > 0 && this.engine !== null ? this.engine.pollFd : -1;
  }

  /** The kick fd woke the worker. */
  kicked(): void {
    native.eventfdRead(this.setup!.kickFd);
    Atomics.add(this.stats, StatIndex.KICKS, 1);
  }

  /**
   * An unexpected exception in the I/O path. The first one marks the queue broken; requests in
   * flight are still answered as they complete. Another one while broken means the queue cannot
   * even finish those: they are abandoned (still recorded in the inflight region, so a later
   * session or a restarted vubd resubmits them) and the queue is left empty, so stop and drain complete.
   */
  fault(e: unknown): void {
    const err = e instanceof Error ? e : new Error(String(e));
    if (!this.broken) {
      this.markBroken(err, true);
      return;
    }
    this.log('error', `queue worker fault while broken; abandoning ${this.inFlight} requests in flight: ${err.message}`, { stack: err.stack });
    this.abandonInFlight();
  }

  private abandonInFlight(): void {
    const engine = this.engine;
    this.engine = null;
    this.ctx.engine = null!;
    try {
      engine?.close(); // the kernel finishes or cancels what it holds; nothing of it is published
    } catch {
      /* already unusable */
    }
    this.slots = [];
    this.freeTags = [];
    this.tagLimit = 0;
    this.inFlight = 0;
    this.needNotify = false;
    this.resubmit = [];
    this.ctx.reset();
    if (this.ctx.sources.length > 0) {
      // A client (rbd, nbd) may still complete the abandoned tags later: a fresh tree has no such late completions.
      this.ctx.closeSources();
      this.node = buildNode(this.nodeSpec, this.ctx);
    }
    Atomics.store(this.stats, StatIndex.IN_FLIGHT, 0);
  }

  /**
   * Pops, starts, reaps and publishes in chunks until the ring and the engine have nothing more
   * (or ROUND requests were started). Returns true if anything was started or completed.
   */
  private serviceRound(): boolean {
    let progressed = false;
    let budget = ROUND;
    for (;;) {
      let started = 0;
      if (budget > 0 && this.canPop()) {
        started = this.popAndStart(budget < CHUNK ? budget : CHUNK);
        budget -= started;
      }
      // Also submits what timers and completions (next phases) queued.
      this.engine?.submit();
      const reaped = this.reap();
      this.publish();
      if (started === 0 && !reaped) return progressed;
      progressed = true;
    }
  }

  /**
   * A frontend truncated a file we map (the addon patched the faulting page with zeroes): this
   * queue's guest memory is no longer what the driver shares with us, so stop serving it.
   */
  private checkSigbus(): void {
    const n = native.sigbusRescues();
    if (n === this.sigbusSeen) return;
    this.sigbusSeen = n;
    if (this.queue === null) return; // not serving: nothing of ours was touched
    this.memoryLost = true;
    const why = 'guest memory shrank under vubd (the frontend truncated its memory file; SIGBUS caught)';
    if (!this.broken) this.markBroken(new BrokenQueueError(why));
    else this.log('error', why);
  }

  /** new avail entries are waiting (false where the ring cannot even be read) */
  hasRequests(): boolean {
    try {
      return this.canPop() && this.queue!.hasPending();
    } catch {
      return false;
    }
  }

  private canPop(): boolean {
    return (
      this.queue !== null && this.setup !== null && this.setup.enabled && this.stopSeq < 0 && !this.drained && !this.broken && this.engine !== null
    );
  }

  /** Starts up to `limit` requests (recovered ones first); returns how many were started. */
  private popAndStart(limit: number): number {
    const q = this.queue!;
    const now = performance.now();
    let started = 0;
    try {
      if (q instanceof PackedQueue) {
        // A packed chain is popped and walked in one step; no inflight region for packed rings.
        while (started < limit && q.pending() > 0 && this.haveFreeSlot()) {
          const slot = this.nextSlot();
          q.pop(slot.chain);
          slot.ringDescs = q.lastChainDescs;
          this.startSlot(slot, now);
          started++;
        }
      } else {
        while (this.resubmit.length > 0 && started < limit && this.haveFreeSlot()) {
          const slot = this.nextSlot();
          q.walk(this.resubmit.shift()!, slot.chain);
          this.startSlot(slot, now);
          started++;
        }
        let avail = started < limit ? q.pending() : 0;
        while (avail > 0 && started < limit && this.haveFreeSlot()) {
          const head = q.popHead();
          this.tracker?.popped(head);
          avail--;
          const slot = this.nextSlot();
          q.walk(head, slot.chain);
          this.startSlot(slot, now);
          started++;
        }
      }
    } catch (e) {
      this.markBroken(e);
    }
    if (started > 0) Atomics.store(this.stats, StatIndex.IN_FLIGHT, this.inFlight);
    return started;
  }

  /** The slot the next request will use. Its tag is taken only by startSlot, once the chain walked: a broken chain must not leak it. */
  private nextSlot(): BlkSlot {
    return this.slots[this.freeTags[this.freeTags.length - 1]!]!;
  }

  private startSlot(slot: BlkSlot, now: number): void {
    this.freeTags.pop();
    this.inFlight++;
    slot.chain.memory!.hold(); // the table this request walked stays mapped until it is done
    slot.generation = this.generation;
    slot.startMs = now;
    this.handler.start(slot, this.node, this.ctx);
  }

  /** `internal`: not a guest error but an unexpected exception (logged with its stack). */
  markBroken(e: unknown, internal = false): void {
    if (!internal && !(e instanceof BrokenQueueError) && !(e instanceof RangeError)) throw e;
    this.broken = true;
    Atomics.store(this.stats, StatIndex.STATE, QueueState.BROKEN);
    const err = e as Error;
    this.log('error', `queue marked broken: ${internal ? 'internal error: ' : ''}${err.message}`, internal ? { stack: err.stack } : undefined);
    if (this.setup && this.setup.errFd >= 0) {
      try {
        native.eventfdWrite(this.setup.errFd, 1);
      } catch (werr) {
        this.log('warn', `could not signal the err fd: ${(werr as Error).message}`);
      }
    }
  }

  private reap(): boolean {
    const engine = this.engine;
    if (engine === null || this.inFlight === 0) return false;
    if (this.ctx.sources.length > 0) this.ctx.serviceSources();
    let any = false;
    const c = this.completions;
    for (;;) {
      const n = engine.reap(c);
      if (n === 0) break;
      if (!any) this.reapMs = performance.now();
      any = true;
      for (let i = 0; i < n; i++) this.completeOne(c[2 * i]!, c[2 * i + 1]!);
      if (n < BATCH) break;
    }
    return any;
  }

  private completeOne(tag: number, res: number): void {
    const slot = this.slots[tag]!;
    res = this.ctx.runContinuations(tag, res);
    if (res === PENDING) return; // a node issued its next operation for this request
    const used = this.handler.complete(slot, res, this.ctx);
    if (used < 0) return; // another phase is running
    if (this.dirty !== null) this.dirty.markWritten(slot.chain, used); // after the data and status landed
    const acc = this.acc;
    this.count(acc, slot, res);
    if (slot.generation !== this.generation) acc[StatIndex.STALE]!++;
    const us = (this.reapMs - slot.startMs) * 1000;
    // bucket 0: < 1 us; bucket b: [2^(b-1), 2^b) us
    const bucket = us < 1 ? 0 : Math.min(StatIndex.HIST_BUCKETS - 1, 1 + (us >= 2147483647 ? 31 : 31 - Math.clz32(us)));
    acc[StatIndex.HIST_BASE + bucket]!++;
    this.accDirty = true;
    const q = this.queue;
    if (q instanceof PackedQueue) q.putUsed(slot.chain.head, used, slot.ringDescs);
    else if (q !== null) {
      q.putUsed(slot.chain.head, used);
      this.tracker?.completed(slot.chain.head);
    }
    slot.chain.memory!.drop();
    slot.chain.memory = null;
    this.needNotify = true;
    this.freeTags.push(tag);
    this.inFlight--;
  }

  private count(a: Int32Array, slot: BlkSlot, res: number): void {
    if (res < 0 || slot.fixedStatus >= 0) a[StatIndex.ERRORS]!++;
    switch (slot.type) {
      case BlkType.IN:
        a[StatIndex.READ_OPS]!++;
        a[StatIndex.READ_KIB]! += slot.length >> 10;
        break;
      case BlkType.OUT:
        a[StatIndex.WRITE_OPS]!++;
        a[StatIndex.WRITE_KIB]! += slot.length >> 10;
        break;
      case BlkType.FLUSH:
        a[StatIndex.FLUSH_OPS]!++;
        break;
      default:
        a[StatIndex.OTHER_OPS]!++;
    }
  }

  /** Adds the counters gathered since the last flush to the shared stats blocks. */
  private flushStats(): void {
    flushNodeStats();
    if (!this.accDirty) return;
    this.accDirty = false;
    const a = this.acc;
    const s = this.stats;
    for (let i = 0; i < StatIndex.COUNT; i++) {
      const v = a[i]!;
      if (v !== 0) {
        Atomics.add(s, i, v);
        a[i] = 0;
      }
    }
  }

  /** Signals the driver on its call fd, and counts it. */
  private interrupt(callFd: number): void {
    native.eventfdWrite(callFd, 1);
    Atomics.add(this.stats, StatIndex.NOTIFIES, 1);
  }

  private publish(): void {
    // Stats first: whoever sees a completion also sees it counted.
    this.flushStats();
    if (this.queue === null) return;
    // Never report success for data that went to a zero page patched over truncated memory.
    this.checkSigbus();
    if (!this.needNotify) return;
    if (this.memoryLost) {
      if (this.dirty !== null) this.markRing(); // packed used descriptors are already in the ring
      return;
    }
    this.needNotify = false;
    Atomics.store(this.stats, StatIndex.IN_FLIGHT, this.inFlight);
    const notify = this.queue.publish();
    if (this.dirty !== null) this.markRing(); // after the used elements and index were written
    if (this.tracker !== null && this.queue instanceof SplitQueue) this.tracker.published(this.queue.usedIdx);
    if (notify && this.setup && this.setup.callFd >= 0) {
      this.interrupt(this.setup.callFd);
    } else if (notify) {
      this.notifyOwed = true; // no call fd yet: the driver gets it as soon as one arrives
    }
  }

  /** Marks the ring areas this queue writes (used ring, or packed descriptors and event area). */
  private markRing(): void {
    const s = this.setup;
    const dirty = this.dirty!;
    if (s === null || s.logGuestAddr < 0 || this.memory === null) return;
    const r = (this.ringLog ??= ringLogRanges(this.memory, s));
    for (let i = 0; i < r.length; i += 2) dirty.mark(r[i]!, r[i + 1]!);
    if (dirty.outside > 0 && !this.logOutsideWarned) {
      this.logOutsideWarned = true;
      this.log('error', 'guest pages outside the dirty log were written: the frontend\'s log is too small, migration may miss them', { pages: dirty.outside });
    }
  }

  /** Switches dirty logging (through the drained barrier); the old bitmap view is dropped. */
  private setDirtyLog(view: { mapping: number; offset: number; size: number } | null, enabled: boolean): void {
    const old = this.logView;
    const next = view === null ? null : native.viewMapping(view.mapping);
    let dirty: DirtyLog | null = null;
    try {
      if (next !== null && enabled) dirty = new DirtyLog(new Uint8Array(next, view!.offset, view!.size));
    } catch (e) {
      if (next !== null) native.unmap(next);
      throw e;
    }
    this.logView = next;
    this.dirty = dirty;
    if (old !== null) native.unmap(old);
    this.ringLog = null;
    this.logOutsideWarned = false;
  }

  /** Installs a new inflight region mapping (or none) and unmaps the old one; nothing is in flight. */
  private replaceInflightRegion(next: { spec: InflightRegion; buffer: ArrayBuffer } | null): void {
    const old = this.inflightRegion;
    this.inflightRegion = next;
    if (old !== null) native.unmap(old.buffer);
  }

  private finishStopOrDrain(): void {
    if (this.inFlight > 0) return;
    if (this.stopSeq >= 0) {
      const seq = this.stopSeq;
      const q = this.queue;
      const lastAvail = q instanceof PackedQueue ? q.base : (q?.lastAvail ?? this.setup?.base ?? 0);
      this.stopSeq = -1;
      this.queue = null;
      this.setup = null;
      this.broken = false;
      Atomics.store(this.stats, StatIndex.STATE, QueueState.IDLE);
      this.post({ type: 'ack', seq, lastAvail });
    }
    if (this.drainSeq >= 0) {
      const seq = this.drainSeq;
      this.drainSeq = -1;
      this.post({ type: 'ack', seq });
    }
  }

  apply(m: ToQueue): void {
    switch (m.type) {
      case 'memtable': {
        this.publish();
        const old = this.memory;
        this.memory = m.chunks.length > 0 ? new GuestMemory(m.chunks) : null;
        this.memoryLost = false;
        this.ringLog = null;
        if (this.setup !== null) this.bindQueue(this.setup);
        old?.retire(); // unmapped once the requests started with it are done
        this.post({ type: 'ack', seq: m.seq });
        return;
      }
      case 'configure': {
        this.publish();
        this.ensureEngine(m.setup.size);
        const old = this.setup;
        const sameRing =
          old !== null &&
          this.queue !== null &&
          old.size === m.setup.size &&
          old.packed === m.setup.packed &&
          old.descUserAddr === m.setup.descUserAddr &&
          old.availUserAddr === m.setup.availUserAddr &&
          old.usedUserAddr === m.setup.usedUserAddr;
        this.setup = m.setup;
        this.ringLog = null;
        if (!sameRing) this.bindQueue(m.setup);
        // Completions published while the ring had no call fd (a frontend that enables the ring
        // before SET_VRING_CALL) would otherwise never interrupt the driver.
        if (this.notifyOwed && m.setup.callFd >= 0) {
          this.notifyOwed = false;
          this.interrupt(m.setup.callFd);
        }
        Atomics.store(this.stats, StatIndex.STATE, this.broken ? QueueState.BROKEN : QueueState.RUNNING);
        this.post({ type: 'ack', seq: m.seq });
        return;
      }
      case 'inflight':
        if (this.inFlight > 0) throw new Error('inflight region change with requests in flight');
        this.tracker = null;
        this.replaceInflightRegion(
          m.region === null ? null : { spec: m.region, buffer: native.mmap(m.region.fd, m.region.mmapOffset + m.region.mmapSize, 0, true) },
        );
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'stop':
        this.stopSeq = m.seq; // acked from finishStopOrDrain once in-flight I/O completed
        return;
      case 'reset':
        this.setDirtyLog(null, false); // the main thread forgets the log whatever happens next
        if (this.inFlight > 0) throw new Error('reset with requests in flight');
        this.notifyOwed = false;
        this.queue = null;
        this.setup = null;
        this.memory?.retire(); // nothing in flight: unmapped at once
        this.memory = null;
        this.memoryLost = false;
        this.broken = false;
        this.tracker = null;
        this.replaceInflightRegion(null);
        this.resubmit = [];
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'dirty-log':
        this.setDirtyLog(m.log, m.enabled);
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'set-node':
        if (this.inFlight > 0) throw new Error('node swap with requests in flight: drain first');
        flushNodeStats();
        this.ctx.closeSources(); // the old tree's clients; nothing is in flight
        this.nodeSpec = m.node;
        this.node = buildNode(m.node, this.ctx);
        this.generation = m.generation;
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'set-writeback':
        this.handler.opts = { ...this.handler.opts, writeback: m.writeback };
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'drain':
        this.drained = true;
        Atomics.store(this.stats, StatIndex.STATE, QueueState.DRAINED);
        this.drainSeq = m.seq;
        return;
      case 'undrain':
        this.drained = false;
        Atomics.store(this.stats, StatIndex.STATE, this.queue ? QueueState.RUNNING : QueueState.IDLE);
        this.post({ type: 'ack', seq: m.seq });
        return;
    }
  }

  private bindQueue(s: VringSetup): void {
    const prev = this.queue;
    this.queue = null;
    if (this.memory === null) return;
    try {
      if (s.packed) {
        // A rebind (new memory table) keeps the indices; a fresh start takes them from the base.
        const base = prev instanceof PackedQueue ? prev.base : s.base;
        this.tracker = null;
        this.queue = new PackedQueue(this.memory, { size: s.size, descAddr: s.descUserAddr, driverAddr: s.availUserAddr, deviceAddr: s.usedUserAddr }, base, s.eventIdx, s.indirect, MAX_CHAIN_DESCRIPTORS);
        this.broken = false;
        return;
      }
      const base = prev instanceof SplitQueue ? prev.lastAvail : s.base;
      const q = new SplitQueue(this.memory, { size: s.size, descAddr: s.descUserAddr, availAddr: s.availUserAddr, usedAddr: s.usedUserAddr }, base, s.eventIdx, s.indirect, MAX_CHAIN_DESCRIPTORS);
      if (prev instanceof SplitQueue) q.usedIdx = prev.usedIdx;
      else this.recoverInflight(q, s);
      this.queue = q;
      this.broken = false;
    } catch (e) {
      this.markBroken(e);
    }
  }

  /** A fresh start: pick up the inflight region and resubmit what a previous run left in flight. */
  private recoverInflight(q: SplitQueue, s: VringSetup): void {
    this.tracker = null;
    this.resubmit = [];
    const r = this.inflightRegion;
    if (r === null || s.packed) return;
    if (s.index >= r.spec.numQueues || s.size !== r.spec.queueSize) {
      this.log('warn', 'inflight region does not match this queue; inflight tracking off', { regionQueueSize: r.spec.queueSize, size: s.size });
      return;
    }
    this.tracker = new SplitInflight(r.buffer, r.spec.mmapOffset + s.index * inflightQueueBytes(s.size), s.size);
    const heads = this.tracker.recover(q.usedIdx);
    if (heads.length > 0) {
      // Everything between used->idx and the in-flight heads was fetched before the restart.
      q.lastAvail = (q.usedIdx + heads.length) & 0xffff;
      this.resubmit = heads;
      this.log('info', `resubmitting ${heads.length} requests left in flight by the previous backend`, { heads: heads.slice(0, 16) });
    }
  }
}
