// A hostile NBD server (test/helpers/hostile-nbd-server.ts, a child process) that breaks the
// protocol for one sector: garbage, a short reply, an unknown handle, a chunk out of range or of
// the wrong length, a read not fully covered, or a real error chunk. The request fails with IOERR,
// the node reconnects for the next one, and another export's queues on the same node carry on
// with the verify workload (0 verify errors). The daemon lives and leaks no fds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { dispose, pattern } from '../helpers/sessions.js';
import { HOSTILE_MODES, POISON_SECTOR } from '../helpers/hostile-nbd-server.js';
import type { VerifyLoadInput, VerifyLoadResult } from '../helpers/verify-load.js';

const MiB = 2 ** 20;
const serverScript = path.join(path.dirname(fileURLToPath(import.meta.url)), '../helpers/hostile-nbd-server.js');

async function startHostile(sock: string, mode: string): Promise<ChildProcess> {
  const p = spawn(process.execPath, [serverScript, sock, mode, String(8 * MiB)], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    p.stdout!.once('data', () => resolve());
    p.once('exit', (c) => reject(new Error(`hostile server exited ${c}`)));
  });
  return p;
}

test('a hostile NBD server: each protocol violation fails its request with IOERR, the node reconnects, the other export carries on', { timeout: 240000 }, async () => {
  const dir = tempDir('vubd-nbd-hostile-');
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--control=${control}`, '--workers=2', '--aio=io_uring'], { dir, exportless: true });
  const qmp = await QmpClient.connect(control);
  try {
    for (const mode of HOSTILE_MODES) {
      const nbdSock = path.join(dir, `${mode}.nbd`);
      const srv = await startHostile(nbdSock, mode);
      try {
        await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': mode, server: { type: 'unix', path: nbdSock }, 'reconnect-delay': 5 });
        const sockA = path.join(dir, `${mode}-a.sock`);
        const sockB = path.join(dir, `${mode}-b.sock`);
        await qmp.execute('block-export-add', { type: 'vhost-user-blk', id: `${mode}-a`, 'node-name': mode, addr: { type: 'unix', path: sockA }, writable: true, 'num-queues': 2 });
        await qmp.execute('block-export-add', { type: 'vhost-user-blk', id: `${mode}-b`, 'node-name': mode, addr: { type: 'unix', path: sockB }, writable: true, 'num-queues': 1 });
        const fdsBefore = d.fdCount();
        const stop = new SharedArrayBuffer(4);
        const progress = new SharedArrayBuffer(8);
        const input: VerifyLoadInput = { socketPath: sockA, queues: 2, areaSectors: (2 * MiB) / 512, depth: 8, stop, progress };
        const worker = new Worker(new URL('../helpers/verify-load.js', import.meta.url), { workerData: input });
        const result = new Promise<VerifyLoadResult>((resolve, reject) => {
          worker.once('message', resolve);
          worker.once('error', reject);
        });
        const fe = Frontend.connect(sockB);
        try {
          fe.negotiate();
          const ring = fe.setupRing(0, 64);
          const data = pattern(5, 4096);
          assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, POISON_SECTOR, data)), 0, `${mode}: the write is answered correctly`);
          for (let i = 0; i < 3; i++) {
            const t0 = Date.now();
            assert.equal(fe.statusOf(fe.run(ring, BLK.IN, POISON_SECTOR, 4096)), 1, `${mode}: the poisoned read fails with IOERR`);
            assert.ok(Date.now() - t0 < 4000, `${mode}: failed without waiting out reconnect-delay`);
            const ok = fe.run(ring, BLK.IN, POISON_SECTOR + 8, 4096);
            assert.equal(fe.statusOf(ok), 0, `${mode}: the next request is served (reconnected if dropped)`);
          }
          const w = pattern(6, 4096);
          assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, POISON_SECTOR + 16, w)), 0);
          assert.deepEqual(fe.dataOf(fe.run(ring, BLK.IN, POISON_SECTOR + 16, 4096)), w, `${mode}: data intact`);
        } finally {
          dispose(fe);
        }
        while (Math.min(...new Int32Array(progress)) < 3) await new Promise((r) => setTimeout(r, 20));
        Atomics.store(new Int32Array(stop), 0, 1);
        const r = await result;
        assert.equal(r.firstError, null, `${mode}: ${r.firstError}`);
        assert.equal(r.lost + r.verifyErrors + r.badStatus, 0, `${mode}: the other export`);
        for (const id of [`${mode}-a`, `${mode}-b`]) {
          for (let tries = 0; ; tries++) {
            try {
              await qmp.execute('block-export-del', { id });
              break;
            } catch (e) {
              if (tries > 300) throw e;
              await new Promise((res) => setTimeout(res, 10));
            }
          }
        }
        await new Promise((res) => setTimeout(res, 200));
        await qmp.execute('blockdev-del', { 'node-name': mode });
        assert.ok(d.fdCount() <= fdsBefore, `${mode}: fds ${d.fdCount()} <= ${fdsBefore}`);
      } finally {
        srv.kill('SIGKILL');
      }
      assert.equal(d.proc.exitCode, null, 'the daemon lives');
    }
    const violations = d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.includes('protocol violation'));
    assert.ok(violations.length >= 5, `violations logged (${violations.length})`);
  } catch (e) {
    for (const l of d.logs.slice(-30)) console.error(l);
    throw e;
  } finally {
    qmp.close();
    await d.stop();
  }
});
