#!/usr/bin/env node
// Scale benchmark: one vubd serving many exports against one qemu-storage-daemon serving the same
// exports, both driven over QMP with the same commands, in the same run; prints one table with
// vubd, QSD and vubd/QSD columns (the targets of issue 11, "Scale, measured").
//
//   npm run bench:scale -- [--quick] [--rows memory,throughput,interference,startup] [--repeat N]
//                          [--time S] [--exports N] [--workers N] [--churn N] [--pin] [--write] [--img PATH]
//
//   --rows       row groups to run (default all)
//   --repeat N   run every measurement N times (fresh daemons) and report medians (default 3; --quick 1)
//   --time S     throughput window per run (default 10 s after a 1 s ramp; --quick 3 s)
//   --exports N  exports (default 32; the interference row loads N-1 and churns one more)
//   --workers N  vubd --workers (default 2); QSD is single-threaded (no iothreads given)
//   --churn N    add/use/delete cycles in the interference row (default 20)
//   --paced-rate R  also run the interference row with the load paced at R requests/s per queue
//                (default 100: 200 IOPS per export, well below saturation, so p99 shows the backend
//                more than the run queue of a saturated machine); the throughput rows also run
//                null-co at that rate (CPU per I/O without batching); 0 = neither paced run
//   --pin        backend on CPU 1, every loadgen on CPU 0 (taskset); default: not pinned
//   --nice N     run the backends and loadgens under nice -n N (negative needs root): on a machine
//                shared with other work, -10 keeps their run-queue wait out of the latency rows
//   --write      also write the table to docs/bench-scale.md
//   --img PATH   image for the file rows (default /var/tmp/vubd-bench-1g.img, 1 GiB, shared read-only)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ROOT, VUBD_MAIN, ensureLoadgen, ensureImage, fmt, ratio, median } from './common.mjs';
import { NAMES } from './scale-lib.mjs';
import { memoryRun, singleDiskRun, throughputRun, interferenceRun, startupRun, vubdHasConfig } from './scale-rows.mjs';

const GROUPS = ['memory', 'throughput', 'interference', 'startup'];

