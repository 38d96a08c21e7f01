// Split virtqueue, descriptor-chain walker and guest memory over real memfd-backed mappings.
// The test plays the driver: it writes rings and descriptors through its own mappings of the
// same memfds, so what the queue reads and writes is checked from the guest's side.
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { native } from '../../src/native/index.js';
import { GuestMemory, type RegionSpec } from '../../src/virtio/memory.js';
import { mapGuestMemory } from '../../src/virtio/memory-map.js';
import { ChainError, DescriptorChain } from '../../src/virtio/chain.js';
import {
  BrokenQueueError,
  SplitQueue,
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE,
  type SplitLayout,
} from '../../src/virtio/split-queue.js';

// ---- guest memory: two regions with a gap, distinct GPA and UVA, region 1 at a non-zero mmap offset

const MiB = 0x100000;
const R0 = { gpa: 0, size: MiB, uva: 0x7f00_0000_0000, mmapOffset: 0 };
const R1 = { gpa: 2 * MiB, size: MiB, uva: 0x7f00_4000_0000, mmapOffset: 0x3000 };
const GAP = MiB; // [1 MiB, 2 MiB) is not guest memory

class TestRam {
  readonly fds: number[] = [];
  /** the driver's own mapping of each whole memfd */
  readonly files: Uint8Array[] = [];
  readonly mem: GuestMemory;
  constructor(readonly defs: (typeof R0)[]) {
    const specs: RegionSpec[] = [];
    defs.forEach((d, i) => {
      const fd = native.memfdCreate(`sq-test-${i}`, d.mmapOffset + d.size);
      this.fds.push(fd);
      this.files.push(new Uint8Array(native.mmap(fd, d.mmapOffset + d.size, 0, true)));
      specs.push({ guestPhysAddr: d.gpa, size: d.size, userAddr: d.uva, mmapOffset: d.mmapOffset, fd });
    });
    this.mem = mapGuestMemory(specs);
  }
  private loc(gpa: number, len: number): { file: Uint8Array; off: number } {
    for (let i = 0; i < this.defs.length; i++) {
      const d = this.defs[i]!;
      if (gpa >= d.gpa && gpa + len <= d.gpa + d.size) return { file: this.files[i]!, off: d.mmapOffset + gpa - d.gpa };
    }
    throw new Error(`test bug: gpa 0x${gpa.toString(16)}+${len} not in guest memory`);
  }
  bytes(gpa: number, len: number): Uint8Array {
    const { file, off } = this.loc(gpa, len);
    return file.subarray(off, off + len);
  }
  dv(gpa: number, len: number): DataView {
    const b = this.bytes(gpa, len);
    return new DataView(b.buffer, b.byteOffset, len);
  }
  uva(gpa: number): number {
    const d = this.defs.find((r) => gpa >= r.gpa && gpa < r.gpa + r.size)!;
    return d.uva + (gpa - d.gpa);
  }
  fill(gpa: number, len: number, seed: number): Uint8Array {
    const b = this.bytes(gpa, len);
    for (let i = 0; i < len; i++) b[i] = (i * 13 + seed) & 0xff;
    return b.slice();
  }
  close(): void {
    for (const fd of this.fds) native.close(fd);
  }
}

