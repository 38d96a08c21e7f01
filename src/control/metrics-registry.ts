// The Prometheus metrics, read at scrape time from what query-stats and query-jobs return: the
// I/O path keeps no extra counters for them. Every metric's collect() reads the one snapshot the
// scrape took, so all series of a scrape agree with each other.
import type { Registry } from 'prom-client';
import { StatIndex } from '../worker/messages.js';
import { SnapshotHistogram, type HistogramSeries } from './metrics-histogram.js';

type PromClient = typeof import('prom-client');

// The parts of the query-stats and query-jobs replies read here (see src/control/commands.ts).
export interface QueueStats {
  queue: number;
  worker?: number;
  readOps: number;
  writeOps: number;
  flushOps: number;
  otherOps: number;
  errors: number;
  inFlight: number;
  kicks: number;
  notifies: number;
  staleCompletions: number;
  readKiB: number;
  writeKiB: number;
  state: string;
  latencyHistogramUs: Record<string, number>;
}
export interface DrainStats {
  state: string;
  nesting: number;
  timeouts: number;
  'latency-ms': { count: number; 'sum-ms'?: number; buckets?: { 'le-ms': number; count: number }[] };
}
export interface ExportStats {
  id: string;
  'node-name'?: string;
  queues: QueueStats[];
  drain: DrainStats;
}
export interface NodeStats {
  'node-name': string;
  driver: string;
  'read-ops': number;
  'write-ops': number;
  'flush-ops': number;
  'other-ops': number;
  'read-kib': number;
  'write-kib': number;
  'flush-error': boolean;
  'flush-errno'?: number;
}
export interface StatsReply {
  generation: number;
  exports: ExportStats[];
  nodes: NodeStats[];
}
export interface JobInfo {
  id: string;
  type: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
}
export interface Scrape {
  stats: StatsReply;
  jobs: JobInfo[];
}

/** The stats blocks are int32 slots that wrap; read as unsigned they count to 2^32 before wrapping to 0. */
const u32 = (v: unknown): number => (typeof v === 'number' ? v >>> 0 : 0);
const WRAP = ' (a 32-bit counter: it wraps to 0 after 2^32, which rate() and increase() take for a reset)';
const WRAP_KIB = ' (counted in KiB per request, so parts of a KiB are not counted; wraps to 0 after 4 TiB, which rate() takes for a reset)';

const QUEUE_STATES = ['idle', 'running', 'drained', 'broken'];
const DRAIN_STATES = ['running', 'draining', 'drained'];
const JOB_STATUSES = ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting', 'concluded'];

/** Queue latency buckets: bucket b counts requests under 2^b us (b = 0: under 1 us) and at least 2^(b-1) us. */
const LAST_BUCKET = StatIndex.HIST_BUCKETS - 1; // counts everything from 2^(LAST-1) us up: only +Inf bounds it

function queueLatency(hist: Record<string, number>): Omit<HistogramSeries, 'labels'> {
  const counts = new Array<number>(StatIndex.HIST_BUCKETS).fill(0);
  for (const [key, n] of Object.entries(hist)) {
    const m = /^<(\d+)us$/.exec(key);
    if (!m) continue;
    const b = Math.log2(Number(m[1]));
    if (Number.isInteger(b) && b >= 0 && b <= LAST_BUCKET) counts[b] = u32(n);
  }
  const buckets: [number, number][] = [];
  let cum = 0;
  let sumUs = 0;
  for (let b = 0; b <= LAST_BUCKET; b++) {
    cum += counts[b]!;
    // The bucket midpoint (0.75 x its bound; 0.5 us for the first); the last bucket at its lower bound.
    sumUs += counts[b]! * (b === 0 ? 0.5 : b === LAST_BUCKET ? 2 ** (b - 1) : 0.75 * 2 ** b);
    if (b < LAST_BUCKET) buckets.push([2 ** b / 1e6, cum]);
  }
  return { buckets, count: cum, sum: sumUs / 1e6 };
}

function drainLatency(d: DrainStats): Omit<HistogramSeries, 'labels'> {
  const l = d['latency-ms'];
  return {
    buckets: (l.buckets ?? []).map((b) => [b['le-ms'] / 1000, b.count] as [number, number]),
    count: l.count,
    sum: (l['sum-ms'] ?? 0) / 1000,
  };
}

