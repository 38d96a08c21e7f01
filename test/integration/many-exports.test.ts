// One daemon, many disks: 16 exports on a 2-thread worker pool, each with its own frontend running
// the stamped verify workload, while other exports are added, used and deleted; then deleting an
// export under load in both modes, and block-export-add's refusals.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { startDaemon, tempDir, type Daemon } from '../helpers/daemon.js';
import { QmpClient, QmpCommandError } from '../../src/control/qmp-client.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { dispose, pattern } from '../helpers/sessions.js';
import type { VerifyLoadInput, VerifyLoadResult } from '../helpers/verify-load.js';

const MiB = 2 ** 20;

function sparse(file: string, size: number): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
}

interface Load {
  result: Promise<VerifyLoadResult>;
  stop: Int32Array;
  progress: Int32Array;
}

function startLoad(socketPath: string, queues: number): Load {
  const stop = new SharedArrayBuffer(4);
  const progress = new SharedArrayBuffer(4 * queues);
  const input: VerifyLoadInput = { socketPath, queues, areaSectors: (2 * MiB) / 512, depth: 8, stop, progress };
  const worker = new Worker(new URL('../helpers/verify-load.js', import.meta.url), { workerData: input });
  const result = new Promise<VerifyLoadResult>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  return { result, stop: new Int32Array(stop), progress: new Int32Array(progress) };
}

/** the process's own threads by name (the kernel's io_uring workers, iou-*, come and go with load) */
function threads(d: Daemon): string[] {
  const dir = `/proc/${d.proc.pid}/task`;
  return fs
    .readdirSync(dir)
    .map((t) => fs.readFileSync(`${dir}/${t}/comm`, 'utf8').trim())
    .filter((n) => !n.startsWith('iou-'))
    .sort();
}

const rounds = (l: Load): number => Math.min(...l.progress);

