// blockdev-mirror: puts a mirror filter above the source (guest writes then go to both), copies
// the source to the target chunk by chunk in the background, reports ready after one full pass,
// and on complete pivots every user of the filter to the target, behind the drained barrier.
// The copy and the target's flush run through BackgroundIo: the main thread never waits on them.
import { rbdMainIo } from './rbd-open.js';
import { alignedBuffer } from './direct-io.js';
import { getSystemErrorName } from 'node:util';
import type { BackgroundIo } from './background-io.js';
import type { BlockGraph } from './graph.js';
import { GraphError, type NodeDef, type Snapshot } from './snapshot.js';
import { flushErrno, newNodeStats, recordFlushError } from './nodes.js';
import { releaseFd, retainFd } from './fd-refs.js';

export type JobStatus = 'created' | 'running' | 'ready' | 'waiting' | 'pending' | 'aborting' | 'concluded';

export interface JobEvents {
  statusChanged(job: MirrorJob): void;
  ready(job: MirrorJob): void;
  completed(job: MirrorJob, error?: string): void;
  /** the job's flush of a node failed first: the node's sticky flush error is now set */
  flushFailed(node: string, errno: number): void;
}

const CHUNK = 1 << 20;

type FileDef = Extract<NodeDef, { driver: 'file' }>;

/** The file a node's data lives in (through filters), or null for a data-less node. */
function leafFile(s: Snapshot, name: string): FileDef | null {
  const n = s.node(name);
  switch (n.driver) {
    case 'file':
      return n;
    case 'null':
      return null;
    case 'rbd':
      throw new GraphError(`node '${name}' is an rbd image: a mirror copies from a file node`);
    case 'throttle':
      return leafFile(s, n.child);
    case 'mirror':
      return leafFile(s, n.source);
    case 'nbd':
      throw new GraphError(`node '${name}' (nbd): the mirror's background copy reads files only`);
  }
}

/** Where the copy writes: a file through the background I/O, or an rbd image through the main thread's handle. */
interface MirrorTarget {
  name: string;
  stats: SharedArrayBuffer;
  /** fds the copy holds a reference on while it runs */
  fds: number[];
  write(buf: ArrayBuffer, length: number, offset: number): Promise<number>;
  flush(): Promise<number>;
}

function fileTarget(f: FileDef, io: BackgroundIo): MirrorTarget {
  return { name: f.name, stats: f.stats, fds: [f.fd], write: (b, l, o) => io.write(f.fd, b, l, o), flush: () => io.fsync(f.fd, true) };
}

function rbdTarget(d: Extract<NodeDef, { driver: 'rbd' }>): MirrorTarget {
  const io = rbdMainIo(d);
  return { name: d.name, stats: d.stats, fds: [], write: (b, l, o) => io.write(b, l, o), flush: () => io.flush() };
}

/** "EIO (errno 5)" for a -errno result */
function errnoText(res: number): string {
  try {
    return `${getSystemErrorName(res)} (errno ${-res})`;
  } catch {
    return `errno ${-res}`;
  }
}

export class MirrorJob {
  status: JobStatus = 'created';
  offset = 0;
  total = 0;
  error: string | null = null;
  readonly filterName: string;
  /** background copy rate limit in bytes per second (QEMU's `speed`); 0 = as fast as it goes */
  speed = 0;
  private cancelled = false;
  private chunks: Int32Array | null = null;
  /** aligned: either end may be an O_DIRECT node */
  private readonly buf = alignedBuffer(CHUNK).buf;
  /** settles once the background copy has stopped: no I/O of this job is left in the kernel */
  private copying: Promise<void> = Promise.resolve();

  constructor(
    readonly id: string,
    readonly source: string,
    readonly target: string,
    private readonly graph: BlockGraph,
    private readonly events: JobEvents,
    private readonly io: BackgroundIo,
  ) {
    this.filterName = `${id}-mirror`;
  }

  private setStatus(s: JobStatus): void {
    this.status = s;
    this.events.statusChanged(this);
  }

  /** Validates and inserts the filter (drained); the copy then runs in the background. */
  async start(): Promise<void> {
    const snap = this.graph.snapshot;
    const src = snap.node(this.source);
    const tgt = snap.node(this.target);
    if (tgt.driver !== 'file' && tgt.driver !== 'rbd') throw new GraphError(`mirror target '${this.target}' must be a file or rbd node`);
    leafFile(snap, this.source); // refuses a source it cannot read
    if (tgt.readOnly) throw new GraphError(`mirror target '${this.target}' is read-only`);
    if (snap.users(this.target).nodes.length + snap.users(this.target).exports.length > 0) {
      throw new GraphError(`mirror target '${this.target}' is already in use`);
    }
    if (snap.size(this.target) < snap.size(src.name)) {
      throw new GraphError(`mirror target '${this.target}' (${snap.size(this.target)} bytes) is smaller than the source (${snap.size(src.name)} bytes)`);
    }
    this.total = snap.size(src.name);
    const chunks = new SharedArrayBuffer(4 * Math.ceil(this.total / CHUNK));
    this.chunks = new Int32Array(chunks);
    const filter: NodeDef = {
      driver: 'mirror',
      name: this.filterName,
      source: this.source,
      target: this.target,
      chunks,
      chunkSize: CHUNK,
      stats: newNodeStats(),
      job: this.id,
    };
    await this.graph.change((s) => s.addNode(filter).replaceUses(this.source, this.filterName));
    this.setStatus('running');
    this.copying = this.copyAll().catch((e: Error) => (this.cancelled ? undefined : this.fail(e.message)));
  }