/** A split ring laid out in guest memory at base (desc, avail, used a page apart). */
class TestRing {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  availIdx = 0;
  constructor(
    readonly ram: TestRam,
    readonly q: number,
    base: number,
  ) {
    this.desc = base;
    this.avail = base + 0x1000;
    this.used = base + 0x2000;
    ram.bytes(base, 0x3000).fill(0);
  }
  get layout(): SplitLayout {
    return { size: this.q, descAddr: this.ram.uva(this.desc), availAddr: this.ram.uva(this.avail), usedAddr: this.ram.uva(this.used) };
  }
  /** writes descriptor i of the table at tableGpa (the ring's own table by default) */
  setDesc(i: number, addr: number | bigint, len: number, flags: number, next = 0, tableGpa = this.desc): void {
    const dv = this.ram.dv(tableGpa + 16 * i, 16);
    dv.setBigUint64(0, BigInt(addr), true);
    dv.setUint32(8, len, true);
    dv.setUint16(12, flags, true);
    dv.setUint16(14, next, true);
  }
  push(...heads: number[]): void {
    const dv = this.ram.dv(this.avail, 6 + 2 * this.q);
    for (const h of heads) {
      dv.setUint16(4 + 2 * (this.availIdx % this.q), h, true);
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
    dv.setUint16(2, this.availIdx, true);
  }
  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.ram.dv(this.avail, 4).setUint16(2, this.availIdx, true);
  }
  set availFlags(v: number) {
    this.ram.dv(this.avail, 2).setUint16(0, v, true);
  }
  set usedEvent(v: number) {
    this.ram.dv(this.avail + 4 + 2 * this.q, 2).setUint16(0, v, true);
  }
  get usedFlags(): number {
    return this.ram.dv(this.used, 2).getUint16(0, true);
  }
  set usedFlags(v: number) {
    this.ram.dv(this.used, 2).setUint16(0, v, true);
  }
  get usedIdx(): number {
    return this.ram.dv(this.used, 4).getUint16(2, true);
  }
  set usedIdx(v: number) {
    this.ram.dv(this.used, 4).setUint16(2, v, true);
  }
  usedElem(slot: number): { id: number; len: number } {
    const dv = this.ram.dv(this.used + 4 + 8 * slot, 8);
    return { id: dv.getUint32(0, true), len: dv.getUint32(4, true) };
  }
  get availEvent(): number {
    return this.ram.dv(this.used + 4 + 8 * this.q, 2).getUint16(0, true);
  }
  set availEvent(v: number) {
    this.ram.dv(this.used + 4 + 8 * this.q, 2).setUint16(0, v, true);
  }
}

const ram = new TestRam([R0, R1]);
after(() => ram.close());

function queue(ring: TestRing, opts: { eventIdx?: boolean; indirect?: boolean; base?: number; maxChain?: number } = {}): SplitQueue {
  return new SplitQueue(ram.mem, ring.layout, opts.base ?? 0, opts.eventIdx ?? false, opts.indirect ?? true, opts.maxChain);
}

/** Expected host address of guest-physical address gpa, computed independently of MappedRegion. */
function hostOf(gpa: number): number {
  const i = gpa >= R1.gpa ? 1 : 0;
  const d = i === 1 ? R1 : R0;
  return native.addressOf(ram.mem.regions[i]!.buffer) + ram.mem.regions[i]!.base + (gpa - d.gpa);
}

function segments(c: DescriptorChain): { region: number; offset: number; len: number; host: number }[] {
  const out = [];
  for (let k = 0; k < c.count; k++) out.push({ region: c.region[k]!, offset: c.offset[k]!, len: c.len[k]!, host: c.hostAddr[k]! });
  return out;
}

describe('GuestMemory', () => {
  test('maps each region at its mmap offset and translates GPA and UVA', () => {
    const [m0, m1] = ram.mem.regions;
    assert.equal(m0!.hostAddr, native.addressOf(m0!.buffer));
    assert.equal(m1!.hostAddr, native.addressOf(m1!.buffer) + m1!.base);
    assert.equal(m1!.bytes.byteLength, MiB);
    // what the driver writes at region offset 5 appears at bytes[5], not at file offset 5
    ram.files[1]![5] = 0x11;
    ram.files[1]![0x3000 + 5] = 0x77;
    assert.equal(m1!.bytes[5], 0x77);
    assert.equal(ram.mem.findGpa(0, 1), 0);
    assert.equal(ram.mem.findGpa(MiB - 16, 16), 0);
    assert.equal(ram.mem.findGpa(R1.gpa + 100, MiB - 100), 1);
    assert.equal(ram.mem.findGpa(MiB - 8, 16), -1, 'straddles the end of region 0');
    assert.equal(ram.mem.findGpa(GAP + 4096, 16), -1, 'in the gap');
    assert.equal(ram.mem.findGpa(R1.gpa - 8, 16), -1, 'straddles the start of region 1');
    assert.equal(ram.mem.findGpa(3 * MiB - 1, 2), -1);
    assert.equal(ram.mem.findUva(R1.uva + 8, 8), 1);
    assert.equal(ram.mem.findUva(R0.uva + MiB - 4, 8), -1);
    assert.equal(ram.mem.findUva(R1.gpa, 8), -1, 'a GPA is not a UVA');
  });

  test('locateUva checks bounds and alignment', () => {
    const at = ram.mem.locateUva(R1.uva + 0x40, 64, 16);
    assert.equal(at.buffer, ram.mem.regions[1]!.buffer);
    assert.equal(at.byteOffset, ram.mem.regions[1]!.base + 0x40);
    assert.throws(() => ram.mem.locateUva(R1.uva + 0x42, 64, 16), RangeError);
    assert.throws(() => ram.mem.locateUva(R0.uva + MiB - 32, 64, 16), RangeError);
    assert.throws(() => ram.mem.locateUva(0x1000, 64, 16), RangeError);
  });

  test('SplitQueue refuses rings outside memory or misaligned', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    assert.throws(() => new SplitQueue(ram.mem, { ...ring.layout, descAddr: R0.uva + MiB - 64 }, 0, false, true), RangeError);
    assert.throws(() => new SplitQueue(ram.mem, { ...ring.layout, usedAddr: ring.layout.usedAddr + 2 }, 0, false, true), RangeError);
    assert.throws(() => new SplitQueue(ram.mem, { ...ring.layout, availAddr: 0 }, 0, false, true), RangeError);
  });
});

