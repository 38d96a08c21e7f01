// One NBD connection of a worker (one per queue context's nbd node): a non-blocking state machine
// DOWN -> CONNECTING -> NEGOTIATING -> READY driven by service(). Requests are pipelined by handle
// (low 32 bits: the tag, high 32 bits: a send sequence number, so a reply can only complete the
// send it answers). Writes go out as header + guest iov in one sendmsg, read payloads land straight
// in the guest iov; partial transfers are kept in the send batch / receive state.
import fs from 'node:fs';
import { native, POLLIN, POLLOUT } from '../native/index.js';
import {
  Chunk, CHUNK_FLAG_DONE, Cmd, encodeRequest, NbdHandshake, NbdProtocolError, REQUEST_HEADER, SIMPLE_REPLY_HEADER, SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER, STRUCTURED_REPLY_MAGIC, discRequest, type ExportInfo,
} from './nbd-protocol.js';
import { advanceIov, nbdErrno, sliceIov } from './nbd-iov.js';

const EAGAIN = 11;
const EIO = 5;
const ATTEMPT_MS = 5000; // one connect + handshake
const BACKOFF_MIN_MS = 50;
const BACKOFF_MAX_MS = 2000;
const BATCH_REQS = 64;
const BATCH_IOV = 1026;
const ERR_MAX = 8192;

export type NbdServer = { type: 'inet'; host: string; port: number } | { type: 'unix'; path: string };

export interface NbdConnectionOptions {
  server: NbdServer;
  exportName: string;
  /** the size the main thread saw; a reconnect to an export of another size fails */
  size: number;
  /** QEMU's reconnect-delay: how long requests wait for the server to come back (0: fail at once) */
  reconnectDelayMs: number;
  done(tag: number, res: number): void;
  log(msg: string, data: Record<string, unknown>): void;
}

export class NbdRequest {
  type = 0;
  flags = 0;
  offset = 0;
  length = 0;
  iov: Float64Array | null = null;
  iovCount = 0;
  /** the result on success (bytes for read/write, 0 otherwise) */
  success = 0;
  hi = 0;
  covered = 0;
  error = 0;
  /** protocol violations it was in flight for, when the culprit was unknown */
  suspect = 0;
  constructor(readonly tag: number) {}
}

const enum St { DOWN, CONNECTING, NEGOTIATING, READY }
const enum Rx { HDR, HDR_S, DATA_OFFSET, HOLE, ERROR, PAYLOAD }

let devZero = -1;
function zeroFill(iov: Float64Array, count: number): void {
  if (devZero < 0) devZero = fs.openSync('/dev/zero', 'r');
  native.preadv(devZero, iov, count, 0); // the kernel fills guest memory with zeroes, no copy here
}

export class NbdConnection {
  private st = St.DOWN;
  private fd = -1;
  private hs: NbdHandshake | null = null;
  private hsOut: Uint8Array | null = null;
  private readonly hsBuf = new Uint8Array(4096);
  info: ExportInfo | null = null;
  private downSince = -1;
  private nextAttempt = 0;
  private attempts = 0;
  private attemptDeadline = 0;
  private lastError = '';
  private seq = 0;

  private readonly queue: NbdRequest[] = [];
  private readonly inflight: (NbdRequest | undefined)[] = [];
  private inflightCount = 0;

  // send batch: headers + guest iovs of up to BATCH_REQS requests in one sendmsg
  private readonly hdrBuf = new ArrayBuffer(REQUEST_HEADER * BATCH_REQS);
  private readonly hdrView = new DataView(this.hdrBuf);
  private readonly hdrAddr = native.addressOf(this.hdrBuf);
  private readonly bIov = new Float64Array(2 * BATCH_IOV);
  private bStart = 0;
  private bCount = 0;
  private sendBlocked = false;

