// Cache modes as QEMU names them (--cache, blockdev-add's cache options) against a real vubd:
// O_DIRECT seen in /proc/PID/fdinfo, unaligned guest buffers through bounce buffers, the
// write-cache mode the guest sees, and unsafe's flushes that never reach a failing fsync.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { startDaemon, tempDir, vubdMain, type Daemon } from '../helpers/daemon.js';
import { openFlags } from '../helpers/fdinfo.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { pattern } from '../helpers/sessions.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;
const O_DIRECT = 0o40000;
const WCE_OFFSET = 32;

function cleanups(t: { after(fn: () => Promise<void>): void }): (fn: () => unknown) => void {
  const fns: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn();
  });
  return (fn) => void fns.push(fn);
}

function image(dir: string, size = 8 * MiB): string {
  const f = path.join(dir, 'disk.img');
  fs.writeFileSync(f, '');
  fs.truncateSync(f, size);
  return f;
}

function fileBytes(file: string, offset: number, len: number): Uint8Array {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, offset);
    return new Uint8Array(b);
  } finally {
    fs.closeSync(fd);
  }
}

async function serve(t: { after(fn: () => Promise<void>): void }, args: string[]): Promise<{ d: Daemon; fe: Frontend; img: string; dir: string }> {
  const defer = cleanups(t);
  const dir = tempDir();
  const img = image(dir);
  const d = await startDaemon([`--blk-file=${img}`, '--num-queues=1', ...args], { dir });
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  defer(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  return { d, fe, img, dir };
}

test('/tmp is a file system with O_DIRECT (the tests below need one)', () => {
  const dir = tempDir();
  try {
    const fd = fs.openSync(image(dir), fs.constants.O_RDWR | fs.constants.O_DIRECT);
    fs.closeSync(fd);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

for (const aio of ['io_uring', 'sync'] as const) {
  test(`aio=${aio} --cache=none: the image is open O_DIRECT, the guest sees write-back, aligned and unaligned buffers read back and land in the file`, { timeout: 30000 }, async (t) => {
    const { d, fe, img } = await serve(t, ['--cache=none', `--aio=${aio}`]);
    const flags = openFlags(d, img);
    assert.ok(flags.length > 0, 'vubd has the image open');
    for (const f of flags) assert.equal(f & O_DIRECT, O_DIRECT, `fd flags 0${f.toString(8)} include O_DIRECT`);
    assert.equal(fe.getConfig()[WCE_OFFSET], 1, 'cache=none is write-back towards the guest');
    const q = fe.setupRing(0, 64);

    const aligned = pattern(1, 8192);
    assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, aligned)), OK, 'aligned write');
    const back = fe.run(q, BLK.IN, 0, 8192);
    assert.equal(fe.statusOf(back), OK);
    assert.deepEqual(fe.dataOf(back), aligned, 'aligned read back');

    // An odd address, and segments of odd lengths: O_DIRECT would refuse them (EINVAL).
    for (const [i, opts] of [{ misalign: 1 }, { misalign: 3, split: 3 }, { split: 5 }].entries()) {
      const data = pattern(10 + i, 12288);
      const sector = 64 + 32 * i;
      assert.equal(fe.statusOf(fe.run(q, BLK.OUT, sector, data, opts)), OK, `unaligned write ${JSON.stringify(opts)}`);
      const r = fe.run(q, BLK.IN, sector, 12288, opts);
      assert.equal(fe.statusOf(r), OK, `unaligned read ${JSON.stringify(opts)}`);
      assert.deepEqual(fe.dataOf(r), data, `unaligned read back ${JSON.stringify(opts)}`);
      assert.equal(r.usedLen, 12288 + 1, 'the used length counts the data copied to the guest');
      assert.deepEqual(fileBytes(img, sector * 512, 12288), data, 'the data is in the file');
    }
    assert.equal(fe.statusOf(fe.run(q, BLK.FLUSH, 0, 0)), OK, 'flushes are honoured');
    assert.deepEqual(fileBytes(img, 0, 8192), aligned, 'the aligned write is in the file');
  });
}

test('--cache=directsync: O_DIRECT and write-through (WCE 0); --cache=writethrough: page cache and write-through', { timeout: 30000 }, async (t) => {
  const ds = await serve(t, ['--cache=directsync']);
  for (const f of openFlags(ds.d, ds.img)) assert.equal(f & O_DIRECT, O_DIRECT, 'directsync is O_DIRECT');
  assert.equal(ds.fe.getConfig()[WCE_OFFSET], 0, 'directsync is write-through towards the guest');
  const q = ds.fe.setupRing(0, 64);
  const data = pattern(7, 4096);
  assert.equal(ds.fe.statusOf(ds.fe.run(q, BLK.OUT, 8, data, { misalign: 7 })), OK);
  assert.deepEqual(fileBytes(ds.img, 8 * 512, 4096), data, 'written without a guest flush');

  const wt = await serve(t, ['--cache=writethrough']);
  const flags = openFlags(wt.d, wt.img);
  assert.ok(flags.length > 0);
  for (const f of flags) assert.equal(f & O_DIRECT, 0, 'writethrough uses the page cache');
  assert.equal(wt.fe.getConfig()[WCE_OFFSET], 0, 'writethrough is write-through towards the guest');

  const wb = await serve(t, []);
  for (const f of openFlags(wb.d, wb.img)) assert.equal(f & O_DIRECT, 0, 'the default uses the page cache');
  assert.equal(wb.fe.getConfig()[WCE_OFFSET], 1, 'the default is writeback, as QEMU');
});

test('--cache=unsafe: a FLUSH completes without an fsync (it succeeds while fsync fails); writeback reports the failure', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  const trigger = path.join(dir, 'fail-fsync');
  const fuse = await mountFuseFs(dir, { failFsyncWhile: trigger });
  defer(() => fuse.unmount());
  for (const name of ['unsafe.img', 'safe.img']) {
    fs.writeFileSync(path.join(fuse.backing, name), '');
    fs.truncateSync(path.join(fuse.backing, name), 4 * MiB);
  }
  fs.writeFileSync(trigger, '');
  const run = async (name: string, cache: string): Promise<number> => {
    const d = await startDaemon([`--blk-file=${path.join(fuse.mountpoint, name)}`, '--num-queues=1', `--cache=${cache}`, '--log-level=warn'], { dir: tempDir() });
    try {
      const fe = Frontend.connect(d.socketPath);
      try {
        fe.negotiate();
        const q = fe.setupRing(0, 64);
        assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, pattern(3, 4096))), OK);
        return fe.statusOf(fe.run(q, BLK.FLUSH, 0, 0));
      } finally {
        fe.close();
      }
    } finally {
      await d.stop();
    }
  };
  assert.equal(await run('safe.img', 'writeback'), IOERR, 'writeback: the failing fsync fails the FLUSH');
  assert.equal(await run('unsafe.img', 'unsafe'), OK, 'unsafe: the FLUSH never reaches fsync');
});

