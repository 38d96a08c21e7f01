// The nbd node against real servers started here: qemu-nbd and nbdkit (memory and file plugins),
// over unix sockets and TCP. The stamped verify workload on 2 queues (one NBD connection each),
// the server SIGKILLed and restarted mid-run with reconnect-delay set (0 verify errors), and
// blockdev-add's refusals: nothing listening, an unknown export, TLS.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { startDaemon, tempDir, type Daemon } from '../helpers/daemon.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { dispose, pattern } from '../helpers/sessions.js';
import { freePort, nbdServerSkip, NbdServerProcess } from '../helpers/nbd-server.js';
import type { VerifyLoadInput, VerifyLoadResult } from '../helpers/verify-load.js';

const MiB = 2 ** 20;

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

const rounds = (l: Load): number => Math.min(...l.progress);

async function waitRounds(l: Load, n: number, timeoutMs = 60000): Promise<void> {
  const target = rounds(l) + n;
  const deadline = Date.now() + timeoutMs;
  while (rounds(l) < target) {
    if (Date.now() > deadline) throw new Error(`workload stalled at round ${rounds(l)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function finish(l: Load): Promise<VerifyLoadResult> {
  Atomics.store(l.stop, 0, 1);
  const r = await l.result;
  assert.equal(r.firstError, null, String(r.firstError));
  assert.equal(r.lost + r.verifyErrors + r.badStatus, 0);
  assert.ok(r.reads > 0 && r.reads === r.writes, 'the workload did work');
  return r;
}

async function daemon(dir: string): Promise<{ d: Daemon; qmp: QmpClient }> {
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--control=${control}`, '--workers=2', '--aio=io_uring'], { dir, exportless: true });
  return { d, qmp: await QmpClient.connect(control) };
}

async function exportNode(qmp: QmpClient, dir: string, node: string, queues = 2): Promise<string> {
  const sock = path.join(dir, `${node}.sock`);
  await qmp.execute('block-export-add', { type: 'vhost-user-blk', id: `e-${node}`, 'node-name': node, addr: { type: 'unix', path: sock }, writable: true, 'num-queues': queues });
  return sock;
}

function image(dir: string, name: string, size: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, '');
  fs.truncateSync(f, size);
  return f;
}

/** a discard / write-zeroes segment */
function seg(sector: number, num: number, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, num, true);
  dv.setUint32(12, flags, true);
  return b;
}

const skip = nbdServerSkip('qemu-nbd', 'nbdkit');

