// Connection lifecycle against a real vubd: reconnects, ring stop/restart, device reset, SIGTERM
// and the command line's start-up failures (frontends waiting in line: frontend-queue.test.ts).
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, SplitRing, BLK } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, vubdMain, type Daemon } from '../helpers/daemon.js';
import { native } from '../../src/native/index.js';
import { F, PF, Request, hasBit } from '../../src/protocol/constants.js';
import { memTablePayload } from '../../src/protocol/codec.js';
import { pattern, makeImage, openSession, closeSession } from '../helpers/sessions.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;





function ringWorks(fe: Frontend, ring: SplitRing, seed: number): void {
  const data = pattern(seed, 8192);
  const sector = 512 + 16 * (seed % 200);
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, sector, data)), OK, `ring ${ring.index} write`);
  const r = fe.run(ring, BLK.IN, sector, 8192, { region: 1 });
  assert.equal(fe.statusOf(r), OK, `ring ${ring.index} read`);
  assert.deepEqual(fe.dataOf(r), data);
}

async function freshSessionWorks(d: Daemon, seed: number): Promise<void> {
  const { fe, conn } = await openSession(d);
  try {
    fe.negotiate();
    ringWorks(fe, fe.setupRing(0, 128), seed);
  } finally {
    await closeSession(d, fe, conn);
  }
}


function errorsLogged(d: Daemon): Record<string, unknown>[] {
  return d.logRecords().filter((r) => typeof r.level === 'number' && r.level >= 50);
}