  // receive state
  private rx = Rx.HDR;
  private readonly rxBuf = new ArrayBuffer(ERR_MAX);
  private readonly rxView = new DataView(this.rxBuf);
  private readonly rxBytes = new Uint8Array(this.rxBuf);
  private readonly rxAddr = native.addressOf(this.rxBuf);
  private readonly rxIov = new Float64Array(2);
  private rxHave = 0;
  private rxWant = SIMPLE_REPLY_HEADER;
  private cur: NbdRequest | null = null;
  private curFlags = 0;
  private curLen = 0;
  private pIov = new Float64Array(2 * BATCH_IOV);
  private pStart = 0;
  private pCount = 0;
  private pLeft = 0;

  constructor(private readonly o: NbdConnectionOptions) {}

  get pollFd(): number {
    if (this.st === St.DOWN) return -1;
    if (this.st === St.READY && this.inflightCount === 0 && this.queue.length === 0) return -1;
    return this.fd;
  }

  get pollEvents(): number {
    if (this.st === St.CONNECTING) return POLLOUT;
    if (this.st === St.NEGOTIATING) return POLLIN | (this.hsOut !== null ? POLLOUT : 0);
    return POLLIN | (this.sendBlocked ? POLLOUT : 0);
  }

  msToNextWake(): number {
    const now = performance.now();
    if (this.st === St.CONNECTING || this.st === St.NEGOTIATING) return Math.max(0, Math.ceil(this.attemptDeadline - now));
    if (this.st === St.DOWN && this.queue.length > 0) return Math.max(0, Math.ceil(this.nextAttempt - now));
    return -1;
  }

  /** Queues a request; service() sends it (one sendmsg for all requests started in a round). */
  submit(r: NbdRequest): void {
    const now = performance.now();
    if (this.st === St.READY && this.inflightCount === 0 && this.queue.length === 0) this.probeIdle();
    if (this.st === St.DOWN) {
      if (this.downSince < 0) this.downSince = now;
      else if (this.pastDeadline(now) && now < this.nextAttempt) {
        this.o.done(r.tag, -EIO); // the reconnect window is over and the next attempt is not due
        return;
      }
    }
    this.queue.push(r);
  }

  service(): void {
    for (let i = 0; i < 4; i++) {
      const before = this.st;
      this.step();
      if (this.st === before) return;
    }
  }

  close(): void {
    if (this.st === St.READY) {
      try {
        const d = discRequest();
        native.sendMsg(this.fd, d, 0, d.length, []);
      } catch {
        /* the server is gone anyway */
      }
    }
    this.closeFd();
    this.queue.length = 0;
    this.inflight.length = 0;
    this.inflightCount = 0;
    this.st = St.DOWN;
  }

  private pastDeadline(now: number): boolean {
    return this.downSince >= 0 && now >= this.downSince + this.o.reconnectDelayMs;
  }

  private step(): void {
    switch (this.st) {
      case St.DOWN:
        if (this.queue.length > 0 && performance.now() >= this.nextAttempt) this.startAttempt();
        return;
      case St.CONNECTING: {
        const rev = new Int32Array(1);
        native.pollWait(new Int32Array([this.fd]), 1, rev, 0, new Int32Array([POLLOUT]));
        if (rev[0] !== 0) {
          const err = native.socketError(this.fd);
          if (err !== 0) this.attemptFailed(`connect: errno ${err}`);
          else this.startHandshake();
        } else if (performance.now() > this.attemptDeadline) this.attemptFailed('connect timed out');
        return;
      }
      case St.NEGOTIATING:
        this.negotiate();
        if (this.st === St.NEGOTIATING && performance.now() > this.attemptDeadline) this.attemptFailed('negotiation timed out');
        return;
      case St.READY:
        if (this.queue.length > 0 || this.bCount > 0) this.send();
        if (this.st === St.READY && this.inflightCount > 0) this.receive();
    }
  }

