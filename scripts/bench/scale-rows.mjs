// The measurements of the scale benchmark, one function per row group; each runs one backend once
// and returns plain numbers (scale.mjs repeats them, takes medians and prints the table).
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VUBD_MAIN, procMemory } from './common.mjs';
import { Daemon, Loadgen, startLoadgens, stopLoadgens, mergedPercentiles, probeVhostUser } from './scale-lib.mjs';

/** frontends kept connected for the memory rows: 2 queues, QD1, 20 requests/s per queue */
const IDLE_LOAD = { queues: 2, qd: 1, rate: 20, time: 0, memMb: 1 };
/** the throughput and interference load per export: 4k randread QD8 over its 2 queues */
const QD8_LOAD = { queues: 2, qd: 4, memMb: 4 };
const SETTLE_MS = 3000;

function fail(results, what) {
  const bad = results.map(Loadgen.problem).filter(Boolean);
  if (bad.length) throw new Error(`${what}: ${bad.length} loadgen(s) failed; first: ${bad[0]}`);
}

/** median of a few VmRSS samples (V8's heap moves a little between them) */
async function sampleMemory(pid) {
  const s = [];
  for (let i = 0; i < 5; i++) {
    s.push(procMemory(pid));
    await sleep(200);
  }
  s.sort((a, b) => a.rss - b.rss);
  return s[2];
}

function slope(points) {
  const n = points.length, mx = points.reduce((a, p) => a + p.x, 0) / n, my = points.reduce((a, p) => a + p.y, 0) / n;
  const sxy = points.reduce((a, p) => a + (p.x - mx) * (p.y - my), 0), sxx = points.reduce((a, p) => a + (p.x - mx) ** 2, 0);
  return sxy / sxx;
}

/** Row 1: one daemon, exports added in four steps up to n, each with a connected frontend, then one more. */
export async function memoryRun(kind, o, dir) {
  const d = await Daemon.start(kind, { dir, workers: o.workers, prefix: o.runBackend, tag: 'memory' });
  const lgs = [];
  try {
    await sleep(1000);
    const empty = await sampleMemory(d.pid);
    const steps = [1, 2, 3, 4].map((k) => Math.round((o.exports * k) / 4));
    const points = [];
    let have = 0;
    for (const n of [...steps, o.exports + 1]) {
      const socks = await d.addDisks(have, n - have, 'null', null, 2);
      lgs.push(...(await startLoadgens(socks, { ...IDLE_LOAD, prefix: o.runLoad })));
      have = n;
      await sleep(SETTLE_MS);
      points.push({ n, mem: await sampleMemory(d.pid) });
    }
    const at = (n) => points.find((p) => p.n === n).mem;
    const fit = points.filter((p) => p.n <= o.exports);
    fail(await stopLoadgens(lgs.splice(0)), 'memory frontends');
    return {
      empty: empty.rss,
      total: at(o.exports).rss,
      shmem: at(o.exports).shmem,
      threads: at(o.exports).threads,
      slope: slope(fit.map((p) => ({ x: p.n, y: p.mem.rss }))),
      slopeNoGuest: slope(fit.map((p) => ({ x: p.n, y: p.mem.rss - p.mem.shmem }))),
      delta: at(o.exports + 1).rss - at(o.exports).rss,
      average: (at(o.exports).rss - empty.rss) / o.exports,
      steps: points.map((p) => `${p.n}:${p.mem.rss.toFixed(1)}`).join(' '),
    };
  } finally {
    for (const l of lgs) l.kill();
    await d.stop();
  }
}