describe('reconnects and ring lifecycle', () => {
  let d: Daemon;
  let seed = 1;

  before(async () => {
    const dir = tempDir('vubd-lifecycle-');
    d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2'], { dir });
  });

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  test('disconnect with requests in flight, reconnect, serve again', async () => {
    for (let round = 0; round < 3; round++) {
      const { fe, conn } = await openSession(d);
      fe.negotiate();
      const q0 = fe.setupRing(0, 128);
      const q1 = fe.setupRing(1, 128);
      for (let i = 0; i < 48; i++) fe.blk(i % 2 ? q1 : q0, BLK.OUT, 2048 + 128 * i, pattern(i, 64 * 1024), { region: i % 2 });
      q0.kick();
      q1.kick();
      const t0 = Date.now();
      await closeSession(d, fe, conn); // gone with up to 48 requests in flight
      assert.ok(Date.now() - t0 < 3000, 'the session was torn down promptly');
      await freshSessionWorks(d, seed++);
    }
    assert.deepEqual(errorsLogged(d), [], 'no error-level log lines');
  });

  test('20 connect/negotiate/IO/disconnect cycles with a stable fd count', async () => {
    await freshSessionWorks(d, seed++); // warm: workers have their engines and request tables
    const fds0 = d.fdCount();
    for (let i = 0; i < 20; i++) {
      const { fe, conn } = await openSession(d);
      fe.negotiate();
      const q = fe.setupRing(i % 2, 64 << (i % 3));
      ringWorks(fe, q, seed++);
      await closeSession(d, fe, conn);
    }
    assert.equal(d.fdCount(), fds0, 'fd count after 20 sessions');
    // Workers never run GC finalizers: guest memory must be unmapped explicitly, or every restart
    // of a VM would keep its whole RAM alive in vubd.
    const guestMappings = fs.readFileSync(`/proc/${d.proc.pid}/maps`, 'utf8').split('\n').filter((l) => l.includes('guest-ram'));
    assert.deepEqual(guestMappings, [], 'no guest memory mapped after the sessions ended');
    assert.deepEqual(errorsLogged(d), []);
  });

  test('GET_VRING_BASE, then restart the ring with SET_VRING_BASE = returned value', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const q = fe.setupRing(0, 128);
      for (let i = 0; i < 5; i++) ringWorks(fe, q, seed++); // 10 requests
      const base = fe.getVringBase(0);
      assert.equal(base, 10);
      assert.equal(q.usedIdx(), 10);
      // stopped: a request published now is not served until the ring is restarted
      const w = fe.blk(q, BLK.OUT, 100, pattern(seed, 4096));
      q.kick();
      await sleep(200);
      assert.equal(q.usedIdx(), 10, 'a stopped ring is not processed');
      fe.restartRing(q, base, false);
      q.kick();
      const done = q.waitFor(1);
      assert.equal(done[0]!.head, w.head);
      assert.equal(fe.statusOf(w), OK);
      assert.equal(q.usedIdx(), 11);
      ringWorks(fe, q, seed++);
      assert.equal(fe.getVringBase(0), 13);
    } finally {
      await closeSession(d, fe, conn);
    }
  });

  /**
   * Posts 64 writes, stops the ring (after a kick: some requests in flight at the reply), restarts
   * it at the returned base and checks that every request completes exactly once. The restarted
   * ring is served from SET_VRING_KICK on, so completions can be published before the test looks:
   * they are counted from the first used entry, whatever the base turned out to be.
   */
  async function stopRestartFinishesOnce(fe: Frontend, q: SplitRing, kickBeforeStop: boolean): Promise<void> {
    const reqs = [];
    for (let i = 0; i < 64; i++) reqs.push(fe.blk(q, BLK.OUT, 4096 + 128 * i, pattern(1000 + i, 64 * 1024), { region: i % 2 }));
    if (kickBeforeStop) q.kick();
    const base = fe.getVringBase(0);
    assert.ok(base <= 64);
    assert.equal(q.usedIdx(), base, 'every popped request completed before the reply');
    fe.restartRing(q, base, false);
    q.kick();
    await sleep(200); // lets the restarted ring publish before the first look
    const done = q.waitFor(64);
    assert.equal(done.length, 64);
    assert.equal(new Set(done.map((x) => x.head)).size, 64, 'each request completed exactly once');
    await sleep(100);
    assert.equal(q.usedIdx(), 64, 'no extra completions');
    for (const r of reqs) assert.equal(fe.statusOf(r), OK);
    for (let i = 0; i < 64; i += 7) {
      const r = fe.run(q, BLK.IN, 4096 + 128 * i, 64 * 1024);
      assert.deepEqual(fe.dataOf(r), pattern(1000 + i, 64 * 1024));
    }
  }

  test('GET_VRING_BASE with requests in flight: used == base at the reply, restart finishes the rest exactly once', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      await stopRestartFinishesOnce(fe, fe.setupRing(0, 256), true); // 64 requests x 3 descriptors
    } finally {
      await closeSession(d, fe, conn);
    }
  });

  test('GET_VRING_BASE before the kick: the posted requests stay for the restart and complete exactly once', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      await stopRestartFinishesOnce(fe, fe.setupRing(0, 256), false);
    } finally {
      await closeSession(d, fe, conn);
    }
  });

  test('SET_MEM_TABLE re-sent with rings running (QEMU does this on memory changes): I/O continues, old fds closed', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const q0 = fe.setupRing(0, 128);
      const q1 = fe.setupRing(1, 128);
      ringWorks(fe, q0, seed++);
      ringWorks(fe, q1, seed++);
      const fds = d.fdCount();
      for (let i = 0; i < 3; i++) {
        // requests in flight while the table is replaced
        const w = [0, 1, 2, 3].map((k) => fe.blk(k % 2 ? q1 : q0, BLK.OUT, 8192 + 128 * k, pattern(500 + k, 64 * 1024)));
        q0.kick();
        q1.kick();
        assert.equal(fe.ack(Request.SET_MEM_TABLE, memTablePayload(fe.ram.table), fe.ram.regions.map((r) => r.fd)), 0n);
        q0.waitFor(2, 3000);
        q1.waitFor(2, 3000);
        for (const r of w) assert.equal(fe.statusOf(r), OK);
        ringWorks(fe, q0, seed++);
        ringWorks(fe, q1, seed++);
      }
      assert.equal(d.fdCount(), fds, 'the replaced tables\' fds were closed');
    } finally {
      await closeSession(d, fe, conn);
    }
  });

  test('RESET_DEVICE stops the rings; renegotiating on the same connection works', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      assert.ok(hasBit(fe.protocolFeatures, PF.RESET_DEVICE), 'RESET_DEVICE is offered');
      const q = fe.setupRing(0, 128);
      ringWorks(fe, q, seed++);
      const used = q.usedIdx();
      assert.equal(fe.ack(Request.RESET_DEVICE), 0n);
      fe.blk(q, BLK.OUT, 100, pattern(seed, 4096));
      q.kick();
      await sleep(200);
      assert.equal(q.usedIdx(), used, 'a reset device does not process the old ring');
      q.close();
      fe.rings = [];
      if (fe.backendReqFds) native.close(fe.backendReqFds[0]);
      fe.backendReqFds = null;
      fe.negotiate();
      const q2 = fe.setupRing(0, 256);
      ringWorks(fe, q2, seed++);
      ringWorks(fe, fe.setupRing(1, 128), seed++);
    } finally {
      await closeSession(d, fe, conn);
    }
    assert.deepEqual(errorsLogged(d), []);
  });
});