  /** The copy holds its own references on both fds: an operation the kernel runs later must not meet a closed or reused number. */
  private async copyAll(): Promise<void> {
    const snap = this.graph.snapshot;
    const src = leafFile(snap, this.source);
    const tgt = snap.node(this.target);
    const dst = tgt.driver === 'rbd' ? rbdTarget(tgt) : fileTarget(tgt as FileDef, this.io);
    const fds = src ? [src.fd, ...dst.fds] : dst.fds;
    fds.forEach(retainFd);
    try {
      await this.copyFrom(src, dst);
    } finally {
      fds.forEach(releaseFd);
    }
  }

  private async copyFrom(src: FileDef | null, dst: MirrorTarget): Promise<void> {
    const chunks = this.chunks!;
    // Rate limiting: bytes copied since the window began; the window restarts when the speed changes.
    let windowStart = Date.now();
    let windowBytes = 0;
    let windowSpeed = this.speed;
    for (let c = 0; c < chunks.length; c++) {
      if (this.cancelled) return;
      const off = c * CHUNK;
      const len = Math.min(CHUNK, this.total - off);
      for (let attempt = 0; ; attempt++) {
        // A guest write to this chunk is in progress (odd count); let it finish.
        let before = Atomics.load(chunks, c);
        for (let spins = 0; before % 2 === 1; spins++) {
          await new Promise((r) => (spins < 64 ? setImmediate(r) : setTimeout(r, 1)));
          if (this.cancelled) return;
          before = Atomics.load(chunks, c);
        }
        await this.copyChunk(src?.fd ?? -1, dst, off, len);
        if (this.cancelled) return;
        if (Atomics.load(chunks, c) === before) break;
        if (attempt > 1000) throw new Error(`chunk ${c} keeps changing under the copy`);
      }
      this.offset = off + len;
      if (this.speed !== windowSpeed) {
        windowStart = Date.now();
        windowBytes = 0;
        windowSpeed = this.speed;
      }
      windowBytes += len;
      // Ahead of the allowed rate: wait, in steps short enough to notice a cancel or a new speed.
      let waited = false;
      for (;;) {
        if (this.cancelled || this.speed !== windowSpeed || windowSpeed === 0) break;
        const aheadMs = (windowBytes / windowSpeed) * 1000 - (Date.now() - windowStart);
        if (aheadMs <= 0) break;
        await new Promise((r) => setTimeout(r, Math.min(aheadMs, 200)));
        waited = true;
      }
      // The synchronous fallback never yields by itself: keep the main loop responsive.
      if (!waited && c % 8 === 7) await new Promise((r) => setImmediate(r));
    }
    if (this.cancelled) return;
    // Ready promises that the target holds the data: a flush that fails ends the job instead.
    // A target whose flush failed before (sticky, see NodeStat.FLUSH_ERRNO) cannot promise it either.
    const before = flushErrno(dst.stats);
    let r = before !== 0 ? -before : await dst.flush();
    if (r < 0 && before === 0 && recordFlushError(dst.stats, -r)) this.events.flushFailed(dst.name, -r);
    if (r >= 0 && flushErrno(dst.stats) !== 0) r = -flushErrno(dst.stats); // a guest flush of the target failed meanwhile
    if (this.cancelled) return;
    if (r < 0) throw new Error(`flushing the mirror target '${this.target}' failed: ${errnoText(r)}`);
    this.setStatus('ready');
    this.events.ready(this);
  }

  private async copyChunk(srcFd: number, dst: MirrorTarget, off: number, len: number): Promise<void> {
    if (srcFd < 0) new Uint8Array(this.buf, 0, len).fill(0);
    else {
      const r = await this.io.read(srcFd, this.buf, len, off);
      if (r < 0) throw new Error(`mirror read at ${off} failed: ${errnoText(r)}`);
      if (r < len) new Uint8Array(this.buf, r, len - r).fill(0);
    }
    const w = await dst.write(this.buf, len, off);
    if (w !== len) throw new Error(`mirror write at ${off} failed: ${w < 0 ? errnoText(w) : `short write ${w}`}`);
  }

  private async fail(message: string): Promise<void> {
    this.error = message;
    this.cancelled = true;
    try {
      await this.removeFilter(this.source);
    } catch (e) {
      this.error = `${message}; removing the mirror filter failed too: ${(e as Error).message}`;
    }
    this.setStatus('concluded');
    this.events.completed(this, this.error);
  }

  private async removeFilter(replacement: string): Promise<void> {
    if (!this.graph.snapshot.nodes.has(this.filterName)) return;
    await this.graph.change((s) => s.replaceUses(this.filterName, replacement).removeNode(this.filterName));
  }

  /** job-complete: pivot to the target. */
  async complete(): Promise<void> {
    if (this.status !== 'ready') throw new GraphError(`The active block job '${this.id}' cannot be completed (status ${this.status})`);
    this.setStatus('pending');
    await this.removeFilter(this.target);
    this.setStatus('concluded');
    this.events.completed(this);
  }

  /** job-cancel: drop the filter and keep the source; concluded once no copy I/O is left in flight. */
  async cancel(): Promise<void> {
    if (this.status === 'concluded') throw new GraphError(`Job '${this.id}' is already concluded`);
    if (this.status === 'aborting') throw new GraphError(`Job '${this.id}' is already being cancelled`);
    this.cancelled = true;
    this.setStatus('aborting');
    await this.removeFilter(this.source);
    await this.copying;
    this.setStatus('concluded');
    this.events.completed(this, 'cancelled');
  }
}