for (const [where, base] of [
  ['region 0 (mmap offset 0)', 0x1000],
  ['region 1 (mmap offset 0x3000)', R1.gpa + 0x1000],
] as const) {
  describe(`rings in ${where}`, () => {
    test('pop and walk a direct chain across both regions', () => {
      const ring = new TestRing(ram, 8, base);
      ring.setDesc(5, 0x10000, 16, NEXT, 2);
      ring.setDesc(2, R1.gpa + 0x20000, 100, NEXT, 7);
      ring.setDesc(7, R1.gpa + 0x30000, 200, NEXT | WRITE, 0);
      ring.setDesc(0, 0x11000, 1, WRITE, 3); // no NEXT: `next` is ignored
      ring.push(5);
      const q = queue(ring);
      assert.equal(q.pending(), 1);
      const head = q.popHead();
      assert.equal(head, 5);
      assert.equal(q.pending(), 0);
      const c = new DescriptorChain(8);
      q.walk(head, c);
      assert.equal(c.error, ChainError.NONE);
      assert.equal(c.head, 5);
      assert.deepEqual(segments(c), [
        { region: 0, offset: 0x10000, len: 16, host: hostOf(0x10000) },
        { region: 1, offset: 0x20000, len: 100, host: hostOf(R1.gpa + 0x20000) },
        { region: 1, offset: 0x30000, len: 200, host: hostOf(R1.gpa + 0x30000) },
        { region: 0, offset: 0x11000, len: 1, host: hostOf(0x11000) },
      ]);
      assert.equal(c.readableCount, 2);
      assert.equal(c.readableBytes, 116);
      assert.equal(c.writableBytes, 201);
    });

    test('pop and walk an indirect table (in the other region)', () => {
      const ring = new TestRing(ram, 8, base);
      const table = (base >= R1.gpa ? 0 : R1.gpa) + 0x8000;
      ring.setDesc(1, table, 48, INDIRECT);
      ring.setDesc(0, 0x40000, 16, NEXT, 2, table);
      ring.setDesc(2, R1.gpa + 0x50000, 4096, NEXT | WRITE, 1, table);
      ring.setDesc(1, 0x41000, 1, WRITE, 0, table);
      ring.push(1);
      const q = queue(ring);
      const c = new DescriptorChain(8);
      q.walk(q.popHead(), c);
      assert.equal(c.error, ChainError.NONE);
      assert.deepEqual(segments(c), [
        { region: 0, offset: 0x40000, len: 16, host: hostOf(0x40000) },
        { region: 1, offset: 0x50000, len: 4096, host: hostOf(R1.gpa + 0x50000) },
        { region: 0, offset: 0x41000, len: 1, host: hostOf(0x41000) },
      ]);
      assert.equal(c.readableBytes, 16);
      assert.equal(c.writableBytes, 4097);
    });

    test('putUsed + publish make used entries visible and advance used idx', () => {
      const ring = new TestRing(ram, 8, base);
      const q = queue(ring);
      q.putUsed(3, 513);
      q.putUsed(6, 1);
      assert.equal(ring.usedIdx, 0, 'not visible before publish');
      assert.equal(q.publish(), true);
      assert.equal(ring.usedIdx, 2);
      assert.deepEqual(ring.usedElem(0), { id: 3, len: 513 });
      assert.deepEqual(ring.usedElem(1), { id: 6, len: 1 });
      assert.equal(q.publish(), false, 'nothing new to publish');
    });
  });
}

