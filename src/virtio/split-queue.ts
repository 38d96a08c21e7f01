// A split virtqueue over guest memory: pops heads from the avail ring, walks descriptor chains
// (direct and indirect, bounded against loops), publishes used entries and decides notifications
// (EVENT_IDX or the NO_INTERRUPT flag). All guest-controlled values are checked before use.
import { DescriptorChain } from './chain.js';
import type { GuestMemory } from './memory.js';

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;

export interface SplitLayout {
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
}

/** Thrown when the ring itself is unusable (bad head index, bad table address, loop). */
export class BrokenQueueError extends Error {}

export class SplitQueue {
  readonly size: number;
  private readonly mask: number;
  /** the descriptor table as 32-bit words (addr lo/hi, len) and 16-bit halves (flags, next) */
  private readonly desc32: Uint32Array;
  private readonly desc16: Uint16Array;
  /** per region: whole-mapping views for aligned indirect tables (null: mapping too large for a view) */
  private readonly regionViews: ({ u32: Uint32Array; u16: Uint16Array } | null | undefined)[] = [];
  private readonly avail: Uint16Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  /** next avail index to consume (free running, 16 bit) */
  lastAvail: number;
  /** our copy of used->idx (free running, 16 bit) */
  usedIdx: number;
  /** used->idx at the time of the last notification decision */
  private signalledUsed: number;

  /** descriptors a chain may have, indirect ones included: the queue size or the device's tighter limit */
  readonly maxChain: number;