async function waitRounds(loads: Load[], n: number, timeoutMs = 60000): Promise<void> {
  const target = loads.map((l) => rounds(l) + n);
  const deadline = Date.now() + timeoutMs;
  while (loads.some((l, i) => rounds(l) < target[i]!)) {
    if (Date.now() > deadline) throw new Error(`workloads stalled: rounds ${loads.map(rounds).join(',')}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function addExport(qmp: QmpClient, dir: string, id: string, node: string, extra: Record<string, unknown> = {}): Promise<string> {
  const sock = path.join(dir, `${id}.sock`);
  await qmp.execute('block-export-add', { type: 'vhost-user-blk', id, 'node-name': node, addr: { type: 'unix', path: sock }, writable: true, ...extra });
  return sock;
}

async function waitEvent(qmp: QmpClient, event: string, id: string, timeoutMs = 10000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!qmp.events.some((e) => e.event === event && (e.data as { id?: string }).id === id)) {
    if (Date.now() > deadline) throw new Error(`no ${event} for ${id}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function daemon(dir: string, workers = 2): Promise<{ d: Daemon; qmp: QmpClient }> {
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--control=${control}`, `--workers=${workers}`, '--aio=io_uring'], { dir, exportless: true });
  return { d, qmp: await QmpClient.connect(control) };
}

test('16 exports on 2 workers run the verify workload while 10 more are added, used and deleted: 0 lost, 0 verify errors', { timeout: 300000 }, async () => {
  const dir = tempDir('vubd-many-');
  const { d, qmp } = await daemon(dir);
  try {
    const socks: string[] = [];
    for (let i = 0; i < 16; i++) {
      const img = path.join(dir, `disk${i}.img`);
      sparse(img, 8 * MiB);
      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': `n${i}`, filename: img });
      socks.push(await addExport(qmp, dir, `e${i}`, `n${i}`, { 'num-queues': 2 }));
    }
    const listed = await qmp.execute<{ id: string; 'iothread-vq-mapping': { iothread: string; vqs: number[] }[] }[]>('query-block-exports');
    assert.equal(listed.length, 16);
    const perWorker = new Map<string, number>();
    for (const e of listed) for (const m of e['iothread-vq-mapping']) perWorker.set(m.iothread, (perWorker.get(m.iothread) ?? 0) + m.vqs.length);
    assert.deepEqual(Object.fromEntries(perWorker), { worker0: 16, worker1: 16 }, 'round robin spreads the 32 queues evenly');
    const threadsBefore = threads(d);

    const loads = socks.map((s) => startLoad(s, 2));
    await waitRounds(loads, 3);
    const fdsBefore = d.fdCount();
    for (let k = 0; k < 10; k++) {
      await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': `extra${k}`, size: 4 * MiB });
      const sock = await addExport(qmp, dir, `x${k}`, `extra${k}`);
      const fe = Frontend.connect(sock);
      try {
        fe.negotiate();
        const ring = fe.setupRing(0, 64);
        const r = fe.run(ring, BLK.IN, 8, 4096);
        assert.equal(fe.statusOf(r), 0, `extra export x${k} served a read`);
        assert.ok(fe.dataOf(r).every((b) => b === 0), 'null node reads zeroes');
      } finally {
        dispose(fe);
      }
      // safe: refused while the frontend's session may still be closing, then done
      for (let tries = 0; ; tries++) {
        try {
          await qmp.execute('block-export-del', { id: `x${k}`, mode: 'safe' });
          break;
        } catch (e) {
          if (!(e instanceof QmpCommandError) || !/still in use/.test(e.message) || tries > 200) throw e;
          await new Promise((r) => setTimeout(r, 10));
        }
      }
      await waitEvent(qmp, 'BLOCK_EXPORT_DELETED', `x${k}`);
      assert.ok(!fs.existsSync(sock), 'the deleted export removed its socket');
      await qmp.execute('blockdev-del', { 'node-name': `extra${k}` });
    }
    await waitRounds(loads, 3);
    assert.deepEqual(threads(d), threadsBefore, 'no thread was made per export');
    for (const l of loads) Atomics.store(l.stop, 0, 1);
    const results = await Promise.all(loads.map((l) => l.result));
    results.forEach((r, i) => {
      assert.equal(r.firstError, null, `export e${i}: ${r.firstError}`);
      assert.equal(r.lost + r.verifyErrors + r.badStatus, 0, `export e${i}`);
      assert.ok(r.reads > 0 && r.reads === r.writes, `export e${i} did work`);
    });
    // The loads' frontends closed: the fds of the 10 added-and-deleted exports are all gone.
    const deadline = Date.now() + 5000;
    while (d.fdCount() > fdsBefore && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.ok(d.fdCount() <= fdsBefore, `fds ${d.fdCount()} <= ${fdsBefore}: nothing leaked by adding and deleting exports`);
    const stats = await qmp.execute<{ exports: { id: string; queues: { staleCompletions: number; errors: number }[] }[] }>('query-stats');
    assert.equal(stats.exports.length, 16);
    assert.equal(stats.exports.flatMap((e) => e.queues).reduce((a, q) => a + q.errors, 0), 0);
  } finally {
    qmp.close();
    await d.stop();
  }
});

test('deleting an export under load: safe is refused while its frontend is connected, hard disconnects it; the other export carries on', { timeout: 120000 }, async () => {
  const dir = tempDir('vubd-del-');
  const { d, qmp } = await daemon(dir);
  try {
    for (const n of ['a', 'b']) {
      sparse(path.join(dir, `${n}.img`), 8 * MiB);
      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': n, filename: path.join(dir, `${n}.img`) });
    }
    const sockA = await addExport(qmp, dir, 'ea', 'a', { 'num-queues': 2 });
    const sockB = await addExport(qmp, dir, 'eb', 'b', { 'num-queues': 2 });
    const other = startLoad(sockB, 2);
    const fe = Frontend.connect(sockA);
    fe.negotiate();
    const ring = fe.setupRing(0, 128);
    // A known write, completed before anything is deleted.
    const data = pattern(7, 64 * 1024);
    const w = fe.run(ring, BLK.OUT, 0, data);
    assert.equal(fe.statusOf(w), 0);
    await waitRounds([other], 2);

    await assert.rejects(qmp.execute('block-export-del', { id: 'ea', mode: 'safe' }), /still in use/);
    assert.ok(fs.existsSync(sockA), 'a refused delete leaves the export in place');
    const again = fe.run(ring, BLK.IN, 0, data.length);
    assert.equal(fe.statusOf(again), 0, 'the export still serves after the refused delete');
    assert.deepEqual(fe.dataOf(again), data);

    // Requests in flight when the hard delete comes: they finish (or the session ends) first.
    for (let i = 0; i < 32; i++) fe.blk(ring, BLK.OUT, 256 + i * 8, pattern(100 + i, 4096));
    ring.kick();
    await qmp.execute('block-export-del', { id: 'ea', mode: 'hard' });
    await waitEvent(qmp, 'BLOCK_EXPORT_DELETED', 'ea');
    assert.ok(fe.isClosedByPeer(5000), 'the frontend was disconnected');
    assert.ok(!fs.existsSync(sockA), 'the socket is gone');
    const ids = (await qmp.execute<{ id: string }[]>('query-block-exports')).map((e) => e.id);
    assert.deepEqual(ids, ['eb']);
    dispose(fe);
    // The node stays and can be exported again; what was written before is there.
    const sockA2 = await addExport(qmp, dir, 'ea2', 'a');
    const fe2 = Frontend.connect(sockA2);
    try {
      fe2.negotiate();
      const r = fe2.run(fe2.setupRing(0, 64), BLK.IN, 0, data.length);
      assert.deepEqual(fe2.dataOf(r), data, 'the data written before the hard delete is on the node');
    } finally {
      dispose(fe2);
    }

    await waitRounds([other], 2);
    Atomics.store(other.stop, 0, 1);
    const r = await other.result;
    assert.equal(r.lost + r.verifyErrors + r.badStatus, 0, `the other export: ${r.firstError}`);
  } finally {
    qmp.close();
    await d.stop();
  }
});

test('block-export-add refuses bad exports with a reason, and an explicit iothread-vq-mapping is honoured', { timeout: 60000 }, async () => {
  const dir = tempDir('vubd-addbad-');
  const { d, qmp } = await daemon(dir, 3);
  try {
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'z', size: 4 * MiB });
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'ro', size: 4 * MiB, 'read-only': true });
    const sock = await addExport(qmp, dir, 'm', 'z', { 'num-queues': 3, 'iothread-vq-mapping': [{ iothread: 'worker2', vqs: [0, 2] }, { iothread: 'worker0', vqs: [1] }] });
    const base = { type: 'vhost-user-blk', 'node-name': 'z', addr: { type: 'unix', path: path.join(dir, 'other.sock') } };
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ ...base, id: 'm' }, /already in use/],
      [{ ...base, id: 'n1', 'node-name': 'nope' }, /Cannot find device='nope'/],
      [{ ...base, id: 'n2', 'node-name': 'ro', writable: true }, /read-only/],
      [{ ...base, id: 'n3', addr: { type: 'unix', path: sock } }, /already listens on/],
      [{ ...base, id: 'n4', 'iothread-vq-mapping': [{ iothread: 'worker3' }] }, /does not exist/],
      [{ ...base, id: 'n5', 'num-queues': 2, 'iothread-vq-mapping': [{ iothread: 'worker0', vqs: [0] }] }, /queue 1 is not mapped/],
      [{ ...base, id: 'n6', 'num-queues': 2, 'iothread-vq-mapping': [{ iothread: 'worker0', vqs: [0, 1] }, { iothread: 'worker1', vqs: [1] }] }, /mapped twice/],
      [{ ...base, id: 'n7', bogus: 1 }, /Parameter 'bogus' is unexpected/],
      [{ ...base, id: 'n8', type: 'nbd' }, /not supported/],
      [{ ...base, id: 'n9', 'num-queues': 0 }, /num-queues/],
      [{ ...base, id: 'n10', addr: { type: 'unix', path: path.join(dir, 'no-such-dir', 's.sock') } }, /cannot start export 'n10'/],
    ];
    for (const [args, want] of cases) {
      await assert.rejects(qmp.execute('block-export-add', args), want, JSON.stringify(args));
    }
    const exportsNow = await qmp.execute<{ id: string; 'iothread-vq-mapping': unknown }[]>('query-block-exports');
    assert.deepEqual(exportsNow.map((e) => e.id), ['m'], 'no refused export was left behind');
    assert.deepEqual(exportsNow[0]!['iothread-vq-mapping'], [{ iothread: 'worker0', vqs: [1] }, { iothread: 'worker2', vqs: [0, 2] }]);
    const stats = await qmp.execute<{ exports: { queues: { queue: number; worker: number }[] }[] }>('query-stats');
    assert.deepEqual(stats.exports[0]!.queues.map((q) => q.worker), [2, 0, 2]);
    await assert.rejects(qmp.execute('block-export-del', { id: 'nope' }), /not found/);
    await assert.rejects(qmp.execute('blockdev-del', { 'node-name': 'z' }), /in use|used/);
  } finally {
    qmp.close();
    await d.stop();
  }
});

test('a worker thread that dies ends the session of every export with a queue on it; the others keep running, all are served again', { timeout: 120000 }, async () => {
  const dir = tempDir('vubd-pooldeath-');
  const control = path.join(dir, 'qmp.sock');
  // worker0: queue 0 of e0, e1 and e2 (num-queues 1); worker1: queue 1 of e0 and e1.
  const d = await startDaemon([`--control=${control}`, '--workers=2', '--aio=sync'], { dir, exportless: true, env: { VUBD_TEST_FAULT: 'die:e0:1' } });
  const qmp = await QmpClient.connect(control);
  try {
    const socks: string[] = [];
    for (const [i, queues] of [[0, 2], [1, 2], [2, 1]] as const) {
      await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': `n${i}`, size: 4 * MiB });
      socks.push(await addExport(qmp, dir, `e${i}`, `n${i}`, { 'num-queues': queues, 'iothread-vq-mapping': [{ iothread: 'worker0', vqs: [0] }, ...(queues === 2 ? [{ iothread: 'worker1', vqs: [1] }] : [])] }));
    }
    const fes = socks.map((s) => Frontend.connect(s));
    try {
      for (const fe of fes) fe.negotiate();
      const ring2 = fes[2]!.setupRing(0, 64);
      assert.equal(fes[2]!.statusOf(fes[2]!.run(ring2, BLK.IN, 0, 4096)), 0, 'e2 served before');
      // Starting queue 1 of e0 and e1 (both on worker1): the first kick there kills worker1.
      for (const fe of fes.slice(0, 2)) {
        try {
          fe.setupRing(0, 64);
          const r = fe.setupRing(1, 64);
          fe.blk(r, BLK.IN, 0, 4096);
          r.kick();
        } catch {
          /* the session may already be gone */
        }
      }
      await d.waitForLog((r) => r.msg === 'worker thread died; replacing it' && r.worker === 1, 10000);
      assert.ok(fes[0]!.isClosedByPeer(5000), 'e0 (queue 1 on worker1) lost its session');
      assert.ok(fes[1]!.isClosedByPeer(5000), 'e1 (queue 1 on worker1) lost its session');
      assert.equal(fes[2]!.statusOf(fes[2]!.run(ring2, BLK.IN, 8, 4096)), 0, 'e2 (worker0 only) kept its session and is served');
      for (const e of ['e0', 'e1']) await d.waitForLog((r) => r.msg === 'queue worker replaced' && r.export === e && r.queue === 1, 10000);
      // A queue whose thread failed counts as dead at once: its session's reset does not send it requests.
      assert.deepEqual(d.logRecords().filter((r) => r.msg === 'internal error while handling a message' || r.msg === 'error while resetting the device after disconnect'), []);
      // Both are served again on both queues (worker1 is a new thread).
      for (const i of [0, 1]) {
        const fe = Frontend.connect(socks[i]!);
        try {
          fe.negotiate();
          for (let q = 0; q < 2; q++) {
            try {
              assert.equal(fe.statusOf(fe.run(fe.setupRing(q, 64), BLK.IN, 16, 4096)), 0, `e${i} queue ${q} served after the reconnect`);
            } catch (e) {
              throw new Error(`e${i} queue ${q}: ${(e as Error).message}\n${d.logs.slice(-30).join("\n")}`);
            }
          }
        } finally {
          dispose(fe);
        }
      }
    } finally {
      for (const fe of fes) dispose(fe);
    }
  } finally {
    qmp.close();
    await d.stop();
  }
});

