// Block nodes as a worker runs them. A node is built from a plain NodeSpec (sent from the main
// thread); files are opened by the main thread and used here by fd number.
import type { IoEngine } from './io-engine.js';
import { reserve } from './throttle-state.js';
import { discardFile, writeZeroesFile } from './range-ops.js';
import { getSystemErrorName } from 'node:util';
import { giveBounce, iovAligned, takeBounce } from './direct-io.js';
import type { RbdOpenOptions } from '../native/index.js';
import { RbdNode } from './rbd-node.js';
import { NbdNode, type NbdNodeSpec } from './nbd-node.js';

const EINVAL = 22;

export type NodeSpec =
  | {
      driver: 'file';
      name: string;
      fd: number;
      path: string;
      size: number;
      readOnly: boolean;
      stats: SharedArrayBuffer;
      /** the fd is O_DIRECT: unaligned guest buffers go through a bounce buffer */
      direct?: boolean;
      /** flushes complete at once without reaching the disk (cache=unsafe) */
      noFlush?: boolean;
      /** O_DIRECT alignment of offsets, lengths and memory */
      alignment?: number;
    }
  | { driver: 'null'; name: string; size: number; readOnly: boolean; stats: SharedArrayBuffer }
  | ({ driver: 'rbd'; name: string; size: number; readOnly: boolean; stats: SharedArrayBuffer; noFlush: boolean; shareId: number } & RbdOpenOptions)
  | { driver: 'throttle'; name: string; size: number; readOnly: boolean; stats: SharedArrayBuffer; child: NodeSpec; state: SharedArrayBuffer }
  | {
      driver: 'mirror';
      name: string;
      size: number;
      readOnly: boolean;
      stats: SharedArrayBuffer;
      source: NodeSpec;
      target: NodeSpec;
      /** Int32 seqlock per chunk: odd while a guest write to the chunk is in progress */
      chunks: SharedArrayBuffer;
      chunkSize: number;
    }
  | NbdNodeSpec;

/** Int32 slots of a node's shared stats block. */
export const enum NodeStat {
  READ_OPS = 0,
  WRITE_OPS = 1,
  FLUSH_OPS = 2,
  OTHER_OPS = 3,
  READ_KIB = 4,
  WRITE_KIB = 5,
  /**
   * errno of the first failed flush, 0 while none failed. Sticky until the node is reopened (a new
   * block): Linux reports a writeback error once per open file, and the pages it dropped are clean
   * now, so a later flush that succeeds would lie (QEMU file-posix's page_cache_inconsistent).
   * Shared by every queue's copy of the node.
   */
  FLUSH_ERRNO = 6,
  COUNT = 8,
}

/** The errno of the node's sticky flush error, or 0. */
export function flushErrno(stats: SharedArrayBuffer | Int32Array): number {
  return Atomics.load(stats instanceof Int32Array ? stats : new Int32Array(stats), NodeStat.FLUSH_ERRNO);
}

/** Records a failed flush; true only for the first caller on any thread (it is the one that logs). */
export function recordFlushError(stats: SharedArrayBuffer | Int32Array, errno: number): boolean {
  const a = stats instanceof Int32Array ? stats : new Int32Array(stats);
  return Atomics.compareExchange(a, NodeStat.FLUSH_ERRNO, 0, errno > 0 ? errno : 5) === 0;
}

/** "EIO (errno 5)" */
export function errnoName(errno: number): string {
  try {
    return `${getSystemErrorName(-errno)} (errno ${errno})`;
  } catch {
    return `errno ${errno}`;
  }
}

export function newNodeStats(): SharedArrayBuffer {
  return new SharedArrayBuffer(4 * NodeStat.COUNT);
}

/** One data transfer; iov points into guest memory (zero copy). */
export interface DataIo {
  tag: number;
  iov: Float64Array;
  iovCount: number;
  offset: number;
  length: number;
  /** fills the guest buffers of a read with zeroes (nodes without data use it) */
  zeroFill(): void;
  /** copies the data of a write out of the guest buffers into dst (bounce buffers) */
  copyFromGuest(dst: Uint8Array): void;
  /** copies the first n bytes of src into the guest buffers of a read (bounce buffers) */
  copyToGuest(src: Uint8Array, n: number): void;
}

