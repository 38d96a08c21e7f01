// vubd-ctl top's numbers and screen: rows computed from two query-stats snapshots, laid out for a
// terminal of a given size. No I/O here (ctl-top.ts does that), so the arithmetic is testable.

export interface QueueStats {
  queue: number;
  worker?: number;
  readOps: number;
  writeOps: number;
  flushOps: number;
  otherOps: number;
  errors: number;
  inFlight: number;
  readKiB: number;
  writeKiB: number;
  state: string;
  latencyHistogramUs: Record<string, number>;
}

export interface ExportStats {
  id: string;
  'node-name'?: string;
  queues: QueueStats[];
  drain: { state: string; nesting?: number; timeouts?: number };
}

export interface ExportInfo {
  id: string;
  'shutting-down'?: boolean;
  'iothread-vq-mapping'?: { iothread: string; vqs: number[] }[];
}

export interface Sample {
  /** performance.now() when the answer arrived */
  t: number;
  exports: ExportStats[];
  info: ExportInfo[];
}

export interface TopRow {
  export: string;
  node: string;
  queue: number;
  worker: string;
  /** null until two samples exist for this queue */
  iops: number | null;
  mbps: number | null;
  /** upper bound in us of the log2 bucket holding the percentile; null without requests in the interval */
  p50: number | null;
  p99: number | null;
  inFlight: number;
  state: string;
  drain: string;
}

export interface TopView {
  rows: TopRow[];
  /** null before the first interval */
  iops: number | null;
  mbps: number | null;
  exports: number;
  queues: number;
  seconds: number | null;
}

/**
 * Counter growth between two reads. The daemon's counters are Int32 and wrap; a queue whose
 * worker was restarted starts again from 0. A growth under 2^31 modulo 2^32 is a wrap, anything
 * else a restart (then the new value is what happened since).
 */
export function counterDelta(prev: number, cur: number): number {
  const d = (cur - prev) >>> 0;
  return d < 2 ** 31 ? d : Math.max(0, cur);
}

/** Bucket-wise growth of a latency histogram ({"<Nus": count}). */
export function histogramDelta(prev: Record<string, number>, cur: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(cur)) {
    const d = counterDelta(prev[k] ?? 0, v);
    if (d > 0) out[k] = d;
  }
  return out;
}

/**
 * The upper bound N (us) of the bucket "<Nus" in which the p-quantile request falls, or null for an
 * empty histogram. Buckets are log2: "<Nus" counts latencies in [N/2, N) us.
 */
export function percentileBucket(hist: Record<string, number>, p: number): number | null {
  const buckets = Object.entries(hist)
    .map(([k, n]) => ({ bound: Number(/^<(\d+)us$/.exec(k)?.[1] ?? NaN), n }))
    .filter((b) => Number.isFinite(b.bound) && b.n > 0)
    .sort((a, b) => a.bound - b.bound);
  const total = buckets.reduce((s, b) => s + b.n, 0);
  if (total === 0) return null;
  const rank = Math.max(1, Math.ceil(p * total));
  let seen = 0;
  for (const b of buckets) {
    seen += b.n;
    if (seen >= rank) return b.bound;
  }
  return buckets[buckets.length - 1]!.bound;
}

const ops = (q: QueueStats): number => q.readOps + q.writeOps + q.flushOps + q.otherOps;

function workerOf(q: QueueStats, info: ExportInfo | undefined): string {
  if (typeof q.worker === 'number') return `worker${q.worker}`; // the name iothread-vq-mapping uses
  const m = info?.['iothread-vq-mapping']?.find((x) => x.vqs.includes(q.queue));
  return m ? m.iothread : '-';
}

