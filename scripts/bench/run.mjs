#!/usr/bin/env node
// Benchmark: vubd vs qemu-storage-daemon (vhost-user-blk export), driven by scripts/bench/loadgen.c,
// a C vhost-user front-end that plays QEMU + guest driver (split or packed rings, EVENT_IDX, indirect descriptors).
//
//   node scripts/bench/run.mjs [--quick] [--time S] [--wait eventfd|spin] [--pin] [--write] [--rss-60]
//                              [--backends vubd,qsd] [--rows null,file|ROWID,...] [--img PATH] [--scrape HZ,...]
//
//   --quick      3 s per row (also env BENCH_QUICK=1); default 10 s (+1 s ramp, not measured)
//   --time S     seconds per row
//   --wait MODE  loadgen completion wait: eventfd (default; blocks on the call fd like a guest IRQ) or spin
//   --pin        backend on CPU 1, loadgen on CPU 0 (taskset); default: no pinning
//   --write      also write the table to docs/bench-latest.md
//   --rss-60     extra row: vubd RSS at start vs end of a 60 s 4k randread QD32 run
//   --backends   subset/order of backends (default vubd,qsd)
//   --rows       row ids or groups to run (default all): null-qd1,null-qd32,null-qd32-2q,file-randread,
//                file-randwrite,file-seqread64k,direct-randread,direct-randwrite,null-qd1-packed,
//                null-qd32-packed, null-qd32-log, null-qd32-scrape, rbd-randread, rbd-randwrite, nbd-randread,
//                rbd-randread-2q, rbd-randwrite-2q, nbd-randwrite, or null / file / direct / packed / log / scrape / rbd / nbd
//                (direct: O_DIRECT, vubd --cache=none; log: dirty logging on, as during a live migration;
//                scrape: vubd only, see --scrape; rbd: a Ceph cluster started for them, needs ceph-mon ceph-osd
//                ceph-common and vubd built with librbd-dev; nbd: an nbdkit memory server per row, vubd
//                driver=nbd vs QSD driver=nbd)
//                (packed rows: vubd only, loadgen --packed; their ratio columns are vubd packed ÷ vubd split)
//   --img PATH   raw image for the file rows (default /var/tmp/vubd-bench-1g.img; created once, 1 GiB)
//   --repeat N   run every row N times (fresh backend each time) and report the run with the median IOPS
//   --vubd-args 'ARGS'  extra vubd options for every vubd run, e.g. '--poll-us=20' (shown in the header)
//   --scrape HZ,...  rates of the null-qd32-scrape row (default 10,100): the same load with --metrics off, with
//                --metrics on and not scraped, and scraped at each rate (scripts/bench/scraper.mjs, one keep-alive
//                connection, on the loadgen's CPU with --pin); runs interleaved, IOPS ratios vs not scraped; and
//                per rate a run of >= 20 s alternating 1 s phases at that rate and at 1/s (ratio per phase pair)
//
// The backend is started fresh for every row. Backend CPU time comes from /proc/PID/stat (utime+stime,
// all threads) sampled over the measured window; RSS is VmRSS at the end of the run.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { HERE, ROOT, OUT, LOADGEN, LOGS, ensureLoadgen, ensureImage, procCpuSeconds, procStatus, fmt, ratio } from './common.mjs';

// ---------------------------------------------------------------- options
function parseArgs(argv) {
  const o = {
    time: 10, quick: process.env.BENCH_QUICK === '1', wait: 'eventfd', pin: false, write: false, rss60: false,
    backends: ['vubd', 'qsd'], rows: null, img: '/var/tmp/vubd-bench-1g.img', repeat: 1, vubdArgs: [], scrape: [10, 100],
  };
  let timeGiven = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [k, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const val = () => inline ?? argv[++i];
    switch (k) {
      case '--quick': o.quick = true; break;
      case '--time': o.time = Number(val()); timeGiven = true; break;
      case '--wait': o.wait = val(); break;
      case '--pin': o.pin = true; break;
      case '--write': o.write = true; break;
      case '--rss-60': o.rss60 = true; break;
      case '--backends': o.backends = val().split(','); break;
      case '--rows': o.rows = val().split(','); break;
      case '--img': o.img = val(); break;
      case '--repeat': o.repeat = Number(val()); break;
      case '--vubd-args': o.vubdArgs = val().split(/\s+/).filter(Boolean); break;
      case '--scrape': o.scrape = val().split(',').map(Number); break;
      case '-h': case '--help':
        console.log(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(1, 30).join('\n'));
        process.exit(0);
      default: throw new Error(`unknown option ${a}`);
    }
  }
  if (o.quick && !timeGiven) o.time = 3;
  if (!['eventfd', 'spin'].includes(o.wait)) throw new Error('--wait must be eventfd or spin');
  if (!(Number.isInteger(o.repeat) && o.repeat >= 1)) throw new Error('--repeat must be a positive integer');
  if (!(o.time > 0)) throw new Error('--time must be > 0');
  if (!o.scrape.every((hz) => hz > 0 && hz <= 1000)) throw new Error('--scrape takes rates between 1 and 1000 per second');
  for (const b of o.backends) if (!['vubd', 'qsd'].includes(b)) throw new Error(`unknown backend ${b}`);
  o.ramp = o.quick ? 0.5 : 1;
  return o;
}

