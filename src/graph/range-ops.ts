// Discard and write-zeroes on a file without stalling the rest of the queue. With io_uring the
// kernel's workers run fallocate; the synchronous engine does it in bounded steps. A file system
// without the fallocate mode gets zeroes written from one shared 1 MiB buffer. Every step after
// the first waits for the next service round (IoContext.defer), so requests popped meanwhile run.
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, native } from '../native/index.js';
import { PENDING, type IoContext } from './nodes.js';
import { alignedBuffer } from './direct-io.js';

const EOPNOTSUPP = 95;
const EIO = 5;
/** bytes one synchronous fallocate step may cover (punching a hole frees extents: time grows with the range) */
const SYNC_FALLOCATE_STEP = 64 * 2 ** 20;
/** bytes of zeroes one write covers */
const ZERO_STEP = 2 ** 20;

/** This thread's zero buffer: only ever written from, so concurrent requests share it; aligned for O_DIRECT files. */
let zeroBuf: ArrayBuffer | null = null;
const zeroIov = new Float64Array(2);

/**
 * Runs issue(offset, len) over [offset, offset + length) in steps of at most `step` bytes, each
 * after the previous one completed and a service round passed. advance(res, len) turns a step's
 * result into the bytes it covered (< 0: the error that ends the request). The request's result is 0.
 */
function inSteps(
  ctx: IoContext,
  tag: number,
  offset: number,
  length: number,
  step: number,
  issue: (off: number, len: number) => void,
  advance: (res: number, len: number) => number,
): void {
  let done = 0;
  const next = (): void => {
    const len = Math.min(step, length - done);
    ctx.then(tag, (res) => {
      const n = advance(res, len);
      if (n < 0) return n;
      done += n;
      if (done >= length) return 0;
      ctx.defer(tag, 0, next);
      return PENDING;
    });
    issue(offset + done, len);
  };
  if (length <= 0) ctx.engine.done(tag, 0);
  else next();
}

function fallocate(ctx: IoContext, fd: number, tag: number, mode: number, offset: number, length: number): void {
  const step = ctx.engine.kind === 'io_uring' ? length : SYNC_FALLOCATE_STEP;
  inSteps(ctx, tag, offset, length, step, (off, len) => ctx.engine.fallocate(fd, mode, off, len, tag), (res, len) => (res < 0 ? res : len));
}

function writeZeroBuffers(ctx: IoContext, fd: number, tag: number, offset: number, length: number): void {
  zeroBuf ??= alignedBuffer(ZERO_STEP).buf;
  const issue = (off: number, len: number): void => {
    zeroIov[0] = native.addressOf(zeroBuf!);
    zeroIov[1] = len;
    ctx.engine.writev(fd, zeroIov, 1, off, tag);
  };
  inSteps(ctx, tag, offset, length, ZERO_STEP, issue, (res) => (res < 0 ? res : res === 0 ? -EIO : res));
}

/** Punches a hole; a file system that cannot is fine (discard is a hint). Completes tag with 0 or -errno. */
export function discardFile(ctx: IoContext, fd: number, tag: number, offset: number, length: number): void {
  ctx.then(tag, (res) => (res === -EOPNOTSUPP ? 0 : res));
  fallocate(ctx, fd, tag, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

/** Zeroes the range (unmap: by punching a hole), writing zeroes where fallocate cannot. Completes tag with 0 or -errno. */
export function writeZeroesFile(ctx: IoContext, fd: number, tag: number, offset: number, length: number, unmap: boolean): void {
  ctx.then(tag, (res) => {
    if (res !== -EOPNOTSUPP) return res;
    writeZeroBuffers(ctx, fd, tag, offset, length);
    return PENDING;
  });
  const mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
  fallocate(ctx, fd, tag, mode, offset, length);
}
