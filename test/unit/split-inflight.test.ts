// Split-ring inflight tracking (INFLIGHT_SHMFD, anchors §1.9) over a real memfd: each "process"
// maps the file afresh, a crash is simply dropping the tracker between two of its steps, and the
// restarted tracker must resubmit exactly the heads whose completions the driver never saw, in
// fetch order. The region layout is the ABI shared with QEMU, so the test reads it directly.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../../src/native/index.js';
import { SplitInflight, inflightQueueBytes } from '../../src/virtio/inflight.js';

const QS = 16;
const PER_QUEUE = inflightQueueBytes(QS);
const fds: number[] = [];
after(() => fds.forEach((fd) => native.close(fd)));

/** A region for 2 queues, as GET_INFLIGHT_FD makes it (zeroed); queue 1 sits at a non-zero offset. */
function region(): number {
  const fd = native.memfdCreate('inflight-test', 2 * PER_QUEUE);
  fds.push(fd);
  return fd;
}

/** One backend process's view of queue q: a fresh mapping, as after a restart. */
function attach(fd: number, q = 1): { t: SplitInflight; dv: DataView } {
  const buf = native.mmap(fd, 2 * PER_QUEUE, 0, true);
  return { t: new SplitInflight(buf, q * PER_QUEUE, QS), dv: new DataView(buf, q * PER_QUEUE, PER_QUEUE) };
}

const inflightOf = (dv: DataView, h: number): number => dv.getUint8(16 + 16 * h);
const usedIdxOf = (dv: DataView): number => dv.getUint16(14, true);

/** The device side of a split ring: the used index the driver sees, advanced only by publish. */
class Device {
  ringUsed: number;
  private written = 0;
  constructor(
    private readonly t: SplitInflight,
    start = 0,
  ) {
    this.ringUsed = start;
  }
  pop(...heads: number[]): void {
    for (const h of heads) this.t.popped(h);
  }
  /** used elements written (not visible yet) */
  complete(...heads: number[]): void {
    for (const h of heads) this.t.completed(h);
    this.written += heads.length;
  }
  /** Atomics.store of used->idx: the driver sees the batch from here on */
  storeUsedIdx(): void {
    this.ringUsed = (this.ringUsed + this.written) & 0xffff;
    this.written = 0;
  }
  /** the batch's marks cleared and used_idx recorded */
  cleared(): void {
    this.t.published(this.ringUsed);
  }
  publish(): void {
    this.storeUsedIdx();
    this.cleared();
  }
}

test('a fresh region is initialised (version 1, desc_num) and a region for another queue size is refused', () => {
  const fd = region();
  const { dv } = attach(fd);
  assert.equal(dv.getUint16(8, true), 1, 'version');
  assert.equal(dv.getUint16(10, true), QS, 'desc_num');
  const buf = native.mmap(fd, 2 * PER_QUEUE, 0, true);
  assert.throws(() => new SplitInflight(buf, PER_QUEUE, 8), RangeError);
  assert.equal(attach(fd, 0).dv.getUint16(8, true), 1, 'queue 0 has its own header');
});

test('out-of-order completion, then a crash: the heads still in flight come back in fetch order', () => {
  const fd = region();
  const a = attach(fd);
  const dev = new Device(a.t);
  dev.pop(3, 7, 1, 5); // fetched in this order
  dev.complete(7, 5); // completed out of order
  dev.publish();
  dev.pop(9);
  dev.complete(1);
  dev.publish();
  // crash: 3 and 9 never completed
  const b = attach(fd);
  assert.deepEqual(b.t.recover(dev.ringUsed), [3, 9]);
  assert.equal(usedIdxOf(b.dv), 3);
});

