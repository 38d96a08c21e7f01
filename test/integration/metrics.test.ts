// --metrics: a real vubd serving Prometheus metrics over TCP, scraped over HTTP while a frontend
// does I/O of known counts through its rings. The counters must match the I/O exactly.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { startDaemon, tempDir, repoRoot, type Daemon } from '../helpers/daemon.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { parseExposition, familyOf, select, value, type Exposition } from '../helpers/prom-text.js';
import { dashboardMetricNames } from '../helpers/dashboard.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;
const UNSUPP = 2;

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

function get(port: number, urlPath = '/metrics', method = 'GET'): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: urlPath, method, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.setTimeout(5000, () => req.destroy(new Error(`no answer to ${method} ${urlPath} within 5 s`)));
    req.on('error', reject);
    req.end();
  });
}

async function scrape(port: number): Promise<Exposition> {
  const r = await get(port);
  assert.equal(r.status, 200, r.body);
  assert.match(String(r.headers['content-type']), /^text\/plain; version=0\.0\.4/);
  return parseExposition(r.body);
}

/** A port the kernel just handed out, free again: another process may take it before vubd does. */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

/** Starts vubd with --metrics on a free port; retries when another process took the port first. */
async function startWithMetrics(args: string[], dir: string, exportless = false): Promise<{ d: Daemon; port: number }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    try {
      return { d: await startDaemon([...args, `--metrics=${port}`], { dir, exportless }), port };
    } catch (e) {
      if (attempt >= 5 || !/is in use/.test((e as Error).message)) throw e;
    }
  }
}

function exitOf(d: Daemon): Promise<number | null> {
  return new Promise((r) => (d.proc.exitCode !== null ? r(d.proc.exitCode) : d.proc.once('exit', (code) => r(code))));
}

/** The queue latency histogram of one queue: buckets in le order, and the +Inf bucket, _count, _sum. */
function histogram(e: Exposition, name: string, labels: Record<string, string>): { les: number[]; counts: number[]; inf: number; count: number; sum: number } {
  const buckets = select(e, `${name}_bucket`, labels)
    .map((s) => ({ le: Number(s.labels.le === '+Inf' ? Infinity : s.labels.le), n: s.value }))
    .sort((a, b) => a.le - b.le);
  const inf = buckets.pop()!;
  assert.equal(inf.le, Infinity, 'the last bucket is +Inf');
  return { les: buckets.map((b) => b.le), counts: buckets.map((b) => b.n), inf: inf.n, count: value(e, `${name}_count`, labels), sum: value(e, `${name}_sum`, labels) };
}

function assertCumulative(h: ReturnType<typeof histogram>, what: string): void {
  for (let i = 1; i < h.les.length; i++) assert.ok(h.les[i]! > h.les[i - 1]!, `${what}: le bounds ascend`);
  for (let i = 1; i < h.counts.length; i++) assert.ok(h.counts[i]! >= h.counts[i - 1]!, `${what}: bucket ${h.les[i]} (${h.counts[i]}) < bucket ${h.les[i - 1]} (${h.counts[i - 1]})`);
  assert.ok(h.inf >= h.counts.at(-1)!, `${what}: +Inf holds every finite bucket`);
  assert.equal(h.inf, h.count, `${what}: +Inf bucket equals _count`);
}

