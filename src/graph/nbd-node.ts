// The nbd block node as a worker runs it: one NbdConnection per node instance (each queue context
// builds its own), registered as the queue's completion source.
//
// Flush across connections: a flush on one NBD connection covers writes completed on other
// connections only if the server offers NBD_FLAG_CAN_MULTI_CONN. Each queue has its own
// connection, and a virtio-blk flush must cover every write the device completed, on any queue.
// So without MULTI_CONN every write goes out with NBD_CMD_FLAG_FUA (durable when it completes),
// or, if the server lacks FUA too, is followed by a flush on its own connection before it
// completes. With MULTI_CONN writes are plain and a flush on any connection is enough.
import { native } from '../native/index.js';
import { CountingNode } from './counting-node.js';
import { NodeStat, PENDING, type BlockNode, type CompletionSource, type DataIo, type IoContext, type SourceRegistry } from './nodes.js';
import { Cmd, CmdFlag, TxFlag } from './nbd-protocol.js';
import { NbdConnection, NbdRequest, type NbdServer } from './nbd-connection.js';

export interface NbdNodeSpec {
  driver: 'nbd';
  name: string;
  size: number;
  readOnly: boolean;
  stats: SharedArrayBuffer;
  /** the address resolved by the main thread (a numeric host) */
  server: NbdServer;
  export: string;
  /** the export's size in bytes (size is rounded down to 512); a reconnect to another size fails */
  exportSize: number;
  /** transmission flags the main thread's connection saw */
  flags: number;
  reconnectDelayMs: number;
}

const RANGE_CHUNK = 1 << 30; // TRIM / WRITE_ZEROES lengths are 32-bit
const ZERO_CHUNK = 1 << 20;
let zeroBuf: ArrayBuffer | null = null;
let zeroAddr = 0;

export class NbdNode extends CountingNode implements BlockNode, CompletionSource {
  private readonly conn: NbdConnection;
  private readonly reqs: NbdRequest[] = [];
  private ctx: IoContext | null = null;
  private readonly flags: number;
  private readonly writeFlags: number;
  private readonly flushAfterWrite: boolean;
  private readonly zeroIov = new Float64Array(2);

  constructor(spec: NbdNodeSpec, sources: SourceRegistry) {
    super(spec);
    this.flags = spec.flags;
    const multi = (spec.flags & TxFlag.CAN_MULTI_CONN) !== 0;
    this.writeFlags = !multi && (spec.flags & TxFlag.SEND_FUA) !== 0 ? CmdFlag.FUA : 0;
    this.flushAfterWrite = !multi && this.writeFlags === 0 && (spec.flags & TxFlag.SEND_FLUSH) !== 0;
    this.conn = new NbdConnection({
      server: spec.server,
      exportName: spec.export,
      size: spec.exportSize,
      reconnectDelayMs: spec.reconnectDelayMs,
      done: (tag, res) => this.ctx!.engine.done(tag, res),
      log: (msg, data) => this.ctx?.logError(msg, { node: this.name, ...data }),
    });
    sources.addSource(this);
  }

  get pollFd(): number {
    return this.conn.pollFd;
  }
  get pollEvents(): number {
    return this.conn.pollEvents;
  }
  service(): void {
    this.conn.service();
  }
  msToNextWake(): number {
    return this.conn.msToNextWake();
  }
  close(): void {
    this.conn.close();
  }

  private req(ctx: IoContext, tag: number, type: number, flags: number, offset: number, length: number, iov: Float64Array | null, iovCount: number, success: number): void {
    this.ctx = ctx;
    const r = (this.reqs[tag] ??= new NbdRequest(tag));
    r.type = type;
    r.flags = flags;
    r.offset = offset;
    r.length = length;
    r.iov = iov;
    r.iovCount = iovCount;
    r.success = success;
    r.covered = 0;
    r.error = 0;
    r.suspect = 0;
    this.conn.submit(r);
  }

  read(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.READ_OPS, NodeStat.READ_KIB, io.length);
    this.req(ctx, io.tag, Cmd.READ, 0, io.offset, io.length, io.iov, io.iovCount, io.length);
  }

  write(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.WRITE_OPS, NodeStat.WRITE_KIB, io.length);
    if (this.flushAfterWrite) this.thenFlush(ctx, io.tag);
    this.req(ctx, io.tag, Cmd.WRITE, this.writeFlags, io.offset, io.length, io.iov, io.iovCount, io.length);
  }

  /** After the operation now issued for tag: a flush on this connection, then the operation's result. */
  private thenFlush(ctx: IoContext, tag: number): void {
    ctx.then(tag, (res) => {
      if (res < 0) return res;
      ctx.then(tag, (f) => (f < 0 ? f : res));
      this.req(ctx, tag, Cmd.FLUSH, 0, 0, 0, null, 0, 0);
      return PENDING;
    });
  }

  flush(ctx: IoContext, tag: number): void {
    this.count(NodeStat.FLUSH_OPS, -1, 0);
    if ((this.flags & TxFlag.SEND_FLUSH) === 0) {
      ctx.engine.done(tag, 0); // no write cache on the server side to flush
      return;
    }
    this.req(ctx, tag, Cmd.FLUSH, 0, 0, 0, null, 0, 0);
  }

  discard(ctx: IoContext, tag: number, offset: number, length: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    if ((this.flags & TxFlag.SEND_TRIM) === 0) {
      ctx.engine.done(tag, 0); // discard is a hint
      return;
    }
    this.ranged(ctx, tag, Cmd.TRIM, 0, offset, length, RANGE_CHUNK);
  }

  writeZeroes(ctx: IoContext, tag: number, offset: number, length: number, unmap: boolean): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    if (this.flushAfterWrite) this.thenFlush(ctx, tag);
    if ((this.flags & TxFlag.SEND_WRITE_ZEROES) !== 0) {
      this.ranged(ctx, tag, Cmd.WRITE_ZEROES, this.writeFlags | (unmap ? 0 : CmdFlag.NO_HOLE), offset, length, RANGE_CHUNK);
    } else {
      this.ranged(ctx, tag, Cmd.WRITE, this.writeFlags, offset, length, ZERO_CHUNK);
    }
  }

  /** One request per chunk of the range, one after another; a WRITE carries zeroes. */
  private ranged(ctx: IoContext, tag: number, type: number, flags: number, offset: number, length: number, chunk: number): void {
    const n = Math.min(length, chunk);
    if (n < length) {
      ctx.then(tag, (res) => {
        if (res < 0) return res;
        this.ranged(ctx, tag, type, flags, offset + n, length - n, chunk);
        return PENDING;
      });
    }
    if (type === Cmd.WRITE) {
      if (zeroBuf === null) {
        zeroBuf = new ArrayBuffer(ZERO_CHUNK);
        zeroAddr = native.addressOf(zeroBuf);
      }
      this.zeroIov[0] = zeroAddr;
      this.zeroIov[1] = n;
      this.req(ctx, tag, type, flags, offset, n, this.zeroIov, 1, 0);
    } else this.req(ctx, tag, type, flags, offset, n, null, 0, 0);
  }
}