describe('avail ring', () => {
  test('indices wrap at 2^16', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.setAvailIdx(65534);
    ring.push(4, 5, 6);
    assert.equal(ring.availIdx, 1);
    const q = queue(ring, { base: 65534 });
    assert.equal(q.pending(), 3);
    assert.deepEqual([q.popHead(), q.popHead(), q.popHead()], [4, 5, 6]);
    assert.equal(q.lastAvail, 1);
    assert.equal(q.pending(), 0);
  });

  test('exactly q pending is fine, q + 1 ahead is a broken queue', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.setAvailIdx(8);
    assert.equal(queue(ring).pending(), 8);
    ring.setAvailIdx(9);
    assert.throws(() => queue(ring).pending(), BrokenQueueError);
    ring.setAvailIdx(0xffff); // "behind": 65535 ahead
    assert.throws(() => queue(ring).pending(), BrokenQueueError);
  });

  test('a head index >= queue size is a broken queue', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.push(8);
    const q = queue(ring);
    assert.equal(q.pending(), 1);
    assert.throws(() => q.popHead(), BrokenQueueError);
    ring.push(0xffff);
    assert.throws(() => q.popHead(), BrokenQueueError);
  });
});

describe('chain data access across segment boundaries', () => {
  // readable: 10 bytes @R0, 7 bytes @R1, 20 bytes @R0; writable: 5 @R1, 9 @R0, 3 @R1
  function build(): { c: DescriptorChain; rd: Uint8Array; wr: { gpa: number; len: number }[] } {
    const ring = new TestRing(ram, 8, 0x1000);
    const rds = [
      { gpa: 0x60000, len: 10 },
      { gpa: R1.gpa + 0x60000, len: 7 },
      { gpa: 0x61000, len: 20 },
    ];
    const wr = [
      { gpa: R1.gpa + 0x62000, len: 5 },
      { gpa: 0x63000, len: 9 },
      { gpa: R1.gpa + 0x64000, len: 3 },
    ];
    const rd: number[] = [];
    rds.forEach((s, i) => {
      rd.push(...ram.fill(s.gpa, s.len, 40 * i + 1));
      ring.setDesc(i, s.gpa, s.len, NEXT, i + 1);
    });
    wr.forEach((s, i) => {
      ram.bytes(s.gpa, s.len + 1).fill(0xee);
      ring.setDesc(3 + i, s.gpa, s.len, WRITE | (i < 2 ? NEXT : 0), 4 + i);
    });
    ring.push(0);
    const q = queue(ring);
    const c = new DescriptorChain(8);
    q.walk(q.popHead(), c);
    assert.equal(c.count, 6);
    assert.equal(c.error, ChainError.NONE);
    return { c, rd: Uint8Array.from(rd), wr };
  }

  test('readInto slices across segments', () => {
    const { c, rd } = build();
    for (const [from, n] of [
      [0, 37],
      [8, 12],
      [10, 7],
      [16, 2],
      [17, 20],
      [30, 100],
      [37, 5],
    ] as const) {
      const out = new Uint8Array(n).fill(0xaa);
      const got = c.readInto(out, from, n);
      const expect = rd.subarray(from, Math.min(from + n, rd.length));
      assert.equal(got, expect.length, `readInto(${from}, ${n})`);
      assert.deepEqual([...out.subarray(0, got)], [...expect]);
    }
  });

  test('writeFrom and zeroWritable touch only the writable buffers, in order', () => {
    const { c, wr } = build();
    const src = Uint8Array.from({ length: 17 }, (_, i) => i + 1);
    assert.equal(c.writeFrom(src.subarray(0, 10), 3), 10);
    const flat = (): number[] => wr.flatMap((s) => [...ram.bytes(s.gpa, s.len)]);
    const expect = new Array(17).fill(0xee);
    for (let i = 0; i < 10; i++) expect[3 + i] = i + 1;
    assert.deepEqual(flat(), expect);
    // the byte after each writable buffer is untouched
    for (const s of wr) assert.equal(ram.bytes(s.gpa + s.len, 1)[0], 0xee);
    // writing past the end stops at the end
    assert.equal(c.writeFrom(src, 10), 7);
    c.zeroWritable(4, 8);
    const z = flat();
    assert.deepEqual(z.slice(4, 12), new Array(8).fill(0));
    assert.equal(z[3], 1);
    assert.equal(z[12], 3);
    // the status byte is the last writable byte
    assert.equal(c.setLastWritableByte(0x42), true);
    assert.equal(ram.bytes(wr[2]!.gpa + 2, 1)[0], 0x42);
  });

  test('iov slices readable and writable sides at byte offsets', () => {
    const { c, wr } = build();
    const out = new Float64Array(16);
    assert.equal(c.iov(out, false, 8, 12), 3);
    assert.deepEqual([...out.subarray(0, 6)], [hostOf(0x60000 + 8), 2, hostOf(R1.gpa + 0x60000), 7, hostOf(0x61000), 3]);
    assert.equal(c.iov(out, false, 16, 21), 2);
    assert.deepEqual([...out.subarray(0, 4)], [hostOf(R1.gpa + 0x60000 + 6), 1, hostOf(0x61000), 20]);
    assert.equal(c.iov(out, true, 0, 16), 3);
    assert.deepEqual([...out.subarray(0, 6)], [hostOf(wr[0]!.gpa), 5, hostOf(wr[1]!.gpa), 9, hostOf(wr[2]!.gpa), 2]);
    assert.equal(c.iov(out, true, 14, 3), 1);
    assert.deepEqual([...out.subarray(0, 2)], [hostOf(wr[2]!.gpa), 3]);
    // more bytes than the side has, or too small an output array
    assert.equal(c.iov(out, false, 0, 38), -1);
    assert.equal(c.iov(out, true, 1, 17), -1);
    assert.equal(c.iov(new Float64Array(4), false, 0, 37), -1);
  });
});