describe('--metrics endpoint', () => {
  let d: Daemon;
  let port: number;
  let dir: string;
  let control: string;
  let fe: Frontend;
  let qmp: QmpClient;

  before(async () => {
    dir = tempDir();
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 16 * MiB);
    control = path.join(dir, 'qmp.sock');
    ({ d, port } = await startWithMetrics([`--blk-file=${image}`, '--num-queues=2', `--control=${control}`], dir));
    fe = Frontend.connect(d.socketPath);
    fe.negotiate();
    qmp = await QmpClient.connect(control);
  });
  after(async () => {
    qmp?.close();
    fe?.close();
    await d?.stop();
  });

  test('counters, bytes, errors and latency histograms match the I/O done; nodes too', async () => {
    const q0 = fe.setupRing(0, 128);
    const q1 = fe.setupRing(1, 128);
    const before = await scrape(port);
    assert.equal(value(before, 'vubd_queue_requests_total', { export: 'export0', queue: '0', type: 'read' }), 0);
    // queue 0: 5 writes of 4 KiB, 7 reads of 8 KiB, 2 flushes
    for (let i = 0; i < 5; i++) assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 8 * i, new Uint8Array(4096).fill(i + 1))), OK);
    for (let i = 0; i < 7; i++) assert.equal(fe.statusOf(fe.run(q0, BLK.IN, 16 * i, 8192)), OK);
    for (let i = 0; i < 2; i++) assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), OK);
    // queue 1: 3 reads of 4 KiB submitted together, a read past the end (IOERR), GET_ID, an unknown type (UNSUPP)
    const reads = [0, 1, 2].map((i) => fe.blk(q1, BLK.IN, 8 * i, 4096));
    q1.kick();
    q1.waitFor(3);
    for (const r of reads) assert.equal(fe.statusOf(r), OK);
    assert.equal(fe.statusOf(fe.run(q1, BLK.IN, (16 * MiB) / 512, 4096)), IOERR);
    assert.equal(fe.statusOf(fe.run(q1, BLK.GET_ID, 0, 20)), OK);
    assert.equal(fe.statusOf(fe.run(q1, 99, 0, 0)), UNSUPP);

    const e = await scrape(port);
    const workers = (await qmp.execute<{ exports: { queues: { worker: number }[] }[] }>('query-stats')).exports[0]!.queues.map((q) => String(q.worker));
    const l0 = { export: 'export0', queue: '0', worker: workers[0]! };
    const l1 = { export: 'export0', queue: '1', worker: workers[1]! };
    const req = (l: Record<string, string>, type: string): number => value(e, 'vubd_queue_requests_total', { ...l, type });
    assert.deepEqual(['read', 'write', 'flush', 'other'].map((t) => req(l0, t)), [7, 5, 2, 0], 'queue 0 requests by type');
    assert.deepEqual(['read', 'write', 'flush', 'other'].map((t) => req(l1, t)), [4, 0, 0, 2], 'queue 1 requests by type');
    assert.equal(value(e, 'vubd_queue_read_bytes_total', l0), 7 * 8192);
    assert.equal(value(e, 'vubd_queue_written_bytes_total', l0), 5 * 4096);
    assert.equal(value(e, 'vubd_queue_read_bytes_total', l1), 3 * 4096, 'the failed read moved nothing');
    assert.equal(value(e, 'vubd_queue_written_bytes_total', l1), 0);
    assert.equal(value(e, 'vubd_queue_errors_total', l0), 0);
    assert.equal(value(e, 'vubd_queue_errors_total', l1), 2, 'IOERR and UNSUPP');
    assert.equal(value(e, 'vubd_queue_in_flight', l0), 0);
    assert.equal(value(e, 'vubd_queue_state', { ...l0, state: 'running' }), 1);
    assert.equal(value(e, 'vubd_queue_state', { ...l0, state: 'idle' }), 0);
    assert.ok(value(e, 'vubd_queue_kicks_total', l0) >= 1, 'kicks counted');
    assert.ok(value(e, 'vubd_queue_kicks_total', l1) >= 1);
    assert.ok(value(e, 'vubd_queue_notifies_total', l0) >= 1, 'interrupts counted');
    assert.equal(value(e, 'vubd_queue_stale_completions_total', l0), 0);
    for (const [l, ops] of [[l0, 14], [l1, 6]] as const) {
      const h = histogram(e, 'vubd_queue_request_duration_seconds', l);
      assertCumulative(h, `queue ${l.queue}`);
      assert.equal(h.count, ops, `queue ${l.queue}: one observation per request`);
      assert.equal(h.les.length, 23, '1 us to 4.19 s in powers of two');
      assert.equal(h.les[0], 1e-6);
      assert.equal(h.les.at(-1), 2 ** 22 / 1e6);
      assert.ok(h.sum > 0 && h.sum < ops * 4.2, `queue ${l.queue}: _sum ${h.sum} s`);
    }
    assert.equal(select(e, 'vubd_queue_request_duration_seconds_count').length, 2, 'one histogram per queue');

    // Node file0 saw what reached the disk: not the failed read, GET_ID or the unknown request.
    const n = { node: 'file0', driver: 'file' };
    const ops = (type: string): number => value(e, 'vubd_node_ops_total', { ...n, type });
    assert.deepEqual(['read', 'write', 'flush', 'other'].map(ops), [10, 5, 2, 0], 'node ops by type');
    assert.equal(value(e, 'vubd_node_read_bytes_total', n), 7 * 8192 + 3 * 4096);
    assert.equal(value(e, 'vubd_node_written_bytes_total', n), 5 * 4096);
    assert.equal(value(e, 'vubd_node_flush_error', n), 0);
    assert.equal(value(e, 'vubd_node_flush_errno', n), 0);
    assert.equal(value(e, 'vubd_export_root', { export: 'export0', node: 'file0' }), 1);

    // The same numbers as query-stats, which is where they come from.
    const stats = await qmp.execute<{ exports: { queues: { readOps: number; errors: number }[] }[] }>('query-stats');
    assert.equal(stats.exports[0]!.queues[1]!.readOps, req(l1, 'read'));
    assert.equal(stats.exports[0]!.queues[1]!.errors, value(e, 'vubd_queue_errors_total', l1));

    // Process metrics from prom-client, prefixed.
    assert.ok(value(e, 'vubd_process_resident_memory_bytes') > 10 * MiB);
    assert.ok(select(e, 'vubd_process_cpu_seconds_total').length === 1);
    assert.ok(select(e, 'vubd_nodejs_eventloop_lag_seconds').length === 1);
    for (const [name, type] of e.types) assert.ok(name.startsWith('vubd_'), `${name} (${type}) is prefixed vubd_`);
  });

  test('drains: count, timeouts and a duration histogram; jobs: progress and status', { timeout: 60000 }, async () => {
    const e0 = await scrape(port);
    assert.equal(value(e0, 'vubd_drains_total', { export: 'export0' }), 0, 'no graph change yet');
    assert.equal(value(e0, 'vubd_drain_state', { export: 'export0', state: 'running' }), 1);
    // A throttle filter inserted above file0: one drained graph change.
    await qmp.execute('block_set_io_throttle', { id: 'export0', iops: 0, iops_rd: 0, iops_wr: 0, bps: 0, bps_rd: 0, bps_wr: 0 });
    const e1 = await scrape(port);
    const ex = { export: 'export0' };
    assert.equal(value(e1, 'vubd_drains_total', ex), 1);
    assert.equal(value(e1, 'vubd_drain_timeouts_total', ex), 0);
    assert.equal(value(e1, 'vubd_drain_nesting', ex), 0);
    const h = histogram(e1, 'vubd_drain_duration_seconds', ex);
    assertCumulative(h, 'drain');
    assert.equal(h.count, 1);
    assert.ok(h.sum > 0 && h.sum < 5, `drain took ${h.sum} s`);
    const stats = await qmp.execute<{ exports: { drain: { 'latency-ms': { max: number } } }[] }>('query-stats');
    assert.ok(Math.abs(h.sum * 1000 - stats.exports[0]!.drain['latency-ms'].max) < 1e-6, 'one drain: its sum is its duration');
    const firstHit = h.counts.findIndex((c) => c === 1);
    assert.ok(firstHit >= 0 && h.les[firstHit]! >= h.sum && (firstHit === 0 || h.les[firstHit - 1]! < h.sum), `the drain (${h.sum} s) is in the bucket that bounds it`);
    assert.equal(value(e1, 'vubd_export_root', { export: 'export0', node: 'file0-throttle' }), 1);

    // A mirror copying 16 MiB at 1 MiB/s: running, with its progress and length.
    const target = path.join(dir, 'target.img');
    fs.writeFileSync(target, '');
    fs.truncateSync(target, 16 * MiB);
    await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'target0', filename: target });
    await qmp.execute('blockdev-mirror', { 'job-id': 'm0', device: 'export0', target: 'target0', sync: 'full', speed: MiB });
    await new Promise((r) => setTimeout(r, 500));
    const e2 = await scrape(port);
    const j = { job: 'm0', type: 'mirror' };
    assert.equal(value(e2, 'vubd_job_total_progress', j), 16 * MiB);
    const cur = value(e2, 'vubd_job_current_progress', j);
    assert.ok(cur >= 0 && cur < 16 * MiB, `progress ${cur}`);
    assert.equal(value(e2, 'vubd_job_status', { ...j, status: 'running' }), 1);
    assert.equal(select(e2, 'vubd_job_status', j).reduce((a, s) => a + s.value, 0), 1, 'exactly one status is 1');
    assert.ok(value(e2, 'vubd_drains_total', ex) >= 2, 'the mirror filter went in behind a drain');
    await qmp.execute('job-cancel', { id: 'm0' });
    await qmp.waitEvent('BLOCK_JOB_CANCELLED', () => true, 10000);
    const e3 = await scrape(port);
    assert.equal(value(e3, 'vubd_job_status', { ...j, status: 'concluded' }), 1);
    await qmp.execute('job-dismiss', { id: 'm0' });
    const e4 = await scrape(port);
    assert.equal(select(e4, 'vubd_job_status', j).length, 0, 'a dismissed job is gone from the metrics');
  });

  test('every metric the Grafana dashboard uses is exposed', async () => {
    const e = await scrape(port);
    // Series of families with no member now (no job runs) are announced by their TYPE line.
    const exposed = new Set(e.samples.map((s) => s.name));
    for (const [name, type] of e.types) {
      if (type === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) exposed.add(name + suffix);
      else exposed.add(name);
    }
    const names = dashboardMetricNames(JSON.parse(fs.readFileSync(path.join(repoRoot, 'docs/grafana-vubd.json'), 'utf8')));
    assert.ok(names.size >= 10, `the dashboard names ${names.size} metrics`);
    for (const name of names) assert.ok(exposed.has(name), `the dashboard uses ${name}, which the endpoint does not expose`);
    for (const s of e.samples) assert.ok(familyOf(s.name, e.types), `${s.name} has a TYPE`);
  });

  test('HTTP: 404, 405, HEAD, parallel scrapes, hostile requests; the daemon lives and keeps its fds', async () => {
    await get(port);
    await new Promise((r) => setTimeout(r, 200));
    const fds = d.fdCount();
    assert.equal((await get(port, '/nope')).status, 404);
    assert.equal((await get(port, '/metrics', 'POST')).status, 405);
    const head = await get(port, '/metrics', 'HEAD');
    assert.equal(head.status, 200);
    assert.equal(head.body, '');
    assert.equal((await get(port, '/metrics?x=1')).status, 200);
    const all = await Promise.all(Array.from({ length: 12 }, () => get(port)));
    for (const r of all) {
      assert.equal(r.status, 200);
      parseExposition(r.body);
    }
    // 16 idle connections hold every place; the next is closed at once; once they go, scrapes work.
    const idle = await Promise.all(
      Array.from({ length: 16 }, async () => {
        const s = net.createConnection(port, '127.0.0.1');
        await new Promise((r) => s.once('connect', r));
        return s;
      }),
    );
    await new Promise((r) => setTimeout(r, 100));
    await assert.rejects(get(port), /socket hang up|ECONNRESET/);
    for (const s of idle) s.destroy();
    await new Promise((r) => setTimeout(r, 100));
    // Garbage, a header that never ends, and a client that vanishes mid-request.
    for (const bytes of ['\x00\x01\x02 garbage\r\n\r\n', 'GET /metrics HTTP/1.1\r\nHost: x\r\nX: ' + 'a'.repeat(20000) + '\r\n\r\n', 'GET /metr']) {
      const s = net.createConnection(port, '127.0.0.1');
      await new Promise((r) => s.once('connect', r));
      s.write(bytes);
      await new Promise((r) => setTimeout(r, 100));
      s.destroy();
    }
    assert.equal((await get(port)).status, 200, 'still scraping');
    for (let i = 0; i < 40 && d.fdCount() > fds; i++) await new Promise((r) => setTimeout(r, 50));
    assert.ok(d.fdCount() <= fds, `no fd leaked: ${d.fdCount()} open, ${fds} before`);
  });
});

