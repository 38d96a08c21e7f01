// Failures stay where they happen: a frontend's bad notification fds, an unexpected exception in
// a queue worker, or a worker thread that dies must never take the disk down for the next frontend.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, SplitRing, BLK } from '../helpers/frontend.js';
import { startDaemon, sleep, type Daemon } from '../helpers/daemon.js';
import { dispose, fdsSettle, makeImage, openSession, pattern, sessionEnded } from '../helpers/sessions.js';
import { native } from '../../src/native/index.js';
import { Request } from '../../src/protocol/constants.js';
import { u64Payload, vringAddrPayload, vringStatePayload } from '../../src/protocol/codec.js';
import { QmpClient } from '../../src/control/qmp-client.js';

/** A fresh frontend writes and reads back on every queue. */
async function servesAllQueues(d: Daemon, queues: number, seed: number): Promise<void> {
  const { fe, conn } = await openSession(d);
  try {
    fe.negotiate();
    for (let q = 0; q < queues; q++) {
      const ring = fe.setupRing(q, 128);
      const data = pattern(seed + q, 4096);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 64 + 8 * q, data)), 0, `queue ${q} write`);
      const r = fe.run(ring, BLK.IN, 64 + 8 * q, 4096, { region: 1 });
      assert.equal(fe.statusOf(r), 0, `queue ${q} read`);
      assert.deepEqual(fe.dataOf(r), data, `queue ${q} data`);
    }
  } finally {
    dispose(fe);
  }
  await sessionEnded(d, conn);
}

/** Ring 0's start sequence with the given notification fds in place of eventfds. */
function startRingWith(fe: Frontend, ring: SplitRing, fds: { kick: number; call: number; err?: number }): void {
  fe.send(Request.SET_VRING_NUM, vringStatePayload(0, ring.size));
  fe.send(Request.SET_VRING_BASE, vringStatePayload(0, 0));
  fe.send(
    Request.SET_VRING_ADDR,
    vringAddrPayload({ index: 0, flags: 0, descUserAddr: fe.ram.uva(ring.desc), usedUserAddr: fe.ram.uva(ring.used), availUserAddr: fe.ram.uva(ring.avail), logGuestAddr: 0 }),
  );
  if (fds.err !== undefined) fe.send(Request.SET_VRING_ERR, u64Payload(0), [fds.err]);
  fe.send(Request.SET_VRING_KICK, u64Payload(0), [fds.kick]);
  fe.send(Request.SET_VRING_CALL, u64Payload(0), [fds.call]);
  fe.send(Request.SET_VRING_ENABLE, vringStatePayload(0, 1));
}

const noWorkerDied = (d: Daemon): boolean => !d.logRecords().some((r) => r.msg === 'queue worker crashed' || r.msg === 'queue worker exited');

describe('notification fds that are not eventfds', () => {
  let d: Daemon;
  let seed = 1;

  test('start a daemon', async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-faults-');
    d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2', '--aio=sync'], { dir });
    await servesAllQueues(d, 2, seed++);
  });

  const kinds: { name: string; make: (dir: string) => number }[] = [
    {
      name: 'an empty regular file',
      make: (dir) => fs.openSync(path.join(dir, `not-an-eventfd-${seed}`), 'w+'),
    },
    {
      name: 'a pipe',
      make: () => {
        const [r, w] = native.socketpair(); // a stream that blocks once full, like a pipe
        native.close(r);
        return w;
      },
    },
  ];
  for (const which of ['kick', 'call', 'err'] as const) {
    for (const kind of kinds) {
      test(`SET_VRING_${which.toUpperCase()} with ${kind.name}: refused with a log line, the next frontend is served`, async () => {
        const fdsBefore = d.fdCount();
        const { fe, conn } = await openSession(d);
        const bad = kind.make(d.dir);
        try {
          fe.negotiate();
          const ring = new SplitRing(fe.ram, 0, 128, false);
          fe.rings[0] = ring;
          try {
            startRingWith(fe, ring, { kick: which === 'kick' ? bad : ring.kickFd, call: which === 'call' ? bad : ring.callFd, err: which === 'err' ? bad : undefined });
            fe.blk(ring, BLK.OUT, 8, pattern(9, 512));
            ring.kick();
          } catch (e) {
            assert.match((e as Error).message, /EPIPE|Broken pipe|ECONNRESET/, 'only a send into the closed connection may fail');
          }
          assert.ok(fe.isClosedByPeer(3000), 'backend closed the connection');
        } finally {
          native.close(bad);
          dispose(fe);
        }
        const rec = await d.waitForLog((r) => r.msg === 'vhost-user connection closed' && r.conn === conn);
        assert.match(rec.reason as string, /not an eventfd/);
        await sessionEnded(d, conn);
        assert.ok(noWorkerDied(d), 'no worker died');
        assert.equal(await fdsSettle(d, fdsBefore), fdsBefore, 'no fd left behind');
        await servesAllQueues(d, 2, seed++);
      });
    }
  }

  test('a call eventfd whose counter the frontend saturated does not block the worker', async () => {
    const { fe, conn } = await openSession(d);
    const call = native.eventfd(false); // blocking, as a careless frontend might make it
    try {
      fe.negotiate();
      const ring = new SplitRing(fe.ram, 0, 128, false);
      fe.rings[0] = ring;
      startRingWith(fe, ring, { kick: ring.kickFd, call });
      fs.writeSync(call, new Uint8Array(BigUint64Array.of(0xfffffffffffffffen).buffer)); // one below the maximum: the next write of 1 would block
      const reqs = [0, 1, 2].map((k) => fe.blk(ring, BLK.OUT, 16 + 8 * k, pattern(k, 512)));
      ring.kick();
      const deadline = Date.now() + 3000;
      while (ring.usedIdx() < reqs.length && Date.now() < deadline) await sleep(5);
      assert.equal(ring.usedIdx(), reqs.length, 'every request completed');
      const t0 = Date.now();
      fe.getVringBase(0); // before the fix the worker sat in write(2) on the call fd and this never came
      assert.ok(Date.now() - t0 < 1000, 'GET_VRING_BASE answered promptly');
    } finally {
      native.close(call);
      dispose(fe);
    }
    await sessionEnded(d, conn);
    await servesAllQueues(d, 2, seed++);
  });

  test('stop the daemon', async () => {
    assert.ok(noWorkerDied(d));
    assert.equal((await d.stop()).code, 0);
  });
});

