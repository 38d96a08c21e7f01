// A vhost-user byte stream on a non-blocking unix socket: reassembles header + payload frames,
// keeps the fds that arrived with each frame, and writes replies without ever blocking the event
// loop (what the socket does not take waits in order for WRITABLE). It owns the socket fd, every
// fd it received until it hands them to the caller with a frame, and its copies of queued fds.
import { native, isErrno, READABLE, WRITABLE, type PollHandle } from '../native/index.js';
import { HEADER_SIZE, MAX_FDS_PER_MESSAGE } from './constants.js';
import { decodeHeader, ProtocolError, type Header } from './codec.js';

/** how long queued replies may wait for the socket to take a byte before the connection is dropped */
export const SEND_STALL_MS = 500;
/** queued reply bytes beyond which we stop reading requests: a peer that never reads costs bounded memory */
const OUTGOING_HIGH_WATER = 64 * 1024;

interface Outgoing {
  bytes: Uint8Array;
  off: number;
  /** our dups, sent with the first byte and closed once sent (the caller closes its own at once) */
  fds: number[];
}

export interface Frame {
  header: Header;
  payload: Uint8Array;
  /** owned by the receiver of the frame */
  fds: number[];
}

export interface ConnectionEvents {
  frame(frame: Frame): void;
  /** reason is null for an orderly close by the peer */
  closed(reason: Error | null): void;
}

/** A reply found the frontend gone (it hung up while its message was handled): a close, not a fault. */
export class PeerGoneError extends Error {}

export class Connection {
  readonly fd: number;
  private poll: PollHandle | null;
  private readonly headerBuf = new Uint8Array(HEADER_SIZE);
  private header: Header | null = null;
  private payload = new Uint8Array(0);
  private filled = 0;
  private pendingFds: number[] = [];
  private open = true;
  private paused = false;
  private readonly outgoing: Outgoing[] = [];
  private outgoingBytes = 0;
  private stallTimer: NodeJS.Timeout | null = null;
  private polled = READABLE;

  constructor(fd: number, private readonly events: ConnectionEvents) {
    this.fd = fd;
    this.poll = native.poll(fd, READABLE, (status, ev) => this.onPoll(status, ev));
  }

  get isOpen(): boolean {
    return this.open;
  }

  /** Stop reading frames (while an earlier message is still being handled). */
  pause(): void {
    if (!this.paused && this.open) {
      this.paused = true;
      this.updatePoll();
    }
  }

  resume(): void {
    if (this.paused && this.open) {
      this.paused = false;
      this.updatePoll();
    }
  }

  /** bytes of replies waiting for room in the socket */
  get queuedBytes(): number {
    return this.outgoingBytes;
  }