const ROWS = [
  { id: 'null-qd1', group: 'null', label: 'null 4k randread QD1 1q', disk: 'null', lg: { rw: 'randread', bs: 4096, qd: 1, queues: 1 } },
  { id: 'null-qd32', group: 'null', label: 'null 4k randread QD32 1q', disk: 'null', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1 } },
  // Packed virtqueues (VIRTIO_F_RING_PACKED): vubd only (QSD 7.2 has none); ratios vs the split row `vs`.
  { id: 'null-qd1-packed', group: 'packed', label: 'null 4k randread QD1 1q packed', disk: 'null', backends: ['vubd'], vs: 'null-qd1', lg: { rw: 'randread', bs: 4096, qd: 1, queues: 1, packed: true } },
  { id: 'null-qd32-packed', group: 'packed', label: 'null 4k randread QD32 1q packed', disk: 'null', backends: ['vubd'], vs: 'null-qd32', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1, packed: true } },
  // Dirty logging on (loadgen --log: LOG_SHMFD bitmap, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG), as during a live migration.
  { id: 'null-qd32-log', group: 'log', label: 'null 4k randread QD32 1q, dirty logging on', disk: 'null', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1, log: true } },
  { id: 'null-qd32-2q', group: 'null', label: 'null 4k randread QD32 2q', disk: 'null', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 2 } },
  { id: 'file-randread', group: 'file', label: 'file 4k randread QD32', disk: 'file', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1 } },
  { id: 'file-randwrite', group: 'file', label: 'file 4k randwrite QD32', disk: 'file', lg: { rw: 'randwrite', bs: 4096, qd: 32, queues: 1 } },
  // O_DIRECT: every read reaches the disk (no page cache); vubd --cache=none vs QSD cache.direct=on,aio=io_uring.
  { id: 'direct-randread', group: 'direct', label: 'O_DIRECT 4k randread QD32', disk: 'direct', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1 } },
  { id: 'direct-randwrite', group: 'direct', label: 'O_DIRECT 4k randwrite QD32', disk: 'direct', lg: { rw: 'randwrite', bs: 4096, qd: 32, queues: 1 } },
  // Ceph RBD through librbd on a throwaway one-mon one-memstore-OSD cluster started for these rows
  // (vubd --blk-file=rbd:... --cache=none vs QSD driver=rbd,cache.direct=on: rbd_cache off in both).
  { id: 'rbd-randread', group: 'rbd', label: 'rbd 4k randread QD32', disk: 'rbd', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1 } },
  { id: 'rbd-randwrite', group: 'rbd', label: 'rbd 4k randwrite QD32', disk: 'rbd', lg: { rw: 'randwrite', bs: 4096, qd: 32, queues: 1 } },
  // two queues (two workers) on one image: the image handle shared through RbdQueues (VUBD_RBD_HANDLES=own: one handle per queue)
  { id: 'rbd-randread-2q', group: 'rbd', label: 'rbd 4k randread QD32 2q', disk: 'rbd', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 2 } },
  { id: 'rbd-randwrite-2q', group: 'rbd', label: 'rbd 4k randwrite QD32 2q', disk: 'rbd', lg: { rw: 'randwrite', bs: 4096, qd: 32, queues: 2 } },
  { id: 'file-seqread64k', group: 'file', label: 'file 64k seq read QD32', disk: 'file', lg: { rw: 'read', bs: 65536, qd: 32, queues: 1 } },
  // The cost of scraping --metrics: expanded into one row per variant by scrapeVariants().
  { id: 'null-qd32-scrape', group: 'scrape', label: 'null 4k randread QD32 1q', disk: 'null', backends: ['vubd'], scrape: true, lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1 } },
  // NBD client node: vubd driver=nbd (blockdev-add over QMP) vs QSD driver=nbd, both on a fresh nbdkit memory server (unix socket)
  { id: 'nbd-randread', group: 'nbd', label: 'nbd (nbdkit memory) 4k randread QD32', disk: 'nbd', lg: { rw: 'randread', bs: 4096, qd: 32, queues: 1 } },
  { id: 'nbd-randwrite', group: 'nbd', label: 'nbd (nbdkit memory) 4k randwrite QD32', disk: 'nbd', lg: { rw: 'randwrite', bs: 4096, qd: 32, queues: 1 } },
];

/** Phases of the alternating variants (ms), and their run length (s, at least) */
const ALTERNATE_MS = 1000;
const ALTERNATE_MIN_S = 20;

/**
 * The scrape row's variants: --metrics off, on and not scraped, scraped at each rate (whole runs,
 * ratios vs not scraped), and per rate one run alternating 1 s phases at that rate and at 1/s, whose
 * phase-by-phase ratio does not depend on the machine's load staying the same from run to run.
 */
function scrapeVariants(row, rates, opts) {
  const base = `${row.id}@0`;
  const vs = { vs: base, vsNote: ' vs not scraped', scrapeLabel: row.label };
  return [
    { ...row, ...vs, id: `${row.id}@off`, label: `${row.label}, --metrics off`, metrics: false, hz: 0 },
    { ...row, id: base, label: `${row.label}, --metrics on, not scraped`, metrics: true, hz: 0, scrapeLabel: row.label },
    ...rates.map((hz) => ({ ...row, ...vs, id: `${row.id}@${hz}`, label: `${row.label}, scraped ${hz}/s`, metrics: true, hz })),
    ...rates.map((hz) => ({
      ...row, ...vs, id: `${row.id}@ab${hz}`, label: `${row.label}, ${ALTERNATE_MS / 1000} s at ${hz}/s, ${ALTERNATE_MS / 1000} s at 1/s, alternating`,
      metrics: true, hz, alternate: ALTERNATE_MS, time: Math.max(ALTERNATE_MIN_S, opts.time),
    })),
  ];
}

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

