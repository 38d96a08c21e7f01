// A throwaway Ceph cluster for rbd tests: one monitor and one memstore OSD, no mgr, auth none, msgr
// v2 on 127.0.0.1, every path under one short temp directory, both daemons in the foreground as
// this process's children (see ../shared/reference/ceph-single-node.md for the measured facts).
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { findExecutable, isCI } from '../e2e/guest.js';
import { native } from '../../src/native/index.js';

export const CEPH_PACKAGES = 'ceph-mon ceph-osd ceph-common librbd-dev';

/** Why rbd tests cannot run here, or null. */
export function cephProblem(): string | null {
  const missing = ['ceph-mon', 'ceph-osd', 'ceph', 'rbd', 'monmaptool'].filter((b) => findExecutable(b) === null);
  if (missing.length > 0) return `needs ${missing.join(', ')} (Debian packages ${CEPH_PACKAGES})`;
  if (!native.rbdAvailable) return `the addon was built without librbd (Debian package librbd-dev, then npm run build:native)`;
  return null;
}

/** node:test's skip option: a reason, except under CI=true where the test must run (and fail). */
export function cephSkip(): string | false {
  const p = cephProblem();
  return p !== null && !isCI() ? p : false;
}

// generous: on a loaded 2-core machine a pool creation has taken over 30 s
const CLI_TIMEOUT_MS = 90000;

