// vubd-ctl top as a person uses it: in a real terminal (tmux) against a real vubd serving a real
// frontend's I/O on one queue while the others sit idle; then piped; then with the daemon killed.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { Worker } from 'node:worker_threads';
import { startDaemon, tempDir, repoRoot, type Daemon } from '../helpers/daemon.js';
import { Tmux, tmuxSkip } from '../helpers/tmux.js';
import type { QueueLoadInput, QueueLoadResult } from '../helpers/queue-load.js';

const run = promisify(execFile);
const ctlMain = path.join(repoRoot, 'dist/src/cli/ctl.js');
const MiB = 2 ** 20;
const QUEUES = 4;
const skip = tmuxSkip();

interface ScreenRow {
  export: string;
  queue: number;
  worker: string;
  iops: number;
  mbps: number;
  p50: string;
  p99: string;
  state: string;
  drain: string;
}

/** The table rows of a top screen (EXPORT QUEUE WORKER IOPS MB/s P50 P99 INFL STATE DRAIN NODE). */
function rowsOf(lines: string[]): ScreenRow[] {
  return lines
    .filter((l) => /^export0 +\d+ /.test(l))
    .map((l) => {
      const c = l.trim().split(/ +/);
      return { export: c[0]!, queue: Number(c[1]), worker: c[2]!, iops: Number(c[3]), mbps: Number(c[4]), p50: c[5]!, p99: c[6]!, state: c[8]!, drain: c[9]! };
    });
}

/** "<64us" -> 64, "<131ms" -> 131000 */
function latencyUs(text: string): number {
  const m = /^<(\d+)(us|ms)$/.exec(text);
  assert.ok(m, `latency '${text}'`);
  return Number(m[1]) * (m[2] === 'ms' ? 1000 : 1);
}

function totalOf(lines: string[]): { iops: number; mbps: number } | null {
  for (const l of lines) {
    const m = /^total: (\d+) IOPS +([\d.]+) MB\/s +1 export, 4 queues/.exec(l);
    if (m) return { iops: Number(m[1]), mbps: Number(m[2]) };
  }
  return null;
}

function startLoad(socketPath: string, busy: number[]): { stop: () => Promise<QueueLoadResult>; done: Int32Array } {
  const stop = new SharedArrayBuffer(4);
  const done = new SharedArrayBuffer(4 * QUEUES);
  const input: QueueLoadInput = { socketPath, queues: QUEUES, busy, depth: 8, pauseMs: 2, stop, done };
  const worker = new Worker(new URL('../helpers/queue-load.js', import.meta.url), { workerData: input });
  const result = new Promise<QueueLoadResult>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  return {
    done: new Int32Array(done),
    stop: async () => {
      Atomics.store(new Int32Array(stop), 0, 1);
      Atomics.notify(new Int32Array(stop), 0);
      return result;
    },
  };
}

/** sh -c command that runs vubd-ctl top, then reports its exit code and the terminal modes before and after. */
function topScript(dir: string, control: string, extra = ''): string {
  const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  return [
    `stty -g > ${q(path.join(dir, 'stty.before'))}`,
    'echo TOP-STARTS-HERE',
    `${q(process.execPath)} ${q(ctlMain)} --control=${q(control)} top --interval=0.5 ${extra}`,
    'echo "top exited $?"',
    `stty -g > ${q(path.join(dir, 'stty.after'))}`,
    'exec sleep 600',
  ].join('; ');
}

