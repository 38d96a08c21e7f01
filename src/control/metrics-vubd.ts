// vubd's own metrics, written at scrape time from what query-stats and query-jobs returned: the
// I/O path keeps no extra counters for them, and every series of a scrape comes from one snapshot.
import { StatIndex } from '../worker/messages.js';
import { labels, TextWriter } from './metrics-text.js';

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
const WRAP_KIB = ' (counted in whole KiB per request, so parts of a KiB are not counted; wraps to 0 after 4 TiB, which rate() takes for a reset)';

const QUEUE_STATES = ['idle', 'running', 'drained', 'broken'];
const DRAIN_STATES = ['running', 'draining', 'drained'];
const JOB_STATUSES = ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting', 'concluded'];
const TYPES = ['read', 'write', 'flush', 'other'].map((t) => `type="${t}"`);

// Queue latency buckets: bucket b counts requests under 2^b us (b = 0: under 1 us) and at least
// 2^(b-1) us; the last one everything from 2^(LAST-1) us up, so only +Inf bounds it.
const LAST_BUCKET = StatIndex.HIST_BUCKETS - 1;
const QUEUE_LES = Array.from({ length: LAST_BUCKET }, (_, b) => String(2 ** b / 1e6));
/** "<Nus" -> bucket index */
const BUCKET_OF = new Map(Array.from({ length: LAST_BUCKET + 1 }, (_, b) => [`<${2 ** b}us`, b]));

function queueLatency(hist: Record<string, number>, cumulative: Float64Array): { count: number; sum: number } {
  const counts = new Float64Array(LAST_BUCKET + 1);
  for (const key in hist) {
    const b = BUCKET_OF.get(key);
    if (b !== undefined) counts[b] = u32(hist[key]);
  }
  let cum = 0;
  let sumUs = 0;
  for (let b = 0; b <= LAST_BUCKET; b++) {
    cum += counts[b]!;
    // the bucket midpoint (0.75 x its bound; 0.5 us for the first); the last bucket at its lower bound
    sumUs += counts[b]! * (b === 0 ? 0.5 : b === LAST_BUCKET ? 2 ** (b - 1) : 0.75 * 2 ** b);
    if (b < LAST_BUCKET) cumulative[b] = cum;
  }
  return { count: cum, sum: sumUs / 1e6 };
}

