// Storage I/O the main thread starts for itself (the mirror job's background copy and its final
// flush). It goes through an io_uring ring whose fd is polled on the Node event loop, so a slow
// or stuck disk never holds up vhost-user messages or QMP: no extra thread, completions arrive
// like any other event. Without io_uring it falls back to synchronous syscalls (invariant 6).
import { native, READABLE, type PollHandle, type Ring } from '../native/index.js';
import { uringUnavailable } from './io-engine.js';

export interface BackgroundIo {
  readonly kind: 'io_uring' | 'sync';
  /** reads up to length bytes at fileOffset into buf[0, length); resolves with the count or -errno */
  read(fd: number, buf: ArrayBuffer, length: number, fileOffset: number): Promise<number>;
  /** writes buf[0, length) at fileOffset; resolves with the count or -errno */
  write(fd: number, buf: ArrayBuffer, length: number, fileOffset: number): Promise<number>;
  /** resolves with 0 or -errno */
  fsync(fd: number, datasync: boolean): Promise<number>;
  close(): void;
}

interface Op {
  type: 'read' | 'write' | 'fsync';
  fd: number;
  /** held here until the kernel is done with it */
  buf: ArrayBuffer | null;
  length: number;
  fileOffset: number;
  /** bytes a read or write moved so far (it goes on after a short transfer) */
  done: number;
  datasync: boolean;
  resolve(res: number): void;
  reject(e: Error): void;
}

const ENTRIES = 32;

export class UringBackgroundIo implements BackgroundIo {
  readonly kind = 'io_uring' as const;
  private readonly ring: Ring;
  private readonly poll: PollHandle;
  private polling = false;
  private readonly iov = new Float64Array(2);
  private readonly completions = new Float64Array(2 * ENTRIES);
  private readonly freeTags: number[] = [];
  private readonly byTag: (Op | null)[] = new Array<Op | null>(ENTRIES).fill(null);
  /** operations waiting for a tag */
  private readonly waiting: Op[] = [];
  /** prepared SQEs the kernel has not taken yet (it said EAGAIN or EBUSY) */
  private unsubmitted = 0;
  private inRing = 0;
  private retry: NodeJS.Timeout | null = null;
  private dead: Error | null = null;

  constructor() {
    this.ring = new native.Ring(ENTRIES, ENTRIES, 1, true);
    for (let t = ENTRIES - 1; t >= 0; t--) this.freeTags.push(t);
    try {
      this.poll = native.poll(this.ring.fd, READABLE, () => this.onCompletions());
    } catch (e) {
      this.ring.close();
      throw e;
    }
    this.poll.stop();
  }

  read(fd: number, buf: ArrayBuffer, length: number, fileOffset: number): Promise<number> {
    return this.queue('read', fd, buf, length, fileOffset, false);
  }
  write(fd: number, buf: ArrayBuffer, length: number, fileOffset: number): Promise<number> {
    return this.queue('write', fd, buf, length, fileOffset, false);
  }
  fsync(fd: number, datasync: boolean): Promise<number> {
    return this.queue('fsync', fd, null, 0, 0, datasync);
  }

  private queue(type: Op['type'], fd: number, buf: ArrayBuffer | null, length: number, fileOffset: number, datasync: boolean): Promise<number> {
    if (this.dead) return Promise.reject(this.dead);
    if (buf !== null && (length < 0 || length > buf.byteLength)) return Promise.reject(new RangeError(`length ${length} exceeds the buffer (${buf.byteLength} bytes)`));
    return new Promise<number>((resolve, reject) => {
      this.waiting.push({ type, fd, buf, length, fileOffset, done: 0, datasync, resolve, reject });
      this.pump();
    });
  }

