// A walked descriptor chain: its buffers as host addresses (for iovecs) and as region offsets
// (for the few bytes JS reads or writes itself). Preallocated and reused: no allocation per request.
import type { GuestMemory } from './memory.js';

export const enum ChainError {
  NONE = 0,
  /** a buffer's address is outside guest memory: the request fails, the chain is still returned */
  BAD_ADDRESS = 1,
  /** more buffers than we can hold */
  TOO_MANY_SEGMENTS = 2,
  /** a device-readable buffer after a device-writable one */
  BAD_ORDER = 3,
}

export class DescriptorChain {
  head = 0;
  count = 0;
  error: ChainError = ChainError.NONE;
  readableBytes = 0;
  writableBytes = 0;
  /** number of leading segments that are device-readable */
  readableCount = 0;
  /** where the last device-writable byte is (the status byte), even if segments overflowed */
  private statusRegion = -1;
  private statusOffset = 0;
  readonly hostAddr: Float64Array;
  readonly len: Uint32Array;
  readonly region: Int32Array;
  readonly offset: Float64Array;
  memory: GuestMemory | null = null;

  constructor(readonly maxSegments: number) {
    this.hostAddr = new Float64Array(maxSegments);
    this.len = new Uint32Array(maxSegments);
    this.region = new Int32Array(maxSegments);
    this.offset = new Float64Array(maxSegments);
  }

  reset(head: number, memory: GuestMemory): void {
    this.head = head;
    this.count = 0;
    this.error = ChainError.NONE;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.readableCount = 0;
    this.statusRegion = -1;
    this.memory = memory;
  }

  /** Adds a guest buffer; records (does not throw) an address or order problem. */
  add(gpa: number, len: number, writable: boolean): void {
    if (len === 0) return;
    if (!writable && this.writableBytes > 0) {
      this.error ||= ChainError.BAD_ORDER;
      return;
    }
    const mem = this.memory!;
    const ri = mem.findGpa(gpa, len);
    if (ri >= 0) {
      this.addPiece(ri, gpa, len, writable);
      return;
    }
    // Not inside one mapped chunk: a large buffer, or one running into the next region. Check
    // that all of it is guest memory before recording any piece, then split it at chunk ends.
    for (let g = gpa, left = len; left > 0; ) {
      const i = mem.findGpa(g, 1);
      if (i < 0) {
        this.error ||= ChainError.BAD_ADDRESS;
        if (writable) this.statusRegion = -1; // the status byte may be in this one: never guess
        return;
      }
      const r = mem.regions[i]!;
      const take = Math.min(left, r.gpa + r.size - g);
      g += take;
      left -= take;
    }
    for (let g = gpa, left = len; left > 0; ) {
      const i = mem.findGpa(g, 1);
      const r = mem.regions[i]!;
      const take = Math.min(left, r.gpa + r.size - g);
      this.addPiece(i, g, take, writable);
      g += take;
      left -= take;
    }
  }

  private addPiece(ri: number, gpa: number, len: number, writable: boolean): void {
    const r = this.memory!.regions[ri]!;
    const off = gpa - r.gpa;
    if (writable) {
      this.statusRegion = ri;
      this.statusOffset = off + len - 1;
    }
    if (this.count >= this.maxSegments) {
      this.error ||= ChainError.TOO_MANY_SEGMENTS;
      return;
    }
    const k = this.count++;
    this.hostAddr[k] = r.hostAddr + off;
    this.len[k] = len;
    this.region[k] = ri;
    this.offset[k] = off;
    if (writable) this.writableBytes += len;
    else {
      this.readableBytes += len;
      this.readableCount = k + 1;
    }
  }

  /** Copies n device-readable bytes starting at byte `from` into out. Returns bytes copied. */
  readInto(out: Uint8Array, from: number, n: number): number {
    let done = 0;
    let skip = from;
    const regions = this.memory!.regions;
    for (let k = 0; k < this.readableCount && done < n; k++) {
      const l = this.len[k]!;
      if (skip >= l) {
        skip -= l;
        continue;
      }
      const take = Math.min(l - skip, n - done);
      const bytes = regions[this.region[k]!]!.bytes;
      const start = this.offset[k]! + skip;
      // Small reads (request headers) copy bytewise: no subarray object per request.
      if (take <= 64) for (let j = 0; j < take; j++) out[done + j] = bytes[start + j]!;
      else out.set(bytes.subarray(start, start + take), done);
      done += take;
      skip = 0;
    }
    return done;
  }

  /** Copies src into the device-writable bytes starting at writable byte `from`. */
  writeFrom(src: Uint8Array, from: number): number {
    let done = 0;
    let skip = from;
    const regions = this.memory!.regions;
    for (let k = this.readableCount; k < this.count && done < src.length; k++) {
      const l = this.len[k]!;
      if (skip >= l) {
        skip -= l;
        continue;
      }
      const take = Math.min(l - skip, src.length - done);
      const r = regions[this.region[k]!]!;
      r.bytes.set(src.subarray(done, done + take), this.offset[k]! + skip);
      done += take;
      skip = 0;
    }
    return done;
  }

  /** Fills device-writable bytes [from, from+n) with zeroes. */
  zeroWritable(from: number, n: number): void {
    let skip = from;
    let left = n;
    const regions = this.memory!.regions;
    for (let k = this.readableCount; k < this.count && left > 0; k++) {
      const l = this.len[k]!;
      if (skip >= l) {
        skip -= l;
        continue;
      }
      const take = Math.min(l - skip, left);
      const start = this.offset[k]! + skip;
      regions[this.region[k]!]!.bytes.fill(0, start, start + take);
      left -= take;
      skip = 0;
    }
  }

  /** Guest-physical address of the last device-writable byte (the status byte), or -1. */
  statusGpa(): number {
    if (this.statusRegion < 0) return -1;
    return this.memory!.regions[this.statusRegion]!.gpa + this.statusOffset;
  }

  /** Writes one byte at the last device-writable byte (the virtio-blk status). False if none. */
  setLastWritableByte(value: number): boolean {
    if (this.statusRegion < 0) return false;
    this.memory!.regions[this.statusRegion]!.bytes[this.statusOffset] = value;
    return true;
  }

  /**
   * Writes an iovec list [addr, len, ...] covering `n` bytes starting at byte `from` of either the
   * readable or the writable side. Returns the number of iovec entries, or -1 if out may overflow.
   */
  iov(out: Float64Array, writable: boolean, from: number, n: number): number {
    let skip = from;
    let left = n;
    let e = 0;
    const first = writable ? this.readableCount : 0;
    const end = writable ? this.count : this.readableCount;
    for (let k = first; k < end && left > 0; k++) {
      const l = this.len[k]!;
      if (skip >= l) {
        skip -= l;
        continue;
      }
      const take = Math.min(l - skip, left);
      if (2 * e + 2 > out.length) return -1;
      out[2 * e] = this.hostAddr[k]! + skip;
      out[2 * e + 1] = take;
      e++;
      left -= take;
      skip = 0;
    }
    return left === 0 ? e : -1;
  }
}
