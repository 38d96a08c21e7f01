// Drains do not wait out the throttle schedule (QEMU's throttle_group_restart_tgm): a VM stop
// (GET_VRING_BASE) or a graph change with a backlog of throttled requests starts them all at once
// and completes promptly. 50 requests at 5 IOPS would otherwise take ~10 s.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { startDaemon, tempDir, type Daemon } from '../helpers/daemon.js';
import { Frontend, BLK, type BlkRequest, type SplitRing } from '../helpers/frontend.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;
const BACKLOG = 50;

interface Setup {
  d: Daemon;
  qmp: QmpClient;
  fe: Frontend;
  ring: SplitRing;
  reqs: BlkRequest[];
}

/** A vubd whose export runs on thr0 (iops=5, burst 1) over file0, with 50 reads queued on ring 0. */
async function throttledBacklog(t: { after(fn: () => Promise<void>): void }): Promise<Setup> {
  const dir = tempDir();
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 16 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${image}`, `--control=${control}`, '--log-level=warn'], { dir });
  const qmp = await QmpClient.connect(control);
  const fe = Frontend.connect(d.socketPath);
  t.after(async () => {
    fe.close();
    qmp.close();
    assert.equal((await d.stop()).code, 0);
  });
  await qmp.execute('blockdev-add', { driver: 'throttle', 'node-name': 'thr0', file: 'file0', limits: { 'iops-total': 5, 'iops-total-max': 1 } });
  await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'thr0' });
  fe.negotiate();
  const ring = fe.setupRing(0, 128);
  const reqs: BlkRequest[] = [];
  for (let i = 0; i < BACKLOG; i++) reqs.push(fe.blk(ring, BLK.IN, 8 * i, 4096, { indirect: true }));
  ring.kick();
  // Let the worker pop them all: one starts, the rest wait on the throttle schedule.
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(ring.usedIdx() < 10, `only a few of the ${BACKLOG} requests completed before the drain (${ring.usedIdx()})`);
  return { d, qmp, fe, ring, reqs };
}

function assertAllDone(s: Setup, done: number): void {
  assert.equal(done, BACKLOG, 'every throttled request completed');
  for (const r of s.reqs) assert.equal(s.fe.statusOf(r), 0, 'and succeeded');
}

test('GET_VRING_BASE with 50 requests throttled at 5 IOPS is answered within 1 s, after all of them completed', { timeout: 30000 }, async (t) => {
  const s = await throttledBacklog(t);
  const t0 = performance.now();
  const base = s.fe.getVringBase(0);
  const ms = performance.now() - t0;
  assert.ok(ms < 1000, `GET_VRING_BASE took ${ms.toFixed(0)} ms`);
  assert.equal(base, BACKLOG);
  assert.equal(s.ring.usedIdx(), base, 'used == base: nothing was left in flight when the ring stopped');
  assertAllDone(s, s.ring.collect().length);
});

test('a graph change (block-export-set-node) under a throttled backlog drains promptly instead of timing out', { timeout: 30000 }, async (t) => {
  const s = await throttledBacklog(t);
  const t0 = performance.now();
  await s.qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'file0' });
  const ms = performance.now() - t0;
  assert.ok(ms < 1500, `the swap's drain took ${ms.toFixed(0)} ms`);
  assert.equal(s.ring.usedIdx(), BACKLOG, 'the drain completed every request before the change');
  assertAllDone(s, s.ring.waitFor(BACKLOG, 1000).length);
  const [e] = await s.qmp.execute<{ 'node-name': string }[]>('query-block-exports');
  assert.equal(e!['node-name'], 'file0');
});

test('block_set_io_throttle that inserts a filter under a throttled backlog drains promptly', { timeout: 30000 }, async (t) => {
  const s = await throttledBacklog(t);
  const t0 = performance.now();
  // file0 is not a throttle node: a filter goes in between thr0 and file0, behind the barrier.
  await s.qmp.execute('block_set_io_throttle', { device: 'file0', iops: 1000, bps: 0, bps_wr: 0 });
  const ms = performance.now() - t0;
  assert.ok(ms < 1500, `the change's drain took ${ms.toFixed(0)} ms`);
  assert.equal(s.ring.usedIdx(), BACKLOG, 'the drain completed every request before the change');
  assertAllDone(s, s.ring.waitFor(BACKLOG, 1000).length);
  const nodes = await s.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
  assert.ok(nodes.some((n) => n['node-name'] === 'file0-throttle'), 'the filter was inserted');
});
