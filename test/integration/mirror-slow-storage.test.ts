// The mirror job against storage that misbehaves (a real FUSE file system, test/helpers/fuse-fs.py):
// a source that is slow to read must not hold up the main thread (vhost-user and QMP replies),
// and a target whose fsync fails must fail the job instead of reporting it ready.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { pattern } from '../helpers/sessions.js';
import { QmpClient, type QmpEvent } from '../../src/control/qmp-client.js';
import { Request } from '../../src/protocol/constants.js';

const MiB = 2 ** 20;

function sparse(file: string, size: number): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
}

/** Cleanups run last-registered first (stop the daemon before unmounting what it has open). */
function cleanups(t: { after(fn: () => Promise<void>): void }): (fn: () => unknown) => void {
  const fns: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn();
  });
  return (fn) => void fns.push(fn);
}

/** The job's BLOCK_JOB_READY or BLOCK_JOB_COMPLETED, whichever comes first. */
async function firstJobEnd(qmp: QmpClient, id: string, timeoutMs: number): Promise<QmpEvent> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const e = qmp.events.find((x) => (x.event === 'BLOCK_JOB_READY' || x.event === 'BLOCK_JOB_COMPLETED') && x.data.device === id);
    if (e) return e;
    if (Date.now() > deadline) throw new Error(`job ${id} neither ready nor completed within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

interface Job {
  id: string;
  status: string;
  error?: string;
  'current-progress': number;
}

test('vhost-user and QMP replies stay under 50 ms while a mirror copies from a slow source', { timeout: 120000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  // Every 128 KiB the kernel asks of the source takes 20 ms: one 1 MiB copy chunk is ~160 ms.
  const fuse = await mountFuseFs(dir, { slowReadMs: 20 });
  defer(() => fuse.unmount());
  const source = path.join(fuse.mountpoint, 'source.img');
  sparse(path.join(fuse.backing, 'source.img'), 32 * MiB);
  const target = path.join(dir, 'target.img');
  sparse(target, 32 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${source}`, `--control=${control}`, '--log-level=warn'], { dir });
  defer(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());

  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: target });
  await qmp.execute('blockdev-mirror', { 'job-id': 'slow', device: 'export0', target: 'target0', sync: 'full' });
  const vhost: number[] = [];
  const control_: number[] = [];
  let whileCopying = 0;
  const deadline = Date.now() + 60000;
  for (let i = 0; !qmp.events.some((e) => e.event === 'BLOCK_JOB_READY' || e.event === 'BLOCK_JOB_COMPLETED'); i++) {
    assert.ok(Date.now() < deadline, 'the mirror did not finish in 60 s');
    let t0 = performance.now();
    if (i % 2 === 0) fe.callU64(Request.GET_FEATURES);
    else fe.getConfig();
    vhost.push(performance.now() - t0);
    t0 = performance.now();
    const jobs = await qmp.execute<Job[]>(i % 2 === 0 ? 'query-jobs' : 'query-stats');
    control_.push(performance.now() - t0);
    if (i % 2 === 0 && jobs[0]?.status === 'running') whileCopying++;
    await new Promise((r) => setTimeout(r, 2));
  }
  const max = (a: number[]): number => a.reduce((m, x) => Math.max(m, x), 0);
  const p99 = (a: number[]): number => [...a].sort((x, y) => x - y)[Math.floor(0.99 * (a.length - 1))] ?? 0;
  t.diagnostic(
    `${vhost.length} vhost-user round trips, p99 ${p99(vhost).toFixed(1)} ms, max ${max(vhost).toFixed(1)} ms; ` +
      `${control_.length} QMP round trips, p99 ${p99(control_).toFixed(1)} ms, max ${max(control_).toFixed(1)} ms; ${whileCopying} query-jobs saw the copy running`,
  );
  // 99% under 50 ms, and no stall near the ~1.5 s a synchronous copy caused; a single late reply is
  // the shared 2-core VM's scheduler, not vubd (the test process and vubd compete for the CPU).
  assert.ok(p99(vhost) < 50, `vhost-user replies: p99 ${p99(vhost).toFixed(1)} ms`);
  assert.ok(p99(control_) < 50, `QMP replies: p99 ${p99(control_).toFixed(1)} ms`);
  assert.ok(max(vhost) < 300, `vhost-user replies took up to ${max(vhost).toFixed(1)} ms`);
  assert.ok(max(control_) < 300, `QMP replies took up to ${max(control_).toFixed(1)} ms`);
  assert.ok(qmp.events.some((e) => e.event === 'BLOCK_JOB_READY'), 'the copy completed and the job is ready');
  assert.ok(whileCopying >= 20, `measured while the copy ran (${whileCopying} samples)`);
  await qmp.execute('job-cancel', { id: 'slow' });
});