describe('--metrics at start-up', () => {
  test('a port in use: exit 1 with a message, before the vhost-user socket exists', async () => {
    const dir = tempDir();
    const holder = net.createServer();
    await new Promise<void>((r) => holder.listen(0, '127.0.0.1', r));
    const port = (holder.address() as net.AddressInfo).port;
    try {
      const d = await startDaemon(['--blk-driver=null', '--size=1M', `--metrics=${port}`], { dir, waitSocket: false });
      assert.equal(await exitOf(d), 1);
      assert.match(d.logs.join('\n'), new RegExp(`cannot serve --metrics: 127\\.0\\.0\\.1:${port} is in use`));
      assert.equal(fs.existsSync(d.socketPath), false, 'nothing listens');
    } finally {
      holder.close();
    }
  });

  for (const [arg, message] of [
    ['--metrics=0', /port must be between 1 and 65535, got 0/],
    ['--metrics=70000', /between 1 and 65535/],
    ['--metrics=::1:9400', /cannot parse/],
    ['--metrics=:9400', /empty address/],
    ['--metrics=[127.0.0.1]:9400', /not an IPv6 address/],
    ['--metrics=http', /port must be a number/],
  ] as const) {
    test(`${arg}: a usage error (exit 2) before anything listens`, async () => {
      const d = await startDaemon(['--blk-driver=null', '--size=1M', arg], { waitSocket: false });
      assert.equal(await exitOf(d), 2);
      assert.match(d.logs.join('\n'), message);
      assert.equal(fs.existsSync(d.socketPath), false);
    });
  }

  test('no --control: the metrics endpoint still serves; an address given explicitly', async () => {
    const dir = tempDir();
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      let d: Daemon;
      try {
        d = await startDaemon(['--blk-driver=null', '--size=1M', '--num-queues=1', `--metrics=127.0.0.1:${port}`], { dir });
      } catch (e) {
        if (attempt < 5 && /is in use/.test((e as Error).message)) continue;
        throw e;
      }
      try {
        const e = await scrape(port);
        assert.equal(value(e, 'vubd_node_ops_total', { node: 'null0', driver: 'null', type: 'read' }), 0);
        assert.equal(select(e, 'vubd_queue_requests_total', { type: 'read' }).length, 1);
        const line = await d.waitForLog((r) => r.msg === 'metrics endpoint listening');
        assert.equal(line.url, `http://127.0.0.1:${port}/metrics`);
      } finally {
        await d.stop();
      }
      return;
    }
  });
});

