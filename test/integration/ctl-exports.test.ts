// vubd-ctl export-add, export-del and exports against a real exportless vubd with a worker pool,
// with a real frontend connected; and top over several exports.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { startDaemon, tempDir, repoRoot, type Daemon } from '../helpers/daemon.js';
import { Frontend } from '../helpers/frontend.js';

const run = promisify(execFile);
const ctlMain = path.join(repoRoot, 'dist/src/cli/ctl.js');

async function ctl(control: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, [ctlMain, `--control=${control}`, ...args]);
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

interface ExportJson {
  id: string;
  'node-name': string;
  writable: boolean;
  'num-queues': number;
  'frontend-connected': boolean;
  addr: { type: string; path: string };
  'iothread-vq-mapping': { iothread: string; vqs: number[] }[];
}

describe('vubd-ctl export-add / export-del / exports', () => {
  let d: Daemon | undefined;
  let dir: string;
  let control: string;

  before(async () => {
    dir = tempDir('vubd-ctl-exports-');
    control = path.join(dir, 'qmp.sock');
    d = await startDaemon([`--control=${control}`, '--workers=2'], { dir, exportless: true, readyTimeoutMs: 30000 });
  });

  after(async () => {
    assert.equal((await d?.stop())?.code, 0);
  });

  test('add two exports, list them with their queue->worker mapping, top shows every queue on its worker', async () => {
    const image = path.join(dir, 'a.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 16 * 2 ** 20);
    assert.equal((await ctl(control, 'add-file', 'na', image)).code, 0);
    assert.equal((await ctl(control, 'add-null', 'nb', '64M')).code, 0);
    const sa = path.join(dir, 'a.sock');
    const sb = path.join(dir, 'b.sock');
    const addA = await ctl(control, 'export-add', 'ea', 'na', sa, '--writable', '--num-queues=3', '--logical-block-size=4096', '--serial=disk-a');
    assert.equal(addA.code, 0, addA.stderr);
    assert.equal(addA.stdout.trim(), `export ea serving node na on ${sa} (3 queues, rw)`);
    assert.equal((await ctl(control, 'export-add', 'eb', 'nb', sb, '--iothread=worker1')).code, 0);
    assert.ok(fs.statSync(sa).isSocket() && fs.statSync(sb).isSocket());

    const json = JSON.parse((await ctl(control, 'exports', '--json')).stdout) as ExportJson[];
    const a = json.find((e) => e.id === 'ea')!;
    const b = json.find((e) => e.id === 'eb')!;
    assert.equal(a.writable, true);
    assert.equal(a['num-queues'], 3);
    assert.deepEqual(a.addr, { type: 'unix', path: sa });
    assert.equal(b.writable, false);
    assert.deepEqual(b['iothread-vq-mapping'], [{ iothread: 'worker1', vqs: [0] }]);

    const table = (await ctl(control, 'exports')).stdout.trimEnd().split('\n');
    assert.match(table[0]!, /^ID +NODE +QUEUES +MODE +STATE +FRONTEND +ADDRESS +QUEUE->WORKER$/);
    const workerOf = (e: ExportJson, q: number): string => e['iothread-vq-mapping'].find((m) => m.vqs.includes(q))!.iothread;
    const mapA = [0, 1, 2].map((q) => `${q}->${workerOf(a, q)}`).join(' ');
    assert.ok(table.some((l) => l.split(/ +/).join(' ') === `ea na 3 rw serving none ${sa} ${mapA}`), table.join('\n'));
    assert.ok(table.some((l) => l.split(/ +/).join(' ') === `eb nb 1 ro serving none ${sb} 0->worker1`), table.join('\n'));

    const top = await ctl(control, 'top', '--once', '--interval=0.3');
    assert.equal(top.code, 0, top.stderr);
    assert.match(top.stdout, /total: 0 IOPS +0\.0 MB\/s +2 exports, 4 queues/);
    const rows = top.stdout.split('\n').filter((l) => /^e[ab] /.test(l)).map((l) => l.split(/ +/));
    assert.deepEqual(rows.map((r) => `${r[0]}/${r[1]}/${r[2]}`), [
      ...[0, 1, 2].map((q) => `ea/${q}/${workerOf(a, q)}`),
      'eb/0/worker1',
    ]);
  });

  test('export-del: safe refused while a frontend is connected (names --hard), --hard disconnects it and waits until it is gone', async () => {
    const sa = path.join(dir, 'a.sock');
    const fe = Frontend.connect(sa);
    try {
      fe.negotiate();
      fe.setupRing(0, 128);
      const deadline = Date.now() + 10000;
      while (!(await ctl(control, 'exports')).stdout.split('\n').some((l) => /^ea .* connected /.test(l))) {
        assert.ok(Date.now() < deadline, 'exports never showed the frontend');
        await new Promise((r) => setTimeout(r, 100));
      }
      const safe = await ctl(control, 'export-del', 'ea');
      assert.equal(safe.code, 1);
      assert.match(safe.stderr, /still in use.*vubd-ctl export-del ea --hard/);
      assert.ok(fs.existsSync(sa), 'a refused delete leaves the export');

      const hard = await ctl(control, 'export-del', 'ea', '--hard');
      assert.equal(hard.code, 0, hard.stderr);
      assert.equal(hard.stdout.trim(), 'export ea deleted (hard)');
      assert.ok(!fs.existsSync(sa), 'socket removed');
      assert.ok(fe.isClosedByPeer(5000), 'the frontend was disconnected');
    } finally {
      fe.close();
    }
    const safeIdle = await ctl(control, 'export-del', 'eb');
    assert.equal(safeIdle.code, 0, safeIdle.stderr);
    assert.equal(safeIdle.stdout.trim(), 'export eb deleted (safe)');
    assert.equal((await ctl(control, 'exports')).stdout.trim(), '(no exports)');
    assert.equal((await ctl(control, 'top', '--once', '--interval=0.2')).stdout.split('\n').filter((l) => l === '(no exports)').length, 1);
  });

  test('mistakes: exit 1 with what was wrong', async () => {
    const cases: [string[], RegExp][] = [
      [['export-add', 'x', 'no-such-node', path.join(dir, 'x.sock')], /export-add failed: Cannot find device='no-such-node'/],
      [['export-add', 'x', 'na'], /export-add needs ID NODE SOCKET, got 2/],
      [['export-add', 'x', 'na', path.join(dir, 'x.sock'), '--num-queues=two'], /--num-queues must be a whole number, got 'two'/],
      [['export-add', 'x', 'na', path.join(dir, 'x.sock'), '--frobnicate'], /export-add: unknown option '--frobnicate'/],
      [['export-del', 'nope'], /export-del failed: Export 'nope' is not found/],
      [['export-del', 'nope', '--timeout=soon'], /--timeout must be a positive number of seconds/],
    ];
    for (const [args, msg] of cases) {
      const r = await ctl(control, ...args);
      assert.equal(r.code, 1, args.join(' '));
      assert.match(r.stderr, msg);
    }
  });
});

// The real daemon emits BLOCK_EXPORT_DELETED before it answers, so the event cannot fail to come
// from it; this stand-in QMP server (a socket speaking the wire protocol) answers and never sends it.
test('export-del: a deletion whose event never comes ends after --timeout with a message', async () => {
  const dir = tempDir('vubd-ctl-exports-timeout-');
  const sock = path.join(dir, 'fake-qmp.sock');
  const server = net.createServer((c) => {
    c.write('{"QMP": {"version": {}, "capabilities": []}}\n');
    c.on('data', (b) => {
      for (const line of b.toString().split('\n').filter((l) => l.trim())) {
        const msg = JSON.parse(line) as { id?: unknown };
        c.write(JSON.stringify({ return: {}, id: msg.id }) + '\n');
      }
    });
    c.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(sock, r));
  try {
    const t0 = Date.now();
    const r = await ctl(sock, 'export-del', 'e9', '--timeout=1');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /export e9: deletion \(safe\) started but BLOCK_EXPORT_DELETED did not arrive within 1 s/);
    assert.ok(Date.now() - t0 < 20000);
  } finally {
    server.close();
  }
});