describe('an unexpected exception in a queue worker', () => {
  test('marks only that queue broken, signals its err fd, and the worker thread serves the next session', async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-faults-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2', '--aio=sync'], { dir, env: { VUBD_TEST_FAULT: 'throw:1' } });
    try {
      const { fe, conn } = await openSession(d);
      const err = native.eventfd(true);
      try {
        fe.negotiate();
        const q0 = fe.setupRing(0, 128);
        const q1 = new SplitRing(fe.ram, 1, 128, false);
        fe.rings[1] = q1;
        fe.send(Request.SET_VRING_ERR, u64Payload(1), [err]);
        fe.restartRing(q1, 0, false);
        const lost = fe.blk(q1, BLK.OUT, 8, pattern(1, 512));
        q1.kick();
        await d.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('queue marked broken: internal error') && r.queue === 1);
        assert.equal(fe.statusOf(lost), 0xff, 'the request on the broken queue was not completed');
        assert.ok(native.eventfdRead(err) > 0, 'err fd signalled');
        // The other queue is untouched and the channel answers.
        const data = pattern(2, 4096);
        assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 32, data)), 0, 'queue 0 still serves');
        assert.ok(fe.callU64(Request.GET_FEATURES) > 0n);
        fe.getVringBase(1); // a broken queue still stops
      } finally {
        native.close(err);
        dispose(fe);
      }
      await sessionEnded(d, conn);
      assert.ok(noWorkerDied(d), 'the worker thread survived');
      await servesAllQueues(d, 2, 40);
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });
});

describe('a queue worker thread that dies', () => {
  test('ends the session, is replaced, and the reconnected frontend gets its queued request served', async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-faults-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2', '--aio=sync'], { dir, env: { VUBD_TEST_FAULT: 'die:1' } });
    try {
      const fdsBefore = d.fdCount();
      const { fe, conn } = await openSession(d);
      let fe2: Frontend | null = null;
      try {
        fe.negotiate({ inflight: 'new' });
        const q0 = fe.setupRing(0, 128);
        const q1 = fe.setupRing(1, 128);
        const data = pattern(5, 4096);
        const pending = fe.blk(q1, BLK.OUT, 48, data);
        q1.kick();
        await d.waitForLog((r) => r.msg === 'queue worker died; ending the session and replacing the worker before the next one' && r.queue === 1);
        assert.ok(fe.isClosedByPeer(3000), 'vubd ended the session');
        const rec = await d.waitForLog((r) => r.msg === 'vhost-user connection closed' && r.conn === conn);
        assert.match(rec.reason as string, /queue worker 1 died/);
        await d.waitForLog((r) => r.msg === 'queue worker replaced' && r.queue === 1);
        await sessionEnded(d, conn);
        // QEMU reconnects with the same guest memory and inflight region, and restarts the rings
        // at the used index: the request the dead worker never answered is served now.
        fe.disconnect();
        fe2 = fe.reconnect(d.socketPath);
        fe2.negotiate({ inflight: fe.inflight! });
        fe2.setupRing(0, 128, q0, q0.usedIdx());
        fe2.setupRing(1, 128, q1, q1.usedIdx());
        q1.kick();
        const done = q1.waitFor(1);
        assert.equal(done[0]!.head, pending.head);
        assert.equal(fe2.statusOf(pending), 0, 'the queued write completed after the reconnect');
        const r = fe2.run(q1, BLK.IN, 48, 4096, { region: 1 });
        assert.deepEqual(fe2.dataOf(r), data);
      } finally {
        if (fe2) dispose(fe2);
        else dispose(fe);
      }
      await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn !== conn);
      await servesAllQueues(d, 2, 60);
      assert.equal(await fdsSettle(d, fdsBefore), fdsBefore, 'the replacement worker holds as many fds as the one it replaced');
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });
});

