// Packed virtqueue over real memfd guest memory; the test plays the driver through its own mapping.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../../src/native/index.js';
import { mapGuestMemory } from '../../src/virtio/memory-map.js';
import { ChainError, DescriptorChain } from '../../src/virtio/chain.js';
import { BrokenQueueError } from '../../src/virtio/split-queue.js';
import {
  EVENT_FLAG_DESC,
  EVENT_FLAG_DISABLE,
  EVENT_FLAG_ENABLE,
  PACKED_DESC_F_AVAIL as AVAIL,
  PACKED_DESC_F_INDIRECT as INDIRECT,
  PACKED_DESC_F_NEXT as NEXT,
  PACKED_DESC_F_USED as USED,
  PACKED_DESC_F_WRITE as WRITE,
  PackedQueue,
  encodePackedBase,
} from '../../src/virtio/packed-queue.js';

const SIZE = 1 << 20;
const UVA = 0x7f10_0000_0000;
const RING = 0x1000;
const DRIVER = 0x2000;
const DEVICE = 0x3000;
const DATA = 0x10000;

function setup(q: number, opts: { eventIdx?: boolean; indirect?: boolean; maxChain?: number } = {}) {
  const fd = native.memfdCreate('packed-test', SIZE);
  const bytes = new Uint8Array(native.mmap(fd, SIZE, 0, true));
  const dv = new DataView(bytes.buffer);
  const mem = mapGuestMemory([{ guestPhysAddr: 0, size: SIZE, userAddr: UVA, mmapOffset: 0, fd }]);
  native.close(fd);
  const queue = new PackedQueue(mem, { size: q, descAddr: UVA + RING, driverAddr: UVA + DRIVER, deviceAddr: UVA + DEVICE }, encodePackedBase(0, true, 0, true), opts.eventIdx ?? true, opts.indirect ?? true, opts.maxChain);
  // Driver state: next slot and wrap counter.
  const drv = { next: 0, wrap: true };
  const put = (i: number, addr: number, len: number, id: number, flags: number): void => {
    dv.setBigUint64(RING + 16 * i, BigInt(addr), true);
    dv.setUint32(RING + 16 * i + 8, len, true);
    dv.setUint16(RING + 16 * i + 12, id, true);
    dv.setUint16(RING + 16 * i + 14, flags, true);
  };
  /** Makes a chain available: flags of the first descriptor written last, like a driver must. */
  const add = (id: number, bufs: { addr: number; len: number; write?: boolean; flags?: number }[]): void => {
    const slots: { i: number; flags: number }[] = [];
    bufs.forEach((b, k) => {
      const wrapBits = drv.wrap ? AVAIL : USED;
      const flags = (b.flags ?? 0) | (b.write ? WRITE : 0) | (k + 1 < bufs.length ? NEXT : 0) | wrapBits;
      slots.push({ i: drv.next, flags });
      put(drv.next, b.addr, b.len, k + 1 === bufs.length ? id : 0xffff, 0);
      if (++drv.next === q) {
        drv.next = 0;
        drv.wrap = !drv.wrap;
      }
    });
    for (let k = slots.length - 1; k >= 0; k--) dv.setUint16(RING + 16 * slots[k]!.i + 14, slots[k]!.flags, true);
  };
  const used = (i: number) => ({ id: dv.getUint16(RING + 16 * i + 12, true), len: dv.getUint32(RING + 16 * i + 8, true), flags: dv.getUint16(RING + 16 * i + 14, true) });
  return { queue, dv, add, used, drv, bytes };
}

