// A failed flush is sticky (QEMU file-posix's rule): Linux reports a writeback error once per open
// file, so after one fdatasync failed, the next one can succeed although the data is gone. Every
// later FLUSH of that node, on any queue, fails until the node is reopened. Real failing fsyncs
// from a FUSE file system (test/helpers/fuse-fs.py), not a mock.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { pattern } from '../helpers/sessions.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;

/** Cleanups run last-registered first (stop the daemon before unmounting what it has open). */
function cleanups(t: { after(fn: () => Promise<void>): void }): (fn: () => unknown) => void {
  const fns: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn();
  });
  return (fn) => void fns.push(fn);
}

interface NamedNode {
  'node-name': string;
  'flush-error': boolean;
  'flush-errno'?: number;
}

const pinoError = 50;

/** The error lines about failed flushes, once the first arrived and any others had time to. */
async function flushErrorLines(d: Awaited<ReturnType<typeof startDaemon>>): Promise<Record<string, unknown>[]> {
  const isIt = (r: Record<string, unknown>): boolean => r.level === pinoError && /flush failed/.test(String(r.msg));
  await d.waitForLog(isIt);
  await new Promise((r) => setTimeout(r, 300)); // workers post their logs to the main thread
  return d.logRecords().filter(isIt);
}

for (const aio of ['io_uring', 'sync'] as const) {
  test(`aio=${aio}: after a failed fsync every FLUSH fails on every queue until the node is reopened; logged once`, { timeout: 60000 }, async (t) => {
    const defer = cleanups(t);
    const dir = tempDir();
    const trigger = path.join(dir, 'fail-fsync');
    const fuse = await mountFuseFs(dir, { failFsyncWhile: trigger });
    defer(() => fuse.unmount());
    const image = path.join(fuse.mountpoint, 'disk.img');
    fs.writeFileSync(path.join(fuse.backing, 'disk.img'), '');
    fs.truncateSync(path.join(fuse.backing, 'disk.img'), 8 * MiB);
    const control = path.join(dir, 'qmp.sock');
    const d = await startDaemon([`--blk-file=${image}`, '--num-queues=2', `--aio=${aio}`, `--control=${control}`, '--log-level=warn'], { dir });
    defer(() => d.stop());
    const fe = Frontend.connect(d.socketPath);
    defer(() => fe.close());
    fe.negotiate();
    const q0 = fe.setupRing(0, 64);
    const q1 = fe.setupRing(1, 64);
    const qmp = await QmpClient.connect(control);
    defer(() => qmp.close());

    assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 0, pattern(1, 4096))), OK);
    assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), OK, 'a flush before any failure succeeds');
    assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 8, pattern(2, 4096))), OK);
    fs.writeFileSync(trigger, '');
    assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), IOERR, 'the fsync fails');
    fs.unlinkSync(trigger);
    // The storage would now report success: the data of the failed flush is gone all the same.
    assert.equal(fe.statusOf(fe.run(q1, BLK.FLUSH, 0, 0)), IOERR, 'the other queue sees the error too');
    assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), IOERR, 'and the queue that saw it, again');
    assert.equal(fe.statusOf(fe.run(q1, BLK.OUT, 16, pattern(3, 4096))), OK, 'writes still work');
    assert.equal(fe.statusOf(fe.run(q1, BLK.FLUSH, 0, 0)), IOERR, 'but no flush promises them');

    const nodes = await qmp.execute<NamedNode[]>('query-named-block-nodes');
    const file0 = nodes.find((n) => n['node-name'] === 'file0')!;
    assert.equal(file0['flush-error'], true, 'query-named-block-nodes shows the sticky error');
    assert.equal(file0['flush-errno'], 5, 'with its errno (EIO)');
    const stats = await qmp.execute<{ nodes: NamedNode[] }>('query-stats');
    assert.equal(stats.nodes.find((n) => n['node-name'] === 'file0')!['flush-error'], true, 'query-stats shows it');

    const errors = await flushErrorLines(d);
    assert.equal(errors.length, 1, `one error line for the node, got: ${JSON.stringify(errors)}`);
    assert.equal(errors[0]!.node, 'file0');
    assert.match(String(errors[0]!.msg), /file0/);

    // Reopening the image is a new node: its flushes are trusted again.
    await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'file1', filename: image });
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'file1' });
    assert.equal(fe.statusOf(fe.run(q1, BLK.FLUSH, 0, 0)), OK, 'the reopened node flushes');
    assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), OK);
    const after = await qmp.execute<NamedNode[]>('query-named-block-nodes');
    assert.equal(after.find((n) => n['node-name'] === 'file1')!['flush-error'], false);
    assert.equal(after.find((n) => n['node-name'] === 'file0')!['flush-error'], true, 'the old node keeps its state');
  });
}

test('a failed flush of a mirror target is sticky, through the mirror filter and a throttle above it', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  const trigger = path.join(dir, 'fail-fsync');
  const fuse = await mountFuseFs(dir, { failFsyncWhile: trigger });
  defer(() => fuse.unmount());
  const source = path.join(dir, 'source.img');
  fs.writeFileSync(source, pattern(4, 2 * MiB));
  fs.writeFileSync(path.join(fuse.backing, 'target.img'), '');
  fs.truncateSync(path.join(fuse.backing, 'target.img'), 2 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${source}`, '--num-queues=2', `--control=${control}`, '--log-level=warn'], { dir });
  defer(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  const q0 = fe.setupRing(0, 64);
  const q1 = fe.setupRing(1, 64);
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());

  await qmp.execute('block_set_io_throttle', { device: 'export0', iops: 100000 });
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: path.join(fuse.mountpoint, 'target.img') });
  await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'file0', target: 'target0', sync: 'full' });
  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'm', 20000);

  assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 0, pattern(5, 4096))), OK);
  fs.writeFileSync(trigger, '');
  assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), IOERR, "the target's fsync fails");
  fs.unlinkSync(trigger);
  assert.equal(fe.statusOf(fe.run(q1, BLK.FLUSH, 0, 0)), IOERR, 'and stays failed on the other queue');
  assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), IOERR);

  const nodes = await qmp.execute<NamedNode[]>('query-named-block-nodes');
  const state = Object.fromEntries(nodes.map((n) => [n['node-name'], n['flush-error']]));
  assert.deepEqual(state, { file0: false, 'file0-throttle': true, target0: true, 'm-mirror': true }, 'the target carries it; the filters above it report it');
  const errors = await flushErrorLines(d);
  assert.equal(errors.length, 1, `one error line, got: ${JSON.stringify(errors)}`);
  assert.equal(errors[0]!.node, 'target0');
  await qmp.execute('job-cancel', { id: 'm' });
});
