// How a worker performs block I/O: an io_uring ring (batched submission, completions reaped in
// the worker loop) or synchronous syscalls. Both deliver completions through reap(), so the
// request path is the same either way. Tags name in-flight requests.
import { native, type Ring } from '../native/index.js';

const EINTR = 4;
const EAGAIN = 11;

export interface IoEngine {
  readonly kind: 'io_uring' | 'sync';
  /** readable when completions are waiting; -1 when completions are always immediate */
  readonly pollFd: number;
  readv(fd: number, iov: Float64Array, iovCount: number, offset: number, tag: number): void;
  writev(fd: number, iov: Float64Array, iovCount: number, offset: number, tag: number): void;
  fsync(fd: number, tag: number): void;
  fallocate(fd: number, mode: number, offset: number, length: number, tag: number): void;
  /** completes tag without I/O (result already known) */
  done(tag: number, res: number): void;
  /** pushes queued operations to the kernel */
  submit(): void;
  /** writes [tag, res, ...] into out; returns the number of completions */
  reap(out: Float64Array): number;
  close(): void;
}

/** Completions known without asking the kernel, delivered on the next reap. */
class ImmediateQueue {
  private buf: Float64Array;
  private n = 0;
  constructor(capacity: number) {
    this.buf = new Float64Array(2 * capacity);
  }
  push(tag: number, res: number): void {
    if (2 * this.n + 2 > this.buf.length) {
      const bigger = new Float64Array(this.buf.length * 2);
      bigger.set(this.buf);
      this.buf = bigger;
    }
    this.buf[2 * this.n] = tag;
    this.buf[2 * this.n + 1] = res;
    this.n++;
  }
  get length(): number {
    return this.n;
  }
  /** moves up to what fits into out starting at pair index `at`; returns pairs moved */
  drain(out: Float64Array, at: number): number {
    const n = this.n;
    if (n === 0) return 0;
    const room = (out.length >> 1) - at;
    const k = room < n ? room : n;
    const buf = this.buf;
    const k2 = 2 * k;
    for (let i = 0, o = 2 * at; i < k2; i++, o++) out[o] = buf[i]!;
    if (k < n) buf.copyWithin(0, k2, 2 * n);
    this.n = n - k;
    return k;
  }
}

export class SyncEngine implements IoEngine {
  readonly kind = 'sync' as const;
  readonly pollFd = -1;
  private readonly ready: ImmediateQueue;
  constructor(capacity: number) {
    this.ready = new ImmediateQueue(capacity);
  }
  readv(fd: number, iov: Float64Array, iovCount: number, offset: number, tag: number): void {
    this.ready.push(tag, native.preadv(fd, iov, iovCount, offset));
  }
  writev(fd: number, iov: Float64Array, iovCount: number, offset: number, tag: number): void {
    this.ready.push(tag, native.pwritev(fd, iov, iovCount, offset));
  }
  fsync(fd: number, tag: number): void {
    this.ready.push(tag, native.fsync(fd, true));
  }
  fallocate(fd: number, mode: number, offset: number, length: number, tag: number): void {
    this.ready.push(tag, native.fallocate(fd, mode, offset, length));
  }
  done(tag: number, res: number): void {
    this.ready.push(tag, res);
  }
  submit(): void {}
  reap(out: Float64Array): number {
    return this.ready.drain(out, 0);
  }
  close(): void {}
}

export class UringEngine implements IoEngine {
  readonly kind = 'io_uring' as const;
  readonly pollFd: number;
  private readonly ring: Ring;
  private readonly ready: ImmediateQueue;
  private queued = 0;
  /** operations prepared and not yet reaped: the ring is only asked for completions when > 0 */
  private inRing = 0;
  /** per tag: bytes its readv/writev in the ring asks for (0: not a read or write), and moved so far */
  private readonly want: Float64Array;
  private readonly moved: Float64Array;

  constructor(entries: number, maxTags: number, maxSegs: number) {
    this.ring = new native.Ring(entries, maxTags, maxSegs);
    this.pollFd = this.ring.fd;
    this.ready = new ImmediateQueue(maxTags);
    this.want = new Float64Array(maxTags);
    this.moved = new Float64Array(maxTags);
  }

  private expect(iov: Float64Array, iovCount: number, tag: number): void {
    let n = 0;
    for (let i = 0; i < iovCount; i++) n += iov[2 * i + 1]!;
    this.want[tag] = n;
    this.moved[tag] = 0;
  }