function runScraper(port, hz, opts, seconds, extra = []) {
  const argv = [process.execPath, path.join(HERE, 'scraper.mjs'), String(port), String(hz), String(seconds), ...extra];
  const cmd = opts.pin ? ['taskset', '-c', '0', ...argv] : argv;
  const p = spawn(cmd[0], cmd.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  p.stdout.on('data', (d) => (out += d));
  return new Promise((res) => p.on('close', () => {
    try { res(JSON.parse(out.trim().split('\n').pop())); } catch { res({ error: `scraper printed ${JSON.stringify(out)}` }); }
  }));
}

// ---------------------------------------------------------------- helpers
/** extra vubd options (--vubd-args) */
let VUBD_ARGS = [];
/** the Ceph cluster of the rbd rows (test/helpers/ceph-cluster.ts), started once */
let CEPH = null;
const RBD_IMAGE = 'bench';
const RBD_SIZE = 256 * 2 ** 20;

async function startCeph() {
  const { CephCluster, cephProblem } = await import(path.join(ROOT, 'dist/test/helpers/ceph-cluster.js'));
  const problem = cephProblem();
  if (problem) throw new Error(`rbd rows: ${problem}`);
  console.error('starting a one-mon one-OSD Ceph cluster for the rbd rows');
  const c = await CephCluster.start({ images: { [RBD_IMAGE]: RBD_SIZE } });
  // Written once, so reads reach objects instead of answering zeroes for absent ones.
  await c.rbd(['bench', '--io-type', 'write', '--io-pattern', 'seq', '--io-size', '4M', '--io-threads', '4', '--io-total', String(RBD_SIZE), `${c.pool}/${RBD_IMAGE}`], 300000);
  return c;
}

function backendArgv(backend, disk, sock, img, numQueues = 2, nbdSock = '') {
  if (disk === 'nbd') {
    // vubd: the node and export come over QMP (nbdExport below); QSD: on its command line
    if (backend === 'vubd') return ['node', path.join(ROOT, 'dist/src/cli/main.js'), `--control=${sock}.qmp`, '--log-level=warn', ...VUBD_ARGS];
    return ['qemu-storage-daemon', '--blockdev', `driver=nbd,node-name=n0,server.type=unix,server.path=${nbdSock},export=`,
      '--export', `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${sock},writable=on,num-queues=${numQueues}`];
  }
  if (backend === 'vubd') {
    const a = ['node', path.join(ROOT, 'dist/src/cli/main.js'), `--socket-path=${sock}`];
    if (disk === 'null') a.push('--blk-driver=null', '--size=8G');
    else if (disk === 'rbd') a.push(`--blk-file=rbd:${CEPH.pool}/${RBD_IMAGE}:conf=${CEPH.conf}`);
    else a.push(`--blk-file=${img}`);
    if (disk === 'direct' || disk === 'rbd') a.push('--cache=none');
    a.push(`--num-queues=${numQueues}`, '--log-level=warn', ...VUBD_ARGS);
    return a;
  }
  const exp = (node) => `type=vhost-user-blk,id=e0,node-name=${node},addr.type=unix,addr.path=${sock},writable=on,num-queues=${numQueues}`;
  if (disk === 'rbd') {
    return ['qemu-storage-daemon', '--blockdev', `driver=rbd,node-name=r0,pool=${CEPH.pool},image=${RBD_IMAGE},conf=${CEPH.conf},cache.direct=on`, '--export', exp('r0')];
  }
  if (disk === 'null') {
    return ['qemu-storage-daemon', '--blockdev', 'driver=null-co,node-name=n0,size=8589934592,read-zeroes=on', '--export', exp('n0')];
  }
  return ['qemu-storage-daemon',
    '--blockdev', `driver=file,node-name=f0,filename=${img},aio=io_uring,cache.direct=${disk === 'direct' ? 'on' : 'off'}`,
    '--blockdev', 'driver=raw,node-name=r0,file=f0', '--export', exp('r0')];
}

class Backend {
  constructor(name, argv, opts, logName) {
    this.name = name;
    const cmd = opts.pin ? ['taskset', '-c', '1', ...argv] : argv;
    this.logPath = path.join(LOGS, `${logName}.log`);
    this.log = fs.openSync(this.logPath, 'w');
    this.proc = spawn(cmd[0], cmd.slice(1), { cwd: ROOT, stdio: ['ignore', this.log, this.log] });
    this.exited = null;
    this.exitPromise = new Promise((res) => this.proc.on('exit', (code, sig) => { this.exited = { code, sig }; res(this.exited); }));
  }
  get pid() { return this.proc.pid; }
  async waitSocket(sock, timeoutMs = 15000) {
    const t0 = Date.now();
    while (Date.now() - t0 < timeoutMs) {
      if (this.exited) throw new Error(`${this.name} exited early (${JSON.stringify(this.exited)}); log: ${this.tail()}`);
      try { if (fs.statSync(sock).isSocket()) { await sleep(100); return; } } catch {}
      await sleep(25);
    }
    throw new Error(`${this.name}: socket ${sock} did not appear within ${timeoutMs} ms`);
  }
  tail(n = 800) {
    try { const s = fs.readFileSync(this.logPath, 'utf8'); return s.slice(-n).trim() || '(empty)'; } catch { return '(no log)'; }
  }
  async stop() {
    if (!this.exited) {
      this.proc.kill('SIGTERM');
      const r = await Promise.race([this.exitPromise, sleep(5000).then(() => null)]);
      if (!r) {
        console.error(`  ${this.name} did not exit within 5 s of SIGTERM; SIGKILL`);
        this.proc.kill('SIGKILL');
        await this.exitPromise;
        this.killed = true;
      }
    }
    fs.closeSync(this.log);
    return this.exited;
  }
}

function runLoadgen(sock, lg, opts, seconds) {
  const args = ['--socket', sock, '--queues', String(lg.queues), '--qd', String(lg.qd), '--bs', String(lg.bs),
    '--rw', lg.rw, '--time', String(seconds), '--ramp', String(opts.ramp), '--wait', opts.wait];
  if (lg.packed) args.push('--packed');
  if (lg.log) args.push('--log');
  const cmd = opts.pin ? ['taskset', '-c', '0', LOADGEN, ...args] : [LOADGEN, ...args];
  const p = spawn(cmd[0], cmd.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout.on('data', (d) => (out += d));
  p.stderr.on('data', (d) => (err += d));
  const timer = setTimeout(() => p.kill('SIGKILL'), (seconds + opts.ramp + 40) * 1000);
  const done = new Promise((res) => p.on('close', (code, sig) => {
    clearTimeout(timer);
    let json = null;
    try { json = JSON.parse(out.trim().split('\n').pop()); } catch {}
    res({ code, sig, json, stderr: err.trim(), cmd: cmd.join(' ') });
  }));
  return { proc: p, done };
}

/** an nbdkit memory server on a unix socket, in the foreground (no pinning: it is the "storage cluster") */
async function startNbdkit(sock) {
  fs.rmSync(sock, { force: true });
  const p = spawn('nbdkit', ['--foreground', '--exit-with-parent', '--unix', sock, 'memory', 'size=1G'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const t0 = Date.now();
  while (!fs.existsSync(sock)) {
    if (p.exitCode !== null || Date.now() - t0 > 10000) throw new Error('nbdkit did not start (Debian package nbdkit)');
    await sleep(20);
  }
  return p;
}

/** vubd: blockdev-add driver=nbd + block-export-add over its control socket */
async function nbdExport(ctrl, sock, nbdSock, numQueues = 2) {
  const { QmpClient } = await import(path.join(ROOT, 'dist/src/control/qmp-client.js'));
  const qmp = await QmpClient.connect(ctrl);
  try {
    await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'n0', server: { type: 'unix', path: nbdSock }, export: '' });
    await qmp.execute('block-export-add', { type: 'vhost-user-blk', id: 'e0', 'node-name': 'n0', addr: { type: 'unix', path: sock }, writable: true, 'num-queues': numQueues });
  } finally {
    qmp.close();
  }
}

// Runs one row on one backend; returns a result object (ok or failure description).
async function runRow(row, backend, opts, tmp) {
  const sock = path.join(tmp, `${backend}.sock`);
  fs.rmSync(sock, { force: true });
  const nbdSock = path.join(tmp, 'nbdkit.sock');
  const nbdkit = row.disk === 'nbd' ? await startNbdkit(nbdSock) : null;
  const argv = backendArgv(backend, row.disk, sock, opts.img, 2, nbdSock);
  if (row.lg?.packed && backend === 'vubd') argv.push('--ring-packed'); // vubd offers packed rings only when asked
  const metricsPort = row.metrics ? await freePort() : 0;
  if (row.metrics) argv.push(`--metrics=127.0.0.1:${metricsPort}`);
  const be = new Backend(backend, argv, opts, `${row.id.replace('@', '-')}-${backend}`);
  const res = { row, backend };
  try {
    if (row.disk === 'nbd' && backend === 'vubd') {
      await be.waitSocket(`${sock}.qmp`);
      await nbdExport(`${sock}.qmp`, sock, nbdSock);
    }
    await be.waitSocket(sock);
    const seconds = row.time ?? opts.time;
    const lg = runLoadgen(sock, row.lg, opts, seconds);
    // Constant rate: from the start of the ramp to the end of the measured window, so every measured
    // second is scraped. Alternating: phases only after the ramp.
    const scraper = !(row.hz > 0) ? null
      : row.alternate ? sleep(opts.ramp * 1000).then(() => runScraper(metricsPort, row.hz, opts, seconds, ['--alternate', String(row.alternate), '--pid', String(be.pid)]))
      : runScraper(metricsPort, row.hz, opts, opts.ramp + seconds);
    // Sample backend CPU over the loadgen's measured window (after ramp, until just before the end).
    const t0 = performance.now();
    const win0 = opts.ramp * 1000 + 100, win1 = (opts.ramp + seconds) * 1000 - 100;
    let cpu0, cpu1, w0, w1;
    const sampler = (async () => {
      await sleep(win0 - (performance.now() - t0));
      if (be.exited) return;
      cpu0 = procCpuSeconds(be.pid); w0 = performance.now();
      await sleep(win1 - (performance.now() - t0));
      if (be.exited) return;
      cpu1 = procCpuSeconds(be.pid); w1 = performance.now();
      res.rssMiB = procStatus(be.pid, 'VmRSS');
      res.hwmMiB = procStatus(be.pid, 'VmHWM');
    })();
    const r = await lg.done;
    await sampler;
    if (scraper) res.scrape = await scraper;
    res.loadgen = r;
    if (be.exited) res.backendExit = be.exited;
    if (r.json && !r.json.error && r.code === 0 && cpu1 !== undefined) {
      const cpuS = cpu1 - cpu0, wallS = (w1 - w0) / 1000;
      Object.assign(res, r.json, { ok: true, cpuPct: (100 * cpuS) / wallS, iopsPerCpuS: cpuS > 0 ? r.json.iops / (cpuS / wallS) : Infinity });
      if (r.json.errors > 0 || r.json.vring_base_mismatch > 0) res.warn = `errors=${r.json.errors} vring_base_mismatch=${r.json.vring_base_mismatch}`;
      if (res.scrape && (res.scrape.error || res.scrape.failures > 0)) {
        res.warn = (res.warn ? res.warn + '; ' : '') + `scrapes failed: ${res.scrape.error ?? `${res.scrape.failures} (${res.scrape.lastError})`}`;
      }
    } else {
      res.ok = false;
      res.failure = r.json?.stalled_queue >= 0 ? `stall on queue ${r.json.stalled_queue}` : `loadgen exit ${r.code ?? r.sig}`;
      // setup failures (exit 2) say why on their last stderr line, e.g. RING_PACKED not offered
      if (r.code === 2 && r.stderr) res.failure += `: ${r.stderr.split('\n').pop().replace(/^loadgen: /, '')}`;
      if (be.exited) res.failure += `; backend exited ${JSON.stringify(be.exited)}`;
    }
  } catch (e) {
    res.ok = false;
    res.failure = e.message;
  }
  const ex = await be.stop();
  if (nbdkit) {
    nbdkit.kill('SIGTERM');
    await new Promise((r) => (nbdkit.exitCode !== null ? r() : nbdkit.once('exit', r)));
  }
  if (be.killed) res.warn = (res.warn ? res.warn + '; ' : '') + 'needed SIGKILL to exit';
  else if (ex && ex.code !== 0 && ex.sig !== 'SIGTERM' && res.ok) res.warn = (res.warn ? res.warn + '; ' : '') + `exit ${ex.code ?? ex.sig} after SIGTERM`;
  res.logTail = be.tail(600);
  return res;
}

async function idleRss(backend, opts, tmp, queues = 4) {
  const sock = path.join(tmp, `${backend}-idle.sock`);
  fs.rmSync(sock, { force: true });
  const be = new Backend(backend, backendArgv(backend, 'null', sock, opts.img, queues), opts, `idle-rss-${backend}`);
  try {
    await be.waitSocket(sock);
    await sleep(2000);
    return { rss: procStatus(be.pid, 'VmRSS') };
  } catch (e) {
    return { failure: e.message };
  } finally {
    await be.stop();
  }
}

async function rss60(opts, tmp) {
  const seconds = 60;
  const sock = path.join(tmp, 'vubd-rss60.sock');
  fs.rmSync(sock, { force: true });
  const be = new Backend('vubd', backendArgv('vubd', 'null', sock, opts.img), opts, 'rss60-vubd');
  try {
    await be.waitSocket(sock);
    const before = procStatus(be.pid, 'VmRSS');
    const lg = runLoadgen(sock, { rw: 'randread', bs: 4096, qd: 32, queues: 1 }, { ...opts, ramp: 0 }, seconds);
    const samples = [];
    const sampler = (async () => {
      for (let t = 1; t <= seconds - 1; t += t < 5 ? 4 : 5) {
        await sleep((t - (samples.at(-1)?.t ?? 0)) * 1000);
        if (be.exited) return;
        samples.push({ t, rss: procStatus(be.pid, 'VmRSS') });
      }
    })();
    const r = await lg.done;
    await sampler;
    const after = be.exited ? NaN : procStatus(be.pid, 'VmRSS');
    return { before, start: samples[0]?.rss, end: samples.at(-1)?.rss, after, samples, json: r.json, code: r.code };
  } catch (e) {
    return { failure: e.message };
  } finally {
    await be.stop();
  }
}

// Newest mtime under dist/ (vubd may be rebuilt while we run; we say so in the report).
function distStamp() {
  let newest = 0;
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.js')) newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  try { walk(path.join(ROOT, 'dist/src')); } catch {}
  return newest;
}

// ---------------------------------------------------------------- report

function table(results, opts, extras) {
  const lines = [];
  lines.push(`| row | backend | IOPS | p50 µs | p99 µs | CPU % | IOPS/CPU-s | RSS MiB | vubd/QSD IOPS/CPU-s | vubd/QSD p50 |`);
  lines.push(`|---|---|---:|---:|---:|---:|---:|---:|---:|---:|`);
  for (const row of ROWS) {
    const rs = results.filter((r) => r.row === row);
    if (!rs.length) continue;
    const v = rs.find((r) => r.backend === 'vubd' && r.ok);
    // packed rows compare to vubd on the split row they mirror; the others to QSD on the same row
    const q = row.vs ? results.find((r) => r.row.id === row.vs && r.backend === 'vubd' && r.ok) : rs.find((r) => r.backend === 'qsd' && r.ok);
    const vsNote = row.vs ? (row.vsNote ?? ' vs split') : '';
    for (const r of rs) {
      const name = r.backend === 'qsd' ? 'QSD 7.2' : 'vubd';
      if (!r.ok) {
        lines.push(`| ${row.label} | ${name} | **FAIL**: ${String(r.failure).replace(/\|/g, '/')} | | | | | | | |`);
        continue;
      }
      const isV = r.backend === 'vubd';
      const note = r.warn ? ` ⚠ ${r.warn}` : '';
      lines.push(`| ${row.label} | ${name}${note} | ${fmt(r.iops)} | ${fmt(r.p50_us, 1)} | ${fmt(r.p99_us, 1)} | ${fmt(r.cpuPct, 0)} | ${fmt(r.iopsPerCpuS)} | ${fmt(r.rssMiB, 1)} | ${isV && q ? ratio(v.iopsPerCpuS, q.iopsPerCpuS) + vsNote : ''} | ${isV && q ? ratio(v.p50_us, q.p50_us) + vsNote : ''} |`);
    }
  }
  const out = [];
  out.push(`# vubd benchmark (latest)`);
  out.push('');
  out.push(`${new Date().toISOString()} · ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}) · Node ${process.version} · ` +
    `${opts.time} s per row (+${opts.ramp} s ramp)${opts.repeat > 1 ? `, median IOPS of ${opts.repeat} runs` : ''} · loadgen wait=${opts.wait}${opts.vubdArgs.length ? ` · vubd ${opts.vubdArgs.join(' ')}` : ''} · ${opts.pin ? 'pinned: backend CPU 1, loadgen CPU 0' : 'not pinned'}`);
  out.push('');
  out.push('Load generator: `scripts/bench/loadgen.c` (vhost-user front-end, split rings or packed rings for "packed" rows, EVENT_IDX, indirect descriptors for >3-descriptor requests, 2 memfd regions). ' +
    'CPU % = backend utime+stime over the measured window (100 % = one core). Ratios: vubd ÷ QSD (IOPS/CPU-s higher is better; p50 lower is better); ' +
    '"packed" rows (loadgen `--packed`, VIRTIO_F_RING_PACKED; vubd only, QSD 7.2 has no packed rings) compare vubd packed ÷ vubd split on the same workload. ' +
    'rbd rows: a 256 MiB image (written once) on a one-mon one-memstore-OSD Ceph 16 cluster on this host (the OSD\'s CPU is not counted), vubd `--blk-file=rbd:... --cache=none` vs QSD `driver=rbd,cache.direct=on` (rbd_cache off in both). ' +
    'null rows: 8 GiB null disk (`null-co,read-zeroes=on` / `--blk-driver=null`); file rows: 1 GiB raw image in page cache (QSD: `aio=io_uring,cache.direct=off`); O_DIRECT rows: the same image, not through the page cache (vubd `--cache=none`, QSD `aio=io_uring,cache.direct=on`); ' +
    'nbd rows: a fresh `nbdkit memory size=1G` on a unix socket per run (its CPU is not counted), vubd `blockdev-add driver=nbd` over QMP vs QSD `--blockdev driver=nbd`.');
  out.push('');
  out.push(...lines);
  if (extras.length) { out.push(''); out.push(...extras); }
  return out.join('\n') + '\n';
}

/** Minimal QMP client for set-up: newline-delimited JSON on a unix socket, one command at a time. */
async function qmpSession(sockPath) {
  const sock = net.createConnection(sockPath);
  let buf = '';
  const waiters = [];
  sock.setEncoding('utf8');
  sock.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line) continue;
      const msg = JSON.parse(line);
      if (msg.event) continue;
      waiters.shift()?.(msg);
    }
  });
  const next = () => new Promise((r) => waiters.push(r));
  await next(); // greeting
  const execute = async (cmd, args) => {
    const reply = next();
    sock.write(JSON.stringify({ execute: cmd, ...(args ? { arguments: args } : {}) }) + '\n');
    const r = await reply;
    if (r.error) throw new Error(`${cmd}: ${r.error.desc}`);
    return r.return;
  };
  await execute('qmp_capabilities');
  return { execute, close: () => sock.destroy() };
}