describe('packed virtqueue', () => {
  test('pops a chain, takes the id from its last descriptor, marks it used with the wrap bits', () => {
    const { queue, add, used } = setup(8);
    assert.equal(queue.pending(), 0);
    add(5, [{ addr: DATA, len: 16 }, { addr: DATA + 512, len: 512, write: true }, { addr: DATA + 2048, len: 1, write: true }]);
    assert.equal(queue.pending(), 1);
    const chain = new DescriptorChain(16);
    assert.equal(queue.pop(chain), 5);
    assert.equal(chain.head, 5);
    assert.equal(chain.count, 3);
    assert.equal(chain.readableBytes, 16);
    assert.equal(chain.writableBytes, 513);
    assert.equal(queue.lastChainDescs, 3);
    assert.equal(queue.lastAvail, 3);
    assert.equal(queue.pending(), 0);
    queue.putUsed(5, 513, 3);
    const u = used(0);
    assert.deepEqual([u.id, u.len, u.flags & (AVAIL | USED)], [5, 513, AVAIL | USED]);
    assert.equal(queue.usedIdx, 3);
  });

  test('wraps around: both wrap counters flip and the base encodes them', () => {
    const { queue, add, used } = setup(4);
    const chain = new DescriptorChain(16);
    for (let round = 0; round < 5; round++) {
      add(round % 4, [{ addr: DATA, len: 16 }, { addr: DATA + 4096, len: 1, write: true }]);
      assert.equal(queue.pending(), 1, `round ${round}`);
      const id = queue.pop(chain);
      assert.equal(id, round % 4);
      const at = queue.usedIdx;
      const wrap = queue.usedWrap;
      queue.putUsed(id, 1, queue.lastChainDescs);
      assert.equal(used(at).flags & (AVAIL | USED), wrap ? AVAIL | USED : 0);
    }
    // 5 chains of 2 descriptors in a ring of 4: 10 slots = 2 wraps + 2.
    assert.equal(queue.lastAvail, 2);
    assert.equal(queue.availWrap, true);
    assert.equal(queue.base, encodePackedBase(2, true, 2, true));
    const q2 = new PackedQueue(queue.memory, { size: 4, descAddr: UVA + RING, driverAddr: UVA + DRIVER, deviceAddr: UVA + DEVICE }, queue.base, true, true);
    assert.equal(q2.lastAvail, 2);
    assert.equal(q2.usedWrap, true);
  });

  test('indirect table', () => {
    const { queue, add, dv } = setup(8);
    const table = 0x8000;
    const entries = [
      [DATA, 16, 0],
      [DATA + 512, 4096, WRITE],
      [DATA + 8192, 1, WRITE],
    ] as const;
    entries.forEach(([a, l, f], k) => {
      dv.setBigUint64(table + 16 * k, BigInt(a), true);
      dv.setUint32(table + 16 * k + 8, l, true);
      dv.setUint16(table + 16 * k + 14, f, true);
    });
    add(3, [{ addr: table, len: 48, flags: INDIRECT }]);
    const chain = new DescriptorChain(16);
    assert.equal(queue.pop(chain), 3);
    assert.equal(queue.lastChainDescs, 1);
    assert.equal(chain.count, 3);
    assert.equal(chain.writableBytes, 4097);
  });

  test('hostile rings throw BrokenQueueError; bad buffers are chain errors', () => {
    const chain = new DescriptorChain(16);
    {
      const { queue, add } = setup(4);
      add(9, [{ addr: DATA, len: 16 }]);
      assert.throws(() => queue.pop(chain), BrokenQueueError, 'id >= size');
    }
    {
      const { queue, dv } = setup(4);
      for (let i = 0; i < 4; i++) {
        dv.setBigUint64(RING + 16 * i, BigInt(DATA), true);
        dv.setUint32(RING + 16 * i + 8, 16, true);
        dv.setUint16(RING + 16 * i + 14, NEXT | AVAIL, true);
      }
      assert.throws(() => queue.pop(chain), BrokenQueueError, 'a chain that never ends');
    }
    {
      const { queue, add } = setup(4, { indirect: false });
      add(1, [{ addr: 0x8000, len: 16, flags: INDIRECT }]);
      assert.throws(() => queue.pop(chain), BrokenQueueError, 'indirect without the feature');
    }
    {
      const { queue, add } = setup(4);
      add(1, [{ addr: 0x8000, len: 17, flags: INDIRECT }]);
      assert.throws(() => queue.pop(chain), BrokenQueueError, 'indirect length not a multiple of 16');
    }
    {
      const { queue, add } = setup(4);
      add(1, [{ addr: SIZE + 4096, len: 16 }, { addr: DATA, len: 1, write: true }]);
      queue.pop(chain);
      assert.equal(chain.error, ChainError.BAD_ADDRESS);
    }
    {
      const { queue, add, dv } = setup(8);
      add(1, [{ addr: DATA, len: 16 }]);
      // The next slot is not available: a NEXT into it is ring damage.
      dv.setUint16(RING + 14, NEXT | AVAIL, true);
      assert.throws(() => queue.pop(chain), BrokenQueueError);
    }
  });

  test('indirect tables longer than the queue or the chain limit are refused; so are direct chains past the limit', () => {
    const chain = new DescriptorChain(16);
    const table = 0x8000;
    {
      const { queue, add } = setup(8);
      add(1, [{ addr: table, len: 16 * 9, flags: INDIRECT }]);
      assert.throws(() => queue.pop(chain), /indirect table of 9 descriptors is longer than the queue \(8\)/);
    }
    {
      const { queue, add } = setup(8);
      add(1, [{ addr: table, len: 0x4000_0000, flags: INDIRECT }]); // 1 GiB, never read
      assert.throws(() => queue.pop(chain), /longer than the queue/);
    }
    {
      const { queue, add } = setup(8, { maxChain: 4 });
      add(1, [{ addr: table, len: 16 * 5, flags: INDIRECT }]);
      assert.throws(() => queue.pop(chain), /longer than 4 descriptors/);
    }
    {
      const { queue, add } = setup(8, { maxChain: 4 });
      add(1, [{ addr: table, len: 16 * 4, flags: INDIRECT }]);
      assert.equal(queue.pop(chain), 1);
    }
    {
      const { queue, add } = setup(8, { maxChain: 4 });
      add(1, Array.from({ length: 5 }, (_, k) => ({ addr: DATA + 64 * k, len: 64 })));
      assert.throws(() => queue.pop(chain), /longer than 4 descriptors/);
    }
    {
      const { queue, add } = setup(8, { maxChain: 4 });
      add(1, Array.from({ length: 4 }, (_, k) => ({ addr: DATA + 64 * k, len: 64 })));
      assert.equal(queue.pop(chain), 1);
      assert.equal(queue.lastChainDescs, 4);
    }
  });

  test('notification decisions: DISABLE, ENABLE, and DESC with the wrap counter', () => {
    const { queue, add, dv } = setup(8);
    const chain = new DescriptorChain(16);
    const cycle = (): boolean => {
      add(0, [{ addr: DATA, len: 16 }, { addr: DATA + 4096, len: 1, write: true }]);
      const id = queue.pop(chain);
      queue.putUsed(id, 1, queue.lastChainDescs);
      return queue.publish();
    };
    assert.equal(queue.publish(), false, 'nothing used');
    dv.setUint16(DRIVER + 2, EVENT_FLAG_DISABLE, true);
    assert.equal(cycle(), false);
    dv.setUint16(DRIVER + 2, EVENT_FLAG_ENABLE, true);
    assert.equal(cycle(), true);
    // DESC: interrupt when the used index passes offset 6 in the current wrap.
    dv.setUint16(DRIVER + 2, EVENT_FLAG_DESC, true);
    dv.setUint16(DRIVER, 6 | 0x8000, true);
    assert.equal(queue.usedIdx, 4);
    assert.equal(cycle(), false, 'used 4 -> 6 does not pass event 6');
    assert.equal(cycle(), true, 'used 6 -> 8(0) passes event 6');
  });

  test('armKick writes the device event area', () => {
    const { queue, dv, add } = setup(8);
    assert.equal(queue.armKick(), false);
    assert.equal(dv.getUint16(DEVICE + 2, true), EVENT_FLAG_DESC);
    assert.equal(dv.getUint16(DEVICE, true), 0x8000);
    add(1, [{ addr: DATA, len: 16 }]);
    assert.equal(queue.armKick(), true);
    const noIdx = setup(8, { eventIdx: false });
    noIdx.dv.setUint16(DEVICE + 2, EVENT_FLAG_DISABLE, true);
    noIdx.queue.armKick();
    assert.equal(noIdx.dv.getUint16(DEVICE + 2, true), EVENT_FLAG_ENABLE);
  });
});