/** Row 1, comparison: a single-disk process (its own command line), 2 queues, one connected frontend. */
export async function singleDiskRun(kind, o, dir) {
  const sock = path.join(dir, `${kind}-single.sock`);
  fs.rmSync(sock, { force: true });
  const argv = kind === 'vubd'
    ? ['node', VUBD_MAIN, `--socket-path=${sock}`, '--blk-driver=null', '--size=1G', '--num-queues=2', '--log-level=warn']
    : ['qemu-storage-daemon', '--blockdev', 'driver=null-co,node-name=n0,size=1073741824,read-zeroes=on',
        '--export', `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${sock},writable=on,num-queues=2`];
  const cmd = [...o.runBackend, ...argv];
  const p = spawn(cmd[0], cmd.slice(1), { stdio: 'ignore' });
  let lgs = [];
  try {
    await probeVhostUser(sock, Date.now() + 20000);
    lgs = await startLoadgens([sock], { ...IDLE_LOAD, prefix: o.runLoad });
    await sleep(SETTLE_MS);
    const m = await sampleMemory(p.pid);
    fail(await stopLoadgens(lgs), 'single-disk frontend');
    return { rss: m.rss };
  } finally {
    for (const l of lgs) l.kill();
    p.kill('SIGTERM');
    await new Promise((r) => (p.exitCode !== null ? r() : p.on('exit', r)));
  }
}

/** Row 2: n exports loaded at once, 4k randread QD8 each (or paced at `rate` per queue); backend CPU over the measured window. */
export async function throughputRun(kind, disk, rate, o, dir) {
  const d = await Daemon.start(kind, { dir, workers: o.workers, prefix: o.runBackend, tag: `tput-${disk}` });
  let lgs = [];
  try {
    const socks = await d.addDisks(0, o.exports, disk, o.img, 2);
    lgs = await startLoadgens(socks, { ...QD8_LOAD, rate, time: o.time, ramp: o.ramp, hold: true, hist: true, prefix: o.runLoad });
    const t0 = performance.now();
    await sleep(o.ramp * 1000 + 150);
    const c0 = d.cpu(), w0 = performance.now();
    await sleep((o.ramp + o.time) * 1000 - 150 - (performance.now() - t0));
    const c1 = d.cpu(), w1 = performance.now();
    const rss = d.memory().rss;
    const rs = await Promise.all(lgs.map((l) => l.done));
    fail(rs, `${disk} load`);
    const iops = rs.reduce((a, r) => a + r.json.iops, 0);
    const cpu = (c1 - c0) / ((w1 - w0) / 1000);
    const [p50, p99] = mergedPercentiles(rs, [0.5, 0.99]);
    const perExport = rs.map((r) => r.json.iops);
    return { iops, rss, cpuPct: 100 * cpu, iopsPerCpu: iops / cpu, p50, p99, minExport: Math.min(...perExport), maxExport: Math.max(...perExport) };
  } finally {
    for (const l of lgs) l.kill();
    await d.stop();
  }
}

/**
 * Row 3: n-1 exports under the QD8 load (as fast as it goes, or `rate` requests/s per queue);
 * while they run, an export is added, used (a short loadgen run) and deleted `o.churn` times.
 * Then the same load again for as long, without churn.
 */
export async function interferenceRun(kind, rate, o, dir) {
  const d = await Daemon.start(kind, { dir, workers: o.workers, prefix: o.runBackend, tag: 'interference' });
  let lgs = [];
  const load = { ...QD8_LOAD, rate, time: 0, ramp: 1, hold: true, hist: true, prefix: o.runLoad };
  try {
    const socks = await d.addDisks(0, o.exports - 1, 'null', null, 2);
    lgs = await startLoadgens(socks, load);
    await sleep(1000); // the ramp: not measured
    const t0 = performance.now();
    let churnOps = 0, ctlMs = 0;
    for (let k = 0; k < o.churn; k++) {
      const id = `c${k}`;
      const a0 = performance.now();
      await d.addNode(id, 'null');
      const sock = await d.addExport(id, id, 1, true);
      const a1 = performance.now();
      const r = await new Loadgen(sock, { queues: 1, qd: 4, rate, time: 0.3, memMb: 2, prefix: o.runLoad }).done;
      const bad = Loadgen.problem(r) ?? (r.json.ops > 0 ? null : 'no request completed');
      if (bad) throw new Error(`churn export ${id}: ${bad}`);
      churnOps += r.json.ops;
      const a2 = performance.now();
      await d.delExport(id);
      ctlMs += a1 - a0 + performance.now() - a2;
    }
    const churnS = (performance.now() - t0) / 1000;
    const withChurn = await stopLoadgens(lgs.splice(0));
    lgs = await startLoadgens(socks, load);
    await sleep(1000 + churnS * 1000);
    const without = await stopLoadgens(lgs.splice(0));
    const failed = (rs) => rs.reduce((a, r) => a + (r.json ? r.json.errors + r.json.len_mismatch : 1) + (r.code === 0 ? 0 : 1), 0);
    const [b50, b99, b999] = mergedPercentiles(without, [0.5, 0.99, 0.999]);
    const [c50, c99, c999] = mergedPercentiles(withChurn, [0.5, 0.99, 0.999]);
    const iops = (rs) => rs.reduce((a, r) => a + (r.json?.iops ?? 0), 0);
    return {
      b50, b99, b999, c50, c99, c999, rise: c99 - b99,
      failedBase: failed(without), failedChurn: failed(withChurn), problems: [...withChurn, ...without].map(Loadgen.problem).filter(Boolean),
      iopsBase: iops(without), iopsChurn: iops(withChurn), cycleMs: (churnS * 1000) / o.churn, ctlMs: ctlMs / o.churn, churnOps,
    };
  } finally {
    for (const l of lgs) l.kill();
    await d.stop();
  }
}