describe('notifications', () => {
  test('without EVENT_IDX: the NO_INTERRUPT flag decides', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    const q = queue(ring, { eventIdx: false });
    ring.availFlags = 1;
    q.putUsed(0, 1);
    assert.equal(q.publish(), false);
    ring.availFlags = 0;
    q.putUsed(1, 1);
    assert.equal(q.publish(), true);
    assert.equal(ring.usedIdx, 2);
  });

  test('with EVENT_IDX: the flag is ignored and used_event decides', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    const q = queue(ring, { eventIdx: true });
    ring.availFlags = 1;
    ring.usedEvent = 0;
    q.putUsed(0, 1);
    assert.equal(q.publish(), true, 'used_event 0 crossed by 0 -> 1');
    ring.availFlags = 0;
    ring.usedEvent = 5;
    q.putUsed(1, 1);
    q.putUsed(2, 1);
    assert.equal(q.publish(), false, 'used_event 5 not crossed by 1 -> 3');
    q.putUsed(3, 1);
    q.putUsed(4, 1);
    q.putUsed(5, 1);
    assert.equal(q.publish(), true, 'used_event 5 crossed by 3 -> 6');
    q.putUsed(6, 1);
    assert.equal(q.publish(), false, 'used_event 5 already behind: 6 -> 7');
  });

  test('property: publish() == vring_need_event(used_event, new, old), with wrap-around', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 0xffff }),
        fc.array(fc.record({ k: fc.integer({ min: 0, max: 8 }), usedEvent: fc.integer({ min: 0, max: 0xffff }) }), { minLength: 1, maxLength: 5 }),
        (start, steps) => {
          ring.usedIdx = start;
          const q = queue(ring, { eventIdx: true });
          let old = start;
          let cur = start;
          for (const { k, usedEvent } of steps) {
            ring.usedEvent = usedEvent;
            for (let i = 0; i < k; i++) q.putUsed(i, i);
            cur = (cur + k) & 0xffff;
            const expect = k > 0 && ((cur - usedEvent - 1) & 0xffff) < ((cur - old) & 0xffff);
            assert.equal(q.publish(), expect);
            assert.equal(ring.usedIdx, cur);
            if (k > 0) old = cur;
          }
        },
      ),
      { numRuns: 500 },
    );
  });

  test('armKick writes avail_event (EVENT_IDX) or clears used flags, and re-checks', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.setAvailIdx(300);
    ring.availEvent = 0xbeef;
    const q = queue(ring, { eventIdx: true, base: 298 });
    assert.equal(q.armKick(), true, 'two heads pending');
    assert.equal(ring.availEvent, 298);
    q.popHead();
    q.popHead();
    assert.equal(q.armKick(), false);
    assert.equal(ring.availEvent, 300);

    const ring2 = new TestRing(ram, 8, R1.gpa + 0x10000);
    ring2.usedFlags = 1;
    ring2.availEvent = 0x1234;
    const q2 = queue(ring2, { eventIdx: false });
    assert.equal(q2.armKick(), false);
    assert.equal(ring2.usedFlags, 0);
    assert.equal(ring2.availEvent, 0x1234, 'no avail_event write without EVENT_IDX');
  });
});

