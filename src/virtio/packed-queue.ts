// A packed virtqueue (VIRTIO_F_RING_PACKED) over guest memory: one descriptor ring shared by
// driver and device, availability marked by the AVAIL/USED flag bits against wrap counters, and
// event suppression structures instead of flags/avail_event. Same safety rules as SplitQueue.
import type { DescriptorChain } from './chain.js';
import type { GuestMemory } from './memory.js';
import { BrokenQueueError } from './split-queue.js';

export const PACKED_DESC_F_NEXT = 1;
export const PACKED_DESC_F_WRITE = 2;
export const PACKED_DESC_F_INDIRECT = 4;
export const PACKED_DESC_F_AVAIL = 1 << 7;
export const PACKED_DESC_F_USED = 1 << 15;
export const EVENT_FLAG_ENABLE = 0;
export const EVENT_FLAG_DISABLE = 1;
export const EVENT_FLAG_DESC = 2;

export interface PackedLayout {
  size: number;
  /** the descriptor ring */
  descAddr: number;
  /** driver event suppression area (vhost-user's "avail" address) */
  driverAddr: number;
  /** device event suppression area (vhost-user's "used" address) */
  deviceAddr: number;
}

/** vhost-user's packed vring base: avail idx | avail wrap << 15 | used idx << 16 | used wrap << 31 */
export function encodePackedBase(lastAvail: number, availWrap: boolean, usedIdx: number, usedWrap: boolean): number {
  return ((lastAvail & 0x7fff) | (availWrap ? 0x8000 : 0) | ((usedIdx & 0x7fff) << 16) | (usedWrap ? 0x80000000 : 0)) >>> 0;
}

export class PackedQueue {
  readonly size: number;
  /** the ring as 32-bit words (addr lo/hi, len) and 16-bit halves (id, flags) */
  private readonly ring32: Uint32Array;
  private readonly flags16: Uint16Array;
  private readonly driverEvent: Uint16Array;
  private readonly deviceEvent: Uint16Array;
  lastAvail: number;
  availWrap: boolean;
  usedIdx: number;
  usedWrap: boolean;
  /** used index (with wrap) at the last notification decision */
  private signalled: number;
  private signalledValid = false;
  /** used elements written since the last publish() */
  private usedSince = 0;
  /** descriptors the last popped chain occupied in the ring */
  lastChainDescs = 0;

  /** descriptors a chain may have, indirect ones included: the queue size or the device's tighter limit */
  readonly maxChain: number;

  constructor(
    readonly memory: GuestMemory,
    layout: PackedLayout,
    base: number,
    readonly eventIdx: boolean,
    readonly indirect: boolean,
    maxChain = layout.size,
  ) {
    const q = layout.size;
    if (q === 0 || q > 0x8000) throw new RangeError(`packed queue size ${q} out of range`);
    this.size = q;
    this.maxChain = Math.min(q, maxChain);
    const r = memory.locateUva(layout.descAddr, 16 * q, 16);
    this.ring32 = new Uint32Array(r.buffer, r.byteOffset, 4 * q);
    this.flags16 = new Uint16Array(r.buffer, r.byteOffset, 8 * q);
    const d = memory.locateUva(layout.driverAddr, 4, 4);
    this.driverEvent = new Uint16Array(d.buffer, d.byteOffset, 2);
    const e = memory.locateUva(layout.deviceAddr, 4, 4);
    this.deviceEvent = new Uint16Array(e.buffer, e.byteOffset, 2);
    this.lastAvail = base & 0x7fff;
    this.availWrap = (base & 0x8000) !== 0;
    this.usedIdx = (base >>> 16) & 0x7fff;
    this.usedWrap = (base & 0x80000000) !== 0;
    if (this.lastAvail >= q || this.usedIdx >= q) throw new BrokenQueueError(`packed base 0x${base.toString(16)} out of range for size ${q}`);
    this.signalled = this.usedIdx;
  }

  /** The vhost-user GET_VRING_BASE value. */
  get base(): number {
    return encodePackedBase(this.lastAvail, this.availWrap, this.usedIdx, this.usedWrap);
  }

  private isAvail(i: number): boolean {
    const f = Atomics.load(this.flags16, 8 * i + 7);
    const avail = (f & PACKED_DESC_F_AVAIL) !== 0;
    const used = (f & PACKED_DESC_F_USED) !== 0;
    return avail === this.availWrap && used !== this.availWrap;
  }

  hasPending(): boolean {
    return this.isAvail(this.lastAvail);
  }

  /** 1 if the next descriptor is available, else 0 (a packed ring has no avail count). */
  pending(): number {
    return this.isAvail(this.lastAvail) ? 1 : 0;
  }

