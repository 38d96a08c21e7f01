// Frontends that connect while another is served wait in line (qemu-storage-daemon stops accepting
// while a client is connected): a quick reconnect is served as soon as the previous session ended,
// a second frontend never disturbs the first, and one that gives up while waiting leaves no fd.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Frontend, GuestRam, SplitRing, BLK } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, type Daemon } from '../helpers/daemon.js';
import { native } from '../../src/native/index.js';
import { Request } from '../../src/protocol/constants.js';
import { memTablePayload } from '../../src/protocol/codec.js';
import { MAX_WAITING } from '../../src/protocol/server.js';
import { pattern, makeImage, openSession, closeSession, fdsSettle } from '../helpers/sessions.js';

const OK = 0;
const WAITING = 'frontend waiting: another frontend is being served';

function ringWorks(fe: Frontend, ring: SplitRing, seed: number): void {
  const data = pattern(seed, 4096);
  const sector = 256 + 8 * (seed % 500);
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, sector, data)), OK, `write (seed ${seed})`);
  const r = fe.run(ring, BLK.IN, sector, 4096, { region: 1 });
  assert.equal(fe.statusOf(r), OK, `read (seed ${seed})`);
  assert.deepEqual(fe.dataOf(r), data);
}

/** True when the daemon has written anything (or closed) on fe's socket. */
function hasReply(fe: Frontend): boolean {
  return native.pollWait(Int32Array.of(fe.fd), 1, new Int32Array(1), 0) > 0;
}

