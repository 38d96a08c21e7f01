// Guest memory as a worker sees it: each region mapped from its fd, translated by guest-physical
// address (descriptors) or frontend virtual address (ring addresses), always bounds checked.
import { native } from '../native/index.js';

export interface RegionSpec {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
  fd: number;
}

/**
 * Guest regions are mapped in chunks: one ArrayBuffer cannot exceed 4 GiB, and guests are often
 * larger. Consecutive chunks overlap by CHUNK_OVERLAP, so anything up to that size (rings,
 * headers, indirect tables) lies inside one chunk wherever it starts; longer buffers are split
 * at chunk ends by the descriptor walker.
 */
export const CHUNK_SIZE = 2 ** 30;
export const CHUNK_OVERLAP = 2 ** 21;

/** One mapped chunk of a guest memory region. */
export class MappedRegion {
  readonly gpa: number;
  readonly uva: number;
  /** bytes mapped (the chunk plus its overlap into the next one) */
  readonly size: number;
  readonly buffer: ArrayBuffer;
  /** byte offset of the chunk's first byte inside buffer */
  readonly base = 0;
  /** host virtual address of the chunk's first byte */
  readonly hostAddr: number;
  readonly bytes: Uint8Array;

  constructor(spec: RegionSpec, offset: number) {
    this.gpa = spec.guestPhysAddr + offset;
    this.uva = spec.userAddr + offset;
    this.size = Math.min(CHUNK_SIZE + CHUNK_OVERLAP, spec.size - offset);
    if (spec.mmapOffset % 4096 !== 0) throw new RangeError(`mmap offset ${spec.mmapOffset} is not page aligned`);
    this.buffer = native.mmap(spec.fd, this.size, spec.mmapOffset + offset, true);
    this.hostAddr = native.addressOf(this.buffer);
    this.bytes = new Uint8Array(this.buffer, 0, this.size);
  }
}

export class GuestMemory {
  /** every chunk of every region, in region order */
  readonly regions: MappedRegion[];
  private last = 0;

  constructor(specs: readonly RegionSpec[]) {
    this.regions = [];
    for (const s of specs) for (let off = 0; off < s.size; off += CHUNK_SIZE) this.regions.push(new MappedRegion(s, off));
  }

  /** Unmaps every chunk now (worker threads never run GC finalizers); no access afterwards. */
  close(): void {
    for (const r of this.regions) native.unmap(r.buffer);
  }

  /** Index of the chunk holding [gpa, gpa+len), or -1. len must be > 0. */
  findGpa(gpa: number, len: number): number {
    const rs = this.regions;
    const hint = rs[this.last];
    if (hint !== undefined && gpa >= hint.gpa && gpa + len <= hint.gpa + hint.size) return this.last;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i]!;
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) {
        this.last = i;
        return i;
      }
    }
    return -1;
  }

  /** Region index holding the frontend virtual range [uva, uva+len), or -1. */
  findUva(uva: number, len: number): number {
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i]!;
      if (uva >= r.uva && uva + len <= r.uva + r.size) return i;
    }
    return -1;
  }

  /** Locates [uva, uva+len) inside one region with the given alignment; throws otherwise. */
  locateUva(uva: number, len: number, align: number): { buffer: ArrayBuffer; byteOffset: number } {
    const i = this.findUva(uva, len);
    if (i < 0) throw new RangeError(`address 0x${uva.toString(16)}+${len} is outside guest memory`);
    const r = this.regions[i]!;
    const byteOffset = r.base + (uva - r.uva);
    if (uva % align !== 0 || byteOffset % align !== 0) {
      throw new RangeError(`address 0x${uva.toString(16)} is not ${align}-byte aligned`);
    }
    return { buffer: r.buffer, byteOffset };
  }
}