function run(bin: string, args: string[], timeoutMs = CLI_TIMEOUT_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    // Without a mgr some CLI calls hang forever: every call is bounded.
    execFile(bin, args, { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${bin} ${args.join(' ')}: ${err.message}${stderr ? `\n${stderr.split('\n').slice(-12).join('\n')}` : ''}`));
      else resolve(stdout);
    });
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface CephClusterOptions {
  /** images to create in the pool: name -> size in bytes */
  images?: Record<string, number>;
  /** memstore capacity reported (keep above what the test writes) */
  deviceBytes?: number;
}

export class CephCluster {
  readonly pool = 'rbd';
  private mon: ChildProcess | null = null;
  private osd: ChildProcess | null = null;
  private osdId = '0';
  private osdUuid = '';
  private constructor(
    readonly dir: string,
    readonly conf: string,
    readonly port: number,
  ) {}

  /** Starts the cluster and creates the pool and images; about 3 s. */
  static async start(opts: CephClusterOptions = {}): Promise<CephCluster> {
    let lastErr: unknown;
    for (let attempt = 0; attempt < 5; attempt++) {
      // A short path: client admin sockets live in the run dir and unix socket paths are limited to 108 bytes.
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ceph'));
      const port = await freePort();
      const c = new CephCluster(dir, path.join(dir, 'ceph.conf'), port);
      try {
        await c.startMon(opts.deviceBytes ?? 4 * 2 ** 30);
      } catch (e) {
        lastErr = e; // most likely the port was taken between freePort() and the bind: try another
        c.stop();
        continue;
      }
      try {
        await c.setup(opts.images ?? { test: 256 << 20 });
        return c;
      } catch (e) {
        c.stop();
        throw e;
      }
    }
    throw new Error(`could not start a ceph monitor: ${String(lastErr)}`);
  }

  private writeConf(deviceBytes: number): void {
    const d = this.dir;
    const conf = `[global]
fsid = ${randomUUID()}
mon host = v2:127.0.0.1:${this.port}
ms bind msgr1 = false
ms bind retry count = 1
ms bind retry delay = 0
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon mgr mkfs grace = 1000000000
paxos propose interval = 0.1
run dir = ${d}/run
log file = ${d}/log/$name.log
mon cluster log file = ${d}/log/$channel.log
crash dir = ${d}/crash
admin socket = ${d}/run/$name.$pid.asok
mon data = ${d}/mon/$name
osd data = ${d}/osd/$name
osd objectstore = memstore
memstore device bytes = ${deviceBytes}
memstore page set = true
# a terminated OSD unmounts memstore, which saves the objects (killOsd/startOsd keep the data)
osd fast shutdown = false
osd op num shards = 1
osd op num threads per shard = 2
`;
    for (const sub of ['run', 'log', 'crash', 'mon', 'osd']) fs.mkdirSync(path.join(d, sub), { recursive: true });
    fs.writeFileSync(this.conf, conf);
  }

  private async startMon(deviceBytes: number): Promise<void> {
    this.writeConf(deviceBytes);
    const fsid = /fsid = (\S+)/.exec(fs.readFileSync(this.conf, 'utf8'))![1]!;
    const monmap = path.join(this.dir, 'monmap');
    await run('monmaptool', ['--create', '--fsid', fsid, '--addv', 'a', `[v2:127.0.0.1:${this.port}]`, monmap]);
    await run('ceph-mon', ['-c', this.conf, '--mkfs', '-i', 'a', '--monmap', monmap]);
    this.mon = this.daemon('ceph-mon', ['-i', 'a']);
    const exited = new Promise<never>((_, reject) => this.mon!.once('exit', (code) => reject(new Error(`ceph-mon exited (${code}): ${this.tail('mon.a')}`))));
    await Promise.race([this.cli(['mon', 'stat'], 60000), exited]);
  }

  private daemon(bin: string, args: string[]): ChildProcess {
    const p = spawn(bin, ['-f', '-c', this.conf, ...args], { stdio: 'ignore' });
    p.on('error', () => undefined);
    return p;
  }

  private tail(name: string): string {
    try {
      return fs.readFileSync(path.join(this.dir, 'log', `${name}.log`), 'utf8').split('\n').slice(-15).join('\n');
    } catch {
      return '(no log)';
    }
  }

  private async setup(images: Record<string, number>): Promise<void> {
    this.osdUuid = randomUUID();
    this.osdId = (await this.cli(['osd', 'new', this.osdUuid])).trim();
    fs.mkdirSync(path.join(this.dir, 'osd', `osd.${this.osdId}`), { recursive: true });
    await run('ceph-osd', ['-c', this.conf, '-i', this.osdId, '--mkfs', '--osd-uuid', this.osdUuid]);
    await this.startOsd();
    await this.cli(['osd', 'pool', 'create', this.pool, '8', '8']);
    await this.rbd(['pool', 'init', this.pool]);
    for (const [name, size] of Object.entries(images)) await this.createImage(name, size);
  }

  async createImage(name: string, size: number): Promise<void> {
    // layering only: the default exclusive-lock feature bounces the lock between our handles
    await this.rbd(['create', '--size', `${Math.ceil(size / 1024)}K`, '--image-feature', 'layering', `${this.pool}/${name}`]);
  }

  /** `ceph -c conf ...` under a timeout */
  cli(args: string[], timeoutMs = CLI_TIMEOUT_MS): Promise<string> {
    return run('ceph', ['-c', this.conf, '--connect-timeout', '10', ...args], timeoutMs);
  }

  /** `rbd -c conf ...` under a timeout */
  rbd(args: string[], timeoutMs = CLI_TIMEOUT_MS): Promise<string> {
    return run('rbd', ['-c', this.conf, ...args], timeoutMs);
  }

  /** Writes a whole image to a file through the rbd CLI (rbd export). */
  async exportTo(name: string, file: string): Promise<void> {
    await this.rbd(['export', `${this.pool}/${name}`, file], 120000);
  }

  /** Reads a whole image through the rbd CLI (rbd export). */
  async exportImage(name: string): Promise<Buffer> {
    const out = path.join(this.dir, `export-${name}-${Date.now()}`);
    await this.rbd(['export', `${this.pool}/${name}`, out], 120000);
    const b = fs.readFileSync(out);
    fs.rmSync(out);
    return b;
  }

  /**
   * Stops the OSD with SIGTERM and waits until it is gone. memstore keeps data in RAM and saves
   * it only on a clean shutdown, so SIGKILL would lose every object; a terminated OSD still drops
   * out of the cluster at once, and the clients' requests wait for it.
   */
  async killOsd(): Promise<void> {
    const p = this.osd;
    this.osd = null;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    const t = setTimeout(() => p.kill('SIGKILL'), 30000);
    await gone;
    clearTimeout(t);
  }

  /** Starts the OSD and waits until the monitor counts it up. */
  async startOsd(): Promise<void> {
    this.osd = this.daemon('ceph-osd', ['-i', this.osdId]);
    const deadline = Date.now() + 60000;
    for (;;) {
      const stat = await this.cli(['osd', 'stat', '-f', 'json']).catch(() => '');
      if (/"num_up_osds":1/.test(stat)) return;
      if (this.osd.exitCode !== null) throw new Error(`ceph-osd exited (${this.osd.exitCode}): ${this.tail(`osd.${this.osdId}`)}`);
      if (Date.now() > deadline) throw new Error(`ceph-osd did not come up: ${this.tail(`osd.${this.osdId}`)}`);
      await sleep(200);
    }
  }

  /** SIGKILL both daemons and remove the directory (about 0.3 s). */
  stop(): void {
    for (const p of [this.osd, this.mon]) if (p && p.exitCode === null) p.kill('SIGKILL');
    this.osd = this.mon = null;
    if (process.env.VUBD_KEEP_CEPH !== '1') fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
