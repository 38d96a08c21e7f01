// iovec arithmetic for the NBD client (layout: Float64Array [addr, len, addr, len, ...]).

/** Writes the part [skip, skip + len) of src's first count entries into out; returns out's entry count. */
export function sliceIov(src: Float64Array, count: number, skip: number, len: number, out: Float64Array): number {
  let n = 0;
  for (let i = 0; i < count && len > 0; i++) {
    const a = src[2 * i]!;
    const l = src[2 * i + 1]!;
    if (skip >= l) {
      skip -= l;
      continue;
    }
    const take = Math.min(l - skip, len);
    out[2 * n] = a + skip;
    out[2 * n + 1] = take;
    n++;
    len -= take;
    skip = 0;
  }
  return n;
}

/** Consumes `done` bytes from entries [start, count) in place; returns the first entry with bytes left (count when all are done). */
export function advanceIov(iov: Float64Array, start: number, count: number, done: number): number {
  let i = start;
  while (i < count && done > 0) {
    const l = iov[2 * i + 1]!;
    if (done >= l) {
      done -= l;
      i++;
      continue;
    }
    iov[2 * i] = iov[2 * i]! + done;
    iov[2 * i + 1] = l - done;
    done = 0;
  }
  while (i < count && iov[2 * i + 1] === 0) i++;
  return i;
}

/** NBD error values are Linux errnos for the ones the protocol names; anything else is EIO. */
export function nbdErrno(err: number): number {
  switch (err) {
    case 1: // EPERM
    case 5: // EIO
    case 12: // ENOMEM
    case 22: // EINVAL
    case 28: // ENOSPC
    case 75: // EOVERFLOW
    case 95: // EOPNOTSUPP
      return err;
    default:
      return 5;
  }
}