  constructor(
    readonly memory: GuestMemory,
    layout: SplitLayout,
    base: number,
    readonly eventIdx: boolean,
    readonly indirect: boolean,
    maxChain = layout.size,
  ) {
    const q = layout.size;
    this.size = q;
    this.mask = q - 1;
    this.maxChain = Math.min(q, maxChain);
    const d = memory.locateUva(layout.descAddr, 16 * q, 16);
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, 4 * q);
    this.desc16 = new Uint16Array(d.buffer, d.byteOffset, 8 * q);
    const a = memory.locateUva(layout.availAddr, 6 + 2 * q, 2);
    this.avail = new Uint16Array(a.buffer, a.byteOffset, 3 + q);
    const u = memory.locateUva(layout.usedAddr, 6 + 8 * q, 4);
    this.used16 = new Uint16Array(u.buffer, u.byteOffset, 3 + 4 * q);
    this.used32 = new Uint32Array(u.buffer, u.byteOffset, 1 + 2 * q);
    this.lastAvail = base & 0xffff;
    this.usedIdx = Atomics.load(this.used16, 1);
    this.signalledUsed = this.usedIdx;
  }

  /** Number of heads the driver has made available that we have not popped yet. */
  pending(): number {
    const idx = Atomics.load(this.avail, 1);
    const n = (idx - this.lastAvail) & 0xffff;
    if (n > this.size) throw new BrokenQueueError(`avail index ${idx} is ${n} ahead of ${this.lastAvail} (queue size ${this.size})`);
    return n;
  }

  /** Cheap check for new avail entries (no validation; pending() validates before popping). */
  hasPending(): boolean {
    return Atomics.load(this.avail, 1) !== this.lastAvail;
  }

  /** Pops the next head index (caller checked pending() > 0). */
  popHead(): number {
    const head = this.avail[2 + (this.lastAvail & this.mask)]!;
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    if (head >= this.size) throw new BrokenQueueError(`avail ring names head ${head} >= queue size ${this.size}`);
    return head;
  }

  /** Walks the chain starting at head into chain. Throws BrokenQueueError only for ring damage. */
  walk(head: number, chain: DescriptorChain): void {
    chain.reset(head, this.memory);
    const d32 = this.desc32;
    const d16 = this.desc16;
    const size = this.size;
    const max = this.maxChain;
    let i = head;
    let seen = 0;
    for (;;) {
      if (i >= size) throw new BrokenQueueError(`descriptor index ${i} out of range ${size}`);
      if (++seen > max) throw new BrokenQueueError(`descriptor chain loops or is longer than ${max} descriptors`);
      const lo = d32[4 * i]!;
      const hi = d32[4 * i + 1]!;
      const len = d32[4 * i + 2]!;
      const flags = d16[8 * i + 6]!;
      const next = d16[8 * i + 7]!;
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        this.walkIndirect(chain, lo, hi, len, flags, seen - 1);
        return;
      }
      // An address past 2^53 is imprecise as a number but lies outside every region all the same.
      chain.add(hi * 0x100000000 + lo, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if (!(flags & VIRTQ_DESC_F_NEXT)) return;
      i = next;
    }
  }

  /**
   * Walks the indirect table an INDIRECT descriptor names (after `before` direct descriptors);
   * the chain ends with it. A table longer than the queue is refused unread (the spec bounds a
   * chain by the queue size), and the walk stops at the chain limit: a guest cannot make the
   * worker read a gigabyte of table per request.
   */
  private walkIndirect(chain: DescriptorChain, lo: number, hi: number, len: number, flags: number, before: number): void {
    if (!this.indirect || flags & VIRTQ_DESC_F_NEXT || len === 0 || len % 16 !== 0) {
      throw new BrokenQueueError(`invalid indirect descriptor (flags ${flags}, len ${len})`);
    }
    if (len / 16 > this.size) throw new BrokenQueueError(`indirect table of ${len / 16} descriptors is longer than the queue (${this.size})`);
    const max = this.maxChain - before;
    const addr = hi * 0x100000000 + lo;
    const ri = hi >= 0x200000 ? -1 : this.memory.findGpa(addr, len);
    if (ri < 0) throw new BrokenQueueError(`indirect table 0x${addr.toString(16)}+${len} is outside guest memory`);
    const r = this.memory.regions[ri]!;
    const byteOffset = r.base + (addr - r.gpa);
    const tableSize = len / 16;
    const views = byteOffset % 4 === 0 ? this.viewsOf(ri) : null;
    // A table at an odd address (legal, if unusual) is read through a DataView.
    const dv = views === null ? new DataView(r.buffer, byteOffset, len) : null;
    const b32 = byteOffset / 4;
    const b16 = byteOffset / 2;
    let i = 0;
    let seen = 0;
    for (;;) {
      if (i >= tableSize) throw new BrokenQueueError(`descriptor index ${i} out of range ${tableSize}`);
      if (++seen > tableSize) throw new BrokenQueueError('descriptor chain loops or is longer than its table');
      if (seen > max) throw new BrokenQueueError(`descriptor chain is longer than ${this.maxChain} descriptors`);
      let dlo: number, dhi: number, dlen: number, dflags: number, next: number;
      if (views !== null) {
        const w = b32 + 4 * i;
        const h = b16 + 8 * i;
        dlo = views.u32[w]!;
        dhi = views.u32[w + 1]!;
        dlen = views.u32[w + 2]!;
        dflags = views.u16[h + 6]!;
        next = views.u16[h + 7]!;
      } else {
        const o = 16 * i;
        dlo = dv!.getUint32(o, true);
        dhi = dv!.getUint32(o + 4, true);
        dlen = dv!.getUint32(o + 8, true);
        dflags = dv!.getUint16(o + 12, true);
        next = dv!.getUint16(o + 14, true);
      }
      if (dflags & VIRTQ_DESC_F_INDIRECT) {
        throw new BrokenQueueError(`invalid indirect descriptor (flags ${dflags}, len ${dlen})`);
      }
      chain.add(dhi * 0x100000000 + dlo, dlen, (dflags & VIRTQ_DESC_F_WRITE) !== 0);
      if (!(dflags & VIRTQ_DESC_F_NEXT)) return;
      i = next;
    }
  }

  private viewsOf(ri: number): { u32: Uint32Array; u16: Uint16Array } | null {
    let v = this.regionViews[ri];
    if (v === undefined) {
      const buf = this.memory.regions[ri]!.buffer;
      try {
        v = { u32: new Uint32Array(buf, 0, buf.byteLength >>> 2), u16: new Uint16Array(buf, 0, buf.byteLength >>> 1) };
      } catch {
        v = null; // larger than a typed array may be here: DataView per table instead
      }
      this.regionViews[ri] = v;
    }
    return v;
  }

  /** Writes a used element; not visible to the driver until publish(). */
  putUsed(head: number, len: number): void {
    const slot = this.usedIdx & this.mask;
    this.used32[1 + 2 * slot] = head;
    this.used32[2 + 2 * slot] = len;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
  }

  /** Makes put entries visible; returns true if the driver wants an interrupt. */
  publish(): boolean {
    const newIdx = this.usedIdx;
    const old = this.signalledUsed;
    if (newIdx === old) return false;
    Atomics.store(this.used16, 1, newIdx);
    this.signalledUsed = newIdx;
    if (this.eventIdx) {
      const usedEvent = Atomics.load(this.avail, 2 + this.size);
      return ((newIdx - usedEvent - 1) & 0xffff) < ((newIdx - old) & 0xffff);
    }
    return (Atomics.load(this.avail, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Asks the driver for a kick when it adds past what we consumed, then re-checks: returns true
   * if work arrived meanwhile (the caller must not sleep).
   */
  armKick(): boolean {
    if (this.eventIdx) Atomics.store(this.used16, 2 + 4 * this.size, this.lastAvail);
    else Atomics.store(this.used16, 0, 0);
    return this.pending() > 0;
  }
}