/** What a node may use while running a request in a worker. */
export interface IoContext {
  readonly engine: IoEngine;
  /** runs fn `delayNs` from now; the request stays in flight meanwhile */
  defer(tag: number, delayNs: number, fn: () => void): void;
  /**
   * When the operation now issued for tag completes with res, next(res) runs: it returns the
   * request's result, or PENDING after issuing another operation for the same tag.
   */
  then(tag: number, next: (res: number) => number): void;
  /** an error-level log line from the worker, with the queue it came from */
  logError(msg: string, data: Record<string, unknown>): void;
}

export const PENDING = -0x7fffffff;

/**
 * Completions that do not come from the I/O engine: a network or library client's fd (librbd's
 * event fd, an NBD socket). The worker's one poll covers pollFd; service() runs on every service
 * round of the queue and completes requests with ctx.engine.done(tag, res), so they flow through
 * the same reap path as io_uring completions. Never blocks.
 */
export interface CompletionSource {
  /** the fd to wait on now (readable = work to do), or -1 */
  readonly pollFd: number;
  /** poll(2) events for pollFd (default POLLIN); a client adds POLLOUT only while a send is blocked */
  readonly pollEvents?: number;
  service(): void;
  /** ms until service() is needed without an fd event (a reconnect backoff), or -1 */
  msToNextWake(): number;
  /** the node tree it belongs to is gone (swapped out while drained, or the queue removed) */
  close(): void;
}

/** Where a node built in a worker registers its completion sources (one per queue context). */
export interface SourceRegistry {
  addSource(src: CompletionSource): void;
}

const NO_SOURCES: SourceRegistry = {
  addSource() {
    throw new Error('this node needs a worker to run in (no completion source registry)');
  },
};

export interface BlockNode {
  readonly name: string;
  readonly size: number;
  readonly readOnly: boolean;
  read(ctx: IoContext, io: DataIo): void;
  write(ctx: IoContext, io: DataIo): void;
  flush(ctx: IoContext, tag: number): void;
  /** completes tag with 0 or -errno; may take several service rounds (never the whole range at once) */
  discard(ctx: IoContext, tag: number, offset: number, length: number): void;
  /** completes tag with 0 or -errno; may take several service rounds (never the whole range at once) */
  writeZeroes(ctx: IoContext, tag: number, offset: number, length: number, unmap: boolean): void;
}

export { CountingNode, flushNodeStats } from './counting-node.js';
import { CountingNode } from './counting-node.js';

export class FileNode extends CountingNode implements BlockNode {
  private readonly fd: number;
  /** O_DIRECT alignment; 0 without O_DIRECT (any buffer goes straight to the kernel) */
  private readonly align: number;
  private readonly noFlush: boolean;
  /** the bounce buffer's iovec (the engine copies iovecs when an operation is prepared) */
  private readonly bounceIov = new Float64Array(2);

