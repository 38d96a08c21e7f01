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
  private readonly desc: DataView;
  private readonly avail: Uint16Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  /** next avail index to consume (free running, 16 bit) */
  lastAvail: number;
  /** our copy of used->idx (free running, 16 bit) */
  usedIdx: number;
  /** used->idx at the time of the last notification decision */
  private signalledUsed: number;

  constructor(
    readonly memory: GuestMemory,
    layout: SplitLayout,
    base: number,
    readonly eventIdx: boolean,
    readonly indirect: boolean,
  ) {
    const q = layout.size;
    this.size = q;
    this.mask = q - 1;
    const d = memory.locateUva(layout.descAddr, 16 * q, 16);
    this.desc = new DataView(d.buffer, d.byteOffset, 16 * q);
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
    let table = this.desc;
    let tableSize = this.size;
    let i = head;
    let seen = 0;
    let inIndirect = false;
    for (;;) {
      if (i >= tableSize) throw new BrokenQueueError(`descriptor index ${i} out of range ${tableSize}`);
      if (++seen > tableSize) throw new BrokenQueueError('descriptor chain loops or is longer than its table');
      const o = 16 * i;
      const lo = table.getUint32(o, true);
      const hi = table.getUint32(o + 4, true);
      const len = table.getUint32(o + 8, true);
      const flags = table.getUint16(o + 12, true);
      const next = table.getUint16(o + 14, true);
      const addr = hi * 0x100000000 + lo;
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (!this.indirect || inIndirect || flags & VIRTQ_DESC_F_NEXT || len === 0 || len % 16 !== 0) {
          throw new BrokenQueueError(`invalid indirect descriptor (flags ${flags}, len ${len})`);
        }
        const ri = hi >= 0x200000 ? -1 : this.memory.findGpa(addr, len);
        if (ri < 0) throw new BrokenQueueError(`indirect table 0x${addr.toString(16)}+${len} is outside guest memory`);
        const r = this.memory.regions[ri]!;
        table = new DataView(r.buffer, r.base + (addr - r.gpa), len);
        tableSize = len / 16;
        inIndirect = true;
        i = 0;
        seen = 0;
        continue;
      }
      // An address past 2^53 is imprecise as a number but lies outside every region all the same.
      chain.add(addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if (!(flags & VIRTQ_DESC_F_NEXT)) return;
      i = next;
    }
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