describe('SIGTERM', () => {
  test('exits 0 within 1000 ms with a connected frontend and requests in flight', async () => {
    const dir = tempDir('vubd-sigterm-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2'], { dir });
    const fe = Frontend.connect(d.socketPath);
    try {
      fe.negotiate();
      const q = fe.setupRing(0, 128);
      ringWorks(fe, q, 1);
      for (let i = 0; i < 32; i++) fe.blk(q, BLK.OUT, 1024 + 128 * i, pattern(i, 64 * 1024));
      q.kick();
      const r = await d.stop();
      assert.equal(r.code, 0, 'exit code');
      assert.ok(r.ms < 1000, `exited after ${r.ms} ms`);
      assert.ok(!fs.existsSync(d.socketPath), 'socket file removed');
      assert.ok(fe.isClosedByPeer(1000), 'frontend sees the connection closed');
    } finally {
      fe.close();
      fe.ram.close();
    }
  });

  test('exits 0 within 1000 ms with a frontend stuck mid-message', async () => {
    const dir = tempDir('vubd-sigterm-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1'], { dir });
    const fe = Frontend.connect(d.socketPath);
    try {
      fe.negotiate();
      fe.sendRaw(Uint8Array.of(5, 0, 0, 0, 1, 0)); // half a header
      await sleep(50);
      const r = await d.stop();
      assert.equal(r.code, 0);
      assert.ok(r.ms < 1000, `exited after ${r.ms} ms`);
    } finally {
      fe.close();
      fe.ram.close();
    }
  });
});