test('a mirror whose target fsync fails concludes with an error, never ready; the guest keeps the source', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  const failFsync = path.join(dir, 'fail-fsync');
  fs.writeFileSync(failFsync, '');
  const fuse = await mountFuseFs(dir, { failFsyncWhile: failFsync });
  defer(() => fuse.unmount());
  const source = path.join(dir, 'source.img');
  const before = pattern(7, 4 * MiB);
  fs.writeFileSync(source, before);
  sparse(path.join(fuse.backing, 'target.img'), 4 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${source}`, `--control=${control}`, '--log-level=warn'], { dir });
  defer(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  const ring = fe.setupRing(0, 128);
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());

  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: path.join(fuse.mountpoint, 'target.img') });
  await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'export0', target: 'target0', sync: 'full' });
  const ended = await firstJobEnd(qmp, 'm', 20000);
  assert.equal(ended.event, 'BLOCK_JOB_COMPLETED', 'the job ended instead of reporting ready');
  assert.match(String(ended.data.error), /fsync|flush/i, 'the event says the target could not be flushed');
  assert.ok(!qmp.events.some((e) => e.event === 'BLOCK_JOB_READY'), 'never reported ready');
  const jobs = await qmp.execute<Job[]>('query-jobs');
  assert.equal(jobs[0]!.status, 'concluded');
  assert.match(String(jobs[0]!.error), /fsync|flush/i);
  await assert.rejects(qmp.execute('job-complete', { id: 'm' }), /cannot be completed/, 'no pivot to a target that did not flush');
  const exportsNow = await qmp.execute<{ 'node-name': string }[]>('query-block-exports');
  assert.equal(exportsNow[0]!['node-name'], 'file0', 'the export still runs on the source');
  const nodes = await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
  assert.ok(!nodes.some((n) => n['node-name'] === 'm-mirror'), 'the mirror filter is gone');
  const targetNode = (nodes as { 'node-name': string; 'flush-error'?: boolean }[]).find((n) => n['node-name'] === 'target0');
  assert.equal(targetNode?.['flush-error'], true, "the target's failed flush is sticky: a later flush of it cannot succeed either");

  // Guest I/O goes on, to the source only.
  const data = pattern(8, 64 * 1024);
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 2048, data)), 0);
  const r = fe.run(ring, BLK.IN, 2048, data.length);
  assert.equal(fe.statusOf(r), 0);
  assert.deepEqual(fe.dataOf(r), data);
  assert.deepEqual(new Uint8Array(fs.readFileSync(source).subarray(2048 * 512, 2048 * 512 + data.length)), data, 'the write is in the source');
  const onTarget = fs.readFileSync(path.join(fuse.backing, 'target.img')).subarray(2048 * 512, 2048 * 512 + data.length);
  assert.notDeepEqual(new Uint8Array(onTarget), data, 'and not in the abandoned target');
});

test('job-cancel during a slow copy concludes once the chunk in flight settled; the export keeps the source', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  const fuse = await mountFuseFs(dir, { slowReadMs: 20 });
  defer(() => fuse.unmount());
  sparse(path.join(fuse.backing, 'source.img'), 32 * MiB);
  const target = path.join(dir, 'target.img');
  sparse(target, 32 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${path.join(fuse.mountpoint, 'source.img')}`, `--control=${control}`, '--log-level=warn'], { dir });
  defer(() => d.stop());
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: target });
  await qmp.execute('blockdev-mirror', { 'job-id': 'c', device: 'export0', target: 'target0', sync: 'full' });
  const deadline = Date.now() + 20000;
  while ((await qmp.execute<Job[]>('query-jobs'))[0]!['current-progress'] < 2 * MiB) {
    assert.ok(Date.now() < deadline, 'the copy made no progress');
    await new Promise((r) => setTimeout(r, 10));
  }
  await qmp.execute('job-cancel', { id: 'c' });
  await qmp.waitEvent('BLOCK_JOB_CANCELLED', (e) => e.data.device === 'c', 10000);
  const jobs = await qmp.execute<Job[]>('query-jobs');
  assert.equal(jobs[0]!.status, 'concluded');
  assert.ok(jobs[0]!['current-progress'] < 32 * MiB, 'cancelled before the copy finished');
  assert.ok(!qmp.events.some((e) => e.event === 'BLOCK_JOB_READY' || e.event === 'BLOCK_JOB_COMPLETED'));
  assert.equal((await qmp.execute<{ 'node-name': string }[]>('query-block-exports'))[0]!['node-name'], 'file0');
  // The target is free again: it can be removed.
  await qmp.execute('blockdev-del', { 'node-name': 'target0' });
});