describe('vubd-ctl top', { skip }, () => {
  let d: Daemon | undefined;
  let dir: string;
  let control: string;
  let load: ReturnType<typeof startLoad> | undefined;

  before(async () => {
    dir = tempDir('vubd-top-');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 64 * MiB);
    control = path.join(dir, 'qmp.sock');
    d = await startDaemon([`--blk-file=${image}`, `--num-queues=${QUEUES}`, `--control=${control}`, '--log-level=warn'], { dir, readyTimeoutMs: 30000 });
    load = startLoad(d.socketPath, [0]);
    const deadline = Date.now() + 30000;
    while (load.done[0]! < 100) {
      assert.ok(Date.now() < deadline, 'the load did not get going');
      await new Promise((r) => setTimeout(r, 50));
    }
  });

  after(async () => {
    const r = await load?.stop();
    const stopped = await d?.stop();
    assert.equal(r?.error, null);
    assert.equal(r?.badStatus, 0);
    assert.equal(stopped?.code, 0);
  });

  test('in a terminal: a row per queue, the busy one with IOPS, totals; resize truncates; q restores the terminal', async () => {
    const t = new Tmux(dir, 'top');
    try {
      t.start(topScript(dir, control), 160, 40);
      const screen = await t.waitFor('top rows with the busy queue measured', (lines) => {
        const rows = rowsOf(lines);
        return rows.length === QUEUES && rows[0]!.iops > 0 && totalOf(lines) ? lines : null;
      });
      const rows = rowsOf(screen);
      assert.deepEqual(rows.map((r) => r.queue), [0, 1, 2, 3]);
      const [busy, ...idle] = rows;
      assert.ok(busy!.iops > 0 && busy!.mbps > 0, `busy queue: ${JSON.stringify(busy)}`);
      assert.match(busy!.p50, /^<\d+(us|ms)$/);
      assert.match(busy!.p99, /^<\d+(us|ms)$/);
      assert.ok(latencyUs(busy!.p99) >= latencyUs(busy!.p50), `p99 ${busy!.p99} below p50 ${busy!.p50}`);
      assert.equal(busy!.state, 'running');
      for (const r of idle) {
        assert.equal(r.iops, 0, `idle queue ${r.queue} shows IOPS`);
        assert.equal(r.mbps, 0);
        assert.equal(r.p50, '-');
      }
      for (const r of rows) {
        assert.equal(r.drain, 'running');
        assert.match(r.worker, /^worker\d+$/, 'the pool worker serving the queue');
      }
      const total = totalOf(screen)!;
      assert.ok(Math.abs(total.iops - busy!.iops) <= 1, `total ${total.iops} IOPS vs busy row ${busy!.iops}`);
      assert.ok(screen.some((l) => /log2 latency bucket upper bound/.test(l)), 'the header says what P50/P99 are');
      assert.ok(screen.every((l) => !l.includes('TOP-STARTS-HERE')), 'top has the alternate screen');
      assert.equal(t.display('#{alternate_on}'), '1');
      assert.equal(t.display('#{cursor_flag}'), '0', 'cursor hidden while top runs');

      // A small window: rows cut to its height with a "… N more" line, lines to its width.
      t.resize(60, 7);
      const small = await t.waitFor('the truncation line', (lines) => (lines.some((l) => /^… \d+ more$/.test(l)) ? lines : null));
      assert.ok(small.length <= 7, `${small.length} lines in a 7-line window`);
      for (const l of small) assert.ok(l.length <= 60, `line wider than the window: '${l}'`);
      // 7 lines: 4 of header, 2 rows, and the line for the other 2
      assert.equal(small.find((l) => /^… \d+ more$/.test(l)), '… 2 more');
      assert.equal(rowsOf(small).length, 2);
      assert.ok(small[0]!.startsWith('vubd top'), 'header stays');

      t.resize(160, 40);
      await t.waitFor('all rows again', (lines) => rowsOf(lines).length === QUEUES);
      t.sendKeys('q');
      const after = await t.waitFor('top exited', (lines) => (lines.some((l) => l.startsWith('top exited')) ? lines : null));
      assert.ok(after.includes('top exited 0'), after.join('\n'));
      assert.ok(after.includes('TOP-STARTS-HERE'), 'the screen from before top is back');
      assert.ok(after.every((l) => !l.startsWith('EXPORT')), 'no top output left on the main screen');
      assert.equal(t.display('#{alternate_on}'), '0');
      assert.equal(t.display('#{cursor_flag}'), '1', 'cursor visible again');
      await t.waitFor('stty after', () => fs.existsSync(path.join(dir, 'stty.after')) && fs.readFileSync(path.join(dir, 'stty.after'), 'utf8').length > 0);
      assert.equal(fs.readFileSync(path.join(dir, 'stty.after'), 'utf8'), fs.readFileSync(path.join(dir, 'stty.before'), 'utf8'), 'terminal modes restored (raw mode off)');
    } finally {
      t.kill();
    }
  });

  test('Ctrl-C leaves top and restores the terminal', async () => {
    const t = new Tmux(dir, 'ctrlc');
    try {
      t.start(topScript(dir, control), 120, 30);
      await t.waitFor('top rows', (lines) => rowsOf(lines).length === QUEUES);
      t.sendKeys('C-c');
      const after = await t.waitFor('top exited', (lines) => (lines.some((l) => l.startsWith('top exited')) ? lines : null));
      assert.ok(after.includes('top exited 0'), after.join('\n'));
      assert.equal(t.display('#{alternate_on}'), '0');
    } finally {
      t.kill();
    }
  });

  test('piped: plain snapshots, no escape sequences; --once prints one and exits 0', async () => {
    const once = await run(process.execPath, [ctlMain, `--control=${control}`, 'top', '--once', '--interval=0.5']);
    assert.doesNotMatch(once.stdout, /\x1b/);
    const lines = once.stdout.split('\n');
    assert.equal(lines.filter((l) => l.startsWith('vubd top')).length, 1);
    const rows = rowsOf(lines);
    assert.equal(rows.length, QUEUES);
    assert.ok(rows[0]!.iops > 0);
    assert.ok(rows.slice(1).every((r) => r.iops === 0));
    assert.ok(totalOf(lines)!.iops > 0);

    // Without --once: a snapshot per interval until stopped.
    const p = spawn(process.execPath, [ctlMain, `--control=${control}`, 'top', '--interval=0.3'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    const exited = new Promise<number | null>((r) => p.on('exit', (code) => r(code)));
    const deadline = Date.now() + 30000;
    while ((out.match(/^vubd top/gm) ?? []).length < 3) {
      assert.ok(Date.now() < deadline, `fewer than 3 snapshots in 30 s: ${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    p.kill('SIGTERM');
    assert.equal(await exited, 143);
    assert.doesNotMatch(out, /\x1b/);
  });

  test('bad arguments: a usage message and exit 1', async () => {
    await assert.rejects(run(process.execPath, [ctlMain, `--control=${control}`, 'top', '--interval=0']), (e: { code: number; stderr: string }) => {
      assert.equal(e.code, 1);
      assert.match(e.stderr, /--interval must be a number of seconds from 0\.1 to 3600/);
      return true;
    });
  });
});

describe('vubd-ctl top when the daemon goes away', { skip }, () => {
  test('says so, restores the terminal and exits non-zero', async () => {
    const dir = tempDir('vubd-top-kill-');
    const control = path.join(dir, 'qmp.sock');
    const d = await startDaemon(['--blk-driver=null', '--size=64M', '--num-queues=1', `--control=${control}`, '--log-level=warn'], { dir, readyTimeoutMs: 30000 });
    const t = new Tmux(dir, 'kill');
    try {
      t.start(topScript(dir, control), 120, 30);
      await t.waitFor('top rows', (lines) => lines.some((l) => /^export0 +0 /.test(l)));
      d.proc.kill('SIGKILL');
      const after = await t.waitFor('top exited', (lines) => (lines.some((l) => l.startsWith('top exited')) ? lines : null));
      assert.ok(after.includes('top exited 1'), after.join('\n'));
      assert.ok(after.some((l) => /vubd-ctl top: lost the daemon at .*qmp\.sock: QMP connection closed/.test(l)), after.join('\n'));
      assert.equal(t.display('#{alternate_on}'), '0');
    } finally {
      t.kill();
      await d.stop();
    }
  });
});