test("blockdev-add cache: {direct: true} opens O_DIRECT and query-named-block-nodes shows the node's cache options; bad cache options are refused", { timeout: 30000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = image(dir);
  const other = path.join(dir, 'other.img');
  fs.writeFileSync(other, '');
  fs.truncateSync(other, 4 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${img}`, '--num-queues=1', `--control=${control}`], { dir });
  defer(() => d.stop());
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'direct0', filename: other, cache: { direct: true, 'no-flush': false } });
  const flags = openFlags(d, other);
  assert.equal(flags.length, 1);
  assert.equal(flags[0]! & O_DIRECT, O_DIRECT, 'the added node is O_DIRECT');
  const nodes = await qmp.execute<{ 'node-name': string; cache: { direct: boolean; 'no-flush': boolean } }[]>('query-named-block-nodes');
  assert.deepEqual(nodes.find((n) => n['node-name'] === 'direct0')!.cache, { writeback: true, direct: true, 'no-flush': false });
  assert.deepEqual(nodes.find((n) => n['node-name'] === 'file0')!.cache, { writeback: true, direct: false, 'no-flush': false });
  await assert.rejects(qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'bad', filename: other, cache: { direct: 'yes' } }), /direct/);
  await assert.rejects(qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'bad', filename: other, cache: { writeback: true } }), /cache\.writeback/);
});

test('--cache and --logical-block-size reject values QEMU does not have', () => {
  for (const bad of ['--cache=fast', '--logical-block-size=1024']) {
    const r = spawnSync(process.execPath, [vubdMain, '--socket-path=/nonexistent/x.sock', '--blk-driver=null', bad], { encoding: 'utf8' });
    assert.equal(r.status, 2, `${bad} is a usage error`);
    assert.match(r.stderr, bad.startsWith('--cache') ? /--cache must be one of/ : /--logical-block-size must be 512 or 4096/);
  }
});

test('a mirror from an O_DIRECT source to an O_DIRECT target (aligned copy buffer); guest writes with unaligned buffers reach both', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = image(dir);
  const target = path.join(dir, 'target.img');
  fs.writeFileSync(target, '');
  fs.truncateSync(target, 8 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${img}`, '--num-queues=1', '--cache=none', `--control=${control}`], { dir });
  defer(() => d.stop());
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  const q = fe.setupRing(0, 64);
  const before = pattern(21, 65536);
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 2048, before, { misalign: 5 })), OK);
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'tgt0', filename: target, cache: { direct: true, 'no-flush': false } });
  await qmp.execute('blockdev-mirror', { 'job-id': 'm0', device: 'export0', target: 'tgt0', sync: 'full' });
  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'm0');
  const during = pattern(22, 4096);
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 4096, during, { misalign: 9, split: 3 })), OK, 'a mirrored write with unaligned buffers');
  await qmp.execute('job-complete', { id: 'm0' });
  const done = await qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data.device === 'm0');
  assert.equal(done.data.error, undefined, `the job ends without error: ${JSON.stringify(done.data)}`);
  assert.deepEqual(fileBytes(target, 2048 * 512, 65536), before, 'copied by the mirror');
  assert.deepEqual(fileBytes(target, 4096 * 512, 4096), during, 'written to the target by the guest');
  assert.deepEqual(fileBytes(img, 4096 * 512, 4096), during, 'and to the source');
});