  constructor(spec: Extract<NodeSpec, { driver: 'file' }>) {
    super(spec);
    this.fd = spec.fd;
    this.align = spec.direct === true ? (spec.alignment ?? 512) : 0;
    this.noFlush = spec.noFlush === true;
  }
  read(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.READ_OPS, NodeStat.READ_KIB, io.length);
    if (this.align === 0 || iovAligned(io.iov, io.iovCount, this.align)) ctx.engine.readv(this.fd, io.iov, io.iovCount, io.offset, io.tag);
    else this.bounced(ctx, io, false);
  }
  write(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.WRITE_OPS, NodeStat.WRITE_KIB, io.length);
    if (this.align === 0 || iovAligned(io.iov, io.iovCount, this.align)) ctx.engine.writev(this.fd, io.iov, io.iovCount, io.offset, io.tag);
    else this.bounced(ctx, io, true);
  }
  /**
   * O_DIRECT with guest buffers the device cannot take (QEMU's bounce buffer): the data goes
   * through aligned memory, copied in before a write and out after a read.
   */
  private bounced(ctx: IoContext, io: DataIo, write: boolean): void {
    if (io.offset % this.align !== 0 || io.length % this.align !== 0) {
      ctx.engine.done(io.tag, -EINVAL); // the request checks keep guest requests aligned to the logical block size
      return;
    }
    const b = takeBounce(io.length);
    if (write) io.copyFromGuest(b.bytes.subarray(0, io.length));
    ctx.then(io.tag, (res) => {
      if (!write && res > 0) io.copyToGuest(b.bytes, res);
      giveBounce(b);
      return res;
    });
    this.bounceIov[0] = b.addr;
    this.bounceIov[1] = io.length;
    if (write) ctx.engine.writev(this.fd, this.bounceIov, 1, io.offset, io.tag);
    else ctx.engine.readv(this.fd, this.bounceIov, 1, io.offset, io.tag);
  }
  /**
   * After one failed flush every later one fails (with the first errno) until the node is reopened.
   * A failed write is not sticky: its own request fails, and nothing acknowledged earlier is lost
   * by it; a failed write-back of acknowledged data only ever shows up as a failed fsync.
   */
  flush(ctx: IoContext, tag: number): void {
    this.count(NodeStat.FLUSH_OPS, -1, 0);
    if (this.noFlush) {
      ctx.engine.done(tag, 0); // cache=unsafe: the operator chose speed over durability
      return;
    }
    const sticky = Atomics.load(this.stats, NodeStat.FLUSH_ERRNO);
    if (sticky !== 0) {
      ctx.engine.done(tag, -sticky);
      return;
    }
    ctx.then(tag, (res) => {
      if (res < 0) {
        if (recordFlushError(this.stats, -res)) {
          ctx.logError(`flush failed on node '${this.name}': ${errnoName(-res)}; every later flush of this node fails until it is reopened`, {
            node: this.name,
            errno: -res,
          });
        }
        return res;
      }
      // A concurrent fsync on another queue may have taken the error this one would have seen.
      const late = Atomics.load(this.stats, NodeStat.FLUSH_ERRNO);
      return late !== 0 ? -late : res;
    });
    ctx.engine.fsync(this.fd, tag);
  }
  discard(ctx: IoContext, tag: number, offset: number, length: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    discardFile(ctx, this.fd, tag, offset, length);
  }
  writeZeroes(ctx: IoContext, tag: number, offset: number, length: number, unmap: boolean): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    writeZeroesFile(ctx, this.fd, tag, offset, length, unmap);
  }
}

export class NullNode extends CountingNode implements BlockNode {
  read(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.READ_OPS, NodeStat.READ_KIB, io.length);
    io.zeroFill();
    ctx.engine.done(io.tag, io.length);
  }
  write(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.WRITE_OPS, NodeStat.WRITE_KIB, io.length);
    ctx.engine.done(io.tag, io.length);
  }
  flush(ctx: IoContext, tag: number): void {
    this.count(NodeStat.FLUSH_OPS, -1, 0);
    ctx.engine.done(tag, 0);
  }
  discard(ctx: IoContext, tag: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    ctx.engine.done(tag, 0);
  }
  writeZeroes(ctx: IoContext, tag: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    ctx.engine.done(tag, 0);
  }
}

