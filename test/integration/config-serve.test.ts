// vubd --config serves what the file describes: every node opened (children first), every export
// listening on its own socket with its own queues, the control socket from the file; a node the
// file names but that cannot be opened is a start-up failure naming the file and the node.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir, vubdMain } from '../helpers/daemon.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { dispose, pattern } from '../helpers/sessions.js';

const MiB = 2 ** 20;

function host(dir: string): Record<string, unknown> {
  return {
    workers: 2,
    control: { path: 'control.sock' },
    nodes: [
      { 'node-name': 'limit', driver: 'throttle', file: 'disk', limits: { 'iops-total': 100000 } },
      { 'node-name': 'disk', driver: 'file', filename: 'disk.img' },
      { 'node-name': 'zero', driver: 'null-co', size: '64M' },
    ],
    exports: [
      { type: 'vhost-user-blk', id: 'vm1', 'node-name': 'limit', addr: { type: 'unix', path: path.join(dir, 'vm1.sock') }, writable: true, 'num-queues': 2 },
      { type: 'vhost-user-blk', id: 'vm2', 'node-name': 'zero', addr: { type: 'unix', path: 'vm2.sock' }, 'iothread-vq-mapping': [{ iothread: 'worker1' }] },
    ],
  };
}

test('vubd --config serves every export of the file, with the file\'s control socket and worker mapping', { timeout: 60000 }, async () => {
  const dir = tempDir('vubd-cfgserve-');
  fs.writeFileSync(path.join(dir, 'disk.img'), '');
  fs.truncateSync(path.join(dir, 'disk.img'), 16 * MiB);
  fs.writeFileSync(path.join(dir, 'host.json'), JSON.stringify(host(dir)));
  const proc = spawn(process.execPath, [vubdMain, '--config=host.json'], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let logs = '';
  proc.stderr!.on('data', (d: Buffer) => (logs += d.toString()));
  try {
    const deadline = Date.now() + 20000;
    while (!logs.includes('"msg":"vubd listening"')) {
      assert.ok(proc.exitCode === null, `vubd exited: ${logs}`);
      assert.ok(Date.now() < deadline, `not listening: ${logs}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const listening = JSON.parse(logs.split('\n').find((l) => l.includes('"msg":"vubd listening"'))!) as Record<string, unknown>;
    assert.equal(listening.exports, 2);
    const qmp = await QmpClient.connect(path.join(dir, 'control.sock'));
    try {
      const exps = await qmp.execute<{ id: string; 'node-name': string; writable: boolean; 'iothread-vq-mapping': unknown }[]>('query-block-exports');
      assert.deepEqual(exps.map((e) => [e.id, e['node-name'], e.writable]), [['vm1', 'limit', true], ['vm2', 'zero', false]]);
      assert.deepEqual(exps[1]!['iothread-vq-mapping'], [{ iothread: 'worker1', vqs: [0] }]);
    } finally {
      qmp.close();
    }
    // vm1: a write through the throttle reaches the image; vm2 (relative socket path, read-only null node) reads zeroes.
    const fe1 = Frontend.connect(path.join(dir, 'vm1.sock'));
    try {
      fe1.negotiate();
      const data = pattern(3, 8192);
      assert.equal(fe1.statusOf(fe1.run(fe1.setupRing(1, 64), BLK.OUT, 64, data)), 0);
      assert.equal(fe1.statusOf(fe1.run(fe1.setupRing(0, 64), BLK.FLUSH, 0, 0)), 0);
      const img = fs.readFileSync(path.join(dir, 'disk.img'));
      assert.deepEqual(new Uint8Array(img.subarray(64 * 512, 64 * 512 + data.length)), data);
    } finally {
      dispose(fe1);
    }
    const fe2 = Frontend.connect(path.join(dir, 'vm2.sock'));
    try {
      fe2.negotiate();
      const ring = fe2.setupRing(0, 64);
      const r = fe2.run(ring, BLK.IN, 0, 4096);
      assert.equal(fe2.statusOf(r), 0);
      assert.notEqual(fe2.statusOf(fe2.run(ring, BLK.OUT, 0, pattern(1, 4096))), 0, 'a read-only export refuses writes');
    } finally {
      dispose(fe2);
    }
  } finally {
    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('exit', r));
  }
  assert.equal(proc.exitCode, 0, logs);
});

test('a node the file describes that cannot be opened stops the start with the file and the node named, exit 1, no socket left', () => {
  const dir = tempDir('vubd-cfgfail-');
  fs.writeFileSync(path.join(dir, 'host.json'), JSON.stringify(host(dir))); // disk.img does not exist
  const r = spawnSync(process.execPath, [vubdMain, '--config=host.json'], { cwd: dir, encoding: 'utf8', timeout: 20000 });
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /^vubd: host\.json: node 'disk': .*disk\.img/m);
  assert.deepEqual(fs.readdirSync(dir).filter((f) => f.endsWith('.sock')), [], 'no socket was left behind');
});

test('npm start -- --config=FILE: the file wins over npm start\'s --default (no ./vubd-disk.img is made)', { timeout: 30000 }, async () => {
  const dir = tempDir('vubd-cfgstart-');
  fs.writeFileSync(path.join(dir, 'h.json'), JSON.stringify({ nodes: [{ 'node-name': 'z', driver: 'null-co', size: '64M' }], exports: [{ type: 'vhost-user-blk', id: 'z', 'node-name': 'z', addr: { type: 'unix', path: 'z.sock' } }] }));
  const proc = spawn(process.execPath, [vubdMain, '--default', '--config=h.json'], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let logs = '';
  proc.stderr!.on('data', (d: Buffer) => (logs += d.toString()));
  try {
    const deadline = Date.now() + 20000;
    while (!logs.includes('"msg":"vubd listening"')) {
      assert.ok(proc.exitCode === null, `vubd exited: ${logs}`);
      assert.ok(Date.now() < deadline, `not listening: ${logs}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(fs.statSync(path.join(dir, 'z.sock')).isSocket());
    assert.deepEqual(fs.readdirSync(dir).sort(), ['h.json', 'z.sock'], 'only the file\'s socket, no default image or socket');
  } finally {
    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('exit', r));
  }
});