test('exports added and deleted at run time appear in and leave the metrics', { timeout: 60000 }, async (t) => {
  const dir = tempDir();
  const control = path.join(dir, 'qmp.sock');
  const { d, port } = await startWithMetrics([`--control=${control}`, '--workers=2'], dir, true);
  const qmp = await QmpClient.connect(control);
  t.after(async () => {
    qmp.close();
    await d.stop();
  });
  assert.equal(select(await scrape(port), 'vubd_queue_requests_total').length, 0, 'no export, no queue series');
  for (const n of ['n0', 'n1']) await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': n, size: 64 * MiB });
  const add = (id: string, node: string, queues: number): Promise<unknown> =>
    qmp.execute('block-export-add', { type: 'vhost-user-blk', id, 'node-name': node, addr: { type: 'unix', path: path.join(dir, `${id}.sock`) }, writable: true, 'num-queues': queues });
  await add('e0', 'n0', 2);
  await add('e1', 'n1', 1);
  const fe = Frontend.connect(path.join(dir, 'e1.sock'));
  t.after(() => fe.close());
  fe.negotiate();
  const q = fe.setupRing(0, 64);
  for (let i = 0; i < 3; i++) assert.equal(fe.statusOf(fe.run(q, BLK.IN, 8 * i, 4096)), OK);
  const e = await scrape(port);
  const mapping = await qmp.execute<{ id: string; 'iothread-vq-mapping': { iothread: string; vqs: number[] }[] }[]>('query-block-exports');
  for (const x of mapping) {
    for (const m of x['iothread-vq-mapping']) {
      for (const vq of m.vqs) {
        const worker = m.iothread.replace(/^worker/, '');
        assert.equal(select(e, 'vubd_queue_in_flight', { export: x.id, queue: String(vq), worker }).length, 1, `${x.id} queue ${vq} on ${m.iothread}`);
      }
    }
  }
  assert.equal(value(e, 'vubd_queue_requests_total', { export: 'e1', queue: '0', type: 'read' }), 3);
  assert.equal(value(e, 'vubd_queue_requests_total', { export: 'e0', queue: '1', type: 'read' }), 0);
  assert.equal(value(e, 'vubd_node_ops_total', { node: 'n1', type: 'read' }), 3);
  assert.equal(value(e, 'vubd_export_root', { export: 'e0', node: 'n0' }), 1);
  assert.equal(select(e, 'vubd_queue_request_duration_seconds_count').length, 3, 'three queues');
  await qmp.execute('block-export-del', { id: 'e0', mode: 'safe' });
  await qmp.waitEvent('BLOCK_EXPORT_DELETED', (ev) => ev.data['id'] === 'e0', 10000);
  const after = await scrape(port);
  assert.equal(select(after, 'vubd_queue_requests_total', { export: 'e0' }).length, 0, 'a deleted export leaves no series');
  assert.equal(select(after, 'vubd_drains_total', { export: 'e0' }).length, 0);
  assert.equal(value(after, 'vubd_queue_requests_total', { export: 'e1', queue: '0', type: 'read' }), 3, 'the other export keeps its counts');
});

