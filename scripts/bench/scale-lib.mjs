// The pieces of the scale benchmark (scale.mjs): a daemon (vubd or qemu-storage-daemon) driven over
// QMP with the same commands, loadgen processes, and a vhost-user "is it serving" probe.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT, LOADGEN, LOGS, VUBD_MAIN, procCpuSeconds, procMemory } from './common.mjs';

const { QmpClient } = await import(path.join(ROOT, 'dist/src/control/qmp-client.js'));

export const NAMES = { vubd: 'vubd', qsd: 'QSD 7.2' };
const NULL_SIZE = 1 << 30;

/** argv behind the launch prefix (nice, taskset) the options asked for */
const pinned = (prefix, argv) => [...(prefix ?? []), ...argv];

async function waitFor(what, check, timeoutMs, proc) {
  const t0 = Date.now();
  for (;;) {
    if (proc?.exitCode !== null && proc?.exitCode !== undefined) throw new Error(`${what}: process exited (${proc.exitCode})`);
    if (await check()) return;
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(10);
  }
}

/** One backend process serving exports added over QMP (vubd --control, QSD --monitor). */
export class Daemon {
  /** kind 'vubd' | 'qsd'; opts {dir, workers, prefix (argv before the command: nice, taskset), tag} */
  static async start(kind, opts) {
    const d = new Daemon(kind, opts);
    await d.connect();
    return d;
  }

  constructor(kind, opts) {
    this.kind = kind;
    this.dir = opts.dir;
    this.control = path.join(opts.dir, `${kind}-qmp.sock`);
    fs.rmSync(this.control, { force: true });
    const argv = kind === 'vubd'
      ? ['node', VUBD_MAIN, `--control=${this.control}`, `--workers=${opts.workers}`, '--log-level=warn']
      : ['qemu-storage-daemon', '--chardev', `socket,path=${this.control},server=on,wait=off,id=m`, '--monitor', 'chardev=m'];
    fs.mkdirSync(LOGS, { recursive: true });
    this.logPath = path.join(LOGS, `scale-${opts.tag ?? 'run'}-${kind}.log`);
    this.log = fs.openSync(this.logPath, 'w');
    const cmd = pinned(opts.prefix, argv);
    this.proc = spawn(cmd[0], cmd.slice(1), { cwd: ROOT, stdio: ['ignore', this.log, this.log] });
    this.exit = new Promise((res) => this.proc.on('exit', (code, sig) => res({ code, sig })));
    this.exports = new Map(); // id -> {node, sock}
  }

  get pid() { return this.proc.pid; }
  cpu() { return procCpuSeconds(this.pid); }
  memory() { return procMemory(this.pid); }
  tail(n = 600) {
    try { return fs.readFileSync(this.logPath, 'utf8').slice(-n).trim() || '(empty log)'; } catch { return '(no log)'; }
  }

  async connect() {
    await waitFor(`${this.kind} control socket`, () => fs.existsSync(this.control), 20000, this.proc);
    for (let tries = 0; ; tries++) {
      try {
        this.qmp = await QmpClient.connect(this.control);
        return;
      } catch (e) {
        if (tries > 200) throw e;
        await sleep(10);
      }
    }
  }

  /** driver 'null' (1 GiB, reads zeroes) or 'file' (read-only: many nodes may share one image) */
  async addNode(name, driver, img) {
    let args;
    if (driver === 'null') {
      args = { driver: 'null-co', 'node-name': name, size: NULL_SIZE };
      if (this.kind === 'qsd') args['read-zeroes'] = true; // vubd's null always returns zeroes
    } else {
      args = { driver: 'file', 'node-name': name, filename: img, 'read-only': true };
      if (this.kind === 'qsd') args.aio = 'io_uring'; // vubd's default; QSD's default is a thread pool
    }
    await this.qmp.execute('blockdev-add', args);
  }

  async addExport(id, node, queues, writable) {
    const sock = path.join(this.dir, `${this.kind}-${id}.sock`);
    fs.rmSync(sock, { force: true });
    await this.qmp.execute('block-export-add', {
      type: 'vhost-user-blk', id, 'node-name': node, addr: { type: 'unix', path: sock }, writable, 'num-queues': queues,
    });
    this.exports.set(id, { node, sock });
    return sock;
  }

  /** adds `count` exports e<from>..: a node each, `queues` queues; returns their sockets */
  async addDisks(from, count, driver, img, queues) {
    const socks = [];
    for (let i = from; i < from + count; i++) {
      await this.addNode(`n${i}`, driver, img);
      socks.push(await this.addExport(`e${i}`, `n${i}`, queues, driver !== 'file'));
    }
    return socks;
  }

  /** block-export-del (safe; retried while the last frontend's session closes), the event, blockdev-del */
  async delExport(id, { delNode = true, timeoutMs = 10000 } = {}) {
    const t0 = Date.now();
    const seen = this.qmp.events.length;
    for (;;) {
      try {
        await this.qmp.execute('block-export-del', { id, mode: 'safe' });
        break;
      } catch (e) {
        if (Date.now() - t0 > timeoutMs) throw new Error(`block-export-del ${id}: ${e.message}`);
        await sleep(10);
      }
    }
    const deadline = Date.now() + timeoutMs;
    while (!this.qmp.events.slice(seen).some((e) => e.event === 'BLOCK_EXPORT_DELETED' && e.data?.id === id)) {
      if (Date.now() > deadline) throw new Error(`no BLOCK_EXPORT_DELETED for ${id}`);
      await sleep(5);
    }
    const { node } = this.exports.get(id);
    this.exports.delete(id);
    if (delNode) await this.qmp.execute('blockdev-del', { 'node-name': node });
  }