  /**
   * Pops the next available chain into chain; returns its buffer id. Throws BrokenQueueError only
   * for ring damage. The caller checked pending() > 0.
   */
  pop(chain: DescriptorChain): number {
    const q = this.size;
    let i = this.lastAvail;
    let wrap = this.availWrap;
    let descs = 0;
    let id = 0;
    chain.reset(0, this.memory);
    for (;;) {
      if (descs >= this.maxChain) throw new BrokenQueueError(`packed descriptor chain longer than ${this.maxChain} descriptors`);
      if (descs > 0 && !this.isAvailAt(i, wrap)) throw new BrokenQueueError('packed chain continues into a descriptor that is not available');
      const w = 4 * i;
      const lo = this.ring32[w]!;
      const hi = this.ring32[w + 1]!;
      const len = this.ring32[w + 2]!;
      id = this.flags16[2 * w + 6]!;
      const flags = this.flags16[2 * w + 7]!;
      descs++;
      if (++i === q) {
        i = 0;
        wrap = !wrap;
      }
      if (flags & PACKED_DESC_F_INDIRECT) {
        if (!this.indirect || descs > 1 || flags & PACKED_DESC_F_NEXT || len === 0 || len % 16 !== 0) {
          throw new BrokenQueueError(`invalid packed indirect descriptor (flags ${flags}, len ${len})`);
        }
        this.walkIndirect(hi * 0x100000000 + lo, len, chain);
        break;
      }
      chain.add(hi * 0x100000000 + lo, len, (flags & PACKED_DESC_F_WRITE) !== 0);
      if (!(flags & PACKED_DESC_F_NEXT)) break;
    }
    if (id >= q) throw new BrokenQueueError(`packed buffer id ${id} >= queue size ${q}`);
    this.lastAvail = i;
    this.availWrap = wrap;
    this.lastChainDescs = descs;
    chain.head = id;
    return id;
  }

  private isAvailAt(i: number, wrap: boolean): boolean {
    const f = Atomics.load(this.flags16, 8 * i + 7);
    return ((f & PACKED_DESC_F_AVAIL) !== 0) === wrap && ((f & PACKED_DESC_F_USED) !== 0) !== wrap;
  }

  /** Refuses a table longer than the queue or the chain limit before reading any of it (no gigabyte walks). */
  private walkIndirect(addr: number, len: number, chain: DescriptorChain): void {
    const n = len / 16;
    if (n > this.size) throw new BrokenQueueError(`indirect table of ${n} descriptors is longer than the queue (${this.size})`);
    if (n > this.maxChain) throw new BrokenQueueError(`indirect table of ${n} descriptors is longer than ${this.maxChain} descriptors`);
    const ri = this.memory.findGpa(addr, len);
    if (ri < 0) throw new BrokenQueueError(`indirect table 0x${addr.toString(16)}+${len} is outside guest memory`);
    const r = this.memory.regions[ri]!;
    const t = new DataView(r.buffer, r.base + (addr - r.gpa), len);
    for (let k = 0; k < n; k++) {
      const o = 16 * k;
      const flags = t.getUint16(o + 14, true);
      if (flags & PACKED_DESC_F_INDIRECT) throw new BrokenQueueError('nested indirect descriptor');
      chain.add(t.getUint32(o + 4, true) * 0x100000000 + t.getUint32(o, true), t.getUint32(o + 8, true), (flags & PACKED_DESC_F_WRITE) !== 0);
    }
  }

  /**
   * Marks a chain used: writes the used descriptor at the device's position and makes it visible
   * (flags last, with a sequentially consistent store), then skips the chain's descriptor count.
   */
  putUsed(id: number, len: number, descs: number): void {
    const w = 4 * this.usedIdx;
    this.ring32[w + 2] = len;
    this.flags16[2 * w + 6] = id;
    const f = this.usedWrap ? PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED : 0;
    Atomics.store(this.flags16, 8 * this.usedIdx + 7, f);
    this.usedSince++;
    this.usedIdx += descs;
    if (this.usedIdx >= this.size) {
      this.usedIdx -= this.size;
      this.usedWrap = !this.usedWrap;
    }
  }

  /** Returns true if the driver wants an interrupt for what was used since the last call. */
  publish(): boolean {
    if (this.usedSince === 0) return false;
    this.usedSince = 0;
    const old = this.signalled;
    const now = this.usedIdx;
    const valid = this.signalledValid;
    this.signalled = now;
    this.signalledValid = true;
    const flags = Atomics.load(this.driverEvent, 1);
    if (flags === EVENT_FLAG_DISABLE) return false;
    if (flags !== EVENT_FLAG_DESC || !this.eventIdx) return true;
    if (!valid) return true;
    const offWrap = Atomics.load(this.driverEvent, 0);
    let off = offWrap & 0x7fff;
    if (this.usedWrap !== offWrap >> 15 > 0) off -= this.size;
    return ((now - off - 1) & 0xffff) < ((now - old) & 0xffff);
  }

  /** Asks for a kick at the next descriptor, then re-checks (true: work arrived, don't sleep). */
  armKick(): boolean {
    if (this.eventIdx) {
      Atomics.store(this.deviceEvent, 0, this.lastAvail | (this.availWrap ? 0x8000 : 0));
      Atomics.store(this.deviceEvent, 1, EVENT_FLAG_DESC);
    } else Atomics.store(this.deviceEvent, 1, EVENT_FLAG_ENABLE);
    return this.pending() > 0;
  }
}