test('a failed flush shows as the node\'s flush error with its errno', { timeout: 60000 }, async (t) => {
  const dir = tempDir();
  const trigger = path.join(dir, 'fail-fsync');
  const fuse = await mountFuseFs(dir, { failFsyncWhile: trigger });
  t.after(() => fuse.unmount());
  const image = path.join(fuse.mountpoint, 'disk.img');
  fs.writeFileSync(path.join(fuse.backing, 'disk.img'), '');
  fs.truncateSync(path.join(fuse.backing, 'disk.img'), 8 * MiB);
  const { d, port } = await startWithMetrics([`--blk-file=${image}`, '--num-queues=1', '--log-level=warn'], dir);
  const fe = Frontend.connect(d.socketPath);
  t.after(async () => {
    fe.close();
    await d.stop();
  });
  fe.negotiate();
  const q0 = fe.setupRing(0, 64);
  assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 0, new Uint8Array(4096).fill(1))), OK);
  assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), OK);
  const n = { node: 'file0', driver: 'file' };
  assert.equal(value(await scrape(port), 'vubd_node_flush_error', n), 0);
  fs.writeFileSync(trigger, '');
  assert.equal(fe.statusOf(fe.run(q0, BLK.FLUSH, 0, 0)), IOERR);
  fs.unlinkSync(trigger);
  const e = await scrape(port);
  assert.equal(value(e, 'vubd_node_flush_error', n), 1);
  assert.equal(value(e, 'vubd_node_flush_errno', n), 5, 'EIO');
  assert.equal(value(e, 'vubd_queue_errors_total', { export: 'export0', queue: '0' }), 1);
  assert.equal(value(e, 'vubd_node_ops_total', { ...n, type: 'flush' }), 2);
});