test('block_resize of a running mirror\'s source or target is refused; the job still completes; resizing works after', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  const fuse = await mountFuseFs(dir, { slowReadMs: 20 });
  defer(() => fuse.unmount());
  const size = 8 * MiB;
  sparse(path.join(fuse.backing, 'source.img'), size);
  const target = path.join(dir, 'target.img');
  sparse(target, size);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${path.join(fuse.mountpoint, 'source.img')}`, `--control=${control}`, '--log-level=warn'], { dir });
  defer(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  const qmp = await QmpClient.connect(control);
  defer(() => qmp.close());
  const capacity = (): number => {
    const c = fe.getConfig();
    return Number(new DataView(c.buffer, c.byteOffset, c.byteLength).getBigUint64(0, true)) * 512;
  };

  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: target });
  await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'export0', target: 'target0', sync: 'full' });
  assert.equal((await qmp.execute<Job[]>('query-jobs'))[0]!.status, 'running');
  await assert.rejects(qmp.execute('block_resize', { 'node-name': 'file0', size: 2 * size }), /Cannot resize node 'file0': it is the source of running mirror job 'm'/);
  await assert.rejects(qmp.execute('block_resize', { 'node-name': 'target0', size: 2 * size }), /Cannot resize node 'target0': it is the target of running mirror job 'm'/);
  assert.equal(capacity(), size, 'the guest still sees the old size');
  assert.equal(fs.statSync(path.join(fuse.backing, 'source.img')).size, size, 'the source file was not grown');
  assert.equal(fs.statSync(target).size, size, 'the target file was not grown');

  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'm', 30000);
  await assert.rejects(qmp.execute('block_resize', { 'node-name': 'file0', size: 2 * size }), /it is the source of running mirror job 'm'/, 'ready is still running');
  await qmp.execute('job-complete', { id: 'm' });
  await qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data.device === 'm', 10000);
  assert.equal((await qmp.execute<{ 'node-name': string }[]>('query-block-exports'))[0]!['node-name'], 'target0', 'pivoted');

  await qmp.execute('block_resize', { 'node-name': 'target0', size: 2 * size });
  assert.equal(capacity(), 2 * size, 'after the job, the resize reaches the guest');
  assert.equal(fs.statSync(target).size, 2 * size);
  await qmp.execute('block_resize', { 'node-name': 'file0', size: 2 * size });
  assert.equal(fs.statSync(path.join(fuse.backing, 'source.img')).size, 2 * size, 'the old source can be resized once the job is over');
});