/** `vubd --help` lists --config (the config-file start-up, once it is on this branch) */
export function vubdHasConfig() {
  const r = spawnSync('node', [VUBD_MAIN, '--help'], { encoding: 'utf8' });
  return /--config=/.test(r.stdout ?? '');
}

const nodeArgs = (i) => ({ 'node-name': `n${i}`, driver: 'null-co', size: 1 << 30 });
const exportArgs = (i, sock) => ({ type: 'vhost-user-blk', id: `e${i}`, 'node-name': `n${i}`, addr: { type: 'unix', path: sock }, writable: true, 'num-queues': 2 });

/**
 * Row 4: exec -> n exports serving (every socket answers a vhost-user GET_FEATURES). mode 'qmp':
 * exec with only a control socket, then blockdev-add/block-export-add per export; 'argv': QSD with
 * n --blockdev/--export; 'config': vubd --config=FILE.
 */
export async function startupRun(kind, mode, o, dir) {
  const socks = Array.from({ length: o.exports }, (_, i) => path.join(dir, `${kind}-${mode}-e${i}.sock`));
  for (const s of socks) fs.rmSync(s, { force: true });
  let argv = null;
  if (mode === 'argv') {
    argv = ['qemu-storage-daemon'];
    socks.forEach((s, i) => argv.push('--blockdev', `driver=null-co,node-name=n${i},size=1073741824,read-zeroes=on`,
      '--export', `type=vhost-user-blk,id=e${i},node-name=n${i},addr.type=unix,addr.path=${s},writable=on,num-queues=2`));
  } else if (mode === 'config') {
    const file = path.join(dir, 'scale-config.json');
    fs.writeFileSync(file, JSON.stringify({ workers: o.workers, 'log-level': 'warn', nodes: socks.map((_, i) => nodeArgs(i)), exports: socks.map((s, i) => exportArgs(i, s)) }, null, 1));
    argv = ['node', VUBD_MAIN, `--config=${file}`];
  }
  const t0 = performance.now();
  let d = null, p = null, ctlMs = NaN, addedMs = NaN;
  try {
    if (argv) {
      const cmd = [...o.runBackend, ...argv];
      p = spawn(cmd[0], cmd.slice(1), { stdio: 'ignore' });
    } else {
      d = new Daemon(kind, { dir, workers: o.workers, prefix: o.runBackend, tag: 'startup' });
      await d.connect();
      ctlMs = performance.now() - t0;
      for (let i = 0; i < o.exports; i++) {
        await d.qmp.execute('blockdev-add', kind === 'qsd' ? { ...nodeArgs(i), 'read-zeroes': true } : nodeArgs(i));
        await d.qmp.execute('block-export-add', exportArgs(i, socks[i]));
      }
      addedMs = performance.now() - t0;
    }
    const deadline = Date.now() + 30000;
    await Promise.all(socks.map((s) => probeVhostUser(s, deadline)));
    return { ms: performance.now() - t0, ctlMs, addedMs };
  } finally {
    if (d) await d.stop();
    if (p) {
      p.kill('SIGTERM');
      await new Promise((r) => (p.exitCode !== null ? r() : p.on('exit', r)));
    }
  }
}