  /**
   * Sends a message after every earlier one. What the socket does not take now is queued (with
   * copies of `fds`, which stay the caller's) and written when the socket is writable; if it takes
   * nothing for SEND_STALL_MS the connection is closed. Throws only if the connection is closed or
   * the socket fails now.
   */
  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (!this.open) throw new Error('connection closed');
    let off = 0;
    if (this.outgoing.length === 0) {
      let n: number;
      try {
        n = native.sendMsg(this.fd, bytes, 0, bytes.byteLength, fds);
      } catch (e) {
        if (isErrno(e, 'EPIPE') || isErrno(e, 'ECONNRESET')) throw new PeerGoneError(`the frontend went away before the reply (${(e as Error).message})`);
        throw e;
      }
      if (n === bytes.byteLength) return;
      off = Math.max(n, 0);
    }
    const own = off === 0 ? fds.map((fd) => native.dup(fd)) : [];
    this.outgoing.push({ bytes, off, fds: own });
    this.outgoingBytes += bytes.byteLength - off;
    if (this.stallTimer === null) this.armStallTimer();
    this.updatePoll();
  }

  private armStallTimer(): void {
    if (this.stallTimer !== null) clearTimeout(this.stallTimer);
    this.stallTimer = setTimeout(() => {
      this.stallTimer = null;
      this.close(new ProtocolError(`frontend is not reading its replies (socket buffer full for ${SEND_STALL_MS} ms)`));
    }, SEND_STALL_MS);
  }

  /** Writes queued replies in order until the socket is full; any progress restarts the stall timer. */
  private flush(): void {
    let progressed = false;
    while (this.open && this.outgoing.length > 0) {
      const m = this.outgoing[0]!;
      const n = native.sendMsg(this.fd, m.bytes, m.off, m.bytes.byteLength - m.off, m.off === 0 ? m.fds : []);
      if (n < 0) break;
      progressed = true;
      if (m.off === 0) m.fds.splice(0).forEach((fd) => native.close(fd));
      m.off += n;
      this.outgoingBytes -= n;
      if (m.off === m.bytes.byteLength) this.outgoing.shift();
    }
    if (!this.open) return;
    if (this.outgoing.length === 0) {
      if (this.stallTimer !== null) clearTimeout(this.stallTimer);
      this.stallTimer = null;
    } else if (progressed) this.armStallTimer();
    this.updatePoll();
  }

  private updatePoll(): void {
    if (!this.open || this.poll === null) return;
    let events = 0;
    if (!this.paused && this.outgoingBytes < OUTGOING_HIGH_WATER) events |= READABLE;
    if (this.outgoing.length > 0) events |= WRITABLE;
    if (events === this.polled) return;
    this.polled = events;
    if (events === 0) this.poll.stop();
    else this.poll.start(events);
  }

  close(reason: Error | null = null): void {
    if (!this.open) return;
    this.open = false;
    this.poll?.close();
    this.poll = null;
    if (this.stallTimer !== null) clearTimeout(this.stallTimer);
    this.stallTimer = null;
    for (const m of this.outgoing.splice(0)) m.fds.forEach((fd) => native.close(fd));
    this.outgoingBytes = 0;
    for (const fd of this.pendingFds) native.close(fd);
    this.pendingFds = [];
    native.close(this.fd);
    this.events.closed(reason);
  }

  private onPoll(status: number, events: number): void {
    if (!this.open) return;
    if (status < 0) {
      this.close(new Error(`socket poll error ${status}`));
      return;
    }
    try {
      if (events & WRITABLE) this.flush();
      // Read frames until the socket is empty, the consumer pauses us or replies pile up.
      while (this.open && !this.paused && this.outgoingBytes < OUTGOING_HIGH_WATER && this.readSome()) {
        /* keep reading */
      }
    } catch (e) {
      this.close(e instanceof Error ? e : new Error(String(e)));
    }
  }

  /** Returns false when the socket has nothing more to give right now. */
  private readSome(): boolean {
    const target = this.header === null ? this.headerBuf : this.payload;
    const want = target.byteLength - this.filled;
    if (want > 0) {
      const r = native.recvMsg(this.fd, target, this.filled, want, MAX_FDS_PER_MESSAGE);
      if (r === null) return false;
      for (const fd of r.fds) this.pendingFds.push(fd);
      if (r.truncated) throw new ProtocolError(`more than ${MAX_FDS_PER_MESSAGE} fds in one message`);
      if (r.n === 0) {
        this.close(this.header !== null || this.filled > 0 ? new ProtocolError('peer closed mid-message') : null);
        return false;
      }
      this.filled += r.n;
      if (this.filled < target.byteLength) return true;
    }
    if (this.header === null) {
      this.header = decodeHeader(this.headerBuf);
      this.payload = new Uint8Array(this.header.size);
      this.filled = 0;
      if (this.header.size > 0) return true;
    }
    const frame: Frame = { header: this.header, payload: this.payload, fds: this.pendingFds };
    this.header = null;
    this.payload = new Uint8Array(0);
    this.filled = 0;
    this.pendingFds = [];
    this.events.frame(frame);
    return true;
  }
}
