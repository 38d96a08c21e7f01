// Proof under load: a stamped verify workload on two queues while the control socket swaps the
// export's node 200+ times, resizes, changes throttle limits and mirrors to a new image with a
// pivot. Nothing may be lost, nothing may fail verification, and no node may serve a request
// after it was swapped out.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import type { VerifyLoadInput, VerifyLoadResult } from '../helpers/verify-load.js';

const MiB = 2 ** 20;

interface NodeCounters {
  'node-name': string;
  'read-ops': number;
  'write-ops': number;
}
interface Stats {
  generation: number;
  exports: { queues: { staleCompletions: number; inFlight: number }[]; drain: { state: string; 'latency-ms': { count: number; p50: number; p99: number; max: number } } }[];
  nodes: NodeCounters[];
}

function counters(stats: Stats, name: string): string {
  const n = stats.nodes.find((x) => x['node-name'] === name);
  return n ? `${n['read-ops']}/${n['write-ops']}` : 'gone';
}

function sparse(file: string, size: number): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
}

test('200 swaps, resizes, throttle changes and a mirror pivot under a verify workload', { timeout: 240000 }, async (t) => {
  const dir = tempDir();
  const image = path.join(dir, 'disk.img');
  const newImage = path.join(dir, 'new.img');
  sparse(image, 32 * MiB);
  sparse(newImage, 40 * MiB);
  // Data the workload never touches: the mirror must carry it to the new image.
  const marker = Buffer.alloc(MiB, 'vubd-mirror-marker ');
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, marker, 0, marker.length, 20 * MiB);
  fs.closeSync(fd);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${image}`, '--num-queues=2', `--control=${control}`, '--log-level=warn'], { dir });
  assert.equal(fs.statSync(control).mode & 0o777, 0o600, 'control socket is private');
  const qmp = await QmpClient.connect(control);

  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'file1', filename: image });
  await qmp.execute('blockdev-add', { driver: 'throttle', 'node-name': 'thr0', file: 'file1', limits: { 'iops-total': 20000, 'bps-total': 400 * MiB } });

  const stop = new SharedArrayBuffer(4);
  const progress = new SharedArrayBuffer(8);
  const input: VerifyLoadInput = { socketPath: d.socketPath, queues: 2, areaSectors: (8 * MiB) / 512, depth: 16, stop, progress };
  const worker = new Worker(new URL('../helpers/verify-load.js', import.meta.url), { workerData: input });
  const result = new Promise<VerifyLoadResult>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  const rounds = (): number => Math.min(...new Int32Array(progress));
  const waitRounds = async (n: number): Promise<void> => {
    const target = rounds() + n;
    const deadline = Date.now() + 20000;
    while (rounds() < target) {
      if (Date.now() > deadline) throw new Error(`workload stalled at round ${rounds()}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  await waitRounds(2);

  const stats = (): Promise<Stats> => qmp.execute<Stats>('query-stats');
  // Rotate the export over nodes; a node outside the export's tree must not serve anything
  // until it is put back.
  let rotation = ['file0', 'file1', 'thr0'];
  const inTree: Record<string, string[]> = { file0: ['file0'], file1: ['file1'], thr0: ['thr0', 'file1'], mir0: ['mir0'], mir1: ['mir1'] };
  let current = 'file0';
  let swaps = 0;
  const frozen = new Map<string, string>();
  const swapTo = async (next: string): Promise<void> => {
    const before = await stats();
    for (const [name, snap] of frozen) {
      assert.equal(counters(before, name), snap, `node ${name} served requests after it was swapped out`);
    }
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': next });
    swaps++;
    current = next;
    const after = await stats();
    frozen.clear();
    for (const name of rotation) if (!inTree[current]!.includes(name)) frozen.set(name, counters(after, name));
  };
  const swapRound = async (count: number): Promise<void> => {
    for (let i = 0; i < count; i++) {
      await swapTo(rotation[(rotation.indexOf(current) + 1) % rotation.length]!);
      if (i % 10 === 0) await waitRounds(1);
    }
  };

  await swapRound(100);

  // Resize: the capacity grows behind the barrier; the workload keeps running.
  for (let i = 1; i <= 3; i++) {
    await qmp.execute('block_resize', { 'node-name': current === 'file0' ? 'file0' : 'file1', size: (32 + i) * MiB });
    await waitRounds(1);
  }
  // Throttle changes while it is in use.
  await swapTo('thr0');
  for (const iops of [5000, 50000, 2000, 100000]) {
    await qmp.execute('block_set_io_throttle', { id: 'thr0', iops, bps: 0 });
    await waitRounds(1);
  }
  const limits = (await qmp.execute<{ 'node-name': string; limits?: { iops_total: number } }[]>('query-named-block-nodes')).find((n) => n['node-name'] === 'thr0');
  assert.equal(limits?.limits?.iops_total, 100000);

  // Mirror the live disk to a new image and pivot to it.
  await swapTo('file0');
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'mir0', filename: newImage });
  await qmp.execute('blockdev-mirror', { 'job-id': 'm0', device: 'export0', target: 'mir0', sync: 'full' });
  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'm0');
  await waitRounds(2);
  await qmp.execute('job-complete', { id: 'm0' });
  await qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data.device === 'm0');
  const exportsAfter = await qmp.execute<{ 'node-name': string }[]>('query-block-exports');
  assert.equal(exportsAfter[0]!['node-name'], 'mir0', 'the export now runs on the mirror target');
  current = 'mir0';
  await waitRounds(2);

  // Keep swapping on the new image.
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'mir1', filename: newImage });
  rotation = ['mir0', 'mir1'];
  frozen.clear();
  await swapRound(100);
  await waitRounds(2);

  Atomics.store(new Int32Array(stop), 0, 1);
  const r = await result;
  const final = await stats();
  const drain = final.exports[0]!.drain;
  t.diagnostic(`swaps ${swaps}, ops ${r.ops}, drains ${drain['latency-ms'].count}, drain latency p50 ${drain['latency-ms'].p50.toFixed(3)} ms p99 ${drain['latency-ms'].p99.toFixed(3)} ms max ${drain['latency-ms'].max.toFixed(3)} ms`);
  assert.equal(r.firstError, null);
  assert.equal(r.lost, 0, 'no request lost');
  assert.equal(r.verifyErrors, 0, 'no verify error');
  assert.equal(r.badStatus, 0);
  assert.ok(swaps >= 200, `${swaps} swaps`);
  assert.ok(r.ops > 1000, `workload ran (${r.ops} ops)`);
  for (const q of final.exports[0]!.queues) assert.equal(q.staleCompletions, 0, 'no request completed under a newer graph than it started in');
  assert.equal(drain.state, 'running');

  // Data written before the mirror started reached the new image.
  assert.ok(fs.readFileSync(newImage).subarray(20 * MiB, 21 * MiB).equals(marker), 'marker copied by the mirror');

  // blockdev-del refuses a node in use and removes one that is not.
  await assert.rejects(qmp.execute('blockdev-del', { 'node-name': 'mir0' }), /busy|in use/i);
  await qmp.execute('blockdev-del', { 'node-name': 'file0' });
  qmp.close();
  assert.equal((await d.stop()).code, 0);
});