describe('hostile rings', () => {
  function walkHead(ring: TestRing, head: number, opts: { indirect?: boolean; maxSegs?: number; maxChain?: number } = {}): DescriptorChain {
    const q = queue(ring, { indirect: opts.indirect ?? true, maxChain: opts.maxChain });
    const c = new DescriptorChain(opts.maxSegs ?? 16);
    q.walk(head, c);
    return c;
  }

  test('the longest legal chain (q descriptors) walks, a loop does not', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    for (let i = 0; i < 8; i++) ring.setDesc(i, 0x70000 + 64 * i, 64, i < 7 ? NEXT : 0, i + 1);
    assert.equal(walkHead(ring, 0).count, 8);
    ring.setDesc(3, 0x70000, 64, NEXT, 5);
    ring.setDesc(5, 0x70000, 64, NEXT, 3);
    assert.throws(() => walkHead(ring, 3), BrokenQueueError);
    ring.setDesc(6, 0x70000, 64, NEXT, 6); // self loop
    assert.throws(() => walkHead(ring, 6), BrokenQueueError);
  });

  test('next index or head >= queue size', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.setDesc(0, 0x70000, 64, NEXT, 8);
    assert.throws(() => walkHead(ring, 0), BrokenQueueError);
    ring.setDesc(0, 0x70000, 64, NEXT, 0xffff);
    assert.throws(() => walkHead(ring, 0), BrokenQueueError);
    assert.throws(() => walkHead(ring, 8), BrokenQueueError);
  });

  test('invalid indirect descriptors', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    const table = R1.gpa + 0x8000;
    ring.setDesc(0, 0x70000, 64, 0, 0, table);
    ring.setDesc(1, 0x70100, 64, WRITE, 0, table);
    // valid first
    ring.setDesc(0, table, 32, INDIRECT);
    assert.equal(walkHead(ring, 0).count, 1);
    ring.setDesc(0, 0x70000, 64, NEXT, 1, table);
    assert.equal(walkHead(ring, 0).count, 2);
    // feature off
    assert.throws(() => walkHead(ring, 0, { indirect: false }), BrokenQueueError);
    // INDIRECT | NEXT
    ring.setDesc(0, table, 32, INDIRECT | NEXT, 1);
    assert.throws(() => walkHead(ring, 0), BrokenQueueError);
    // length not a multiple of 16, or 0
    for (const len of [0, 8, 33, 47]) {
      ring.setDesc(0, table, len, INDIRECT);
      assert.throws(() => walkHead(ring, 0), BrokenQueueError, `len ${len}`);
    }
    // table outside memory: in the gap, straddling a region end, beyond 2^53
    for (const addr of [GAP + 0x1000, MiB - 16, 3 * MiB - 16, 2 ** 53, 0xffff_ffff_ffff_f000n]) {
      ring.setDesc(0, addr, 32, INDIRECT);
      assert.throws(() => walkHead(ring, 0), BrokenQueueError, `table at ${addr}`);
    }
    // indirect inside indirect
    ring.setDesc(0, table, 32, INDIRECT);
    ring.setDesc(1, table, 32, INDIRECT, 0, table);
    ring.setDesc(0, 0x70000, 64, NEXT, 1, table);
    assert.throws(() => walkHead(ring, 0), BrokenQueueError);
    // a loop inside the indirect table
    ring.setDesc(1, 0x70100, 64, NEXT | WRITE, 0, table);
    assert.throws(() => walkHead(ring, 0), BrokenQueueError);
    // next beyond the indirect table's length
    ring.setDesc(1, 0x70100, 64, NEXT | WRITE, 2, table);
    assert.throws(() => walkHead(ring, 0), BrokenQueueError);
  });

  test('an indirect table longer than the queue is refused, even if its chain is short', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    const table = R1.gpa + 0x8000;
    ring.setDesc(0, 0x70000, 16, NEXT, 1, table);
    ring.setDesc(1, 0x70100, 1, WRITE, 0, table);
    ring.setDesc(0, table, 16 * 8, INDIRECT);
    assert.equal(walkHead(ring, 0).count, 2);
    ring.setDesc(0, table, 16 * 9, INDIRECT);
    assert.throws(() => walkHead(ring, 0), /indirect table of 9 descriptors is longer than the queue \(8\)/);
    ring.setDesc(0, table, 0x4000_0000, INDIRECT); // 1 GiB: refused before any of it is read
    assert.throws(() => walkHead(ring, 0), /longer than the queue/);
  });

  test('the walk stops at the device chain limit: direct, indirect, and direct followed by indirect', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    const table = R1.gpa + 0x8000;
    for (let i = 0; i < 5; i++) ring.setDesc(i, 0x70000 + 64 * i, 64, i < 4 ? NEXT : 0, i + 1);
    assert.equal(walkHead(ring, 0, { maxChain: 5 }).count, 5);
    assert.throws(() => walkHead(ring, 0, { maxChain: 4 }), /longer than 4 descriptors/);
    for (let i = 0; i < 5; i++) ring.setDesc(i, 0x70000 + 64 * i, 64, i < 4 ? NEXT : 0, i + 1, table);
    ring.setDesc(0, table, 16 * 8, INDIRECT);
    assert.equal(walkHead(ring, 0, { maxChain: 5 }).count, 5);
    assert.throws(() => walkHead(ring, 0, { maxChain: 4 }), /longer than 4 descriptors/);
    ring.setDesc(6, 0x70400, 64, NEXT, 7);
    ring.setDesc(7, table, 16 * 8, INDIRECT);
    assert.equal(walkHead(ring, 6, { maxChain: 6 }).count, 6);
    assert.throws(() => walkHead(ring, 6, { maxChain: 5 }), /longer than 5 descriptors/);
    // the queue size stays the bound when the device limit is larger
    assert.equal(queue(ring, { maxChain: 1000 }).maxChain, 8);
  });

  test('bad buffer addresses are a chain error, not a throw', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    const cases: [number | bigint, number][] = [
      [GAP + 0x1000, 16], // in the gap
      [MiB - 8, 16], // straddles the end of region 0 into the gap
      [R1.gpa - 8, 16], // straddles the gap into region 1
      [R1.gpa + MiB - 1, 2], // past the end of region 1
      [0x10000, 0xffff_ffff], // longer than memory
      [2 ** 53 - 16, 16], // < 2^53 but not memory
      [2 ** 53, 16], // needs 54 bits
      [0xffff_ffff_ffff_fff0n, 16],
    ];
    for (const [addr, len] of cases) {
      ring.setDesc(0, 0x70000, 16, NEXT, 1);
      ring.setDesc(1, addr, len, NEXT | WRITE, 2);
      ring.setDesc(2, 0x70100, 1, WRITE);
      const c = walkHead(ring, 0);
      assert.equal(c.error, ChainError.BAD_ADDRESS, `addr ${addr} len ${len}`);
      assert.deepEqual(
        segments(c).map((s) => s.offset),
        [0x70000, 0x70100],
        'the good buffers are still recorded',
      );
    }
  });

  test('readable after writable is BAD_ORDER', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.setDesc(0, 0x70000, 16, NEXT, 1);
    ring.setDesc(1, 0x70100, 16, NEXT | WRITE, 2);
    ring.setDesc(2, 0x70200, 16, NEXT, 3);
    ring.setDesc(3, 0x70300, 1, WRITE);
    const c = walkHead(ring, 0);
    assert.equal(c.error, ChainError.BAD_ORDER);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.readableCount, 1);
  });

  test('more segments than the chain holds is TOO_MANY_SEGMENTS', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    for (let i = 0; i < 6; i++) ring.setDesc(i, 0x70000 + 0x100 * i, 32, i < 5 ? NEXT : 0, i + 1);
    const c = walkHead(ring, 0, { maxSegs: 4 });
    assert.equal(c.error, ChainError.TOO_MANY_SEGMENTS);
    assert.equal(c.count, 4);
    assert.equal(walkHead(ring, 0, { maxSegs: 6 }).error, ChainError.NONE);
  });

  test('zero-length buffers are skipped', () => {
    const ring = new TestRing(ram, 8, 0x1000);
    ring.setDesc(0, 0x70000, 16, NEXT, 1);
    ring.setDesc(1, GAP + 0x100, 0, NEXT, 2);
    ring.setDesc(2, 0x70200, 1, WRITE);
    const c = walkHead(ring, 0);
    assert.equal(c.error, ChainError.NONE);
    assert.equal(c.count, 2);
  });
});