/** vubd CPU time per scrape, idle, with one export of 2 queues and with 32 exports of 2 queues (one daemon). */
async function scrapeCpu(opts, tmp) {
  const out = [];
  for (const exports of [1, 32]) {
    const port = await freePort();
    const control = path.join(tmp, `scrape-cpu-${exports}.qmp`);
    fs.rmSync(control, { force: true });
    const argv = ['node', path.join(ROOT, 'dist/src/cli/main.js'), `--control=${control}`, `--metrics=127.0.0.1:${port}`, '--log-level=warn', ...VUBD_ARGS];
    const be = new Backend('vubd', argv, opts, `scrape-cpu-${exports}`);
    try {
      await be.waitSocket(control);
      const qmp = await qmpSession(control);
      for (let i = 0; i < exports; i++) {
        await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': `n${i}`, size: GiB });
        await qmp.execute('block-export-add', { type: 'vhost-user-blk', id: `e${i}`, 'node-name': `n${i}`, addr: { type: 'unix', path: path.join(tmp, `scrape-cpu-e${i}.sock`) }, writable: true, 'num-queues': 2 });
      }
      qmp.close();
      const args = [process.execPath, path.join(HERE, 'scraper.mjs'), String(port), '--cpu-per-scrape', '500', '--pid', String(be.pid)];
      const cmd = opts.pin ? ['taskset', '-c', '0', ...args] : args;
      const r = spawnSync(cmd[0], cmd.slice(1), { encoding: 'utf8' });
      const j = JSON.parse(r.stdout.trim().split('\n').pop());
      out.push({ exports, ...j });
    } catch (e) {
      out.push({ exports, failure: e.message });
    } finally {
      await be.stop();
    }
  }
  return out;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : NaN;
};
const pct = (ratio) => `${ratio >= 1 ? '+' : ''}${((ratio - 1) * 100).toFixed(1)} %`;

