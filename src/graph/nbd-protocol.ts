// The NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md), client
// side: constants, request headers, and the fixed newstyle handshake as a pure state machine
// (bytes in, bytes out), so the main thread (node:net) and the workers (non-blocking fds) share it.

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n;
const OLDSTYLE_MAGIC = 0x00420281861253n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const REP_ACK = 1;
const REP_INFO = 3;
const REP_ERR = 0x80000000;
const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

/** transmission flags (NBD_FLAG_*) */
export const enum TxFlag {
  HAS_FLAGS = 1 << 0,
  READ_ONLY = 1 << 1,
  SEND_FLUSH = 1 << 2,
  SEND_FUA = 1 << 3,
  ROTATIONAL = 1 << 4,
  SEND_TRIM = 1 << 5,
  SEND_WRITE_ZEROES = 1 << 6,
  SEND_DF = 1 << 7,
  CAN_MULTI_CONN = 1 << 8,
}

export const enum Cmd {
  READ = 0,
  WRITE = 1,
  DISC = 2,
  FLUSH = 3,
  TRIM = 4,
  WRITE_ZEROES = 6,
}

export const enum CmdFlag {
  FUA = 1,
  NO_HOLE = 2,
}

export const enum Chunk {
  NONE = 0,
  OFFSET_DATA = 1,
  OFFSET_HOLE = 2,
  ERROR = 0x8001,
  ERROR_OFFSET = 0x8002,
}
export const CHUNK_FLAG_DONE = 1;
export const REQUEST_HEADER = 28;
export const SIMPLE_REPLY_HEADER = 16;
export const STRUCTURED_REPLY_HEADER = 20;

const OPT_ERRORS: Record<number, string> = {
  1: 'the server does not support this option (NBD_REP_ERR_UNSUP)',
  2: 'refused by server policy (NBD_REP_ERR_POLICY)',
  3: 'invalid option (NBD_REP_ERR_INVALID)',
  4: 'unsupported on this platform (NBD_REP_ERR_PLATFORM)',
  5: 'the server requires TLS (NBD_REP_ERR_TLS_REQD); vubd does not do NBD over TLS',
  6: 'no such export (NBD_REP_ERR_UNKNOWN)',
  7: 'the server is shutting down (NBD_REP_ERR_SHUTDOWN)',
  8: 'block size constraints not met (NBD_REP_ERR_BLOCK_SIZE_REQD)',
  9: 'export too big (NBD_REP_ERR_TOO_BIG)',
};

export interface ExportInfo {
  size: number;
  /** TxFlag bits */
  flags: number;
  structured: boolean;
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
}

export class NbdProtocolError extends Error {}

/** Writes a 28-byte request header at off. handle = hi << 32 | lo. */
export function encodeRequest(v: DataView, off: number, flags: number, type: number, lo: number, hi: number, offset: number, length: number): void {
  v.setUint32(off, REQUEST_MAGIC);
  v.setUint16(off + 4, flags);
  v.setUint16(off + 6, type);
  v.setUint32(off + 8, hi);
  v.setUint32(off + 12, lo);
  v.setUint32(off + 16, Math.floor(offset / 0x100000000));
  v.setUint32(off + 20, offset >>> 0);
  v.setUint32(off + 24, length);
}

/** The disconnect request (NBD_CMD_DISC), sent before a clean close. */
export function discRequest(): Uint8Array {
  const b = new Uint8Array(REQUEST_HEADER);
  encodeRequest(new DataView(b.buffer), 0, 0, Cmd.DISC, 0, 0, 0, 0);
  return b;
}

function u64(v: DataView, off: number): bigint {
  return v.getBigUint64(off);
}

/**
 * Client side of fixed newstyle negotiation: greeting, client flags, NBD_OPT_STRUCTURED_REPLY,
 * NBD_OPT_GO with the export name asking for NBD_INFO_BLOCK_SIZE. feed() what arrives, send what
 * takeOutput() returns; done() is the export once the server acked NBD_OPT_GO. Throws
 * NbdProtocolError with a message for the operator on any refusal or malformed message.
 */
export class NbdHandshake {
  private buf = new Uint8Array(0);
  private out: Uint8Array[] = [];
  private state: 'greeting' | 'structured' | 'go' | 'done' = 'greeting';
  private structured = false;
  private info: Partial<ExportInfo> = {};
  private result: ExportInfo | null = null;

  constructor(private readonly exportName: string) {
    if (Buffer.byteLength(exportName) > 4096) throw new NbdProtocolError('export name longer than 4096 bytes');
  }

  takeOutput(): Uint8Array | null {
    if (this.out.length === 0) return null;
    const all = Buffer.concat(this.out);
    this.out = [];
    return all;
  }

  done(): ExportInfo | null {
    return this.result;
  }

  feed(data: Uint8Array): void {
    if (this.state === 'done') throw new NbdProtocolError('the server sent data before any request');
    const b = new Uint8Array(this.buf.length + data.length);
    b.set(this.buf);
    b.set(data, this.buf.length);
    this.buf = b;
    while (this.step());
  }

  private take(n: number): DataView | null {
    if (this.buf.length < n) return null;
    const v = new DataView(this.buf.buffer, this.buf.byteOffset, n);
    this.buf = this.buf.subarray(n);
    return v;
  }