describe('property: random descriptor tables', () => {
  const Q = 16;
  const TABLE = R1.gpa + 0x9000; // 8-entry indirect area
  const addr = fc.oneof(
    fc.integer({ min: 0, max: MiB - 1 }),
    fc.integer({ min: R1.gpa, max: R1.gpa + MiB - 1 }),
    fc.integer({ min: 0, max: 64 }).map((d) => MiB - d),
    fc.integer({ min: 0, max: 64 }).map((d) => R1.gpa + MiB - d),
    fc.integer({ min: 0, max: 64 }).map((d) => R1.gpa - d),
    fc.integer({ min: GAP, max: 2 * MiB - 1 }),
    fc.integer({ min: 3 * MiB, max: 2 ** 53 - 1 }),
    fc.constantFrom(TABLE, TABLE + 16, TABLE + 120),
    fc.bigInt({ min: 2n ** 53n - 64n, max: 2n ** 64n - 1n }),
  );
  const len = fc.oneof(
    fc.integer({ min: 0, max: 64 }),
    fc.integer({ min: 0, max: 8 }).map((n) => 16 * n),
    fc.integer({ min: 0, max: 2 * MiB }),
    fc.constant(0xffff_ffff),
  );
  const desc = fc.record({
    addr,
    len,
    flags: fc.oneof(fc.integer({ min: 0, max: 7 }), fc.integer({ min: 0, max: 0xffff })),
    next: fc.oneof(fc.integer({ min: 0, max: Q + 2 }), fc.integer({ min: 0, max: 0xffff })),
  });

  test('walk completes or throws BrokenQueueError, and every segment lies inside its region', () => {
    const ring = new TestRing(ram, Q, 0x80000);
    let completed = 0;
    let broken = 0;
    fc.assert(
      fc.property(
        fc.array(desc, { minLength: Q, maxLength: Q }),
        fc.array(desc, { minLength: 8, maxLength: 8 }),
        fc.integer({ min: 0, max: Q + 1 }),
        fc.integer({ min: 1, max: 8 }),
        fc.boolean(),
        (main, indirectTable, head, maxSegs, indirect) => {
          main.forEach((d, i) => ring.setDesc(i, d.addr, d.len, d.flags, d.next));
          indirectTable.forEach((d, i) => ring.setDesc(i, d.addr, d.len, d.flags, d.next, TABLE));
          const q = new SplitQueue(ram.mem, ring.layout, 0, false, indirect);
          const c = new DescriptorChain(maxSegs);
          try {
            q.walk(head, c);
          } catch (e) {
            if (e instanceof BrokenQueueError) {
              broken++;
              return;
            }
            throw e;
          }
          completed++;
          assert.ok(c.count <= maxSegs);
          let rd = 0;
          let total = 0;
          for (let k = 0; k < c.count; k++) {
            const ri = c.region[k]!;
            const r = ram.mem.regions[ri];
            assert.ok(r !== undefined, `segment ${k} names region ${ri}`);
            const off = c.offset[k]!;
            const l = c.len[k]!;
            assert.ok(l > 0);
            assert.ok(Number.isInteger(off) && off >= 0, `offset ${off}`);
            assert.ok(off + l <= r.size, `segment ${k} [${off}, ${off + l}) beyond region size ${r.size}`);
            assert.equal(c.hostAddr[k]! - r.hostAddr, off);
            if (k < c.readableCount) rd += l;
            total += l;
          }
          assert.equal(rd, c.readableBytes);
          assert.equal(total, c.readableBytes + c.writableBytes);
          // the chain's accessors stay inside it
          const iov = new Float64Array(2 * maxSegs);
          assert.equal(c.iov(iov, false, 0, c.readableBytes), c.readableCount);
          if (c.readableBytes <= 4 * MiB) {
            const out = new Uint8Array(c.readableBytes);
            assert.equal(c.readInto(out, 0, c.readableBytes + 10), c.readableBytes);
          }
        },
      ),
      { numRuns: 3000 },
    );
    // both outcomes must be exercised for the property to mean something
    assert.ok(completed > 100, `completed ${completed}`);
    assert.ok(broken > 100, `broken ${broken}`);
  });
});