/** Delays requests so that all queues together stay within the node's limits. */
export class ThrottleNode extends CountingNode implements BlockNode {
  private readonly child: BlockNode;
  private readonly state: SharedArrayBuffer;
  constructor(spec: Extract<NodeSpec, { driver: 'throttle' }>, sources: SourceRegistry) {
    super(spec);
    this.child = buildNode(spec.child, sources);
    this.state = spec.state;
  }
  read(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.READ_OPS, NodeStat.READ_KIB, io.length);
    const wait = reserve(this.state, false, io.length, process.hrtime.bigint());
    if (wait <= 0) this.child.read(ctx, io);
    else ctx.defer(io.tag, wait, () => this.child.read(ctx, io));
  }
  write(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.WRITE_OPS, NodeStat.WRITE_KIB, io.length);
    const wait = reserve(this.state, true, io.length, process.hrtime.bigint());
    if (wait <= 0) this.child.write(ctx, io);
    else ctx.defer(io.tag, wait, () => this.child.write(ctx, io));
  }
  flush(ctx: IoContext, tag: number): void {
    this.count(NodeStat.FLUSH_OPS, -1, 0);
    this.child.flush(ctx, tag);
  }
  discard(ctx: IoContext, tag: number, offset: number, length: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    this.child.discard(ctx, tag, offset, length);
  }
  writeZeroes(ctx: IoContext, tag: number, offset: number, length: number, unmap: boolean): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    this.child.writeZeroes(ctx, tag, offset, length, unmap);
  }
}

/**
 * The filter a mirror job puts above its source: reads come from the source, writes go to the
 * source and then the target. A per-chunk seqlock tells the background copy that a guest write
 * raced with its copy of that chunk, so it copies the chunk again.
 */
export class MirrorNode extends CountingNode implements BlockNode {
  private readonly source: BlockNode;
  private readonly target: BlockNode;
  private readonly chunks: Int32Array;
  private readonly chunkSize: number;
  constructor(spec: Extract<NodeSpec, { driver: 'mirror' }>, sources: SourceRegistry) {
    super(spec);
    this.source = buildNode(spec.source, sources);
    this.target = buildNode(spec.target, sources);
    this.chunks = new Int32Array(spec.chunks);
    this.chunkSize = spec.chunkSize;
  }
  private bracket(offset: number, length: number): void {
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.chunkSize);
    for (let c = first; c <= last && c < this.chunks.length; c++) Atomics.add(this.chunks, c, 1);
  }
  read(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.READ_OPS, NodeStat.READ_KIB, io.length);
    this.source.read(ctx, io);
  }
  write(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.WRITE_OPS, NodeStat.WRITE_KIB, io.length);
    this.onBoth(ctx, io.tag, io.offset, io.length, (n) => n.write(ctx, io));
  }
  /** Runs op on the source, then on the target; the chunks it covers stay odd until both are done. */
  private onBoth(ctx: IoContext, tag: number, offset: number, length: number, op: (n: BlockNode) => void): void {
    this.bracket(offset, length); // odd: write in progress
    ctx.then(tag, (res) => {
      if (res < 0) {
        this.bracket(offset, length);
        return res;
      }
      ctx.then(tag, (res2) => {
        this.bracket(offset, length); // even again: both copies written
        return res2 < 0 ? res2 : res;
      });
      op(this.target);
      return PENDING;
    });
    op(this.source);
  }
  flush(ctx: IoContext, tag: number): void {
    this.count(NodeStat.FLUSH_OPS, -1, 0);
    ctx.then(tag, (res) => {
      if (res < 0) return res;
      this.target.flush(ctx, tag);
      return PENDING;
    });
    this.source.flush(ctx, tag);
  }
  discard(ctx: IoContext, tag: number, offset: number, length: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    this.onBoth(ctx, tag, offset, length, (n) => n.discard(ctx, tag, offset, length));
  }
  writeZeroes(ctx: IoContext, tag: number, offset: number, length: number, unmap: boolean): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    this.onBoth(ctx, tag, offset, length, (n) => n.writeZeroes(ctx, tag, offset, length, unmap));
  }
}

export function buildNode(spec: NodeSpec, sources: SourceRegistry = NO_SOURCES): BlockNode {
  switch (spec.driver) {
    case 'file':
      return new FileNode(spec);
    case 'null':
      return new NullNode(spec);
    case 'throttle':
      return new ThrottleNode(spec, sources);
    case 'mirror':
      return new MirrorNode(spec, sources);
    case 'rbd':
      return new RbdNode(spec, sources);
    case 'nbd':
      return new NbdNode(spec, sources);
  }
}