/**
 * The scrape cost: whole runs (median IOPS ÷ not scraped) and the alternating runs (median over
 * every scraped phase of its IOPS ÷ the mean of the unscraped phases either side; all repetitions).
 */
function scrapeSummary(results, all) {
  const rs = results.filter((r) => r.row.scrape && r.ok);
  if (!results.some((r) => r.row.scrape)) return null;
  const base = rs.find((r) => r.row.metrics && r.row.hz === 0);
  const whole = !base ? ['no ratios: the unscraped run failed'] : rs.filter((r) => r !== base && !r.row.alternate).map((r) => {
    if (!r.row.metrics) return `--metrics off ${fmt(r.iops)} IOPS (${pct(r.iops / base.iops)})`;
    const s = r.scrape ?? {};
    return `${r.row.hz}/s ${fmt(r.iops)} IOPS (${pct(r.iops / base.iops)}; ${fmt(s.hz, 1)} scrapes/s done, p50 ${fmt(s.p50_ms, 2)} ms, ${fmt(s.bytes / 1024, 1)} KiB each, scraper CPU ${fmt(s.client_cpu_ms, 2)} ms each)`;
  });
  const ab = rs.filter((r) => r.row.alternate).map((r) => {
    const runs = all.filter((x) => x.row === r.row && x.ok && x.scrape?.ratios);
    const ratios = runs.flatMap((x) => x.scrape.ratios);
    const cpu = runs.flatMap((x) => x.scrape.cpuDiffs);
    const done = median(runs.map((x) => x.scrape.hz * 2 - 1)); // scraped phases' rate: the mean rate is (hz + 1) / 2
    return `${r.row.hz}/s vs 1/s: IOPS ${pct(median(ratios))} (median of ${ratios.length} phase pairs, ${fmt(Math.min(...ratios) * 100 - 100, 1)} % to ${fmt(Math.max(...ratios) * 100 - 100, 1)} %), ` +
      `backend CPU ${fmt(median(cpu), 1)} points, ${fmt(done, 0)} scrapes/s reached`;
  });
  const label = results.find((r) => r.row.scrape).row.scrapeLabel;
  return `Scrape cost (${label}): whole runs, median IOPS: not scraped ${base ? fmt(base.iops) : '—'}; ${whole.join(' · ')}. ` +
    (ab.length ? `Alternating ${ALTERNATE_MS / 1000} s phases in one run (IOPS from vubd's counters): ${ab.join(' · ')}. ` : '') +
    'Negative is a cost. Scraper: scripts/bench/scraper.mjs, one keep-alive connection, on the loadgen\'s CPU when pinned.';
}