describe('command line', () => {
  const run = (args: string[]): { status: number | null; stdout: string; stderr: string } => {
    const r = spawnSync(process.execPath, [vubdMain, ...args], { encoding: 'utf8', timeout: 10000 });
    return { status: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  test('missing --blk-file exits 2 with a message on stderr, before listening', () => {
    const dir = tempDir('vubd-cli-');
    const sock = path.join(dir, 's.sock');
    const r = run([`--socket-path=${sock}`]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /blk-file/);
    assert.ok(!fs.existsSync(sock), 'no socket created');
  });

  test('unreadable image exits 1 with a message, before listening', () => {
    const dir = tempDir('vubd-cli-');
    const sock = path.join(dir, 's.sock');
    for (const image of [path.join(dir, 'missing.img'), path.join(dir, 'not-a-dir.img', 'x'), dir]) {
      if (image.endsWith('x')) fs.writeFileSync(path.dirname(image), 'file');
      const r = run([`--socket-path=${sock}`, `--blk-file=${image}`]);
      assert.equal(r.status, 1, `${image}: exit status (stderr: ${r.stderr})`);
      assert.match(r.stderr, /vubd:.*(image|open|file|directory)/i, `${image}: stderr says why`);
      assert.ok(!fs.existsSync(sock), `${image}: no socket created`);
    }
  });

  test('socket path in use by a live vubd: exits 1 with a message; the live one keeps serving', async () => {
    const dir = tempDir('vubd-cli-');
    const image = makeImage(dir);
    const d = await startDaemon([`--blk-file=${image}`, '--num-queues=1'], { dir });
    try {
      const r = run([`--socket-path=${d.socketPath}`, `--blk-file=${image}`, '--num-queues=1']);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /in use/i);
      assert.ok(fs.existsSync(d.socketPath), 'the live socket file was left alone');
      await freshSessionWorks(d, 3);
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });

  test('a stale socket file is replaced', async () => {
    const dir = tempDir('vubd-cli-');
    const sock = path.join(dir, 'vubd.sock');
    native.close(native.listenUnix(sock, 1)); // bound, then nobody listens: connect gets ECONNREFUSED
    assert.ok(fs.lstatSync(sock).isSocket());
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1'], { dir });
    try {
      await freshSessionWorks(d, 4);
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });

  test('a regular file at the socket path is not replaced', () => {
    const dir = tempDir('vubd-cli-');
    const sock = path.join(dir, 'vubd.sock');
    fs.writeFileSync(sock, 'precious');
    const r = run([`--socket-path=${sock}`, `--blk-file=${makeImage(dir)}`, '--num-queues=1']);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /not a socket/);
    assert.equal(fs.readFileSync(sock, 'utf8'), 'precious');
  });

  test('--print-capabilities prints exactly the capabilities JSON and exits 0, ignoring other options', () => {
    const want = '{"type":"block","features":["read-only","blk-file"]}\n';
    for (const args of [['--print-capabilities'], ['-c'], ['--print-capabilities', '--socket-path=/nonexistent/dir/s.sock', '--blk-file=/nonexistent']]) {
      const r = run(args);
      assert.equal(r.status, 0, args.join(' '));
      assert.equal(r.stdout, want, args.join(' '));
      assert.equal(r.stderr, '', args.join(' '));
    }
  });

  test('--read-only: GET_FEATURES has VIRTIO_BLK_F_RO, writes fail with IOERR, reads work, image unchanged', async () => {
    const dir = tempDir('vubd-ro-');
    const image = makeImage(dir, 4 * MiB);
    const content = pattern(77, 4 * MiB);
    fs.writeFileSync(image, content);
    const d = await startDaemon([`--blk-file=${image}`, '--read-only', '--num-queues=1'], { dir });
    const { fe, conn } = await openSession(d);
    try {
      const features = fe.callU64(Request.GET_FEATURES);
      assert.ok(hasBit(features, F.BLK_RO), 'bit 5 offered');
      fe.negotiate();
      assert.ok(hasBit(fe.features, F.BLK_RO));
      const q = fe.setupRing(0, 128);
      assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, new Uint8Array(4096))), IOERR, 'write');
      const seg = new Uint8Array(16);
      new DataView(seg.buffer).setUint32(8, 8, true);
      assert.equal(fe.statusOf(fe.run(q, BLK.WRITE_ZEROES, 0, seg)), IOERR, 'write zeroes');
      assert.equal(fe.statusOf(fe.run(q, BLK.DISCARD, 0, seg)), IOERR, 'discard');
      const r = fe.run(q, BLK.IN, 0, 4096);
      assert.equal(fe.statusOf(r), OK);
      assert.deepEqual(fe.dataOf(r), content.subarray(0, 4096));
      assert.equal(fe.statusOf(fe.run(q, BLK.FLUSH, 0, 0)), OK);
    } finally {
      await closeSession(d, fe, conn);
      assert.equal((await d.stop()).code, 0);
    }
    assert.deepEqual(new Uint8Array(fs.readFileSync(image)), content, 'image unchanged');
    // without --read-only the bit is not offered
    const d2 = await startDaemon([`--blk-file=${image}`, '--num-queues=1'], { dir: tempDir('vubd-rw-') });
    try {
      const fe2 = Frontend.connect(d2.socketPath);
      assert.ok(!hasBit(fe2.callU64(Request.GET_FEATURES), F.BLK_RO));
      fe2.close();
      fe2.ram.close();
    } finally {
      await d2.stop();
    }
  });
});