  /** Prepares waiting operations while tags last and hands them to the kernel. */
  private pump(): void {
    while (this.waiting.length > 0 && this.freeTags.length > 0) {
      const op = this.waiting[0]!;
      const tag = this.freeTags[this.freeTags.length - 1]!;
      let prepared: boolean;
      try {
        prepared = this.prep(op, tag);
      } catch (e) {
        this.waiting.shift();
        op.reject(e as Error);
        continue;
      }
      if (!prepared) break; // SQ full of SQEs the kernel has not taken: retried below
      this.waiting.shift();
      this.freeTags.pop();
      this.byTag[tag] = op;
      this.inRing++;
      this.unsubmitted++;
    }
    if (this.unsubmitted > 0) {
      try {
        this.unsubmitted -= this.ring.submit();
      } catch (e) {
        this.failAll(e as Error);
        return;
      }
    }
    if (this.inRing > 0 && !this.polling) {
      this.poll.start(READABLE);
      this.polling = true;
    }
    // Nothing of ours in the kernel to wake us: try again shortly.
    if ((this.unsubmitted > 0 && this.unsubmitted === this.inRing) || (this.waiting.length > 0 && this.inRing === 0)) {
      this.retry ??= setTimeout(() => {
        this.retry = null;
        this.pump();
      }, 1);
    }
  }

  private prep(op: Op, tag: number): boolean {
    if (op.type === 'fsync') return this.ring.prepFsync(op.fd, tag, op.datasync);
    this.iov[0] = native.addressOf(op.buf!) + op.done;
    this.iov[1] = op.length - op.done;
    const at = op.fileOffset + op.done;
    return op.type === 'read' ? this.ring.prepReadv(op.fd, this.iov, 1, at, tag) : this.ring.prepWritev(op.fd, this.iov, 1, at, tag);
  }

  private onCompletions(): void {
    const c = this.completions;
    for (;;) {
      const n = this.ring.reap(c);
      for (let i = 0; i < n; i++) {
        const tag = c[2 * i]!;
        const op = this.byTag[tag];
        if (!op) continue;
        this.byTag[tag] = null;
        this.freeTags.push(tag);
        this.inRing--;
        const res = c[2 * i + 1]!;
        if (op.type === 'fsync' || res < 0) op.resolve(res);
        else if (res > 0 && op.done + res < op.length) {
          op.done += res; // a short transfer: the rest goes next (a read ends short only at end of file)
          this.waiting.unshift(op);
        } else op.resolve(op.done + res);
      }
      if (n < ENTRIES) break;
    }
    this.pump();
    if (this.inRing === 0 && this.polling) {
      this.poll.stop();
      this.polling = false;
    }
  }

  /** The ring is unusable: every operation fails now, and every later one at once. */
  private failAll(e: Error): void {
    this.dead = e;
    for (const op of this.waiting.splice(0)) op.reject(e);
    for (let t = 0; t < ENTRIES; t++) {
      this.byTag[t]?.reject(e);
      this.byTag[t] = null;
    }
    this.inRing = 0;
  }

  close(): void {
    if (this.dead) return;
    if (this.retry) clearTimeout(this.retry);
    this.poll.close();
    this.ring.close();
    this.failAll(new Error('background I/O closed'));
  }
}

export class SyncBackgroundIo implements BackgroundIo {
  readonly kind = 'sync' as const;
  private readonly iov = new Float64Array(2);
  read(fd: number, buf: ArrayBuffer, length: number, fileOffset: number): Promise<number> {
    this.iov[0] = native.addressOf(buf);
    this.iov[1] = Math.min(length, buf.byteLength);
    return Promise.resolve(native.preadv(fd, this.iov, 1, fileOffset));
  }
  write(fd: number, buf: ArrayBuffer, length: number, fileOffset: number): Promise<number> {
    this.iov[0] = native.addressOf(buf);
    this.iov[1] = Math.min(length, buf.byteLength);
    return Promise.resolve(native.pwritev(fd, this.iov, 1, fileOffset));
  }
  fsync(fd: number, datasync: boolean): Promise<number> {
    return Promise.resolve(native.fsync(fd, datasync));
  }
  close(): void {}
}

/** io_uring when the kernel allows it, else synchronous I/O with a one-line reason. */
export function createBackgroundIo(want: 'io_uring' | 'sync', warn: (msg: string) => void): BackgroundIo {
  if (want === 'io_uring') {
    try {
      return new UringBackgroundIo();
    } catch (e) {
      warn(`${uringUnavailable(e)}; the mirror job's background copy runs synchronously on the main thread and may delay vhost-user and QMP replies (--aio=sync silences this)`);
    }
  }
  return new SyncBackgroundIo();
}