  // Each prep tries once; when the SQ is full it hands what we have to the kernel and retries once.
  readv(fd: number, iov: Float64Array, iovCount: number, offset: number, tag: number): void {
    if (!this.ring.prepReadv(fd, iov, iovCount, offset, tag)) {
      this.submit();
      if (!this.ring.prepReadv(fd, iov, iovCount, offset, tag)) throw new Error('io_uring submission queue stays full');
    }
    this.expect(iov, iovCount, tag);
    this.queued++;
    this.inRing++;
  }
  writev(fd: number, iov: Float64Array, iovCount: number, offset: number, tag: number): void {
    if (!this.ring.prepWritev(fd, iov, iovCount, offset, tag)) {
      this.submit();
      if (!this.ring.prepWritev(fd, iov, iovCount, offset, tag)) throw new Error('io_uring submission queue stays full');
    }
    this.expect(iov, iovCount, tag);
    this.queued++;
    this.inRing++;
  }
  fsync(fd: number, tag: number): void {
    if (!this.ring.prepFsync(fd, tag, true)) {
      this.submit();
      if (!this.ring.prepFsync(fd, tag, true)) throw new Error('io_uring submission queue stays full');
    }
    this.want[tag] = 0;
    this.queued++;
    this.inRing++;
  }
  fallocate(fd: number, mode: number, offset: number, length: number, tag: number): void {
    if (!this.ring.prepFallocate(fd, mode, offset, length, tag)) {
      this.submit();
      if (!this.ring.prepFallocate(fd, mode, offset, length, tag)) throw new Error('io_uring submission queue stays full');
    }
    this.want[tag] = 0;
    this.queued++;
    this.inRing++;
  }
  done(tag: number, res: number): void {
    this.ready.push(tag, res);
  }
  submit(): void {
    while (this.queued > 0) {
      const n = this.ring.submit();
      if (n <= 0) break;
      this.queued -= n;
    }
  }
  reap(out: Float64Array): number {
    const k = this.ready.drain(out, 0);
    if (this.inRing === 0 || k === out.length >> 1) return k;
    const got = this.ring.reap(k === 0 ? out : out.subarray(2 * k));
    this.inRing -= got;
    // A read or write that moved less than asked goes on for the rest (as the sync engine does);
    // only its final result is delivered: all bytes, an error, or fewer at end of file.
    let n = k;
    let continued = false;
    for (let i = k; i < k + got; i++) {
      const tag = out[2 * i]!;
      let res = out[2 * i + 1]!;
      const want = this.want[tag]!;
      if (want !== 0) {
        const moved = this.moved[tag]! + (res > 0 ? res : 0);
        if ((res > 0 && moved < want) || res === -EAGAIN || res === -EINTR) {
          this.moved[tag] = moved;
          this.continueRest(tag, moved);
          continued = true;
          continue;
        }
        this.want[tag] = 0;
        if (res >= 0) res = moved;
      }
      out[2 * n] = tag;
      out[2 * n + 1] = res;
      n++;
    }
    if (continued) this.submit(); // the caller may sleep on the ring next: the rest must be in the kernel
    return n;
  }

  private continueRest(tag: number, moved: number): void {
    if (!this.ring.prepRest(tag, moved)) {
      this.submit();
      if (!this.ring.prepRest(tag, moved)) throw new Error('io_uring submission queue stays full');
    }
    this.queued++;
    this.inRing++;
  }
  close(): void {
    this.ring.close();
  }
}

/** Why io_uring_setup failed and how to fix it, in one line. */
export function uringUnavailable(e: unknown): string {
  const code = (e as { code?: string }).code ?? String(e);
  const hint =
    code === 'EPERM'
      ? 'io_uring is disabled (check sysctl kernel.io_uring_disabled or the seccomp profile)'
      : code === 'ENOMEM'
        ? 'not enough locked memory (raise RLIMIT_MEMLOCK, e.g. ulimit -l)'
        : code === 'ENOSYS'
          ? 'the kernel has no io_uring (needs Linux 5.6+)'
          : 'io_uring setup failed';
  return `io_uring unavailable (${code}): ${hint}`;
}

/** io_uring when the kernel allows it, else synchronous I/O with a one-line reason. */
export function createEngine(
  want: 'io_uring' | 'sync',
  entries: number,
  maxTags: number,
  maxSegs: number,
  warn: (msg: string) => void,
): IoEngine {
  if (want === 'io_uring') {
    try {
      return new UringEngine(entries, maxTags, maxSegs);
    } catch (e) {
      warn(`${uringUnavailable(e)}; falling back to synchronous I/O (--aio=sync silences this)`);
    }
  }
  return new SyncEngine(maxTags);
}