  private startAttempt(): void {
    const s = this.o.server;
    try {
      const c = s.type === 'unix' ? native.streamConnect('unix', s.path, 0) : native.streamConnect('inet', s.host, s.port);
      this.fd = c.fd;
      this.attemptDeadline = performance.now() + ATTEMPT_MS;
      if (c.pending) this.st = St.CONNECTING;
      else this.startHandshake();
    } catch (e) {
      this.attemptFailed((e as Error).message);
    }
  }

  private startHandshake(): void {
    this.hs = new NbdHandshake(this.o.exportName);
    this.hsOut = null;
    this.st = St.NEGOTIATING;
  }

  private negotiate(): void {
    const hs = this.hs!;
    try {
      for (;;) {
        if (this.hsOut !== null) {
          const n = native.sendMsg(this.fd, this.hsOut, 0, this.hsOut.length, []);
          if (n < 0) return; // EAGAIN: POLLOUT wakes us
          this.hsOut = n < this.hsOut.length ? this.hsOut.subarray(n) : null;
          if (this.hsOut !== null) continue;
        }
        const r = native.recvMsg(this.fd, this.hsBuf, 0, this.hsBuf.length, 0);
        if (r === null) return;
        if (r.n === 0) throw new NbdProtocolError('the server closed the connection during negotiation');
        hs.feed(this.hsBuf.subarray(0, r.n));
        this.hsOut = hs.takeOutput();
        const info = hs.done();
        if (info !== null) {
          if (info.size !== this.o.size) throw new NbdProtocolError(`export size is now ${info.size}, was ${this.o.size}`);
          this.ready(info);
          return;
        }
      }
    } catch (e) {
      this.attemptFailed((e as Error).message);
    }
  }

  private ready(info: ExportInfo): void {
    this.info = info;
    this.st = St.READY;
    if (this.attempts > 0 || this.lastError !== '') {
      this.o.log(`nbd: reconnected to ${this.describe()} after ${this.attempts + 1} attempt(s)`, { nbdExport: this.o.exportName });
    }
    this.attempts = 0;
    this.lastError = '';
    this.rx = Rx.HDR;
    this.rxHave = 0;
    this.rxWant = SIMPLE_REPLY_HEADER;
  }

  private describe(): string {
    const s = this.o.server;
    return s.type === 'unix' ? `unix:${s.path}` : `${s.host}:${s.port}`;
  }

