// Starts a real vubd process for tests and collects its log lines.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const vubdMain = path.join(repoRoot, 'dist/src/cli/main.js');

export interface Daemon {
  proc: ChildProcess;
  socketPath: string;
  dir: string;
  logs: string[];
  /** parsed JSON log lines */
  logRecords(): Record<string, unknown>[];
  waitForLog(match: (r: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; ms: number }>;
  fdCount(): number;
}

export function tempDir(prefix = 'vubd-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** readyTimeoutMs: how long start-up may take (default 10 s; many queues take longer on a busy machine) */
export async function startDaemon(
  args: string[],
  opts: { dir?: string; waitSocket?: boolean; env?: Record<string, string>; readyTimeoutMs?: number; exportless?: boolean } = {},
): Promise<Daemon> {
  const dir = opts.dir ?? tempDir();
  const socketPath = path.join(dir, 'vubd.sock');
  const proc = spawn(process.execPath, [vubdMain, ...(opts.exportless ? [] : [`--socket-path=${socketPath}`]), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: opts.env ? { ...process.env, ...opts.env } : process.env,
  });
  const logs: string[] = [];
  let partial = '';
  proc.stderr!.on('data', (d: Buffer) => {
    partial += d.toString();
    const lines = partial.split('\n');
    partial = lines.pop()!;
    logs.push(...lines.filter((l) => l.length > 0));
  });
  proc.stdout!.on('data', () => {});
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const d: Daemon = {
    proc,
    socketPath,
    dir,
    logs,
    logRecords: () =>
      logs.flatMap((l) => {
        try {
          return [JSON.parse(l) as Record<string, unknown>];
        } catch {
          return [];
        }
      }),
    async waitForLog(match, timeoutMs = 5000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const hit = d.logRecords().find(match);
        if (hit) return hit;
        if (Date.now() > deadline) throw new Error(`log line not seen; logs:\n${logs.join('\n')}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    async stop(signal = 'SIGTERM') {
      const t0 = Date.now();
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const code = await Promise.race([exited, new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      return { code, ms: Date.now() - t0 };
    },
    fdCount: () => fs.readdirSync(`/proc/${proc.pid}/fd`).length,
  };
  if (opts.exportless) {
    // no vhost-user socket: ready once it says it runs with no export (exports come over QMP)
    await d.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('vubd running with no export'), opts.readyTimeoutMs ?? 10000);
  } else if (opts.waitSocket ?? true) {
    const deadline = Date.now() + (opts.readyTimeoutMs ?? 10000);
    while (!fs.existsSync(socketPath)) {
      if (proc.exitCode !== null) throw new Error(`vubd exited with ${proc.exitCode}: ${logs.join('\n')}`);
      if (Date.now() > deadline) throw new Error(`vubd did not create its socket: ${logs.join('\n')}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    if (!args.some((a) => /^--log-level=(warn|error|fatal|silent)$/.test(a))) await d.waitForLog((r) => r.msg === 'vubd listening', Math.max(5000, deadline - Date.now()));
  }
  return d;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
