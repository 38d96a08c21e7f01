// Real NBD servers for the nbd node tests: qemu-nbd (Debian qemu-utils) and nbdkit (Debian
// nbdkit), started on a unix socket or a TCP port, killable and restartable on the same address.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import fs from 'node:fs';
import { findExecutable, isCI } from '../e2e/guest.js';

const PACKAGES: Record<string, string> = { 'qemu-nbd': 'qemu-utils', nbdkit: 'nbdkit' };

/** The skip reason when a server program is missing; under CI=true the test must run (and fail) instead. */
export function nbdServerSkip(...tools: ('qemu-nbd' | 'nbdkit')[]): string | false {
  const missing = tools.filter((t) => !findExecutable(t));
  if (missing.length === 0 || isCI()) return false;
  return missing.map((t) => `${t} is not installed (Debian package ${PACKAGES[t]})`).join('; ');
}

export type Listen = { unix: string } | { port: number };

export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

async function connectable(l: Listen, timeoutMs: number, proc: ChildProcess, stderr: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`NBD server exited at start-up: ${stderr()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = 'unix' in l ? net.connect(l.unix) : net.connect(l.port, '127.0.0.1');
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`NBD server not listening after ${timeoutMs} ms: ${stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A server process that can be killed and started again with the same command line. */
export class NbdServerProcess {
  proc: ChildProcess | null = null;
  private err = '';
  constructor(
    readonly cmd: string,
    readonly args: string[],
    readonly listen: Listen,
  ) {}

  /** QMP's server argument for this address */
  get server(): Record<string, unknown> {
    return 'unix' in this.listen ? { type: 'unix', path: this.listen.unix } : { type: 'inet', host: '127.0.0.1', port: String(this.listen.port) };
  }

  async start(): Promise<this> {
    if ('unix' in this.listen) fs.rmSync(this.listen.unix, { force: true });
    this.err = '';
    const p = spawn(this.cmd, this.args, { stdio: ['ignore', 'ignore', 'pipe'] });
    p.stderr!.on('data', (d: Buffer) => (this.err += d.toString()));
    this.proc = p;
    // a probe connection: qemu-nbd without --persistent would exit when it closes, so it always gets --persistent
    await connectable(this.listen, 10000, p, () => this.err);
    return this;
  }

  stderr(): string {
    return this.err;
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.proc;
    if (p === null || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await gone;
    this.proc = null;
  }

  static qemuNbd(image: string, listen: Listen, exportName = 'disk'): NbdServerProcess {
    const where = 'unix' in listen ? ['--socket', listen.unix] : ['--bind', '127.0.0.1', '--port', String(listen.port)];
    return new NbdServerProcess('qemu-nbd', ['--format=raw', '--persistent', '--shared=16', '--cache=writeback', `--export-name=${exportName}`, ...where, image], listen);
  }

  /** nbdkit in the foreground; pluginArgs e.g. ['memory', 'size=64M'] or ['--filter=error', 'file', 'file=...', 'error-rate=...'] */
  static nbdkit(pluginArgs: string[], listen: Listen): NbdServerProcess {
    const where = 'unix' in listen ? ['--unix', listen.unix] : ['--ipaddr', '127.0.0.1', '--port', String(listen.port)];
    return new NbdServerProcess('nbdkit', ['--foreground', '--exit-with-parent', ...where, ...pluginArgs], listen);
  }
}
