// The metrics registry on a known query-stats snapshot (bucket conversion, 32-bit wrap, state
// sets), the drain barrier's histogram, and the Grafana dashboard against the registry's names.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { createExposition } from '../../src/control/metrics.js';
import type { Scrape } from '../../src/control/metrics-vubd.js';
import { parseMetricsAddress, UsageError } from '../../src/cli/args.js';
import { DrainBarrier, DRAIN_BUCKETS_MS } from '../../src/graph/drain.js';
import { parseExposition, select, value } from '../helpers/prom-text.js';
import { dashboardExprs, dashboardMetricNames } from '../helpers/dashboard.js';
import { repoRoot } from '../helpers/daemon.js';

function snapshot(): Scrape {
  return {
    stats: {
      generation: 7,
      exports: [
        {
          id: 'e0',
          'node-name': 'n0',
          queues: [
            {
              queue: 0, worker: 3, readOps: -5, writeOps: 2, flushOps: 1, otherOps: 0, errors: 1, inFlight: 4, kicks: 9, notifies: 8,
              staleCompletions: 0, readKiB: 12, writeKiB: 8, state: 'drained',
              latencyHistogramUs: { '<1us': 2, '<4us': 3, '<8388608us': 1 },
            },
          ],
          drain: { state: 'draining', nesting: 1, timeouts: 2, 'latency-ms': { count: 3, 'sum-ms': 7.5, buckets: DRAIN_BUCKETS_MS.map((le) => ({ 'le-ms': le, count: le < 1 ? 0 : le < 5 ? 2 : 3 })) } },
        },
      ],
      nodes: [
        { 'node-name': 'n0', driver: 'file', 'read-ops': 6, 'write-ops': 2, 'flush-ops': 1, 'other-ops': 0, 'read-kib': 12, 'write-kib': 8, 'flush-error': true, 'flush-errno': 28 },
      ],
    },
    jobs: [{ id: 'm0', type: 'mirror', status: 'ready', 'current-progress': 5, 'total-progress': 10 }],
  };
}