describe('nbd node', { skip }, () => {
  for (const kind of ['qemu-nbd unix', 'nbdkit memory tcp'] as const) {
    test(`verify workload on 2 queues over ${kind}; data lands on the server`, { timeout: 120000 }, async () => {
      const dir = tempDir('vubd-nbd-');
      const listen = kind === 'qemu-nbd unix' ? { unix: path.join(dir, 'nbd.sock') } : { port: await freePort() };
      const img = image(dir, 'disk.img', 16 * MiB);
      const srv = kind === 'qemu-nbd unix' ? NbdServerProcess.qemuNbd(img, listen) : NbdServerProcess.nbdkit(['memory', 'size=16M'], listen);
      await srv.start();
      const { d, qmp } = await daemon(dir);
      try {
        await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'n0', server: srv.server, export: 'disk' });
        const nodes = await qmp.execute<{ 'node-name': string; drv: string; image: { 'virtual-size': number } }[]>('query-named-block-nodes');
        assert.deepEqual(nodes.map((n) => [n['node-name'], n.drv, n.image['virtual-size']]), [['n0', 'nbd', 16 * MiB]]);
        const sock = await exportNode(qmp, dir, 'n0');
        const fe = Frontend.connect(sock);
        try {
          fe.negotiate();
          const ring = fe.setupRing(0, 64);
          const data = pattern(3, 128 * 1024);
          assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 2048, data)), 0);
          const r = fe.run(ring, BLK.IN, 2048, data.length);
          assert.equal(fe.statusOf(r), 0);
          assert.deepEqual(fe.dataOf(r), data, 'read back through nbd');
          assert.equal(fe.statusOf(fe.run(ring, BLK.FLUSH, 0, 0)), 0, 'flush');
          assert.equal(fe.statusOf(fe.run(ring, BLK.WRITE_ZEROES, 0, seg(2048, 64, 0))), 0, 'write zeroes');
          assert.equal(fe.statusOf(fe.run(ring, BLK.DISCARD, 0, seg(4096, 64, 0))), 0, 'discard');
          const rz = fe.run(ring, BLK.IN, 2048, 64 * 512);
          assert.ok(fe.dataOf(rz).every((b) => b === 0), 'zeroed');
        } finally {
          dispose(fe);
        }
        if (kind === 'qemu-nbd unix') {
          // qemu-nbd writes through to the file: what the guest wrote is on the host now
          const fd = fs.openSync(img, 'r');
          const got = Buffer.alloc(4096);
          fs.readSync(fd, got, 0, 4096, 2048 * 512 + 64 * 512);
          fs.closeSync(fd);
          assert.deepEqual(new Uint8Array(got), pattern(3, 128 * 1024).subarray(64 * 512, 64 * 512 + 4096), 'the image holds the write');
        }
        const load = startLoad(sock, 2);
        await waitRounds(load, 5);
        await finish(load);
      } finally {
        qmp.close();
        await d.stop();
        await srv.kill('SIGTERM');
      }
    });
  }

  for (const kind of ['qemu-nbd unix', 'nbdkit file tcp'] as const) {
    test(`${kind}: the server SIGKILLed and restarted mid-run with reconnect-delay=15: requests wait, are resent, 0 verify errors`, { timeout: 180000 }, async () => {
      const dir = tempDir('vubd-nbd-kill-');
      const listen = kind === 'qemu-nbd unix' ? { unix: path.join(dir, 'nbd.sock') } : { port: await freePort() };
      const img = image(dir, 'disk.img', 16 * MiB);
      const srv = kind === 'qemu-nbd unix' ? NbdServerProcess.qemuNbd(img, listen) : NbdServerProcess.nbdkit(['file', `file=${img}`], listen);
      await srv.start();
      const { d, qmp } = await daemon(dir);
      try {
        await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'n0', server: srv.server, export: 'disk', 'reconnect-delay': 15 });
        const load = startLoad(await exportNode(qmp, dir, 'n0'), 2);
        for (let k = 0; k < 2; k++) {
          await waitRounds(load, 3);
          await srv.kill('SIGKILL');
          const stalled = rounds(load);
          await new Promise((r) => setTimeout(r, 1000));
          assert.ok(rounds(load) <= stalled + 1, 'no progress while the server is gone');
          await srv.start();
          await waitRounds(load, 3, 30000);
        }
        await finish(load);
        const lost = d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.includes('lost'));
        const back = d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('nbd: reconnected'));
        assert.ok(lost.length >= 2, `connection loss logged (${lost.length})`);
        assert.ok(back.length >= 2, `reconnects logged (${back.length})`);
      } finally {
        qmp.close();
        await d.stop();
        await srv.kill('SIGTERM');
      }
    });
  }

  test('reconnect-delay=0: requests fail with IOERR at once while the server is down, and work again once it is back', { timeout: 60000 }, async () => {
    const dir = tempDir('vubd-nbd-nowait-');
    const img = image(dir, 'disk.img', 4 * MiB);
    const srv = NbdServerProcess.qemuNbd(img, { unix: path.join(dir, 'nbd.sock') });
    await srv.start();
    const { d, qmp } = await daemon(dir);
    const fe = Frontend.connect(await (async () => (await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'n0', server: srv.server, export: 'disk' }), exportNode(qmp, dir, 'n0', 1)))());
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 64);
      const data = pattern(9, 4096);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8, data)), 0);
      await srv.kill('SIGKILL');
      const t0 = Date.now();
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, 8, 4096)), 1, 'IOERR while the server is down');
      assert.ok(Date.now() - t0 < 3000, 'failed at once');
      await srv.start();
      let r = fe.run(ring, BLK.IN, 8, 4096);
      for (let i = 0; i < 50 && fe.statusOf(r) !== 0; i++) {
        await new Promise((res) => setTimeout(res, 100)); // the backoff may make the first request after the restart fail too
        r = fe.run(ring, BLK.IN, 8, 4096);
      }
      assert.equal(fe.statusOf(r), 0, 'served again after the restart, without blockdev-add');
      assert.deepEqual(fe.dataOf(r), data);
    } finally {
      dispose(fe);
      qmp.close();
      await d.stop();
      await srv.kill('SIGTERM');
    }
  });

  test('blockdev-add refusals: nothing listening, an unknown export, TLS, a bad server; the daemon carries on', { timeout: 60000 }, async () => {
    const dir = tempDir('vubd-nbd-refuse-');
    const img = image(dir, 'disk.img', 4 * MiB);
    const srv = NbdServerProcess.qemuNbd(img, { unix: path.join(dir, 'nbd.sock') });
    await srv.start();
    const { d, qmp } = await daemon(dir);
    try {
      const port = await freePort();
      const add = (extra: Record<string, unknown>) => qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'x', export: 'disk', ...extra });
      await assert.rejects(add({ server: { type: 'unix', path: path.join(dir, 'nobody.sock') } }), /cannot open NBD export 'disk' on unix:.*nobody\.sock: .*ENOENT/);
      await assert.rejects(add({ server: { type: 'inet', host: '127.0.0.1', port: String(port) } }), new RegExp(`cannot open NBD export 'disk' on 127\\.0\\.0\\.1:${port}: .*ECONNREFUSED`));
      await assert.rejects(add({ server: srv.server, export: 'nope' }), /no such export/);
      await assert.rejects(add({ server: srv.server, 'tls-creds': 'tls0' }), /TLS \(tls-creds\) is not supported/);
      await assert.rejects(add({ server: { type: 'vsock', cid: '3', port: '1' } }), /server.type must be 'inet' or 'unix'/);
      await assert.rejects(add({ server: { type: 'inet', host: '127.0.0.1', port: 'x' } }), /server.port/);
      const t0 = Date.now();
      await assert.rejects(add({ server: { type: 'unix', path: path.join(dir, 'late.sock') }, 'open-timeout': 1 }), /ENOENT/);
      assert.ok(Date.now() - t0 >= 700, 'open-timeout retried for about a second');
      await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'ok', server: srv.server, export: 'disk' });
      const names = (await qmp.execute<{ 'node-name': string; file: string }[]>('query-named-block-nodes')).map((n) => [n['node-name'], n.file]);
      assert.deepEqual(names, [['ok', `nbd+unix:///disk?socket=${path.join(dir, 'nbd.sock')}`]]);
      assert.equal(d.proc.exitCode, null);
    } finally {
      qmp.close();
      await d.stop();
      await srv.kill('SIGTERM');
    }
  });
});