const count = (d: Daemon, msg: string): number => d.logRecords().filter((r) => r.msg === msg).length;
const errorsLogged = (d: Daemon): Record<string, unknown>[] => d.logRecords().filter((r) => typeof r.level === 'number' && r.level >= 50);
/** lets the test process read the daemon's stderr between synchronous frontend calls */
const yieldToLoop = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('frontends wait in line', () => {
  let d: Daemon;
  let seed = 1;

  before(async () => {
    const dir = tempDir('vubd-queue-');
    d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2'], { dir });
  });

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  async function warmSession(): Promise<void> {
    const { fe, conn } = await openSession(d);
    fe.negotiate();
    ringWorks(fe, fe.setupRing(0, 64), seed++);
    ringWorks(fe, fe.setupRing(1, 64), seed++);
    await closeSession(d, fe, conn);
  }

  test('100 sessions in a row, each connecting before the previous one closed: every one is served', { timeout: 120000 }, async () => {
    await warmSession();
    const fds0 = d.fdCount();
    const connected0 = count(d, 'frontend connected');
    const ram = new GuestRam();
    try {
      let fe = Frontend.connect(d.socketPath, ram);
      for (let i = 0; i < 100; i++) {
        fe.negotiate();
        const q = fe.setupRing(i % 2, 64);
        ringWorks(fe, q, seed++);
        // The next frontend is already in the socket when this one goes away.
        const next = i + 1 < 100 ? Frontend.connect(d.socketPath, ram) : null;
        fe.close();
        if (next === null) break;
        fe = next;
        ram.resetAlloc(); // the old session's rings are gone once the new one is served
        await yieldToLoop();
      }
    } finally {
      ram.close();
    }
    await d.waitForLog(() => count(d, 'session ended; waiting for the next frontend') >= connected0 + 100, 10000);
    assert.equal(count(d, 'frontend connected') - connected0, 100, 'every frontend was served');
    assert.equal(await fdsSettle(d, fds0), fds0, 'no fd left behind after 100 sessions');
    assert.deepEqual(errorsLogged(d), []);
  });

  test('a second frontend waits, unanswered, while the first does I/O; it is served once the first leaves', { timeout: 60000 }, async () => {
    const { fe: first, conn } = await openSession(d);
    let second: Frontend | null = null;
    try {
      first.negotiate();
      const q0 = first.setupRing(0, 128);
      ringWorks(first, q0, seed++);
      const waitingBefore = count(d, WAITING);
      const inFlight = Array.from({ length: 32 }, (_, i) => first.blk(q0, BLK.OUT, 4096 + 128 * i, pattern(seed + i, 64 * 1024)));
      q0.kick();
      second = Frontend.connect(d.socketPath); // arrives while the first has I/O in flight
      second.send(Request.GET_FEATURES); // waits unread in its socket until its turn
      assert.equal(q0.waitFor(32).length, 32, 'the first frontend\'s requests all complete');
      for (const r of inFlight) assert.equal(first.statusOf(r), OK);
      await d.waitForLog(() => count(d, WAITING) > waitingBefore);
      const q1 = first.setupRing(1, 128);
      for (let i = 0; i < 20; i++) {
        ringWorks(first, i % 2 ? q1 : q0, seed++);
        assert.ok(!hasReply(second), `the waiting frontend got no reply while the first is served (round ${i})`);
        await yieldToLoop();
      }
      assert.ok(first.callU64(Request.GET_FEATURES) > 0n, 'the first frontend is still answered');
      await sleep(300);
      assert.ok(!hasReply(second), 'still no reply to the waiting frontend');
    } finally {
      await closeSession(d, first, conn);
    }
    try {
      const r = second!.recv(5000);
      assert.equal(r.request, Request.GET_FEATURES, 'the waiting frontend is answered once the first left');
      assert.equal(r.flags, 0x5);
      second!.negotiate();
      ringWorks(second!, second!.setupRing(0, 128), seed++);
    } finally {
      second!.close();
      second!.ram.close();
    }
    const served = d.logRecords().filter((r) => r.msg === 'frontend connected');
    await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn === served[served.length - 1]!.conn);
    assert.deepEqual(errorsLogged(d), []);
  });

  test('frontends that give up while waiting leave no fd behind; the others are served in order', { timeout: 60000 }, async () => {
    await warmSession();
    const fds0 = d.fdCount();
    const { fe: first, conn } = await openSession(d);
    const quitters: Frontend[] = [];
    const stayers: Frontend[] = [];
    try {
      first.negotiate();
      const q = first.setupRing(0, 128);
      ringWorks(first, q, seed++);
      const fdsServing = d.fdCount();
      const waitingBefore = count(d, WAITING);
      for (let i = 0; i < 5; i++) {
        const fe = Frontend.connect(d.socketPath);
        (i % 2 === 0 ? quitters : stayers).push(fe);
        // a quitter leaves messages with fds behind in its socket: the kernel drops them with it
        if (i % 2 === 0) fe.send(Request.SET_MEM_TABLE, memTablePayload(fe.ram.table), fe.ram.regions.map((r) => r.fd));
      }
      await d.waitForLog(() => count(d, WAITING) >= waitingBefore + 5);
      assert.ok(d.fdCount() >= fdsServing + 5, 'the waiting connections are held');
      for (const fe of quitters) assert.ok(!fe.isClosedByPeer(50), 'a waiting frontend is not refused');
      for (const fe of quitters) {
        fe.close();
        fe.ram.close();
      }
      assert.equal(await fdsSettle(d, fdsServing + stayers.length), fdsServing + stayers.length, 'the quitters\' fds were closed while the first is still served');
      await d.waitForLog(() => count(d, 'waiting frontend disconnected before its turn') >= 3);
      ringWorks(first, q, seed++);
    } finally {
      await closeSession(d, first, conn);
    }
    for (const fe of stayers) {
      try {
        fe.negotiate();
        ringWorks(fe, fe.setupRing(0, 128), seed++); // served in turn: a later one would leave this one unanswered
      } finally {
        fe.close();
        fe.ram.close();
      }
    }
    await d.waitForLog(() => {
      const ended = d.logRecords().filter((r) => r.msg === 'session ended; waiting for the next frontend').length;
      return ended === count(d, 'frontend connected');
    });
    assert.equal(await fdsSettle(d, fds0), fds0, 'no fd left behind');
    assert.deepEqual(errorsLogged(d), []);
  });

  test('more frontends than the line holds: the rest wait in the listen queue, all are served in order', { timeout: 60000 }, async () => {
    await warmSession();
    const fds0 = d.fdCount();
    const { fe: first, conn } = await openSession(d);
    const waiting: Frontend[] = [];
    const ram = new GuestRam();
    try {
      first.negotiate();
      ringWorks(first, first.setupRing(0, 64), seed++);
      const waitingBefore = count(d, WAITING);
      for (let i = 0; i < MAX_WAITING + 4; i++) {
        waiting.push(Frontend.connect(d.socketPath, ram));
        waiting[i]!.send(Request.GET_FEATURES);
      }
      await d.waitForLog(() => count(d, WAITING) >= waitingBefore + MAX_WAITING);
      await sleep(200);
      assert.equal(count(d, WAITING) - waitingBefore, MAX_WAITING, 'beyond the line, vubd stops accepting');
      assert.ok(waiting.every((fe) => !hasReply(fe)), 'none of them is answered yet');
    } finally {
      await closeSession(d, first, conn);
    }
    try {
      for (const fe of waiting) {
        assert.equal(fe.recv(5000).request, Request.GET_FEATURES, 'answered in arrival order');
        fe.negotiate();
        fe.close();
        await yieldToLoop();
      }
    } finally {
      ram.close();
    }
    await d.waitForLog(() => count(d, 'session ended; waiting for the next frontend') === count(d, 'frontend connected'), 10000);
    assert.equal(await fdsSettle(d, fds0), fds0, 'no fd left behind');
    assert.deepEqual(errorsLogged(d), []);
  });

  test('SIGTERM closes the waiting frontends too', async () => {
    const dir = tempDir('vubd-queue-term-');
    const d2 = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1'], { dir });
    const { fe: first } = await openSession(d2);
    const second = Frontend.connect(d2.socketPath);
    try {
      first.negotiate();
      await d2.waitForLog((r) => r.msg === WAITING);
      const r = await d2.stop();
      assert.equal(r.code, 0);
      assert.ok(first.isClosedByPeer(1000), 'the served frontend sees the close');
      assert.ok(second.isClosedByPeer(1000), 'the waiting frontend sees the close');
    } finally {
      await d2.stop();
      for (const fe of [first, second]) {
        fe.close();
        fe.ram.close();
      }
    }
  });
});