describe('metrics registry', () => {
  test('a query-stats snapshot as Prometheus series', async () => {
    const e = parseExposition(await (await createExposition(snapshot)).render());
    const q = { export: 'e0', queue: '0', worker: '3' };
    assert.equal(value(e, 'vubd_queue_requests_total', { ...q, type: 'read' }), 2 ** 32 - 5, 'an int32 that wrapped reads as unsigned');
    assert.equal(value(e, 'vubd_queue_read_bytes_total', q), 12 * 1024);
    assert.equal(value(e, 'vubd_queue_in_flight', q), 4);
    assert.equal(value(e, 'vubd_queue_state', { ...q, state: 'drained' }), 1);
    assert.equal(select(e, 'vubd_queue_state', q).reduce((a, s) => a + s.value, 0), 1);
    const b = (le: string): number => value(e, 'vubd_queue_request_duration_seconds_bucket', { ...q, le });
    assert.equal(b('0.000001'), 2, '"<1us" is le 1 us');
    assert.equal(b('0.000002'), 2, 'nothing in [1, 2) us');
    assert.equal(b('0.000004'), 5, 'cumulative: "<4us" added');
    assert.equal(b('4.194304'), 5, 'the last bucket ("<8388608us", everything from 4.19 s up) has no finite bound');
    assert.equal(b('+Inf'), 6);
    assert.equal(select(e, 'vubd_queue_request_duration_seconds_bucket', { ...q, le: '8.388608' }).length, 0);
    assert.equal(value(e, 'vubd_queue_request_duration_seconds_count', q), 6);
    const sumUs = 2 * 0.5 + 3 * 3 + 1 * 2 ** 22;
    assert.ok(Math.abs(value(e, 'vubd_queue_request_duration_seconds_sum', q) - sumUs / 1e6) < 1e-12, 'midpoint estimate');
    assert.equal(value(e, 'vubd_drains_total', { export: 'e0' }), 3);
    assert.equal(value(e, 'vubd_drain_timeouts_total', { export: 'e0' }), 2);
    assert.equal(value(e, 'vubd_drain_state', { export: 'e0', state: 'draining' }), 1);
    assert.equal(value(e, 'vubd_drain_duration_seconds_bucket', { export: 'e0', le: '0.001' }), 2);
    assert.equal(value(e, 'vubd_drain_duration_seconds_bucket', { export: 'e0', le: '+Inf' }), 3);
    assert.equal(value(e, 'vubd_drain_duration_seconds_sum', { export: 'e0' }), 0.0075);
    assert.equal(value(e, 'vubd_node_flush_error', { node: 'n0', driver: 'file' }), 1);
    assert.equal(value(e, 'vubd_node_flush_errno', { node: 'n0', driver: 'file' }), 28);
    assert.equal(value(e, 'vubd_node_written_bytes_total', { node: 'n0', driver: 'file' }), 8 * 1024);
    assert.equal(value(e, 'vubd_job_current_progress', { job: 'm0', type: 'mirror' }), 5);
    assert.equal(value(e, 'vubd_job_status', { job: 'm0', type: 'mirror', status: 'ready' }), 1);
    assert.equal(value(e, 'vubd_graph_generation'), 7);
    assert.equal(e.types.get('vubd_queue_requests_total'), 'counter');
    assert.equal(e.types.get('vubd_queue_request_duration_seconds'), 'histogram');
    assert.match(e.help.get('vubd_queue_requests_total')!, /32-bit counter/);
    assert.match(e.help.get('vubd_queue_request_duration_seconds')!, /_sum is estimated from the bucket midpoints/);
  });

  test('hostile export, node and job names are escaped, never break a line', async () => {
    const s = snapshot();
    const evil = 'e"0\\x\ny} 1\nvubd_fake 2';
    s.stats.exports[0]!.id = evil;
    s.stats.nodes[0]!['node-name'] = evil;
    s.jobs[0]!.id = evil;
    const e = parseExposition(await (await createExposition(() => s)).render());
    assert.equal(select(e, 'vubd_fake').length, 0);
    assert.equal(value(e, 'vubd_queue_in_flight', { export: evil }), 4, 'the label reads back as given');
    assert.equal(value(e, 'vubd_node_flush_errno', { node: evil }), 28);
    assert.equal(value(e, 'vubd_job_total_progress', { job: evil }), 10);
  });

  test('the next snapshot replaces the last: vanished exports and jobs leave no series', async () => {
    let s = snapshot();
    const x = await createExposition(() => s);
    await x.render();
    s = { stats: { generation: 8, exports: [], nodes: [] }, jobs: [] };
    const e = parseExposition(await x.render());
    assert.equal(select(e, 'vubd_queue_requests_total').length, 0);
    assert.equal(select(e, 'vubd_job_status').length, 0);
    assert.equal(select(e, 'vubd_queue_request_duration_seconds_bucket').length, 0);
  });
});

describe('--metrics address', () => {
  test('port alone is loopback; IPv4, [IPv6] and names; bad ones refused', () => {
    assert.deepEqual(parseMetricsAddress('9400'), { host: '127.0.0.1', port: 9400 });
    assert.deepEqual(parseMetricsAddress('0.0.0.0:9400'), { host: '0.0.0.0', port: 9400 });
    assert.deepEqual(parseMetricsAddress('[::1]:1'), { host: '::1', port: 1 });
    assert.deepEqual(parseMetricsAddress('localhost:65535'), { host: 'localhost', port: 65535 });
    for (const bad of ['0', '65536', '', 'x', '::1:80', ':80', '[1.2.3.4]:80', 'a b:80', '1.2.3.4:']) {
      assert.throws(() => parseMetricsAddress(bad), UsageError, bad);
    }
  });
});