function parseArgs(argv) {
  const o = { rows: GROUPS, repeat: null, time: null, exports: 32, workers: 2, churn: 20, pacedRate: 100, pin: false, nice: null, write: false, quick: false, backends: ['vubd', 'qsd'], img: '/var/tmp/vubd-bench-1g.img' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [k, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const val = () => inline ?? argv[++i];
    const int = (name) => {
      const v = Number(val());
      if (!Number.isInteger(v) || v < 1) throw new Error(`${name} expects a positive integer`);
      return v;
    };
    switch (k) {
      case '--quick': o.quick = true; break;
      case '--rows': o.rows = val().split(','); break;
      case '--backends': o.backends = val().split(','); break;
      case '--repeat': o.repeat = int('--repeat'); break;
      case '--time': o.time = Number(val()); break;
      case '--exports': o.exports = int('--exports'); break;
      case '--workers': o.workers = int('--workers'); break;
      case '--churn': o.churn = int('--churn'); break;
      case '--paced-rate': o.pacedRate = Number(val()); break;
      case '--pin': o.pin = true; break;
      case '--nice': o.nice = Number(val()); if (!Number.isInteger(o.nice) || o.nice < -20 || o.nice > 19) throw new Error('--nice expects -20..19'); break;
      case '--write': o.write = true; break;
      case '--img': o.img = val(); break;
      case '-h': case '--help':
        console.log(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(1).filter((l, i, a) => a.slice(0, i + 1).every((x) => x.startsWith('//'))).join('\n'));
        process.exit(0);
      default: throw new Error(`unknown option ${a}`);
    }
  }
  for (const r of o.rows) if (!GROUPS.includes(r)) throw new Error(`unknown row group ${r} (${GROUPS.join(', ')})`);
  for (const b of o.backends) if (!NAMES[b]) throw new Error(`unknown backend ${b}`);
  if (o.exports < 4) throw new Error('--exports must be at least 4');
  o.repeat ??= o.quick ? 1 : 3;
  o.time ??= o.quick ? 3 : 10;
  if (!(o.time > 0)) throw new Error('--time must be > 0');
  o.ramp = 1;
  const nice = o.nice === null ? [] : ['nice', '-n', String(o.nice)];
  o.runBackend = [...nice, ...(o.pin ? ['taskset', '-c', '1'] : [])];
  o.runLoad = [...nice, ...(o.pin ? ['taskset', '-c', '0'] : [])];
  return o;
}

/** runs fn() `repeat` times; returns the per-key medians of the numeric fields, plus the runs */
async function repeated(label, repeat, fn) {
  const runs = [];
  for (let k = 0; k < repeat; k++) {
    process.stderr.write(`${label}${repeat > 1 ? ` [${k + 1}/${repeat}]` : ''} ... `);
    try {
      const r = await fn();
      runs.push(r);
      process.stderr.write(Object.entries(r).filter(([, v]) => typeof v === 'number').map(([key, v]) => `${key}=${fmt(v, 1)}`).join(' ') + '\n');
    } catch (e) {
      process.stderr.write(`FAILED: ${e.message}\n`);
      return { failure: e.message, runs };
    }
  }
  const out = { runs };
  for (const key of Object.keys(runs[0])) {
    if (typeof runs[0][key] === 'number') out[key] = median(runs.map((r) => r[key]));
    else out[key] = runs.map((r) => r[key]).flat();
  }
  return out;
}

// ---------------------------------------------------------------- table
const lowerIsBetter = (v, q) => (v > 0 && q > 0 ? ratio(v, q) : '—');
function cell(r, key, d = 1, unit = '') {
  if (!r) return '';
  if (r.failure) return `**FAIL**: ${r.failure.replace(/\|/g, '/').slice(0, 160)}`;
  return fmt(r[key], d) + unit;
}

function buildTable(res, o, meta) {
  const L = [];
  const row = (label, v, q, rat, target = '', met = '') => L.push(`| ${label} | ${v} | ${q} | ${rat} | ${target} | ${met} |`);
  const ok = (b) => (b === undefined ? '' : b ? 'yes' : '**no**');
  const n = o.exports;
  const V = (g) => res[g]?.vubd, Q = (g) => res[g]?.qsd;
  L.push('| measurement | vubd | QSD 7.2 | vubd/QSD | target (vubd) | met |', '|---|---:|---:|---:|---|---|');
  if (res.memory) {
    const v = V('memory'), q = Q('memory');
    row(`RSS, ${n} exports × 2 queues, ${n} frontends connected (VmRSS, MiB)`, cell(v, 'total'), cell(q, 'total'), lowerIsBetter(v?.total, q?.total), '≤ 120 MiB', ok(v && !v.failure ? v.total <= 120 : undefined));
    row(`  of that, guest memory the backend touched (RssShmem, MiB)`, cell(v, 'shmem'), cell(q, 'shmem'), '', '', '');
    row(`marginal RSS per export: slope of VmRSS over ${[1, 2, 3, 4].map((k) => Math.round((n * k) / 4)).join('/')} exports (MiB)`, cell(v, 'slope', 2), cell(q, 'slope', 2), lowerIsBetter(v?.slope, q?.slope), '≤ 1 MiB', ok(v && !v.failure ? v.slope <= 1 : undefined));
    row(`  average per export: (RSS(${n}) − RSS(no export)) / ${n} (MiB)`, cell(v, 'average', 2), cell(q, 'average', 2), lowerIsBetter(v?.average, q?.average));
    row(`  the same slope without guest memory (VmRSS − RssShmem, MiB)`, cell(v, 'slopeNoGuest', 2), cell(q, 'slopeNoGuest', 2), '', '', '');
    row(`  export ${n + 1} with its frontend: RSS(${n + 1}) − RSS(${n}) (MiB)`, cell(v, 'delta', 2), cell(q, 'delta', 2), '', '', '');
    row('RSS with no export yet (MiB)', cell(v, 'empty'), cell(q, 'empty'), lowerIsBetter(v?.empty, q?.empty));
    const sv = res.single?.vubd, sq = res.single?.qsd;
    row('one single-disk process, 2 queues, 1 frontend (MiB)', cell(sv, 'rss'), cell(sq, 'rss'), lowerIsBetter(sv?.rss, sq?.rss));
    const times = (r) => (r && !r.failure ? fmt(r.rss * n, 0) : cell(r, 'rss'));
    row(`  × ${n}: one process per disk (MiB)`, times(sv), times(sq), lowerIsBetter(sv?.rss, sq?.rss));
  }
  for (const g of ['throughput-null', 'throughput-file', 'throughput-paced']) {
    if (!res[g]) continue;
    const v = V(g), q = Q(g);
    const label = {
      'throughput-null': `null-co, ${n} exports, 4k randread QD8 each`,
      'throughput-file': `file (page cache), ${n} exports, 4k randread QD8 each`,
      'throughput-paced': `null-co, ${n} exports, 4k randread paced at ${2 * o.pacedRate} IOPS each (≤ QD8)`,
    }[g];
    row(`${label}: aggregate IOPS`, cell(v, 'iops', 0), cell(q, 'iops', 0), ratio(v?.iops, q?.iops));
    row(`  backend CPU (% of one core)`, cell(v, 'cpuPct', 0), cell(q, 'cpuPct', 0), ratio(v?.cpuPct, q?.cpuPct));
    row(`  IOPS per backend CPU-second`, cell(v, 'iopsPerCpu', 0), cell(q, 'iopsPerCpu', 0), ratio(v?.iopsPerCpu, q?.iopsPerCpu), '≥ 1.0× QSD',
      ok(v && q && !v.failure && !q.failure ? v.iopsPerCpu >= q.iopsPerCpu : undefined));
    row(`  p50 / p99 latency, all exports merged (µs)`, v?.failure ? cell(v) : `${cell(v, 'p50', 0)} / ${cell(v, 'p99', 0)}`, q?.failure ? cell(q) : `${cell(q, 'p50', 0)} / ${cell(q, 'p99', 0)}`, lowerIsBetter(v?.p99, q?.p99));
    row(`  backend RSS at the end of the window (MiB)`, cell(v, 'rss'), cell(q, 'rss'), lowerIsBetter(v?.rss, q?.rss));
    row(`  slowest / fastest export (IOPS)`, v?.failure ? '' : `${cell(v, 'minExport', 0)} / ${cell(v, 'maxExport', 0)}`, q?.failure ? '' : `${cell(q, 'minExport', 0)} / ${cell(q, 'maxExport', 0)}`, '');
  }
  for (const g of ['interference', 'interference-paced']) {
    if (!res[g]) continue;
    const v = V(g), q = Q(g);
    const m = n - 1;
    const how = g === 'interference' ? '4k randread QD8, as fast as they go' : `4k randread QD8 at ${2 * o.pacedRate} IOPS each (paced)`;
    row(`${m} exports under ${how}: p99 without churn (µs)`, cell(v, 'b99', 0), cell(q, 'b99', 0), lowerIsBetter(v?.b99, q?.b99));
    row(`  p99 while an export is added, used, deleted ${o.churn}× (µs)`, cell(v, 'c99', 0), cell(q, 'c99', 0), lowerIsBetter(v?.c99, q?.c99));
    row(`  p99 rise (µs)`, cell(v, 'rise', 0), cell(q, 'rise', 0), '', '< 1000 µs', ok(v && !v.failure ? v.rise < 1000 : undefined));
    row(`  p50 without / with churn (µs)`, v?.failure ? '' : `${cell(v, 'b50', 0)} / ${cell(v, 'c50', 0)}`, q?.failure ? '' : `${cell(q, 'b50', 0)} / ${cell(q, 'c50', 0)}`, '');
    row(`  failed requests of the ${m} exports (with churn + without)`, v?.failure ? cell(v) : fmt(v.failedChurn + v.failedBase), q?.failure ? cell(q) : fmt(q.failedChurn + q.failedBase), '', '0',
      ok(v && !v.failure ? v.failedChurn + v.failedBase === 0 : undefined));
    row(`  aggregate IOPS without / with churn`, v?.failure ? '' : `${cell(v, 'iopsBase', 0)} / ${cell(v, 'iopsChurn', 0)}`, q?.failure ? '' : `${cell(q, 'iopsBase', 0)} / ${cell(q, 'iopsChurn', 0)}`, '');
    row(`  one churn cycle: blockdev-add, block-export-add, 0.3 s run, block-export-del, blockdev-del (ms)`, cell(v, 'cycleMs', 0), cell(q, 'cycleMs', 0), lowerIsBetter(v?.cycleMs, q?.cycleMs));
    row(`  of that, the QMP commands (add and delete, incl. waiting for BLOCK_EXPORT_DELETED) (ms)`, cell(v, 'ctlMs', 0), cell(q, 'ctlMs', 0), lowerIsBetter(v?.ctlMs, q?.ctlMs));
  }
  if (res.startup) {
    const v = V('startup'), q = Q('startup'), qa = res.startup.qsdArgv, vc = res.startup.vubdConfig;
    row(`start-up, exec → ${n} sockets answer GET_FEATURES, exports added over QMP (ms)`, cell(v, 'ms', 0), cell(q, 'ms', 0), lowerIsBetter(v?.ms, q?.ms));
    row(`  of that, until QMP answers / until the last block-export-add returned (ms)`, v?.failure ? '' : `${cell(v, 'ctlMs', 0)} / ${cell(v, 'addedMs', 0)}`, q?.failure ? '' : `${cell(q, 'ctlMs', 0)} / ${cell(q, 'addedMs', 0)}`, '');
    row(`start-up from a file/command line (vubd --config; QSD ${n}× --blockdev/--export) (ms)`,
      vc ? cell(vc, 'ms', 0) : 'no --config on this build', cell(qa, 'ms', 0), vc ? lowerIsBetter(vc.ms, qa?.ms) : '');
  }
  const out = ['# vubd scale benchmark', ''];
  out.push(meta.join(' · '), '');
  out.push(...L, '');
  out.push(...NOTES(o));
  return out.join('\n') + '\n';
}

const NOTES = (o) => [
  'How: `scripts/bench/scale.mjs` (`npm run bench:scale`). Both daemons start with only a QMP socket (vubd `--control=SOCK --workers=' + o.workers + '`, QSD `--chardev socket,...,server=on,wait=off --monitor`) and get the same `blockdev-add` (null-co 1 GiB, reads zeroes; or file: the 1 GiB image, read-only so every node shares it; QSD `aio=io_uring`) and `block-export-add` (vhost-user-blk, 2 queues) commands. Every frontend is `scripts/bench/loadgen.c` (split rings, EVENT_IDX, waits on the call eventfd).',
  `Memory: exports added in four steps; after each step every new export gets a loadgen kept connected at 20 requests/s per queue (QD1, 2 queues), and VmRSS is the median of 5 samples 3 s later. "Marginal" is the least-squares slope over the four steps (export + its connected frontend); RssShmem is guest memory (loadgen's memfd) the backend touched, counted in VmRSS.`,
  `Throughput: ${o.exports} loadgens (2 queues × QD4 = QD8 per export: a 2-queue guest) held until all are set up and started together; ${o.time} s measured after a ${o.ramp} s ramp; backend CPU = utime+stime of all its threads over the window (100 % = one core). ${o.pin ? 'Pinned: the backend on CPU 1, every loadgen on CPU 0.' : 'Not pinned: on 2 cores pinning puts vubd\'s two workers on one core and the loadgens (which need more CPU than either backend) on the other, so both backends would be load-generator bound; the per-CPU-second figure is the comparison.'}`,
  `Interference: ${o.exports - 1} exports under the same QD8 load, once as fast as it goes (the machine saturates: p99 is mostly run-queue wait) and once paced at ${o.pacedRate} requests/s per queue (open loop, at most QD8 in flight) (percentiles from the loadgens' merged histograms); the churn export is a null-co node with one queue, a 0.3 s QD4 loadgen run, then block-export-del mode=safe (retried while its session closes), BLOCK_EXPORT_DELETED, blockdev-del. The run without churn follows in the same daemon for as long as the churn took.`,
  'Start-up: from spawn() of the daemon until every socket has answered a vhost-user GET_FEATURES; with QMP, the commands are sent one after another as soon as the control socket accepts.',
  (o.nice === null ? 'Not reniced.' : `Backends and loadgens ran under \`nice -n ${o.nice}\` (the machine is shared: without it other work's run-queue wait dominates every latency figure).`) + ` Medians of ${o.repeat} run(s), fresh daemons each run. The machine is shared with other work: see the load average above.`,
];

async function main() {
  const o = parseArgs(process.argv.slice(2));
  ensureLoadgen();
  if (!fs.existsSync(VUBD_MAIN)) throw new Error('dist/src/cli/main.js missing: run npm run build');
  if (o.rows.includes('throughput')) ensureImage(o.img);
  const load0 = os.loadavg();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-scale-'));
  const res = {};
  const each = async (group, label, fn) => {
    res[group] ??= {};
    for (const b of o.backends) res[group][b] = await repeated(`${label} / ${NAMES[b]}`, o.repeat, () => fn(b));
  };
  try {
    if (o.rows.includes('memory')) {
      await each('memory', `memory, ${o.exports} exports`, (b) => memoryRun(b, o, dir));
      await each('single', 'memory, one single-disk process', (b) => singleDiskRun(b, o, dir));
    }
    if (o.rows.includes('throughput')) {
      for (const disk of ['null', 'file']) await each(`throughput-${disk}`, `throughput, ${o.exports} × ${disk}`, (b) => throughputRun(b, disk, 0, o, dir));
      if (o.pacedRate > 0) await each('throughput-paced', `throughput, ${o.exports} × null paced`, (b) => throughputRun(b, 'null', o.pacedRate, o, dir));
    }
    if (o.rows.includes('interference')) {
      await each('interference', `interference, ${o.exports - 1} loaded + ${o.churn} churn cycles`, (b) => interferenceRun(b, 0, o, dir));
      if (o.pacedRate > 0) await each('interference-paced', `interference, ${o.exports - 1} paced + ${o.churn} churn cycles`, (b) => interferenceRun(b, o.pacedRate, o, dir));
    }
    if (o.rows.includes('startup')) {
      await each('startup', `start-up over QMP, ${o.exports} exports`, (b) => startupRun(b, 'qmp', o, dir));
      if (o.backends.includes('qsd')) res.startup.qsdArgv = await repeated('start-up, QSD command line', o.repeat, () => startupRun('qsd', 'argv', o, dir));
      if (o.backends.includes('vubd') && vubdHasConfig()) res.startup.vubdConfig = await repeated('start-up, vubd --config', o.repeat, () => startupRun('vubd', 'config', o, dir));
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const load1 = os.loadavg();
  const meta = [
    new Date().toISOString(),
    `${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'})`,
    `Node ${process.version}`,
    `load average ${load0.map((x) => x.toFixed(2)).join(' ')} at start, ${load1.map((x) => x.toFixed(2)).join(' ')} at end`,
    `\`npm run bench:scale -- ${process.argv.slice(2).join(' ')}\``.replace(/ `$/, '`'),
  ];
  const md = buildTable(res, o, meta);
  console.log(md);
  fs.mkdirSync(path.join(ROOT, 'scripts/bench/out'), { recursive: true });
  fs.writeFileSync(path.join(ROOT, 'scripts/bench/out/scale-results.json'), JSON.stringify({ options: o, meta, res }, null, 1));
  if (o.write) {
    fs.writeFileSync(path.join(ROOT, 'docs/bench-scale.md'), md);
    console.error('wrote docs/bench-scale.md');
  }
  const failed = Object.values(res).some((g) => Object.values(g).some((r) => r?.failure));
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => { console.error(`bench:scale: ${e.stack ?? e}`); process.exit(2); });