  private attemptFailed(msg: string): void {
    this.closeFd();
    this.st = St.DOWN;
    this.attempts++;
    const now = performance.now();
    this.nextAttempt = now + Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this.attempts, 10));
    if (this.attempts === 1 || msg !== this.lastError) {
      this.o.log(`nbd: cannot connect to ${this.describe()} export '${this.o.exportName}': ${msg}`, { nbdExport: this.o.exportName, attempts: this.attempts });
    }
    this.lastError = msg;
    if (this.pastDeadline(now)) this.failQueued();
  }

  private failQueued(): void {
    const q = this.queue.splice(0);
    for (const r of q) this.o.done(r.tag, -EIO);
  }

  private closeFd(): void {
    if (this.fd >= 0) native.close(this.fd);
    this.fd = -1;
    this.bCount = 0;
    this.bStart = 0;
    this.sendBlocked = false;
    this.hs = null;
    this.hsOut = null;
  }

  /** The connection broke: what was sent goes back to the queue (reads and writes are idempotent). */
  private lost(reason: string): void {
    this.closeFd();
    this.st = St.DOWN;
    const resend: NbdRequest[] = [];
    for (const r of this.inflight) if (r !== undefined) resend.push(r);
    resend.sort((a, b) => a.hi - b.hi);
    this.inflight.length = 0;
    this.inflightCount = 0;
    for (const r of resend) {
      r.covered = 0;
      r.error = 0;
    }
    this.queue.unshift(...resend);
    const now = performance.now();
    // the reconnect window runs from the first loss until a reply proves a new connection works
    if (this.downSince < 0) this.downSince = now;
    this.nextAttempt = now;
    const giveUp = this.o.reconnectDelayMs <= 0 || this.pastDeadline(now);
    this.lastError = reason;
    this.o.log(
      `nbd: connection to ${this.describe()} lost: ${reason}; ${this.queue.length} request(s) ${giveUp ? `fail (reconnect-delay ${this.o.reconnectDelayMs / 1000} s is over)` : `wait up to ${this.o.reconnectDelayMs / 1000} s (reconnect-delay)`}`,
      { nbdExport: this.o.exportName },
    );
    if (giveUp) this.failQueued();
  }

  /**
   * A reply that breaks the protocol: its request fails and the connection is dropped. When the
   * reply names no request we know (bad magic, unknown handle), every request in flight is
   * suspect: it is resent once, and fails if the server breaks the protocol again meanwhile.
   */
  private violation(msg: string, r: NbdRequest | null): void {
    if (r !== null && this.inflight[r.tag] === r) this.finish(r, -EIO);
    else {
      for (const x of this.inflight) if (x !== undefined && ++x.suspect >= 2) this.finish(x, -EIO);
    }
    this.lost(`protocol violation by the server: ${msg}`);
  }

  /** Before the first request on an idle connection: has the server hung up meanwhile? */
  private probeIdle(): void {
    this.rxIov[0] = this.rxAddr + this.rxHave;
    this.rxIov[1] = 1;
    const n = native.recvv(this.fd, this.rxIov, 1);
    if (n === -EAGAIN) return;
    this.lost(n === 0 ? 'the server closed the connection' : n > 0 ? 'data from the server with no request outstanding' : `recv: errno ${-n}`);
  }

  private send(): void {
    for (;;) {
      if (this.bCount === 0 && !this.buildBatch()) return;
      const n = native.sendv(this.fd, this.bIov.subarray(2 * this.bStart), this.bCount - this.bStart);
      if (n === -EAGAIN) {
        this.sendBlocked = true;
        return;
      }
      if (n <= 0) {
        this.lost(`send: errno ${-n}`);
        return;
      }
      this.sendBlocked = false;
      this.bStart = advanceIov(this.bIov, this.bStart, this.bCount, n);
      if (this.bStart < this.bCount) continue;
      this.bCount = 0;
      this.bStart = 0;
    }
  }

  private buildBatch(): boolean {
    const q = this.queue;
    let k = 0;
    let c = 0;
    while (k < q.length && k < BATCH_REQS) {
      const r = q[k]!;
      const data = r.type === Cmd.WRITE ? r.iovCount : 0;
      if (c + 1 + data > BATCH_IOV) {
        if (k === 0) throw new RangeError(`nbd request with ${data} segments`);
        break;
      }
      r.hi = this.seq = (this.seq + 1) >>> 0;
      encodeRequest(this.hdrView, k * REQUEST_HEADER, r.flags, r.type, r.tag, r.hi, r.offset, r.length);
      this.bIov[2 * c] = this.hdrAddr + k * REQUEST_HEADER;
      this.bIov[2 * c + 1] = REQUEST_HEADER;
      c++;
      for (let i = 0; i < data; i++, c++) {
        this.bIov[2 * c] = r.iov![2 * i]!;
        this.bIov[2 * c + 1] = r.iov![2 * i + 1]!;
      }
      this.inflight[r.tag] = r; // a reply may come before the rest of the batch is out
      this.inflightCount++;
      k++;
    }
    q.splice(0, k);
    this.bCount = c;
    this.bStart = 0;
    return c > 0;
  }

  /**
   * Reads replies until the socket is empty. At a header boundary it asks for up to 28 bytes
   * (a structured header and a data chunk's offset; bytes past the header are always header or
   * chunk bytes, never payload), and a payload read carries the next header along, so a read
   * reply takes one recvmsg in the steady state. Leftover bytes stay at the front of rxBuf.
   */
  private receive(): void {
    const ra = this.info!.structured ? STRUCTURED_REPLY_HEADER + 8 : SIMPLE_REPLY_HEADER;
    for (;;) {
      if (this.rx !== Rx.PAYLOAD && this.rxHave >= this.rxWant) {
        if (!this.parse()) return;
        if (this.inflightCount === 0 && this.rx === Rx.HDR && this.rxHave === 0) return;
        continue;
      }
      let n: number;
      let pay = 0;
      if (this.rx === Rx.PAYLOAD) {
        pay = this.pLeft;
        this.pIov[2 * this.pCount] = this.rxAddr; // rxHave is 0 here: the offset was consumed
        this.pIov[2 * this.pCount + 1] = ra;
        n = native.recvv(this.fd, this.pIov.subarray(2 * this.pStart), this.pCount + 1 - this.pStart);
      } else {
        const want = this.rx === Rx.HDR || this.rx === Rx.HDR_S ? Math.max(this.rxWant, ra) : this.rxWant;
        this.rxIov[0] = this.rxAddr + this.rxHave;
        this.rxIov[1] = want - this.rxHave;
        n = native.recvv(this.fd, this.rxIov, 1);
      }
      if (n === -EAGAIN) return;
      if (n <= 0) {
        // Cut off in the middle of a reply: that request is resent once, and fails if it happens again.
        const r = this.cur;
        const mid = r !== null && this.inflight[r.tag] === r;
        if (mid && ++r.suspect >= 2) this.finish(r, -EIO);
        this.lost(`${n === 0 ? 'the server closed the connection' : `recv: errno ${-n}`}${mid ? ' in the middle of a reply' : ''}`);
        return;
      }
      if (this.rx === Rx.PAYLOAD) {
        const got = n < pay ? n : pay;
        this.pStart = advanceIov(this.pIov, this.pStart, this.pCount, got);
        this.pLeft -= got;
        this.rxHave = n - got;
        if (this.pLeft > 0) continue;
        this.cur!.covered += this.curLen;
        if (!this.chunkDone()) return;
        continue;
      }
      this.rxHave += n;
    }
  }

  /** Drops the first n bytes of rxBuf (a parsed part); what follows moves to the front. */
  private consume(n: number): void {
    if (this.rxHave > n) this.rxBytes.copyWithin(0, n, this.rxHave);
    this.rxHave -= n;
  }

  private expectHeader(): void {
    this.rx = Rx.HDR;
    this.rxWant = SIMPLE_REPLY_HEADER;
    this.cur = null;
  }

  private lookup(v: DataView): NbdRequest | null {
    const hi = v.getUint32(8);
    const lo = v.getUint32(12);
    const r = lo < this.inflight.length ? this.inflight[lo] : undefined;
    return r !== undefined && r.hi === hi ? r : null;
  }

  /** A fixed-size part arrived; false when the connection was dropped. */
  private parse(): boolean {
    const v = this.rxView;
    switch (this.rx) {
      case Rx.HDR: {
        const magic = v.getUint32(0);
        if (magic === STRUCTURED_REPLY_MAGIC) {
          this.rx = Rx.HDR_S;
          this.rxWant = STRUCTURED_REPLY_HEADER;
          return true;
        }
        if (magic !== SIMPLE_REPLY_MAGIC) return this.violation(`bad reply magic 0x${magic.toString(16)}`, null), false;
        const r = this.lookup(v);
        if (r === null) return this.violation(`reply for unknown handle 0x${v.getBigUint64(8).toString(16)}`, null), false;
        const err = v.getUint32(4);
        this.consume(SIMPLE_REPLY_HEADER);
        if (err !== 0 || r.type !== Cmd.READ) {
          this.finish(r, err !== 0 ? -nbdErrno(err) : r.success);
          this.expectHeader();
          return true;
        }
        // the bytes read along with the header would be payload
        if (this.info!.structured) return this.violation('a simple reply with data to a read (structured replies were negotiated)', r), false;
        this.cur = r;
        this.curFlags = CHUNK_FLAG_DONE;
        this.curLen = r.length;
        r.covered = 0;
        return this.payload(r, 0, r.length);
      }
      case Rx.HDR_S: {
        const r = this.lookup(v);
        if (r === null) return this.violation(`structured reply for unknown handle 0x${v.getBigUint64(8).toString(16)}`, null), false;
        const flags = v.getUint16(4);
        const type = v.getUint16(6);
        const len = v.getUint32(16);
        this.cur = r;
        this.curFlags = flags;
        this.curLen = len;
        this.consume(STRUCTURED_REPLY_HEADER);
        if (type === Chunk.NONE) {
          if (len !== 0 || (flags & CHUNK_FLAG_DONE) === 0) return this.violation('NBD_REPLY_TYPE_NONE with a payload or without DONE', r), false;
          return this.chunkDone();
        }
        if (type === Chunk.OFFSET_DATA || type === Chunk.OFFSET_HOLE) {
          if (r.type !== Cmd.READ) return this.violation(`data chunk for a non-read request`, r), false;
          if (type === Chunk.OFFSET_DATA ? len <= 8 : len !== 12) return this.violation(`chunk type ${type} of length ${len}`, r), false;
          this.rx = type === Chunk.OFFSET_DATA ? Rx.DATA_OFFSET : Rx.HOLE;
          this.rxWant = type === Chunk.OFFSET_DATA ? 8 : 12;
          return true;
        }
        if ((type & 0x8000) !== 0) {
          if (len < 6 || len > ERR_MAX) return this.violation(`error chunk of length ${len}`, r), false;
          this.rx = Rx.ERROR;
          this.rxWant = len;
          return true;
        }
        return this.violation(`unknown chunk type ${type}`, r), false;
      }
      case Rx.DATA_OFFSET:
      case Rx.HOLE: {
        const r = this.cur!;
        const off = Number(v.getBigUint64(0));
        const len = this.rx === Rx.HOLE ? v.getUint32(8) : this.curLen - 8;
        this.consume(this.rx === Rx.HOLE ? 12 : 8);
        if (off < r.offset || off + len > r.offset + r.length || len === 0) return this.violation(`chunk [${off}, +${len}) outside the read [${r.offset}, +${r.length})`, r), false;
        if (this.rx === Rx.HOLE) {
          const cnt = sliceIov(r.iov!, r.iovCount, off - r.offset, len, this.pIov);
          zeroFill(this.pIov, cnt);
          r.covered += len;
          return this.chunkDone();
        }
        this.curLen = len;
        return this.payload(r, off - r.offset, len);
      }
      case Rx.ERROR: {
        const r = this.cur!;
        const err = v.getUint32(0);
        const msgLen = v.getUint16(4);
        this.consume(this.rxWant);
        if (err === 0 || 6 + msgLen > this.curLen) return this.violation('error chunk with error 0 or a message longer than the chunk', r), false;
        if (r.error === 0) r.error = err;
        return this.chunkDone();
      }
      default:
        return true;
    }
  }

  private payload(r: NbdRequest, skip: number, len: number): boolean {
    this.pCount = sliceIov(r.iov!, r.iovCount, skip, len, this.pIov);
    this.pStart = 0;
    this.pLeft = len;
    this.rx = Rx.PAYLOAD;
    return true;
  }

  /** The current chunk is complete; false when the connection was dropped. */
  private chunkDone(): boolean {
    const r = this.cur!;
    if ((this.curFlags & CHUNK_FLAG_DONE) !== 0) {
      if (r.error !== 0) this.finish(r, -nbdErrno(r.error));
      else if (r.type === Cmd.READ && r.covered !== r.length) return this.violation(`read of ${r.length} bytes answered with ${r.covered}`, r), false;
      else this.finish(r, r.success);
    }
    this.expectHeader();
    return true;
  }

  private finish(r: NbdRequest, res: number): void {
    this.inflight[r.tag] = undefined;
    this.inflightCount--;
    this.downSince = -1; // an answer (even an error) from this connection
    this.o.done(r.tag, res);
  }
}