/** eventfd-id of every eventfd the process holds (Linux shows it in fdinfo). */
function eventfdIds(pid: number): Set<number> {
  const ids = new Set<number>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fdinfo`)) {
    try {
      const m = /^eventfd-id:\s*(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
      if (m) ids.add(Number(m[1]));
    } catch {
      /* closed meanwhile */
    }
  }
  return ids;
}

describe('fd ownership across threads', () => {
  test('a SET_VRING_KICK the worker refuses leaves the old kick fd open while the worker still uses it', async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-faults-');
    const control = path.join(dir, 'qmp.sock');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', '--aio=sync', `--control=${control}`], { dir });
    const qmp = await QmpClient.connect(control);
    try {
      // Requests stay in flight for seconds behind a slow throttle.
      await qmp.execute('block_set_io_throttle', { device: 'export0', iops: 10, iops_max: 1 });
      const { fe, conn } = await openSession(d);
      try {
        fe.negotiate();
        const ring = fe.setupRing(0, 128);
        const oldKickId = idOf(ring.kickFd);
        for (let k = 0; k < 12; k++) fe.blk(ring, BLK.OUT, 8 * k, pattern(k, 512));
        ring.kick();
        await sleep(200);
        assert.ok(eventfdIds(d.proc.pid!).has(oldKickId), 'vubd holds the kick eventfd');
        // A bigger ring while requests are in flight: the worker cannot rebuild its request table and refuses.
        const newKick = native.eventfd(true);
        try {
          fe.send(Request.SET_VRING_NUM, vringStatePayload(0, 256));
          fe.send(Request.SET_VRING_KICK, u64Payload(0), [newKick]);
        } finally {
          native.close(newKick);
        }
        assert.ok(fe.isClosedByPeer(3000), 'the refusal closes the connection');
        // The worker still polls the old kick fd until its requests are done: it must still be open.
        assert.ok(eventfdIds(d.proc.pid!).has(oldKickId), 'the old kick fd stays open while the worker may still use it');
      } finally {
        dispose(fe);
      }
      await sessionEnded(d, conn);
      await qmp.execute('block_set_io_throttle', { device: 'export0', iops: 0 });
      await servesAllQueues(d, 1, 80);
    } finally {
      qmp.close();
      assert.equal((await d.stop()).code, 0);
    }
  });
});

function idOf(fd: number): number {
  const m = /^eventfd-id:\s*(\d+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  if (!m) throw new Error(`fd ${fd} is not an eventfd`);
  return Number(m[1]);
}

describe('a ring restarted before its call fd arrives', () => {
  test('completions published without a call fd are signalled on the call fd that comes next', async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-faults-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', '--aio=sync'], { dir });
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 128);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8, pattern(1, 512))), 0);
      const base = fe.getVringBase(0); // the ring stays enabled; vubd closed its call fd
      const reqs = [0, 1, 2].map((k) => fe.blk(ring, BLK.OUT, 16 + 8 * k, pattern(10 + k, 512)));
      // Restart with the kick fd first: vubd serves at once, with no call fd to signal.
      fe.send(Request.SET_VRING_NUM, vringStatePayload(0, ring.size));
      fe.send(Request.SET_VRING_BASE, vringStatePayload(0, base));
      fe.send(
        Request.SET_VRING_ADDR,
        vringAddrPayload({ index: 0, flags: 0, descUserAddr: fe.ram.uva(ring.desc), usedUserAddr: fe.ram.uva(ring.used), availUserAddr: fe.ram.uva(ring.avail), logGuestAddr: 0 }),
      );
      fe.send(Request.SET_VRING_KICK, u64Payload(0), [ring.kickFd]);
      const deadline = Date.now() + 3000;
      while (ring.usedIdx() < base + reqs.length && Date.now() < deadline) await sleep(5);
      assert.equal(ring.usedIdx(), base + reqs.length, 'served before the call fd arrived');
      while (native.eventfdRead(ring.callFd) > 0) {
        /* drain anything left from before */
      }
      fe.send(Request.SET_VRING_CALL, u64Payload(0), [ring.callFd]);
      const rev = new Int32Array(1);
      assert.equal(native.pollWait(Int32Array.of(ring.callFd), 1, rev, 2000), 1, 'the driver is interrupted for those completions');
      for (const r of reqs) assert.equal(fe.statusOf(r), 0);
    } finally {
      dispose(fe);
    }
    await sessionEnded(d, conn);
    assert.equal((await d.stop()).code, 0);
  });
});
