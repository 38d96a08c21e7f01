// O_DIRECT support: memory aligned for the device, the alignment probe (QEMU's
// raw_probe_alignment) and the bounce buffers that unaligned guest buffers go through.
import { native } from '../native/index.js';

const EINVAL = 22;
export const MAX_ALIGNMENT = 4096;
const CANDIDATES = [512, 1024, 2048, 4096];

/** Page-aligned memory (a private memfd mapping; the fd is closed at once, the finalizer unmaps). */
export function alignedBuffer(length: number): { buf: ArrayBuffer; addr: number; bytes: Uint8Array } {
  const size = Math.ceil(Math.max(length, 1) / MAX_ALIGNMENT) * MAX_ALIGNMENT;
  const fd = native.memfdCreate('vubd-bounce', size);
  try {
    const buf = native.mmap(fd, size, 0, true);
    return { buf, addr: native.addressOf(buf), bytes: new Uint8Array(buf) };
  } finally {
    native.close(fd);
  }
}

/**
 * The alignment O_DIRECT needs on fd, for file offsets, lengths and memory: the smallest of
 * 512..4096 that a read accepts (EINVAL means misaligned). Throws when none works.
 */
export function probeDirectAlignment(fd: number): number {
  const { addr } = alignedBuffer(2 * MAX_ALIGNMENT);
  const works = (bufAddr: number, len: number): boolean => native.preadv(fd, Float64Array.of(bufAddr, len), 1, 0) !== -EINVAL;
  const request = CANDIDATES.find((a) => works(addr, a));
  const memory = CANDIDATES.find((a) => works(addr + a, MAX_ALIGNMENT));
  if (request === undefined || memory === undefined) throw new Error('no O_DIRECT alignment up to 4096 works');
  return Math.max(request, memory);
}

/** True when every iovec element's address and length are multiples of align (a power of two). */
export function iovAligned(iov: Float64Array, iovCount: number, align: number): boolean {
  for (let i = 0; i < 2 * iovCount; i++) if (iov[i]! % align !== 0) return false;
  return true;
}

/** bytes of bounce buffers a worker keeps for reuse; bigger or further ones are mapped per request */
const POOL_BYTES = 16 * 2 ** 20;
const MIN_BOUNCE = 64 * 2 ** 10;

export interface Bounce {
  addr: number;
  bytes: Uint8Array;
  size: number;
}

/** This thread's free bounce buffers, by size class (powers of two from 64 KiB). */
const free = new Map<number, Bounce[]>();
let pooled = 0;

export function takeBounce(length: number): Bounce {
  let size = MIN_BOUNCE;
  while (size < length) size *= 2;
  const b = free.get(size)?.pop();
  if (b !== undefined) {
    pooled -= size;
    return b;
  }
  const a = alignedBuffer(size);
  return { addr: a.addr, bytes: a.bytes, size };
}

/** Gives a bounce buffer back; one a request abandoned (never given back) is unmapped by the GC. */
export function giveBounce(b: Bounce): void {
  if (pooled + b.size > POOL_BYTES) return;
  let list = free.get(b.size);
  if (list === undefined) free.set(b.size, (list = []));
  list.push(b);
  pooled += b.size;
}
