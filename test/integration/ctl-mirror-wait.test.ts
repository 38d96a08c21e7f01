// vubd-ctl mirror --wait as a person uses it: a rate-limited mirror between two file nodes of a
// real vubd, watched in a real terminal (tmux) and through a pipe, until READY; and cancelled.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { startDaemon, tempDir, repoRoot, type Daemon } from '../helpers/daemon.js';
import { Tmux, tmuxSkip } from '../helpers/tmux.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const run = promisify(execFile);
const ctlMain = path.join(repoRoot, 'dist/src/cli/ctl.js');
const MiB = 2 ** 20;
// 16 MiB at 4 MiB/s: about 4 s of copying, long enough to watch
const SIZE = 16 * MiB;
const SPEED = '4M';
const BAR = /^\[([#.]+)\] +(\d+\.\d)% +([\d.]+ (?:B|KiB|MiB)) \/ 16\.0 MiB +([\d.]+ (?:B|KiB|MiB))\/s +ETA (\d+:\d\d)$/;

describe('vubd-ctl mirror --wait', { skip: tmuxSkip() }, () => {
  let d: Daemon | undefined;
  let dir: string;
  let control: string;
  let qmp: QmpClient | undefined;

  const image = (name: string): string => {
    const p = path.join(dir, name);
    fs.writeFileSync(p, '');
    fs.truncateSync(p, SIZE);
    return p;
  };
  const jobStatus = async (id: string): Promise<string | undefined> =>
    (await qmp!.execute<{ id: string; status: string }[]>('query-jobs')).find((j) => j.id === id)?.status;
  const cancelAndWait = async (id: string): Promise<void> => {
    await qmp!.execute('job-cancel', { id });
    const deadline = Date.now() + 30000;
    while ((await jobStatus(id)) !== 'concluded') {
      assert.ok(Date.now() < deadline, `job ${id} did not conclude after cancel`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };

  before(async () => {
    dir = tempDir('vubd-mirror-wait-');
    const source = image('source.img');
    control = path.join(dir, 'qmp.sock');
    d = await startDaemon([`--blk-file=${source}`, '--num-queues=1', `--control=${control}`, '--log-level=warn'], { dir, readyTimeoutMs: 30000 });
    qmp = await QmpClient.connect(control);
    for (const t of ['t0', 't1', 't2']) await qmp.execute('blockdev-add', { driver: 'file', 'node-name': t, filename: image(`${t}.img`) });
  });

  after(async () => {
    qmp?.close();
    assert.equal((await d?.stop())?.code, 0);
  });

  test('in a terminal: one bar redrawn in place with percent, amounts, rate and ETA; exit 0 at READY', async () => {
    const t = new Tmux(dir, 'mirror');
    try {
      t.start(`'${process.execPath}' '${ctlMain}' --control='${control}' mirror m0 file0 t0 ${SPEED} --wait; echo "ctl exited $?"; exec sleep 600`, 120, 20);
      // Mid-run: a bar with a measured rate and an ETA, below 100 %.
      const mid = await t.waitFor('a bar with a rate', (lines) => {
        const bars = lines.filter((l) => l.startsWith('['));
        assert.ok(bars.length <= 1, `more than one bar line: the bar is not redrawn in place:\n${lines.join('\n')}`);
        const m = bars[0] ? BAR.exec(bars[0]) : null;
        return m && Number(m[2]) > 0 && Number(m[2]) < 100 ? m : null;
      });
      const rate = mid[4]!;
      assert.match(rate, /MiB|KiB/);
      // the bar's filled part follows the percentage
      const filled = mid[1]!.replace(/\./g, '').length / mid[1]!.length;
      assert.ok(Math.abs(filled * 100 - Number(mid[2])) <= 100 / mid[1]!.length + 0.1, `bar ${mid[1]} vs ${mid[2]}%`);
      assert.equal(await jobStatus('m0'), 'running');

      const end = await t.waitFor('ctl exited', (lines) => (lines.some((l) => l.startsWith('ctl exited')) ? lines : null));
      assert.ok(end.includes('ctl exited 0'), end.join('\n'));
      assert.ok(end.some((l) => /^\[#+\] +100\.0% +16\.0 MiB \/ 16\.0 MiB/.test(l)), `final bar full:\n${end.join('\n')}`);
      assert.ok(end.some((l) => /^mirror m0 ready: 16\.0 MiB copied in [\d.]+ s/.test(l)), end.join('\n'));
      assert.equal(await jobStatus('m0'), 'ready');
    } finally {
      t.kill();
    }
    await cancelAndWait('m0');
  });

  test('piped: a progress line a second, then the ready line', async () => {
    const r = await run(process.execPath, [ctlMain, `--control=${control}`, 'mirror', 'm1', 'file0', 't1', SPEED, '--wait']);
    assert.doesNotMatch(r.stdout, /\x1b|\r/);
    const lines = r.stdout.trim().split('\n');
    const progress = lines.filter((l) => l.startsWith('mirror m1: '));
    assert.ok(progress.length >= 2, `progress lines:\n${r.stdout}`);
    for (const l of progress) assert.match(l, /^mirror m1: \d+\.\d% [\d.]+ (B|KiB|MiB) \/ 16\.0 MiB (--|[\d.]+ (B|KiB|MiB))\/s ETA (--:--|\d+:\d\d)$/);
    const percents = progress.map((l) => Number(/: (\d+\.\d)%/.exec(l)![1]));
    assert.deepEqual(percents, [...percents].sort((a, b) => a - b), 'progress never goes back');
    assert.match(lines[lines.length - 1]!, /^mirror m1 ready: 16\.0 MiB copied in [\d.]+ s \([\d.]+ (KiB|MiB)\/s\)/);
    assert.equal(await jobStatus('m1'), 'ready');
    await cancelAndWait('m1');
  });

  test('a job cancelled while waiting: the error and exit 1', async () => {
    const p = spawn(process.execPath, [ctlMain, `--control=${control}`, 'mirror', 'm2', 'file0', 't2', '1M', '--wait'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    p.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const exited = new Promise<number | null>((r) => p.on('exit', (code) => r(code)));
    const deadline = Date.now() + 30000;
    while (!out.includes('mirror m2: ')) {
      assert.ok(Date.now() < deadline, `no progress line: ${out} ${err}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    await cancelAndWait('m2');
    assert.equal(await exited, 1);
    assert.match(err, /^vubd-ctl: mirror m2 was cancelled$/m);
    assert.doesNotMatch(out, /ready/);
  });

  test('a job that cannot start: the QMP error and exit 1, no waiting', async () => {
    await assert.rejects(run(process.execPath, [ctlMain, `--control=${control}`, 'mirror', 'm3', 'file0', 'no-such-node', '--wait']), (e: { code: number; stderr: string }) => {
      assert.equal(e.code, 1);
      assert.match(e.stderr, /mirror failed: .*no-such-node/);
      return true;
    });
  });
});
