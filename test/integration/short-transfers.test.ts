// A read or write the kernel completes short is continued for the rest, with io_uring as with
// synchronous I/O; a read that ends short at end of file (the file shrank under vubd) reads zeroes
// past it, as QEMU does, instead of failing. Real short transfers: a FUSE file system that takes
// at most 3000 bytes per write (so continuations start in the middle of a sector and of an iovec),
// and an image that the test process truncates and extends while vubd serves it (short reads).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { pattern } from '../helpers/sessions.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const KiB = 1024;
const MiB = 2 ** 20;
const OK = 0;

/** Cleanups run last-registered first (stop the daemon before unmounting what it has open). */
function cleanups(t: { after(fn: () => Promise<void>): void }): (fn: () => unknown) => void {
  const fns: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn();
  });
  return (fn) => void fns.push(fn);
}

function bytesOf(file: string, offset: number, length: number): Uint8Array {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const n = fs.readSync(fd, b, 0, length, offset);
    return new Uint8Array(b.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
}

for (const aio of ['io_uring', 'sync'] as const) {
  test(`aio=${aio}: writes that the file system takes short are continued for the rest`, { timeout: 60000 }, async (t) => {
    const defer = cleanups(t);
    const dir = tempDir();
    const fuse = await mountFuseFs(dir, { maxWrite: 3000 });
    defer(() => fuse.unmount());
    const backing = path.join(fuse.backing, 'disk.img');
    fs.writeFileSync(backing, pattern(21, 4 * MiB));
    const d = await startDaemon([`--blk-file=${path.join(fuse.mountpoint, 'disk.img')}`, `--aio=${aio}`, '--log-level=warn'], { dir });
    defer(() => d.stop());
    const fe = Frontend.connect(d.socketPath);
    defer(() => fe.close());
    fe.negotiate();
    const q = fe.setupRing(0, 64);

    const data = pattern(22, 96 * KiB);
    assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 2048, data, { split: 5 })), OK, 'a write taken 3000 bytes at a time succeeds');
    assert.deepEqual(bytesOf(backing, 2048 * 512, data.length), data, 'all of it reached the file');
    const back = fe.run(q, BLK.IN, 2048, data.length, { split: 3 });
    assert.equal(fe.statusOf(back), OK);
    assert.deepEqual(fe.dataOf(back), data);
  });

  test(`aio=${aio}: a read past the end of an image that another process truncated reads zeroes there; extended again, the hole reads zeroes`, { timeout: 60000 }, async (t) => {
    const defer = cleanups(t);
    const dir = tempDir();
    const image = path.join(dir, 'disk.img');
    const disk = pattern(23, 2 * MiB);
    fs.writeFileSync(image, disk);
    const d = await startDaemon([`--blk-file=${image}`, `--aio=${aio}`, '--log-level=warn'], { dir });
    defer(() => d.stop());
    const fe = Frontend.connect(d.socketPath);
    defer(() => fe.close());
    fe.negotiate();
    const q = fe.setupRing(0, 64);

    const eof = MiB + 1000; // not even on a sector boundary
    fs.truncateSync(image, eof);
    const start = MiB - 32 * KiB;
    const r = fe.run(q, BLK.IN, start / 512, 64 * KiB, { split: 2 });
    assert.equal(fe.statusOf(r), OK, 'not an I/O error');
    const got = fe.dataOf(r);
    assert.deepEqual(got.subarray(0, eof - start), disk.subarray(start, eof), 'the data up to the new end of file');
    assert.deepEqual(got.subarray(eof - start), new Uint8Array(start + 64 * KiB - eof), 'zeroes past it');
    const past = fe.run(q, BLK.IN, (MiB + 64 * KiB) / 512, 4096);
    assert.equal(fe.statusOf(past), OK, 'a read wholly past the end');
    assert.deepEqual(fe.dataOf(past), new Uint8Array(4096));

    fs.truncateSync(image, 2 * MiB);
    const again = fe.run(q, BLK.IN, start / 512, 64 * KiB);
    assert.equal(fe.statusOf(again), OK);
    assert.deepEqual(fe.dataOf(again), got, 'extended again: what was cut off is a hole of zeroes');
  });
}

test('a mirror copies to a target that takes its writes short', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  const fuse = await mountFuseFs(dir, { maxWrite: 3000 });
  defer(() => fuse.unmount());
  const source = path.join(dir, 'source.img');
  const disk = pattern(24, 3 * MiB);
  fs.writeFileSync(source, disk);
  const target = path.join(fuse.backing, 'target.img');
  fs.writeFileSync(target, '');
  fs.truncateSync(target, 3 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${source}`, `--control=${control}`, '--log-level=warn'], { dir });
  defer(() => d.stop());
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: path.join(fuse.mountpoint, 'target.img') });
  await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'export0', target: 'target0', sync: 'full' });
  const end = await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'm', 30000).catch(() => null);
  assert.ok(end, `the job became ready (events: ${JSON.stringify(qmp.events.filter((e) => e.event.startsWith('BLOCK_JOB')))})`);
  const copy = new Uint8Array(fs.readFileSync(target));
  const firstDiff = copy.findIndex((b, i) => b !== disk[i]);
  assert.equal(firstDiff, -1, `the target equals the source (first difference at byte ${firstDiff})`);
  await qmp.execute('job-cancel', { id: 'm' });
});