// ---------------------------------------------------------------- main
async function main() {
  const opts = parseArgs(process.argv.slice(2));
  VUBD_ARGS = opts.vubdArgs;
  ensureLoadgen();
  fs.mkdirSync(LOGS, { recursive: true });
  if (opts.backends.includes('vubd') && !fs.existsSync(path.join(ROOT, 'dist/src/cli/main.js'))) throw new Error('dist/src/cli/main.js missing: run npm run build');
  // The scrape row becomes its variants, run interleaved (off, 0, 10/s, 100/s, off, 0, ...) so that a
  // machine getting busier during the run does not land on one variant.
  const at = ROWS.findIndex((r) => r.scrape);
  const scrapeRow = ROWS[at];
  ROWS.splice(at, 1, ...scrapeVariants(scrapeRow, opts.scrape, opts));
  const picked = (r) => !opts.rows || opts.rows.includes(r.id) || opts.rows.includes(r.group) || (r.scrape && opts.rows.includes(scrapeRow.id));
  const rows = ROWS.filter(picked);
  const groups = [];
  for (const row of rows) {
    if (row.scrape && groups.at(-1)?.[0].scrape) groups.at(-1).push(row);
    else groups.push([row]);
  }
  if (rows.some((r) => r.disk === 'file' || r.disk === 'direct')) ensureImage(opts.img);
  if (rows.some((r) => r.disk === 'rbd')) {
    try {
      CEPH = await startCeph();
    } catch (e) {
      // The other rows still run; asked for explicitly, the rbd rows' absence is an error.
      console.error(`bench: skipping the rbd rows: ${e.message}`);
      if (opts.rows) process.exitCode = 1;
      for (let i = rows.length - 1; i >= 0; i--) if (rows[i].disk === 'rbd') rows.splice(i, 1);
      for (let g = groups.length - 1; g >= 0; g--) if (groups[g][0].disk === 'rbd') groups.splice(g, 1);
    }
  }
  const dist0 = distStamp();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-bench-'));
  const results = [];
  const allRuns = [];
  try {
    for (const group of groups) {
      for (const backend of opts.backends) {
        const members = group.filter((row) => !row.backends || row.backends.includes(backend));
        if (!members.length) continue;
        const runs = new Map(members.map((row) => [row, []]));
        for (let k = 0; k < opts.repeat; k++) {
          for (const row of members) {
            const mine = runs.get(row);
            if (mine.some((x) => !x.ok)) continue;
            process.stderr.write(`${row.label} / ${backend}${opts.repeat > 1 ? ` [${k + 1}/${opts.repeat}]` : ''} ... `);
            const one = await runRow(row, backend, opts, tmp);
            mine.push(one);
            allRuns.push(one);
            const ab = one.scrape?.ratios ? `, scraped phases ${one.scrape.ratios.map((x) => pct(x)).join(' ')}` : '';
            const scraped = one.scrape ? `, ${fmt(one.scrape.hz, 1)} scrapes/s p50 ${fmt(one.scrape.p50_ms, 2)} ms${ab}` : '';
            if (one.ok && (opts.repeat > 1 || members.length > 1)) process.stderr.write(`${fmt(one.iops)} IOPS p50 ${fmt(one.p50_us, 1)} µs CPU ${fmt(one.cpuPct)} %${scraped}\n`);
            else if (!one.ok) process.stderr.write('\n');
          }
        }
        for (const row of members) {
          const mine = runs.get(row);
          // median by IOPS (any failure wins: it is what gets reported)
          const failed = mine.find((x) => !x.ok);
          const r = failed ?? mine.sort((a, b) => a.iops - b.iops)[Math.floor((mine.length - 1) / 2)];
          if (!failed && mine.length > 1) r.spread = `${fmt(mine[0].iops)}–${fmt(mine.at(-1).iops)}`;
          if (opts.repeat > 1 || members.length > 1) process.stderr.write(`  => ${members.length > 1 ? row.label + ': ' : ''}median `);
          results.push(r);
          if (r.ok) process.stderr.write(`${fmt(r.iops)} IOPS p50 ${fmt(r.p50_us, 1)} µs p99 ${fmt(r.p99_us, 1)} µs CPU ${fmt(r.cpuPct)} %${r.warn ? ' ⚠ ' + r.warn : ''}\n`);
          else {
            process.stderr.write(`FAILED: ${r.failure}\n`);
            if (r.loadgen?.stderr) process.stderr.write(`  loadgen stderr: ${r.loadgen.stderr.split('\n').join('\n  ')}\n`);
            process.stderr.write(`  ${backend} log tail: ${r.logTail}\n`);
          }
        }
      }
    }
    const extras = [];
    const scrapeLine = scrapeSummary(results, allRuns);
    if (scrapeLine) {
      process.stderr.write('vubd CPU per scrape, idle, 1 and 32 exports of 2 queues ... ');
      const cpu = await scrapeCpu(opts, tmp);
      const text = cpu.map((c) => c.failure ? `${c.exports} export(s): FAIL ${c.failure}` :
        `${c.exports} export${c.exports > 1 ? 's' : ''}: ${fmt(c.cpu_ms, 2)} ms (${fmt(c.bytes / 1024, 0)} KiB; at 10/s ${fmt(c.cpu_ms, 1)} %, at 100/s ${fmt(c.cpu_ms * 10, 0)} % of a core; ` +
        `a GET / with no stats ${fmt(c.http_cpu_ms, 2)} ms)`).join(' · ');
      process.stderr.write(text + '\n');
      extras.push(scrapeLine + ` vubd CPU time per scrape (500 back to back, idle daemon): ${text}.`);
    }
    if (opts.backends.length) {
      const idle = [];
      for (const b of opts.backends) {
        process.stderr.write(`idle RSS, 4 queues / ${b} ... `);
        const r = await idleRss(b, opts, tmp, 4);
        process.stderr.write(r.failure ? `FAILED: ${r.failure}\n` : `${fmt(r.rss, 1)} MiB\n`);
        idle.push(`${b === 'qsd' ? 'QSD 7.2' : 'vubd'} ${r.failure ? 'FAIL: ' + r.failure : fmt(r.rss, 1) + ' MiB'}`);
      }
      extras.push(`Idle RSS (null disk, 4 queues, 2 s after start, no front-end connected): ${idle.join(' · ')}`);
    }
    if (opts.rss60) {
      process.stderr.write('vubd RSS over a 60 s null 4k randread QD32 run ... ');
      const r = await rss60(opts, tmp);
      if (r.failure) { process.stderr.write(`FAILED: ${r.failure}\n`); extras.push(`vubd 60 s RSS: FAIL: ${r.failure}`); }
      else {
        process.stderr.write(`start ${fmt(r.start, 1)} MiB, end ${fmt(r.end, 1)} MiB\n`);
        extras.push(`vubd RSS over a 60 s null 4k randread QD32 run: before connect ${fmt(r.before, 1)} MiB, at 1 s ${fmt(r.start, 1)} MiB, at ${r.samples.at(-1)?.t} s ${fmt(r.end, 1)} MiB ` +
          `(Δ ${fmt(r.end - r.start, 1)} MiB; ${r.json ? fmt(r.json.iops) + ' IOPS, errors ' + r.json.errors : 'loadgen exit ' + r.code}); samples: ` +
          r.samples.map((s) => `${s.t}s=${fmt(s.rss, 1)}`).join(' '));
      }
    }
    const dist1 = distStamp();
    extras.push(`vubd build: dist/src newest file ${new Date(dist0).toISOString()}` +
      (dist1 !== dist0 ? ` — **dist/ was rebuilt during this run (now ${new Date(dist1).toISOString()}); vubd rows may mix builds**` : ''));
    if (dist1 !== dist0) console.error('warning: dist/ changed while the benchmark ran');
    const md = table(results, opts, extras);
    console.log(md);
    if (opts.write) {
      fs.mkdirSync(path.join(ROOT, 'docs'), { recursive: true });
      fs.writeFileSync(path.join(ROOT, 'docs/bench-latest.md'), md);
      console.error('wrote docs/bench-latest.md');
    }
    fs.writeFileSync(path.join(OUT, 'last-results.json'), JSON.stringify(results.map(({ row, logTail, ...r }) => ({ row: row.id, ...r })), null, 1));
    process.exitCode = results.every((r) => r.ok) && !process.exitCode ? 0 : 1;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
    CEPH?.stop();
  }
}

main().catch((e) => { console.error(`bench: ${e.stack ?? e}`); process.exit(2); });