describe('drain barrier histogram', () => {
  test('every completed drain lands in the bucket that bounds it, cumulatively', async () => {
    let release: () => void = () => {};
    const b = new DrainBarrier({ drainQueues: () => new Promise<void>((r) => (release = r)), undrainQueues: async () => {} });
    for (const ms of [0, 30, 30]) {
      const p = b.drain(5000);
      if (ms) setTimeout(release, ms);
      else release();
      await p;
      await b.undrain();
    }
    const l = b.latency();
    assert.equal(l.count, 3);
    assert.equal(l.buckets.length, DRAIN_BUCKETS_MS.length);
    for (let i = 1; i < l.buckets.length; i++) assert.ok(l.buckets[i]!.count >= l.buckets[i - 1]!.count);
    assert.equal(l.buckets.at(-1)!.count, 3, 'the last bound (10 s) holds them all');
    assert.equal(l.buckets.find((x) => x['le-ms'] === 25)!.count, 1, 'only the immediate drain is under 25 ms');
    assert.ok(l['sum-ms'] >= 59 && l['sum-ms'] < 5000, `sum ${l['sum-ms']} ms`);
  });
});

describe('docs/grafana-vubd.json', () => {
  const dash = JSON.parse(fs.readFileSync(path.join(repoRoot, 'docs/grafana-vubd.json'), 'utf8'));

  test('uses only metrics the registry exposes', async () => {
    const families = new Map<string, string>();
    const e = parseExposition(await (await createExposition(() => ({ stats: { generation: 1, exports: [], nodes: [] }, jobs: [] }))).render(families));
    assert.ok(families.size >= 25, `${families.size} vubd families`);
    // every family announced (vubd's even with no series: no export here), and what a scrape shows
    const exposed = new Set<string>(e.samples.map((s) => s.name));
    for (const [name, type] of e.types) {
      if (type === 'histogram') for (const s of ['_bucket', '_sum', '_count']) exposed.add(name + s);
      else exposed.add(name);
    }
    for (const [name, type] of families) assert.equal(e.types.get(name), type, `${name} announced as ${type}`);
    const names = dashboardMetricNames(dash);
    assert.ok(names.size >= 15, `${names.size} metrics used`);
    for (const n of names) assert.ok(exposed.has(n), `the dashboard uses ${n}, which vubd does not expose`);
    for (const expr of dashboardExprs(dash)) assert.match(expr, /vubd_/, `every query reads a vubd metric: ${expr}`);
  });

  test('a Grafana dashboard: schema, variables, panels that use them', () => {
    assert.ok(dash.schemaVersion >= 36 && dash.schemaVersion <= 41, `schemaVersion ${dash.schemaVersion}`);
    const vars = new Map<string, { type: string; query?: unknown }>(dash.templating.list.map((v: { name: string; type: string }) => [v.name, v]));
    assert.equal(vars.get('datasource')?.type, 'datasource');
    assert.equal(vars.get('datasource')?.query, 'prometheus');
    assert.equal(vars.get('export')?.type, 'query');
    const ids = new Set<number>();
    const titles: string[] = [];
    for (const p of dash.panels as { id: number; type: string; title: string; gridPos: { x: number; w: number }; datasource?: { uid: string }; targets?: { expr: string }[] }[]) {
      assert.ok(!ids.has(p.id), `panel id ${p.id} is unique`);
      ids.add(p.id);
      assert.ok(p.gridPos.x + p.gridPos.w <= 24, `${p.title} fits the 24-column grid`);
      if (p.type === 'row') continue;
      titles.push(p.title);
      assert.equal(p.datasource?.uid, '${datasource}', `${p.title} uses the datasource variable`);
      assert.ok(p.targets && p.targets.length > 0, `${p.title} has queries`);
    }
    const exprs = dashboardExprs(dash).join('\n');
    assert.match(exprs, /histogram_quantile\(0\.99, sum by \(export, queue, le\) \(rate\(vubd_queue_request_duration_seconds_bucket/);
    assert.match(exprs, /export=~"\$export"/);
    for (const want of ['IOPS', 'Throughput', 'Latency', 'In flight', 'Errors', 'Drain', 'flush errors', 'Job progress', 'Resident memory']) {
      assert.ok(titles.some((t) => t.includes(want)), `a panel for ${want}`);
    }
  });
});
