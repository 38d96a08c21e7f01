// DESIGN.md "Memory ordering on the rings": a driver on another thread (test/helpers/ring-driver-thread)
// hammers the notification decisions while SplitQueue / PackedQueue publish on this one. Both
// sides share a memfd mapping and real eventfds and follow the suppression protocol (EVENT_IDX
// used_event/avail_event, the NO_INTERRUPT/NO_NOTIFY flags, packed event suppression areas). A
// lost notification (the driver waits while completions sit unnotified) or a lost kick (the
// device sleeps with buffers available) would hang a real guest; here it fails the test.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { native, POLLIN } from '../../src/native/index.js';
import { mapGuestMemory } from '../../src/virtio/memory-map.js';
import { DescriptorChain } from '../../src/virtio/chain.js';
import { SplitQueue } from '../../src/virtio/split-queue.js';
import { PackedQueue, encodePackedBase } from '../../src/virtio/packed-queue.js';
import { Ctl, type DriverConfig, type DriverResult } from '../helpers/ring-driver-thread.js';

const BYTES = 1 << 20;
const UVA = 0x7f20_0000_0000;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;
const DATA = 0x10000;
const Q = 64;
const TOTAL = 100_000;
const RUN_MS = 4000;
/** a wait this long is looked at; the same again before a miss is declared (the VM is shared and noisy) */
const WAIT_MS = 2000;

const fds: number[] = [];
after(() => fds.forEach((fd) => native.close(fd)));

interface DeviceResult {
  completed: number;
  notifies: number;
  sleeps: number;
  lostKicks: number;
}

/** The device loop, shaped like the queue worker's: pop, complete out of order, publish, arm, sleep. */
function runDevice(q: SplitQueue | PackedQueue, kickFd: number, callFd: number, ctl: Int32Array, seed: number): DeviceResult {
  const chain = new DescriptorChain(4);
  const inProgress: { id: number; descs: number }[] = [];
  const res: DeviceResult = { completed: 0, notifies: 0, sleeps: 0, lostKicks: 0 };
  const fdsK = Int32Array.of(kickFd);
  const rev = new Int32Array(1);
  const wait = (ms: number): boolean => native.pollWait(fdsK, 1, rev, ms) > 0 && (rev[0]! & POLLIN) !== 0;
  let x = seed;
  const rnd = (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  const deadline = performance.now() + RUN_MS + 4 * WAIT_MS + 5000;
  while (Atomics.load(ctl, Ctl.ABORT) === 0 && performance.now() < deadline) {
    let popped = 0;
    const want = 1 + rnd(8);
    while (popped < want && q.pending() > 0) {
      if (q instanceof PackedQueue) inProgress.push({ id: q.pop(chain), descs: q.lastChainDescs });
      else {
        const head = q.popHead();
        q.walk(head, chain);
        inProgress.push({ id: head, descs: 1 });
      }
      popped++;
    }
    // Completions arrive in any order, some now, some later; never sleep with requests in progress.
    const k = popped > 0 ? rnd(inProgress.length + 1) : inProgress.length;
    for (let j = 0; j < k; j++) {
      const i = rnd(inProgress.length);
      const r = inProgress[i]!;
      inProgress[i] = inProgress[inProgress.length - 1]!;
      inProgress.pop();
      if (q instanceof PackedQueue) q.putUsed(r.id, 0, r.descs);
      else q.putUsed(r.id, 0);
    }
    res.completed += k;
    if (k > 0 && q.publish()) {
      native.eventfdWrite(callFd, 1);
      res.notifies++;
    }
    if (popped > 0 || k > 0) continue;
    if (Atomics.load(ctl, Ctl.DONE) === 1 && res.completed >= Atomics.load(ctl, Ctl.SUBMITTED)) break;
    if (q.armKick()) continue;
    res.sleeps++;
    if (!wait(WAIT_MS)) {
      if (q.pending() > 0 && !wait(WAIT_MS)) {
        res.lostKicks++;
        Atomics.add(ctl, Ctl.LOST_KICK, 1);
        Atomics.store(ctl, Ctl.ABORT, 1);
        break;
      }
      continue;
    }
    native.eventfdRead(kickFd);
  }
  return res;
}

async function stress(packed: boolean, eventIdx: boolean, seed: number): Promise<{ driver: DriverResult; device: DeviceResult }> {
  const fd = native.memfdCreate('notify-stress', BYTES);
  const kickFd = native.eventfd(true);
  const callFd = native.eventfd(true);
  fds.push(fd, kickFd, callFd);
  const mem = mapGuestMemory([{ guestPhysAddr: 0, size: BYTES, userAddr: UVA, mmapOffset: 0, fd }]);
  const q = packed
    ? new PackedQueue(mem, { size: Q, descAddr: UVA + DESC, driverAddr: UVA + AVAIL, deviceAddr: UVA + USED }, encodePackedBase(0, true, 0, true), eventIdx, false)
    : new SplitQueue(mem, { size: Q, descAddr: UVA + DESC, availAddr: UVA + AVAIL, usedAddr: UVA + USED }, 0, eventIdx, false);
  const ctl = new Int32Array(new SharedArrayBuffer(4 * Ctl.COUNT));
  const config: DriverConfig = {
    fd, bytes: BYTES, packed, eventIdx, q: Q, desc: DESC, avail: AVAIL, used: USED, data: DATA, kickFd, callFd,
    ctl: ctl.buffer as SharedArrayBuffer, total: TOTAL, runMs: RUN_MS, seed: seed * 7919, waitMs: WAIT_MS,
  };
  const worker = new Worker(new URL('../helpers/ring-driver-thread.js', import.meta.url), { workerData: config });
  const driverDone = new Promise<DriverResult>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  await new Promise((r) => setTimeout(r, 50)); // let the thread start: the device loop blocks this one
  const device = runDevice(q, kickFd, callFd, ctl, seed);
  Atomics.store(ctl, Ctl.ABORT, 1); // if the device gave up first, release the driver
  native.eventfdWrite(callFd, 1);
  const driver = await driverDone;
  await worker.terminate();
  mem.close();
  return { driver, device };
}

for (const packed of [false, true]) {
  for (const eventIdx of [true, false]) {
    const name = `${packed ? 'packed' : 'split'} ring, ${eventIdx ? 'EVENT_IDX' : packed ? 'ENABLE/DISABLE flags' : 'NO_INTERRUPT/NO_NOTIFY flags'}`;
    test(`${name}: a driver thread and the device thread never lose a notification or a kick`, { timeout: 120_000 }, async (t) => {
      const { driver, device } = await stress(packed, eventIdx, packed ? 11 : 5 + (eventIdx ? 1 : 0));
      t.diagnostic(
        `driver: ${driver.submitted} submitted, ${driver.completed} completed, ${driver.kicks} kicks, ${driver.sleeps} sleeps; ` +
          `device: ${device.notifies} notifications, ${device.sleeps} sleeps`,
      );
      assert.equal(driver.lostNotifications, 0, 'completions published without a notification while the driver slept');
      assert.equal(device.lostKicks, 0, 'buffers made available without a kick while the device slept');
      assert.equal(driver.completed, driver.submitted, 'every submitted buffer completed');
      assert.equal(device.completed, driver.submitted);
      assert.ok(driver.submitted >= 1000, `enough traffic to mean something (${driver.submitted})`);
      // Both sides must actually have slept and been woken, many times, for the decisions to be exercised.
      assert.ok(driver.sleeps >= 100 && device.sleeps >= 100, `sleeps: driver ${driver.sleeps}, device ${device.sleeps}`);
    });
  }
}
