// The arithmetic and layout behind vubd-ctl top and mirror --wait.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildView, counterDelta, formatLatency, histogramDelta, percentileBucket, renderView, type QueueStats, type Sample } from '../../src/cli/top-model.js';
import { formatBytes, formatDuration, progressBar, progressText, RateMeter } from '../../src/cli/progress.js';

test('counter deltas: plain growth, Int32 wrap, worker restart', () => {
  assert.equal(counterDelta(10, 25), 15);
  assert.equal(counterDelta(2 ** 31 - 5, -(2 ** 31) + 4), 9); // wrapped
  assert.equal(counterDelta(1000, 7), 7); // restarted from 0
  assert.equal(counterDelta(5, 5), 0);
});

test('percentiles come from the interval histogram, as the bucket upper bound', () => {
  const before = { '<8us': 100, '<16us': 5 };
  const after = { '<8us': 100, '<16us': 55, '<32us': 49, '<1024us': 1 };
  const d = histogramDelta(before, after);
  assert.deepEqual(d, { '<16us': 50, '<32us': 49, '<1024us': 1 });
  assert.equal(percentileBucket(d, 0.5), 16);
  assert.equal(percentileBucket(d, 0.99), 32);
  assert.equal(percentileBucket(d, 1), 1024);
  assert.equal(percentileBucket({}, 0.5), null);
  assert.equal(formatLatency(16), '<16us');
  assert.equal(formatLatency(131072), '<132ms');
  assert.equal(formatLatency(null), '-');
});

const q = (queue: number, ops: number, kib: number, hist: Record<string, number> = {}): QueueStats => ({
  queue,
  readOps: ops,
  writeOps: 0,
  flushOps: 0,
  otherOps: 0,
  errors: 0,
  inFlight: 0,
  readKiB: kib,
  writeKiB: 0,
  state: 'running',
  latencyHistogramUs: hist,
});
const sample = (t: number, queues: QueueStats[]): Sample => ({ t, exports: [{ id: 'e0', 'node-name': 'n0', queues, drain: { state: 'running' } }], info: [{ id: 'e0', 'iothread-vq-mapping': [{ iothread: 'worker1', vqs: [0, 1] }] }] });

test('rows: rates over the real elapsed time, totals, worker from the mapping when stats lack it', () => {
  const v = buildView(sample(0, [q(0, 0, 0), q(1, 0, 0)]), sample(2000, [q(0, 2000, 8000, { '<64us': 2000 }), q(1, 0, 0)]));
  assert.equal(v.rows[0]!.iops, 1000);
  assert.equal(v.rows[0]!.mbps, (8000 * 1024) / 1e6 / 2);
  assert.equal(v.rows[0]!.p50, 64);
  assert.equal(v.rows[1]!.iops, 0);
  assert.equal(v.rows[1]!.p99, null);
  assert.equal(v.rows[0]!.worker, 'worker1');
  assert.equal(v.iops, 1000);
  assert.equal(v.queues, 2);
  const first = buildView(null, sample(0, [q(0, 5, 5)]));
  assert.equal(first.iops, null);
  assert.equal(first.rows[0]!.iops, null);
});

test('layout: height cut with a "… N more" line, width cut, no limits on a pipe', () => {
  const many = Array.from({ length: 10 }, (_, i) => q(i, 0, 0));
  const v = buildView(sample(0, many), sample(1000, many));
  const small = renderView(v, { width: 40, height: 8, title: 'vubd top - a very long title that does not fit in forty columns' });
  assert.equal(small.length, 8);
  assert.ok(small.every((l) => l.length <= 40));
  assert.equal(small[7], '… 7 more');
  const piped = renderView(v, { width: null, height: null, title: 't' });
  assert.equal(piped.filter((l) => l.startsWith('e0 ')).length, 10);
});

test('progress: bar, text, rate window, durations', () => {
  assert.equal(formatBytes(512), '512 B');
  assert.equal(formatBytes(3 * 2 ** 20), '3.0 MiB');
  assert.equal(formatDuration(6), '0:06');
  assert.equal(formatDuration(3723), '1:02:03');
  assert.equal(formatDuration(null), '--:--');
  const m = new RateMeter(5000);
  assert.equal(m.rate(), null);
  m.add(0, 0);
  m.add(1000, 2 ** 20);
  assert.equal(m.rate(), 2 ** 20);
  const p = { offset: 2 ** 20, total: 4 * 2 ** 20, rate: 2 ** 20 };
  assert.equal(progressText(p), '25.0% 1.0 MiB / 4.0 MiB 1.0 MiB/s ETA 0:03');
  const bar = progressBar(p, 80);
  assert.ok(bar.length <= 80);
  assert.match(bar, /^\[(#+)(\.+)\]  25\.0%  1\.0 MiB \/ 4\.0 MiB  1\.0 MiB\/s  ETA 0:03$/);
  const [, full, empty] = /^\[(#+)(\.+)\]/.exec(bar)!;
  assert.equal(full!.length, Math.floor((full!.length + empty!.length) / 4));
});
