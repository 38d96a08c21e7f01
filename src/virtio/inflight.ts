// Inflight I/O tracking for a split queue (vhost-user INFLIGHT_SHMFD, spec "Inflight I/O
// tracking"). The region survives a backend crash: the frontend hands it to the restarted backend,
// which resubmits the marked heads in fetch order.
//
// Per queue: features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16 |
// desc[desc_num] of { inflight u8, padding[5], next u16, counter u64 }.

const HEADER = 16;
const DESC = 16;
const ALIGN = 64;

export function inflightQueueBytes(queueSize: number): number {
  return Math.ceil((HEADER + DESC * queueSize) / ALIGN) * ALIGN;
}

export class SplitInflight {
  private readonly dv: DataView;
  private counter = 0;
  private readonly batch: Uint16Array;
  private batchLen = 0;

  constructor(
    buffer: ArrayBuffer,
    byteOffset: number,
    readonly queueSize: number,
  ) {
    this.dv = new DataView(buffer, byteOffset, inflightQueueBytes(queueSize));
    this.batch = new Uint16Array(queueSize);
    if (this.dv.getUint16(8, true) === 0) {
      this.dv.setBigUint64(0, 0n, true);
      this.dv.setUint16(8, 1, true); // version
      this.dv.setUint16(10, queueSize, true);
    } else if (this.dv.getUint16(10, true) !== queueSize) {
      throw new RangeError(`inflight region describes ${this.dv.getUint16(10, true)} descriptors, queue has ${queueSize}`);
    }
  }

  /** A head was popped from the avail ring. */
  popped(head: number): void {
    const o = HEADER + DESC * head;
    const c = ++this.counter;
    this.dv.setUint32(o + 8, c % 0x100000000, true);
    this.dv.setUint32(o + 12, Math.floor(c / 0x100000000), true);
    this.dv.setUint8(o, 1);
  }

  /** A head's used element was written (not yet published). */
  completed(head: number): void {
    this.dv.setUint16(HEADER + DESC * head + 6, this.dv.getUint16(12, true), true);
    this.dv.setUint16(12, head, true); // last_batch_head
    this.batch[this.batchLen++] = head;
  }

  /** The batch is visible in used->idx: clear its marks and record the new used index. */
  published(usedIdx: number): void {
    for (let i = 0; i < this.batchLen; i++) this.dv.setUint8(HEADER + DESC * this.batch[i]!, 0);
    this.batchLen = 0;
    this.dv.setUint16(14, usedIdx, true);
  }

  /**
   * After a restart: reconciles the last batch with the ring's used index, then returns the heads
   * still in flight in the order they were fetched.
   */
  recover(ringUsedIdx: number): number[] {
    const dv = this.dv;
    const recorded = dv.getUint16(14, true);
    if (recorded !== ringUsedIdx) {
      // The crash hit between publishing used->idx and clearing the batch's marks.
      let n = (ringUsedIdx - recorded) & 0xffff;
      let h = dv.getUint16(12, true);
      const seen = new Set<number>();
      while (n-- > 0 && h < this.queueSize && !seen.has(h)) {
        seen.add(h);
        dv.setUint8(HEADER + DESC * h, 0);
        h = dv.getUint16(HEADER + DESC * h + 6, true);
      }
      dv.setUint16(14, ringUsedIdx, true);
    }
    const heads: { head: number; counter: number }[] = [];
    for (let h = 0; h < this.queueSize; h++) {
      const o = HEADER + DESC * h;
      const c = dv.getUint32(o + 12, true) * 0x100000000 + dv.getUint32(o + 8, true);
      if (c > this.counter) this.counter = c;
      if (dv.getUint8(o) === 1) heads.push({ head: h, counter: c });
    }
    heads.sort((a, b) => a.counter - b.counter);
    return heads.map((x) => x.head);
  }
}