  async stop() {
    try { this.qmp?.close(); } catch {}
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGTERM');
      const r = await Promise.race([this.exit, sleep(8000).then(() => null)]);
      if (!r) { this.proc.kill('SIGKILL'); await this.exit; this.killed = true; }
    }
    fs.closeSync(this.log);
  }
}

/** A loadgen process on one socket; `opts`: queues, qd, rate, time (0 = until stop()), ramp, hold, hist, prefix */
export class Loadgen {
  constructor(sock, opts) {
    const args = ['--socket', sock, '--queues', String(opts.queues ?? 1), '--qd', String(opts.qd ?? 1), '--bs', '4096',
      '--rw', 'randread', '--time', String(opts.time ?? 0), '--ramp', String(opts.ramp ?? 0), '--wait', 'eventfd',
      '--mem-mb', String(opts.memMb ?? 2), '--ready'];
    if (opts.rate) args.push('--rate', String(opts.rate));
    if (opts.hold) args.push('--hold');
    if (opts.hist) args.push('--hist');
    const cmd = pinned(opts.prefix, [LOADGEN, ...args]);
    this.cmd = cmd.join(' ');
    this.proc = spawn(cmd[0], cmd.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    this.out = '';
    this.err = '';
    this.isReady = false;
    this.proc.stdout.on('data', (d) => (this.out += d));
    this.proc.stderr.on('data', (d) => {
      this.err += d;
      if (!this.isReady && this.err.includes('loadgen: ready')) this.isReady = true;
    });
    this.done = new Promise((res) => this.proc.on('close', (code, sig) => {
      let json = null;
      try { json = JSON.parse(this.out.trim().split('\n').pop()); } catch {}
      res({ code, sig, json, stderr: this.err.trim() });
    }));
  }

  async ready(timeoutMs = 30000) {
    await waitFor('loadgen setup', () => this.isReady, timeoutMs, this.proc);
  }
  go() { this.proc.kill('SIGUSR1'); }
  stop() { if (this.proc.exitCode === null) this.proc.kill('SIGINT'); }
  kill() { if (this.proc.exitCode === null) this.proc.kill('SIGKILL'); }

  /** what went wrong, or null: exit status, a stall, failed requests, a wrong used length or ring base */
  static problem(r) {
    if (!r.json || r.json.error) return `loadgen exit ${r.code ?? r.sig}: ${r.stderr.split('\n').pop()}`;
    if (r.code !== 0) return `loadgen exit ${r.code}${r.json.stalled_queue >= 0 ? ` (queue ${r.json.stalled_queue} stalled)` : ''}`;
    const j = r.json;
    if (j.errors || j.len_mismatch || j.vring_base_mismatch) return `errors=${j.errors} len_mismatch=${j.len_mismatch} vring_base_mismatch=${j.vring_base_mismatch}`;
    return null;
  }
}

/** starts loadgens on every socket, waits until all are set up (and, with hold, starts them together) */
export async function startLoadgens(socks, opts) {
  const lgs = socks.map((s) => new Loadgen(s, opts));
  try {
    await Promise.all(lgs.map((l) => l.ready()));
  } catch (e) {
    for (const l of lgs) l.kill();
    const bad = await Promise.all(lgs.map((l) => l.done));
    throw new Error(`${e.message}; ${bad.map(Loadgen.problem).find(Boolean) ?? ''}`);
  }
  if (opts.hold) for (const l of lgs) l.go();
  return lgs;
}

export async function stopLoadgens(lgs) {
  for (const l of lgs) l.stop();
  const timer = setTimeout(() => lgs.forEach((l) => l.kill()), 30000);
  const rs = await Promise.all(lgs.map((l) => l.done));
  clearTimeout(timer);
  return rs;
}

/** merged latency histograms ([[bucket_ns, count]...]) -> percentile in µs */
export function mergedPercentiles(results, ps) {
  const h = new Map();
  for (const r of results) for (const [v, c] of r.json?.hist ?? []) h.set(v, (h.get(v) ?? 0) + c);
  const buckets = [...h].sort((a, b) => a[0] - b[0]);
  const total = buckets.reduce((s, [, c]) => s + c, 0);
  return ps.map((p) => {
    if (!total) return NaN;
    const want = Math.min(total - 1, Math.floor(p * total));
    let acc = 0;
    for (const [v, c] of buckets) if ((acc += c) > want) return v / 1e3;
    return buckets.at(-1)[0] / 1e3;
  });
}

/**
 * Resolves once `sock` answers a vhost-user GET_FEATURES (connect, request, 8-byte reply) — the
 * socket accepts a vhost-user connection and the backend speaks on it. Retries until the deadline.
 */
export async function probeVhostUser(sock, deadline) {
  const req = Buffer.alloc(12);
  req.writeUInt32LE(1, 0); // VHOST_USER_GET_FEATURES
  req.writeUInt32LE(1, 4); // version 1
  for (;;) {
    const ok = await new Promise((resolve) => {
      const c = net.createConnection(sock);
      let got = Buffer.alloc(0);
      const end = (v) => { c.destroy(); resolve(v); };
      c.on('error', () => end(false));
      c.on('connect', () => c.write(req));
      c.on('data', (d) => {
        got = Buffer.concat([got, d]);
        if (got.length >= 20) end(got.readUInt32LE(0) === 1 && (got.readUInt32LE(4) & 0x4) !== 0);
      });
      c.setTimeout(5000, () => end(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${sock} did not answer GET_FEATURES in time`);
    await sleep(2);
  }
}
