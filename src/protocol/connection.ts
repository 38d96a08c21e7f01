// A vhost-user byte stream on a non-blocking unix socket: reassembles header + payload frames,
// keeps the fds that arrived with each frame, and writes replies. It owns the socket fd and
// every fd it received until it hands them to the caller with a frame.
import { native, READABLE, type PollHandle } from '../native/index.js';
import { HEADER_SIZE, MAX_FDS_PER_MESSAGE } from './constants.js';
import { decodeHeader, ProtocolError, type Header } from './codec.js';

/** how long a reply may wait for room in the socket buffer before the connection is dropped */
const SEND_STALL_MS = 500;

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

  constructor(fd: number, private readonly events: ConnectionEvents) {
    this.fd = fd;
    this.poll = native.poll(fd, READABLE, (status) => this.onReadable(status));
  }

  get isOpen(): boolean {
    return this.open;
  }

  /** Stop reading frames (while an earlier message is still being handled). */
  pause(): void {
    if (!this.paused && this.open) {
      this.paused = true;
      this.poll?.stop();
    }
  }

  resume(): void {
    if (this.paused && this.open) {
      this.paused = false;
      this.poll?.start(READABLE);
    }
  }

  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (!this.open) throw new Error('connection closed');
    let off = 0;
    let first = true;
    let deadline = 0;
    while (off < bytes.byteLength) {
      const n = native.sendMsg(this.fd, bytes, off, bytes.byteLength - off, first ? fds : []);
      if (n < 0) {
        // Replies are tiny and a frontend waits for each one: a full socket buffer means the peer
        // stopped reading. Wait briefly (this blocks the main thread), then give up on it.
        const now = Date.now();
        if (deadline === 0) deadline = now + SEND_STALL_MS;
        else if (now >= deadline) throw new ProtocolError(`frontend is not reading its replies (socket buffer full for ${SEND_STALL_MS} ms)`);
        native.pollWait(Int32Array.of(this.fd), 0, new Int32Array(1), 10);
        continue;
      }
      first = false;
      off += n;
    }
  }

  close(reason: Error | null = null): void {
    if (!this.open) return;
    this.open = false;
    this.poll?.close();
    this.poll = null;
    for (const fd of this.pendingFds) native.close(fd);
    this.pendingFds = [];
    native.close(this.fd);
    this.events.closed(reason);
  }

  private onReadable(status: number): void {
    if (!this.open) return;
    if (status < 0) {
      this.close(new Error(`socket poll error ${status}`));
      return;
    }
    try {
      // Read frames until the socket is empty or the consumer pauses us.
      while (this.open && !this.paused && this.readSome()) {
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
