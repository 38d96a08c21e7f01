// Dirty logging for live migration (VHOST_F_LOG_ALL + LOG_SHMFD): one bit per 4 KiB guest page in
// a bitmap the frontend shares with us; QEMU reads and clears it while it copies guest RAM. Every
// page vubd writes is marked after the write, never before: a bit set before the write could be
// read and cleared by QEMU in between, and the page would then be copied without our data.
// Bits are set with atomic ORs because QEMU clears them concurrently.
import type { DescriptorChain } from './chain.js';
import type { GuestMemory } from './memory.js';

export const LOG_PAGE_SIZE = 4096;

export class DirtyLog {
  /** pages that fell outside the bitmap (a frontend bug: QEMU sizes the log to cover all memory) */
  outside = 0;

  /** bitmap: the frontend's log region, starting at its mmap_offset */
  constructor(readonly bitmap: Uint8Array) {}

  /** Marks every page of [gpa, gpa + len); pages past the end of the bitmap are counted in `outside`. */
  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    const bits = this.bitmap;
    let p = Math.floor(gpa / LOG_PAGE_SIZE);
    let last = Math.floor((gpa + len - 1) / LOG_PAGE_SIZE);
    const top = bits.length * 8 - 1;
    if (last > top) {
      this.outside += last - Math.max(p, top + 1) + 1;
      last = top; // never write past the region the frontend named
    }
    // Single bits up to a byte boundary, whole bytes, then single bits.
    for (; p <= last && p % 8 !== 0; p++) Atomics.or(bits, Math.floor(p / 8), 1 << p % 8);
    for (; p + 7 <= last; p += 8) Atomics.or(bits, p / 8, 0xff);
    for (; p <= last; p++) Atomics.or(bits, Math.floor(p / 8), 1 << p % 8);
  }

  /**
   * Marks what a completed request wrote: the first `usedLen - 1` bytes of its device-writable
   * buffers (read data, GET_ID) and its status byte. Only what was written: a guest could name
   * huge writable buffers for a request that fails at once.
   */
  markWritten(chain: DescriptorChain, usedLen: number): void {
    const regions = chain.memory!.regions;
    let left = usedLen - 1;
    for (let k = chain.readableCount; k < chain.count && left > 0; k++) {
      const n = Math.min(chain.len[k]!, left);
      this.mark(regions[chain.region[k]!]!.gpa + chain.offset[k]!, n);
      left -= n;
    }
    const status = chain.statusGpa();
    if (status >= 0) this.mark(status, 1);
  }
}

/**
 * The guest-physical ranges a ring's device side writes: for a split ring the used ring (elements,
 * index and avail_event) at the frontend's log_guest_addr; for a packed ring the descriptor ring
 * (used descriptors are written in place; translated from its frontend address) and the device
 * event area at log_guest_addr.
 */
export function ringLogRanges(memory: GuestMemory, ring: { size: number; packed: boolean; descUserAddr: number; logGuestAddr: number }): number[] {
  if (!ring.packed) return [ring.logGuestAddr, 4 + 8 * ring.size + 2];
  const ranges = [ring.logGuestAddr, 4];
  const len = 16 * ring.size;
  const i = memory.findUva(ring.descUserAddr, len);
  if (i >= 0) {
    const r = memory.regions[i]!;
    ranges.push(r.gpa + (ring.descUserAddr - r.uva), len);
  }
  return ranges;
}