test('crash after used->idx was stored, before the marks were cleared: the batch is reconciled, not resubmitted', () => {
  const fd = region();
  const a = attach(fd);
  const dev = new Device(a.t);
  dev.pop(3, 7, 1);
  dev.complete(1, 3);
  dev.storeUsedIdx(); // the driver has seen 1 and 3 complete
  // crash before cleared()
  assert.equal(inflightOf(a.dv, 1), 1, 'marks still set in the region');
  assert.equal(usedIdxOf(a.dv), 0, 'used_idx still the old one');
  const b = attach(fd);
  assert.deepEqual(b.t.recover(dev.ringUsed), [7], 'only the head the driver never saw complete');
  assert.equal(usedIdxOf(b.dv), 2, 'used_idx reconciled with the ring');
  assert.deepEqual([inflightOf(b.dv, 1), inflightOf(b.dv, 3), inflightOf(b.dv, 7)], [0, 0, 1]);
});

test('crash after the used elements were written, before used->idx: the batch is resubmitted (the driver saw nothing)', () => {
  const fd = region();
  const dev = new Device(attach(fd).t);
  dev.pop(4, 2);
  dev.publish();
  dev.complete(2);
  // crash before storeUsedIdx()
  assert.deepEqual(attach(fd).t.recover(dev.ringUsed), [4, 2]);
});

test('crash half-way through clearing a batch: the rest is reconciled', () => {
  const fd = region();
  const a = attach(fd);
  const dev = new Device(a.t);
  dev.pop(0, 1, 2, 3);
  dev.complete(2, 0, 3);
  dev.storeUsedIdx();
  a.dv.setUint8(16 + 16 * 0, 0); // the clearing loop got as far as one head
  assert.deepEqual(attach(fd).t.recover(dev.ringUsed), [1]);
});

test('only the last batch is reconciled: a head completed in an earlier batch and fetched again stays in flight', () => {
  const fd = region();
  const dev = new Device(attach(fd).t);
  dev.pop(2, 6);
  dev.complete(2);
  dev.publish(); // batch 1: head 2
  dev.pop(2); // the driver reused head 2
  dev.complete(6);
  dev.storeUsedIdx(); // batch 2: head 6, whose list link points at 2 from batch 1
  const b = attach(fd);
  assert.deepEqual(b.t.recover(dev.ringUsed), [2], 'head 2 (fetched again) is resubmitted; 6 is not');
});

test('reconciliation across the 16-bit wrap of used->idx', () => {
  const fd = region();
  const a = attach(fd);
  const dev = new Device(a.t, 0xfffe);
  dev.pop(1);
  dev.complete(1);
  dev.publish(); // used 0xffff
  dev.pop(5, 8, 11);
  dev.complete(11, 5);
  dev.storeUsedIdx(); // used 0xffff + 2 = 1
  assert.equal(dev.ringUsed, 1);
  assert.deepEqual(attach(fd).t.recover(dev.ringUsed), [8]);
});

test('fetch order holds across two crashes: counters keep growing after a recovery', () => {
  const fd = region();
  const dev1 = new Device(attach(fd).t);
  dev1.pop(10, 12);
  // crash 1
  const b = attach(fd);
  assert.deepEqual(b.t.recover(dev1.ringUsed), [10, 12]);
  const dev2 = new Device(b.t, dev1.ringUsed);
  dev2.complete(10); // resubmitted 10 finished; 12 still running
  dev2.publish();
  dev2.pop(0, 4); // new heads fetched after the recovery
  dev2.complete(0);
  dev2.publish();
  // crash 2
  assert.deepEqual(attach(fd).t.recover(dev2.ringUsed), [12, 4], 'the older fetch first, though its head number is larger');
});

test('a region the frontend garbled (batch list out of range or looping) neither throws nor runs forever', () => {
  const fd = region();
  const a = attach(fd);
  const dev = new Device(a.t);
  dev.pop(1, 2, 3);
  a.dv.setUint16(12, 0xffff, true); // last_batch_head out of range
  assert.deepEqual(attach(fd).t.recover(50), [1, 2, 3]);
  const c = attach(fd);
  c.dv.setUint16(14, 0, true);
  c.dv.setUint16(12, 2, true);
  c.dv.setUint16(16 + 16 * 2 + 6, 2, true); // 2 -> 2: a self loop
  assert.deepEqual(attach(fd).t.recover(40000), [1, 3]);
});