export function buildView(prev: Sample | null, cur: Sample): TopView {
  const seconds = prev ? (cur.t - prev.t) / 1000 : null;
  const rows: TopRow[] = [];
  let iops = 0;
  let mbps = 0;
  let known = false;
  for (const e of cur.exports) {
    const info = cur.info.find((x) => x.id === e.id);
    const before = prev?.exports.find((x) => x.id === e.id);
    for (const q of e.queues) {
      const p = before?.queues.find((x) => x.queue === q.queue);
      const row: TopRow = {
        export: e.id,
        node: e['node-name'] ?? '-',
        queue: q.queue,
        worker: workerOf(q, info),
        iops: null,
        mbps: null,
        p50: null,
        p99: null,
        inFlight: q.inFlight,
        state: q.state,
        drain: info?.['shutting-down'] ? 'deleting' : e.drain.state,
      };
      if (p && seconds !== null && seconds > 0) {
        row.iops = counterDelta(ops(p), ops(q)) / seconds;
        const kib = counterDelta(p.readKiB, q.readKiB) + counterDelta(p.writeKiB, q.writeKiB);
        row.mbps = (kib * 1024) / 1e6 / seconds;
        const h = histogramDelta(p.latencyHistogramUs, q.latencyHistogramUs);
        row.p50 = percentileBucket(h, 0.5);
        row.p99 = percentileBucket(h, 0.99);
        iops += row.iops;
        mbps += row.mbps;
        known = true;
      }
      rows.push(row);
    }
  }
  return { rows, iops: known ? iops : null, mbps: known ? mbps : null, exports: cur.exports.length, queues: rows.length, seconds };
}

/** "<64us", "<1024us", "<131ms" (rounded up: still an upper bound) */
export function formatLatency(us: number | null): string {
  if (us === null) return '-';
  return us < 10000 ? `<${us}us` : `<${Math.ceil(us / 1000)}ms`;
}

const fmtIops = (v: number | null): string => (v === null ? '-' : String(Math.round(v)));
const fmtMbps = (v: number | null): string => (v === null ? '-' : v.toFixed(1));
const plural = (n: number, word: string): string => `${n} ${word}${n === 1 ? '' : 's'}`;

function cut(s: string, w: number): string {
  return s.length <= w ? s.padEnd(w) : s.slice(0, Math.max(0, w - 1)) + '…';
}

const COLUMNS: { title: string; width: number; right?: boolean; get: (r: TopRow) => string }[] = [
  { title: 'EXPORT', width: 14, get: (r) => r.export },
  { title: 'QUEUE', width: 5, right: true, get: (r) => String(r.queue) },
  { title: 'WORKER', width: 8, right: true, get: (r) => r.worker },
  { title: 'IOPS', width: 8, right: true, get: (r) => fmtIops(r.iops) },
  { title: 'MB/s', width: 8, right: true, get: (r) => fmtMbps(r.mbps) },
  { title: 'P50', width: 8, right: true, get: (r) => formatLatency(r.p50) },
  { title: 'P99', width: 8, right: true, get: (r) => formatLatency(r.p99) },
  { title: 'INFL', width: 5, right: true, get: (r) => String(r.inFlight) },
  { title: 'STATE', width: 8, get: (r) => r.state },
  { title: 'DRAIN', width: 9, get: (r) => r.drain },
  { title: 'NODE', width: 16, get: (r) => r.node },
];

function line(cells: string[]): string {
  return cells
    .map((c, i) => {
      const col = COLUMNS[i]!;
      return col.right && c.length <= col.width ? c.padStart(col.width) : cut(c, col.width);
    })
    .join(' ')
    .trimEnd();
}

export interface Layout {
  /** null: no limit (a pipe) */
  width: number | null;
  height: number | null;
  title: string;
}

/** The screen, one string per line, each at most `width` characters, at most `height` lines. */
export function renderView(v: TopView, layout: Layout): string[] {
  const total =
    v.iops === null
      ? `total: sampling...  ${plural(v.exports, 'export')}, ${plural(v.queues, 'queue')}`
      : `total: ${fmtIops(v.iops)} IOPS  ${fmtMbps(v.mbps)} MB/s  ${plural(v.exports, 'export')}, ${plural(v.queues, 'queue')}`;
  const head = [
    layout.title,
    `${total}   (P50/P99: log2 latency bucket upper bound, last ${v.seconds === null ? '-' : v.seconds.toFixed(1)} s)`,
    '',
    line(COLUMNS.map((c) => c.title)),
  ];
  let body = v.rows.map((r) => line(COLUMNS.map((c) => c.get(r))));
  if (v.rows.length === 0) body = ['(no exports)'];
  if (layout.height !== null) {
    const room = Math.max(1, layout.height - head.length);
    if (body.length > room) {
      const shown = room - 1;
      body = [...body.slice(0, shown), `… ${body.length - shown} more`];
    }
  }
  const lines = [...head, ...body];
  const limited = layout.height !== null ? lines.slice(0, Math.max(1, layout.height)) : lines;
  return layout.width !== null ? limited.map((l) => l.slice(0, layout.width!)) : limited;
}
