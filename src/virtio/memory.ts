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

export const MAX_REGION_MAPPING = 2 ** 32;

export class MappedRegion {
  readonly gpa: number;
  readonly uva: number;
  readonly size: number;
  /** the whole mapping (starts mmapOffset bytes before the region) */
  readonly buffer: ArrayBuffer;
  /** byte offset of the region's first byte inside buffer */
  readonly base: number;
  /** host virtual address of the region's first byte */
  readonly hostAddr: number;
  readonly bytes: Uint8Array;

  constructor(spec: RegionSpec) {
    const length = spec.size + spec.mmapOffset;
    if (length > MAX_REGION_MAPPING) {
      throw new RangeError(
        `guest memory region of ${spec.size} bytes at offset ${spec.mmapOffset} needs a ${length}-byte mapping; regions over 4 GiB are not supported`,
      );
    }
    this.gpa = spec.guestPhysAddr;
    this.uva = spec.userAddr;
    this.size = spec.size;
    this.buffer = native.mmap(spec.fd, length, 0, true);
    this.base = spec.mmapOffset;
    this.hostAddr = native.addressOf(this.buffer) + this.base;
    this.bytes = new Uint8Array(this.buffer, this.base, this.size);
  }
}

export class GuestMemory {
  readonly regions: MappedRegion[];
  private last = 0;

  constructor(specs: readonly RegionSpec[]) {
    this.regions = specs.map((s) => new MappedRegion(s));
  }

  /** Index of the region holding [gpa, gpa+len), or -1. len must be > 0. */
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
