// Guest memory as a worker sees it: views of the chunks the main thread mapped once for the whole
// process (memory-map.ts), translated by guest-physical address (descriptors) or frontend virtual
// address (ring addresses), always bounds checked.
import { native } from '../native/index.js';

/** A region of the frontend's memory table, with the fd it came with. */
export interface RegionSpec {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
  fd: number;
}

/** One mapped chunk of a region, as the main thread sends it to the workers: plain numbers. */
export interface ChunkSpec {
  gpa: number;
  uva: number;
  /** bytes mapped (the chunk plus its overlap into the next one) */
  size: number;
  /** process-wide mapping id (native.mapShared) */
  mapping: number;
}

/**
 * Guest regions are mapped in chunks: one ArrayBuffer cannot exceed 4 GiB, and guests are often
 * larger. Consecutive chunks overlap by CHUNK_OVERLAP, so anything up to that size (rings,
 * headers, indirect tables) lies inside one chunk wherever it starts; longer buffers are split
 * at chunk ends by the descriptor walker.
 */
export const CHUNK_SIZE = 2 ** 30;
export const CHUNK_OVERLAP = 2 ** 21;

/** One mapped chunk of a guest memory region: this thread's view of the process-wide mapping. */
export class MappedRegion {
  readonly gpa: number;
  readonly uva: number;
  readonly size: number;
  readonly buffer: ArrayBuffer;
  /** byte offset of the chunk's first byte inside buffer */
  readonly base = 0;
  /** host virtual address of the chunk's first byte */
  readonly hostAddr: number;
  readonly bytes: Uint8Array;

  constructor(spec: ChunkSpec) {
    this.gpa = spec.gpa;
    this.uva = spec.uva;
    this.size = spec.size;
    this.buffer = native.viewMapping(spec.mapping);
    this.hostAddr = native.addressOf(this.buffer);
    this.bytes = new Uint8Array(this.buffer, 0, this.size);
  }
}

export class GuestMemory {
  /** every chunk of every region, in region order */
  readonly regions: MappedRegion[] = [];
  private last = 0;
  /** requests in flight that were started with this table */
  private users = 0;
  /** replaced by a newer table: unmapped as soon as no request uses it */
  private retired = false;
  private closed = false;

  constructor(chunks: readonly ChunkSpec[]) {
    try {
      for (const c of chunks) this.regions.push(new MappedRegion(c));
    } catch (e) {
      this.close(); // the views taken so far
      throw e;
    }
  }

  /** A request starts with this table: it stays mapped until that request is done. */
  hold(): void {
    this.users++;
  }

  /** A request that started with this table is done. */
  drop(): void {
    if (--this.users === 0 && this.retired) this.close();
  }

  /** A newer table replaced this one: unmapped now, or when the last request using it is done. */
  retire(): void {
    this.retired = true;
    if (this.users === 0) this.close();
  }

  /** Drops this thread's views now (worker threads never run GC finalizers); no access afterwards. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
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