export function writeVubdMetrics(w: TextWriter, { stats, jobs }: Scrape): void {
  // Label sets, escaped once. Before the worker pool every queue had its own worker thread, numbered as the queue.
  const qs: { l: string; q: QueueStats }[] = [];
  for (const e of stats.exports) for (const q of e.queues) qs.push({ l: labels({ export: e.id, queue: String(q.queue), worker: String(q.worker ?? q.queue) }), q });
  const es = stats.exports.map((e) => ({ l: labels({ export: e.id }), e }));
  const ns = stats.nodes.map((n) => ({ l: labels({ node: n['node-name'], driver: n.driver }), n }));
  const js = jobs.map((j) => ({ l: labels({ job: j.id, type: j.type }), j }));
  const each = <T extends { l: string }>(list: T[], f: (x: T) => number, name: string): void => {
    for (const x of list) w.sample(name, x.l, f(x));
  };

  // ---- per export and queue
  let name = 'vubd_queue_requests_total';
  w.family(name, 'counter', `Requests completed, by type (read, write, flush, other)${WRAP}`);
  for (const { l, q } of qs) {
    w.sample(name, l, u32(q.readOps), TYPES[0]);
    w.sample(name, l, u32(q.writeOps), TYPES[1]);
    w.sample(name, l, u32(q.flushOps), TYPES[2]);
    w.sample(name, l, u32(q.otherOps), TYPES[3]);
  }
  w.family((name = 'vubd_queue_read_bytes_total'), 'counter', `Bytes read by the guest${WRAP_KIB}`);
  each(qs, ({ q }) => u32(q.readKiB) * 1024, name);
  w.family((name = 'vubd_queue_written_bytes_total'), 'counter', `Bytes written by the guest${WRAP_KIB}`);
  each(qs, ({ q }) => u32(q.writeKiB) * 1024, name);
  w.family((name = 'vubd_queue_errors_total'), 'counter', `Requests completed with an error status (IOERR or UNSUPP)${WRAP}`);
  each(qs, ({ q }) => u32(q.errors), name);
  w.family((name = 'vubd_queue_in_flight'), 'gauge', "Requests taken from the ring and not yet completed (as of the queue's last publish)");
  each(qs, ({ q }) => u32(q.inFlight), name);
  w.family((name = 'vubd_queue_kicks_total'), 'counter', `Kicks (available-buffer notifications) read from the guest${WRAP}`);
  each(qs, ({ q }) => u32(q.kicks), name);
  w.family((name = 'vubd_queue_notifies_total'), 'counter', `Used-buffer interrupts sent to the guest${WRAP}`);
  each(qs, ({ q }) => u32(q.notifies), name);
  w.family((name = 'vubd_queue_stale_completions_total'), 'counter', `Requests completed under a newer graph generation than they started with (must stay 0)${WRAP}`);
  each(qs, ({ q }) => u32(q.staleCompletions), name);
  w.family((name = 'vubd_queue_state'), 'gauge', `Queue state: 1 for the current one of ${QUEUE_STATES.join(', ')}`);
  for (const { l, q } of qs) {
    for (const s of QUEUE_STATES) w.sample(name, l, q.state === s ? 1 : 0, `state="${s}"`);
    if (!QUEUE_STATES.includes(q.state)) w.sample(name, l, 1, labels({ state: String(q.state) }));
  }
  name = 'vubd_queue_request_duration_seconds';
  w.family(
    name,
    'histogram',
    "Request latency from taking it off the ring to completing it, in the queue's power-of-two buckets (1 us to 4.19 s); " +
      '_sum is estimated from the bucket midpoints (within a third of the truth), not measured',
  );
  const cumulative = new Float64Array(LAST_BUCKET);
  for (const { l, q } of qs) {
    const { count, sum } = queueLatency(q.latencyHistogramUs ?? {}, cumulative);
    w.histogram(name, l, QUEUE_LES, cumulative, count, sum);
  }

  // ---- per export
  w.family((name = 'vubd_export_root'), 'gauge', 'The node an export serves from (always 1; the node label names it)');
  for (const e of stats.exports) w.sample(name, labels({ export: e.id, node: e['node-name'] ?? '' }), 1);
  w.family((name = 'vubd_drains_total'), 'counter', "Drains of the export's queues that completed (nested drains count once)");
  each(es, ({ e }) => e.drain['latency-ms'].count, name);
  w.family((name = 'vubd_drain_timeouts_total'), 'counter', 'Drains that did not complete in time (the change failed, the queues resumed)');
  each(es, ({ e }) => e.drain.timeouts, name);
  w.family((name = 'vubd_drain_state'), 'gauge', `Drain state: 1 for the current one of ${DRAIN_STATES.join(', ')}`);
  for (const { l, e } of es) for (const s of DRAIN_STATES) w.sample(name, l, e.drain.state === s ? 1 : 0, `state="${s}"`);
  w.family((name = 'vubd_drain_nesting'), 'gauge', 'Drains currently held on the export (they nest)');
  each(es, ({ e }) => e.drain.nesting, name);
  name = 'vubd_drain_duration_seconds';
  w.family(name, 'histogram', 'Time from a drain request until every queue of the export was drained (completed drains)');
  for (const { l, e } of es) {
    const d = e.drain['latency-ms'];
    const b = d.buckets ?? [];
    w.histogram(name, l, b.map((x) => String(x['le-ms'] / 1000)), b.map((x) => x.count), d.count, (d['sum-ms'] ?? 0) / 1000);
  }

  // ---- per node
  w.family((name = 'vubd_node_ops_total'), 'counter', `Operations that reached the node, by type (read, write, flush, other)${WRAP}`);
  for (const { l, n } of ns) {
    w.sample(name, l, u32(n['read-ops']), TYPES[0]);
    w.sample(name, l, u32(n['write-ops']), TYPES[1]);
    w.sample(name, l, u32(n['flush-ops']), TYPES[2]);
    w.sample(name, l, u32(n['other-ops']), TYPES[3]);
  }
  w.family((name = 'vubd_node_read_bytes_total'), 'counter', `Bytes read from the node${WRAP_KIB}`);
  each(ns, ({ n }) => u32(n['read-kib']) * 1024, name);
  w.family((name = 'vubd_node_written_bytes_total'), 'counter', `Bytes written to the node${WRAP_KIB}`);
  each(ns, ({ n }) => u32(n['write-kib']) * 1024, name);
  w.family((name = 'vubd_node_flush_error'), 'gauge', '1 when a flush of the node (or of a node below a filter) failed: every later flush fails until it is reopened');
  each(ns, ({ n }) => (n['flush-error'] ? 1 : 0), name);
  w.family((name = 'vubd_node_flush_errno'), 'gauge', 'errno of the failed flush (0 when none failed)');
  each(ns, ({ n }) => (n['flush-error'] ? (n['flush-errno'] ?? 0) : 0), name);

  // ---- jobs
  w.family((name = 'vubd_job_current_progress'), 'gauge', 'Job progress so far (mirror: bytes copied), as query-jobs current-progress');
  each(js, ({ j }) => j['current-progress'], name);
  w.family((name = 'vubd_job_total_progress'), 'gauge', 'Job progress at completion (mirror: bytes to copy), as query-jobs total-progress');
  each(js, ({ j }) => j['total-progress'], name);
  w.family((name = 'vubd_job_status'), 'gauge', `Job status: 1 for the current one of ${JOB_STATUSES.join(', ')}`);
  for (const { l, j } of js) {
    for (const s of JOB_STATUSES) w.sample(name, l, j.status === s ? 1 : 0, `status="${s}"`);
    if (!JOB_STATUSES.includes(j.status)) w.sample(name, l, 1, labels({ status: String(j.status) }));
  }

  w.family((name = 'vubd_graph_generation'), 'gauge', 'Generation number of the block graph snapshot in use (grows by one per change)');
  w.sample(name, '', stats.generation);
}