  private option(opt: number, data: Uint8Array): void {
    const h = new DataView(new ArrayBuffer(16));
    h.setBigUint64(0, IHAVEOPT);
    h.setUint32(8, opt);
    h.setUint32(12, data.length);
    this.out.push(new Uint8Array(h.buffer), data);
  }

  private sendGo(): void {
    const name = Buffer.from(this.exportName);
    const d = new DataView(new ArrayBuffer(4 + name.length + 4));
    d.setUint32(0, name.length);
    new Uint8Array(d.buffer).set(name, 4);
    d.setUint16(4 + name.length, 1);
    d.setUint16(6 + name.length, INFO_BLOCK_SIZE);
    this.option(OPT_GO, new Uint8Array(d.buffer));
  }

  private step(): boolean {
    if (this.state === 'greeting') {
      if (this.buf.length < 16) return false;
      const v = new DataView(this.buf.buffer, this.buf.byteOffset, 16);
      if (u64(v, 0) !== NBD_MAGIC) throw new NbdProtocolError('not an NBD server (no NBDMAGIC greeting)');
      if (u64(v, 8) === OLDSTYLE_MAGIC) throw new NbdProtocolError('the server speaks oldstyle NBD; vubd needs fixed newstyle (qemu-nbd, nbdkit and nbd-server do)');
      if (u64(v, 8) !== IHAVEOPT) throw new NbdProtocolError('bad NBD greeting (neither IHAVEOPT nor oldstyle)');
      const g = this.take(18);
      if (g === null) return false;
      const flags = g.getUint16(16);
      if ((flags & FLAG_FIXED_NEWSTYLE) === 0) throw new NbdProtocolError('the server does not offer fixed newstyle negotiation');
      const cf = new DataView(new ArrayBuffer(4));
      cf.setUint32(0, FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
      this.out.push(new Uint8Array(cf.buffer));
      this.option(OPT_STRUCTURED_REPLY, new Uint8Array(0));
      this.state = 'structured';
      return true;
    }
    if (this.buf.length < 20) return false;
    const h = new DataView(this.buf.buffer, this.buf.byteOffset, 20);
    if (u64(h, 0) !== OPT_REPLY_MAGIC) throw new NbdProtocolError('bad option reply magic from the server');
    const opt = h.getUint32(8);
    const type = h.getUint32(12);
    const len = h.getUint32(16);
    if (len > 65536) throw new NbdProtocolError(`option reply of ${len} bytes (too long)`);
    if (this.buf.length < 20 + len) return false;
    this.take(20);
    const data = this.take(len)!;
    const want = this.state === 'structured' ? OPT_STRUCTURED_REPLY : OPT_GO;
    if (opt !== want) throw new NbdProtocolError(`option reply for option ${opt}, expected ${want}`);
    if ((type & REP_ERR) !== 0) {
      if (this.state === 'structured') {
        this.structured = false; // an old server: simple replies only
        this.sendGo();
        this.state = 'go';
        return true;
      }
      const text = len > 0 ? `: ${Buffer.from(data.buffer, data.byteOffset, len).toString('utf8')}` : '';
      throw new NbdProtocolError(`export '${this.exportName}': ${OPT_ERRORS[type & 0x7fffffff] ?? `error ${type & 0x7fffffff}`}${text}`);
    }
    if (this.state === 'structured') {
      if (type !== REP_ACK) throw new NbdProtocolError(`unexpected reply ${type} to NBD_OPT_STRUCTURED_REPLY`);
      this.structured = true;
      this.sendGo();
      this.state = 'go';
      return true;
    }
    if (type === REP_INFO) {
      if (len < 2) throw new NbdProtocolError('NBD_REP_INFO without an info type');
      const it = data.getUint16(0);
      if (it === INFO_EXPORT) {
        if (len !== 12) throw new NbdProtocolError(`NBD_INFO_EXPORT of ${len} bytes (expected 12)`);
        const size = data.getBigUint64(2);
        if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdProtocolError(`export size ${size} too large`);
        this.info.size = Number(size);
        this.info.flags = data.getUint16(10);
      } else if (it === INFO_BLOCK_SIZE) {
        if (len !== 14) throw new NbdProtocolError(`NBD_INFO_BLOCK_SIZE of ${len} bytes (expected 14)`);
        this.info.minBlock = data.getUint32(2);
        this.info.preferredBlock = data.getUint32(6);
        this.info.maxBlock = data.getUint32(10);
      }
      return true;
    }
    if (type !== REP_ACK) throw new NbdProtocolError(`unexpected reply ${type} to NBD_OPT_GO`);
    if (this.info.size === undefined) throw new NbdProtocolError('the server acked NBD_OPT_GO without NBD_INFO_EXPORT');
    if (this.buf.length > 0) throw new NbdProtocolError('the server sent data before any request');
    this.result = {
      size: this.info.size,
      flags: this.info.flags!,
      structured: this.structured,
      minBlock: this.info.minBlock ?? 1,
      preferredBlock: this.info.preferredBlock ?? 4096,
      maxBlock: this.info.maxBlock ?? 32 * 1024 * 1024,
    };
    this.state = 'done';
    return false;
  }
}