export function registerVubdMetrics(prom: PromClient, registry: Registry, current: () => Scrape): void {
  const registers = [registry];
  const queues = function* (): Generator<[{ export: string; queue: string; worker: string }, QueueStats, ExportStats]> {
    for (const e of current().stats.exports) {
      // Before the worker pool, every queue had its own worker thread, numbered as the queue.
      for (const q of e.queues) yield [{ export: e.id, queue: String(q.queue), worker: String(q.worker ?? q.queue) }, q, e];
    }
  };
  const Q = ['export', 'queue', 'worker'] as const;
  const N = ['node', 'driver'] as const;
  const J = ['job', 'type'] as const;

  const counter = <L extends string>(name: string, help: string, labelNames: readonly L[], fill: (inc: (labels: Record<L, string>, v: number) => void) => void): void => {
    new prom.Counter<L>({
      name, help, labelNames, registers,
      collect() {
        this.reset();
        fill((labels, v) => this.inc(labels, v));
      },
    });
  };
  const gauge = <L extends string>(name: string, help: string, labelNames: readonly L[], fill: (set: (labels: Record<L, string>, v: number) => void) => void): void => {
    new prom.Gauge<L>({
      name, help, labelNames, registers,
      collect() {
        this.reset();
        fill((labels, v) => this.set(labels, v));
      },
    });
  };
  const histogram = (name: string, help: string, series: () => HistogramSeries[]): void => {
    registry.registerMetric(new SnapshotHistogram(name, help, series) as unknown as Parameters<Registry['registerMetric']>[0]);
  };

  // ---- per export and queue
  counter('vubd_queue_requests_total', `Requests completed, by type (read, write, flush, other)${WRAP}`, [...Q, 'type'], (inc) => {
    for (const [l, q] of queues()) {
      inc({ ...l, type: 'read' }, u32(q.readOps));
      inc({ ...l, type: 'write' }, u32(q.writeOps));
      inc({ ...l, type: 'flush' }, u32(q.flushOps));
      inc({ ...l, type: 'other' }, u32(q.otherOps));
    }
  });
  counter('vubd_queue_read_bytes_total', `Bytes read by the guest${WRAP_KIB}`, Q, (inc) => {
    for (const [l, q] of queues()) inc(l, u32(q.readKiB) * 1024);
  });
  counter('vubd_queue_written_bytes_total', `Bytes written by the guest${WRAP_KIB}`, Q, (inc) => {
    for (const [l, q] of queues()) inc(l, u32(q.writeKiB) * 1024);
  });
  counter('vubd_queue_errors_total', `Requests completed with an error status (IOERR or UNSUPP)${WRAP}`, Q, (inc) => {
    for (const [l, q] of queues()) inc(l, u32(q.errors));
  });
  gauge('vubd_queue_in_flight', 'Requests taken from the ring and not yet completed (as of the queue\'s last publish)', Q, (set) => {
    for (const [l, q] of queues()) set(l, u32(q.inFlight));
  });
  counter('vubd_queue_kicks_total', `Kicks (available-buffer notifications) read from the guest${WRAP}`, Q, (inc) => {
    for (const [l, q] of queues()) inc(l, u32(q.kicks));
  });
  counter('vubd_queue_notifies_total', `Used-buffer interrupts sent to the guest${WRAP}`, Q, (inc) => {
    for (const [l, q] of queues()) inc(l, u32(q.notifies));
  });
  counter('vubd_queue_stale_completions_total', `Requests completed under a newer graph generation than they started with (must stay 0)${WRAP}`, Q, (inc) => {
    for (const [l, q] of queues()) inc(l, u32(q.staleCompletions));
  });
  gauge('vubd_queue_state', 'Queue state: 1 for the current one of idle, running, drained, broken', [...Q, 'state'], (set) => {
    for (const [l, q] of queues()) {
      for (const s of QUEUE_STATES) set({ ...l, state: s }, q.state === s ? 1 : 0);
      if (!QUEUE_STATES.includes(q.state)) set({ ...l, state: q.state }, 1);
    }
  });
  histogram(
    'vubd_queue_request_duration_seconds',
    'Request latency from taking it off the ring to completing it, in the queue\'s power-of-two buckets (1 us to 4.19 s); ' +
      '_sum is estimated from the bucket midpoints (within a third of the truth), not measured',
    () => [...queues()].map(([labels, q]) => ({ labels, ...queueLatency(q.latencyHistogramUs) })),
  );

  // ---- per export
  gauge('vubd_export_root', 'The node an export serves from (always 1; the node label names it)', ['export', 'node'], (set) => {
    for (const e of current().stats.exports) set({ export: e.id, node: e['node-name'] ?? '' }, 1);
  });
  counter('vubd_drains_total', 'Drains of the export\'s queues that completed (nested drains count once)', ['export'], (inc) => {
    for (const e of current().stats.exports) inc({ export: e.id }, e.drain['latency-ms'].count);
  });
  counter('vubd_drain_timeouts_total', 'Drains that did not complete in time (the change failed, the queues resumed)', ['export'], (inc) => {
    for (const e of current().stats.exports) inc({ export: e.id }, e.drain.timeouts);
  });
  gauge('vubd_drain_state', 'Drain state: 1 for the current one of running, draining, drained', ['export', 'state'], (set) => {
    for (const e of current().stats.exports) for (const s of DRAIN_STATES) set({ export: e.id, state: s }, e.drain.state === s ? 1 : 0);
  });
  gauge('vubd_drain_nesting', 'Drains currently held on the export (they nest)', ['export'], (set) => {
    for (const e of current().stats.exports) set({ export: e.id }, e.drain.nesting);
  });
  histogram('vubd_drain_duration_seconds', 'Time from a drain request until every queue of the export was drained (completed drains)', () =>
    current().stats.exports.map((e) => ({ labels: { export: e.id }, ...drainLatency(e.drain) })),
  );

  // ---- per node
  counter('vubd_node_ops_total', `Operations that reached the node, by type (read, write, flush, other)${WRAP}`, [...N, 'type'], (inc) => {
    for (const n of current().stats.nodes) {
      const l = { node: n['node-name'], driver: n.driver };
      inc({ ...l, type: 'read' }, u32(n['read-ops']));
      inc({ ...l, type: 'write' }, u32(n['write-ops']));
      inc({ ...l, type: 'flush' }, u32(n['flush-ops']));
      inc({ ...l, type: 'other' }, u32(n['other-ops']));
    }
  });
  counter('vubd_node_read_bytes_total', `Bytes read from the node${WRAP_KIB}`, N, (inc) => {
    for (const n of current().stats.nodes) inc({ node: n['node-name'], driver: n.driver }, u32(n['read-kib']) * 1024);
  });
  counter('vubd_node_written_bytes_total', `Bytes written to the node${WRAP_KIB}`, N, (inc) => {
    for (const n of current().stats.nodes) inc({ node: n['node-name'], driver: n.driver }, u32(n['write-kib']) * 1024);
  });
  gauge('vubd_node_flush_error', '1 when a flush of the node (or of a node below a filter) failed: every later flush fails until it is reopened', N, (set) => {
    for (const n of current().stats.nodes) set({ node: n['node-name'], driver: n.driver }, n['flush-error'] ? 1 : 0);
  });
  gauge('vubd_node_flush_errno', 'errno of the failed flush (0 when none failed)', N, (set) => {
    for (const n of current().stats.nodes) set({ node: n['node-name'], driver: n.driver }, n['flush-error'] ? (n['flush-errno'] ?? 0) : 0);
  });

  // ---- jobs
  gauge('vubd_job_current_progress', 'Job progress so far (mirror: bytes copied), as query-jobs current-progress', J, (set) => {
    for (const j of current().jobs) set({ job: j.id, type: j.type }, j['current-progress']);
  });
  gauge('vubd_job_total_progress', 'Job progress at completion (mirror: bytes to copy), as query-jobs total-progress', J, (set) => {
    for (const j of current().jobs) set({ job: j.id, type: j.type }, j['total-progress']);
  });
  gauge('vubd_job_status', `Job status: 1 for the current one of ${JOB_STATUSES.join(', ')}`, [...J, 'status'], (set) => {
    for (const j of current().jobs) {
      for (const s of JOB_STATUSES) set({ job: j.id, type: j.type, status: s }, j.status === s ? 1 : 0);
      if (!JOB_STATUSES.includes(j.status)) set({ job: j.id, type: j.type, status: j.status }, 1);
    }
  });

  gauge('vubd_graph_generation', 'Generation number of the block graph snapshot in use (grows by one per change)', [], (set) => {
    set({}, current().stats.generation);
  });
}
