// The QMP control socket on the wire, and vubd-ctl on top of it.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { startDaemon, tempDir, repoRoot, type Daemon } from '../helpers/daemon.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { BackendRequest, FLAG_VERSION, Request } from '../../src/protocol/constants.js';
import { native } from '../../src/native/index.js';

const run = promisify(execFile);
const ctlMain = path.join(repoRoot, 'dist/src/cli/ctl.js');
const MiB = 2 ** 20;

async function ctl(control: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, [ctlMain, `--control=${control}`, ...args]);
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

/** Raw line-oriented QMP session for wire-level checks. */
async function rawSession(control: string): Promise<{ send: (s: string) => void; next: () => Promise<Record<string, unknown>>; close: () => void }> {
  const sock = net.createConnection(control);
  const lines: string[] = [];
  const waiters: ((l: string) => void)[] = [];
  let buf = '';
  sock.setEncoding('utf8');
  sock.on('data', (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line) continue;
      const w = waiters.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  await new Promise((r) => sock.once('connect', r));
  return {
    send: (s) => sock.write(s),
    next: () =>
      new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no QMP reply')), 5000);
        const take = (l: string): void => {
          clearTimeout(t);
          resolve(JSON.parse(l) as Record<string, unknown>);
        };
        const l = lines.shift();
        if (l !== undefined) take(l);
        else waiters.push(take);
      }),
    close: () => sock.destroy(),
  };
}

describe('control socket', () => {
  let d: Daemon;
  let control: string;
  let dir: string;
  let image: string;

  before(async () => {
    dir = tempDir();
    image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 16 * MiB);
    control = path.join(dir, 'qmp.sock');
    d = await startDaemon([`--blk-file=${image}`, '--num-queues=2', `--control=${control}`], { dir });
  });

  after(async () => {
    assert.equal((await d.stop()).code, 0);
  });

  test('QMP wire protocol: greeting, negotiation, ids, errors', async () => {
    const s = await rawSession(control);
    const greeting = (await s.next()) as { QMP: { version: { package: string }; capabilities: unknown[] } };
    assert.match(greeting.QMP.version.package, /^vubd /);
    assert.deepEqual(greeting.QMP.capabilities, []);
    s.send('{"execute":"query-block-exports","id":1}\n');
    assert.deepEqual(await s.next(), { error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" }, id: 1 });
    // Objects need not be newline terminated and may arrive in pieces.
    s.send('{"execute":"qmp_cap');
    s.send('abilities"}');
    assert.deepEqual(await s.next(), { return: {} });
    s.send('{"execute":"query-block-exports","id":"x"}');
    const exports = (await s.next()) as { id: string; return: Record<string, unknown>[] };
    assert.equal(exports.id, 'x');
    assert.equal(exports.return.length, 1);
    const { addr, 'iothread-vq-mapping': mapping, ...rest } = exports.return[0]!;
    assert.deepEqual(rest, { id: 'export0', type: 'vhost-user-blk', 'node-name': 'file0', 'shutting-down': false, writable: true, 'num-queues': 2, 'frontend-connected': false });
    assert.equal((addr as { type: string }).type, 'unix');
    // QEMU's iothread-vq-mapping shape: every queue on exactly one worker.
    const vqs = (mapping as { iothread: string; vqs: number[] }[]).flatMap((m) => m.vqs).sort();
    assert.deepEqual(vqs, [0, 1]);
    s.send('{"execute":"no-such-command","id":2}');
    assert.deepEqual(await s.next(), { error: { class: 'CommandNotFound', desc: 'The command no-such-command has not been found' }, id: 2 });
    s.send('{"execute":"blockdev-del","arguments":{"node-name":"file0"},"id":3}');
    const busy = (await s.next()) as { error: { class: string; desc: string }; id: number };
    assert.equal(busy.error.class, 'GenericError');
    assert.match(busy.error.desc, /busy.*export 'export0'/);
    s.send('{"execute": 5}');
    assert.equal(((await s.next()) as { error: { class: string } }).error.class, 'GenericError');
    s.send('[1,2]');
    assert.equal(((await s.next()) as { error: { class: string } }).error.class, 'GenericError');
    s.close();
  });

  test('vubd-ctl: graph, add, swap, throttle, stats, errors', async () => {
    const dot = await ctl(control, 'graph', '--dot');
    assert.equal(dot.code, 0);
    assert.match(dot.stdout, /^digraph vubd \{/);
    assert.match(dot.stdout, /"export:export0" -> "file0"/);

    assert.equal((await ctl(control, 'add-file', 'file1', image)).code, 0);
    assert.equal((await ctl(control, 'add-throttle', 'thr0', 'file1', 'iops-total=5000', 'bps-total=100M')).code, 0);
    assert.equal((await ctl(control, 'swap', 'export0', 'thr0')).code, 0);
    const exports = JSON.parse((await ctl(control, 'exports', '--json')).stdout) as { 'node-name': string }[];
    assert.equal(exports[0]!['node-name'], 'thr0');
    const graph = JSON.parse((await ctl(control, 'graph')).stdout) as { generation: number; nodes: { 'node-name': string; children: string[] }[] };
    assert.deepEqual(graph.nodes.find((n) => n['node-name'] === 'thr0')!.children, ['file1']);

    // The guest's I/O now goes through thr0 and file1, and the counters say so.
    const fe = Frontend.connect(d.socketPath);
    fe.negotiate();
    const ring = fe.setupRing(0);
    assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 64, new Uint8Array(4096).fill(7))), 0);
    const r = fe.run(ring, BLK.IN, 64, 4096);
    assert.ok(fe.dataOf(r).every((b) => b === 7));
    const stats = JSON.parse((await ctl(control, 'stats')).stdout) as { nodes: { 'node-name': string; 'read-ops': number; 'write-ops': number }[]; exports: { queues: { readOps: number; latencyHistogramUs: Record<string, number> }[] }[] };
    const byName = Object.fromEntries(stats.nodes.map((n) => [n['node-name'], n]));
    assert.equal(byName.thr0!['write-ops'], 1);
    assert.equal(byName.file1!['read-ops'], 1);
    assert.equal(byName.file0!['read-ops'], 0);
    assert.equal(stats.exports[0]!.queues[0]!.readOps, 1);
    assert.ok(Object.values(stats.exports[0]!.queues[0]!.latencyHistogramUs).reduce((a, b) => a + b, 0) >= 2);

    assert.equal((await ctl(control, 'throttle', 'thr0', 'iops=100', 'bps_wr=1M')).code, 0);
    const nodes = JSON.parse((await ctl(control, 'nodes')).stdout) as { 'node-name': string; limits?: Record<string, number> }[];
    const lim = nodes.find((n) => n['node-name'] === 'thr0')!.limits!;
    assert.equal(lim.iops_total, 100);
    assert.equal(lim.bps_wr, MiB);

    const bad = await ctl(control, 'swap', 'export0', 'nope');
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /Cannot find node 'nope'/);
    assert.equal((await ctl(control, 'frobnicate')).code, 1);
    const noControl = await run(process.execPath, [ctlMain, 'graph']).catch((e: { code: number }) => e);
    assert.equal((noControl as { code: number }).code, 2);

    assert.equal((await ctl(control, 'swap', 'export0', 'file0')).code, 0);
    fe.close();
  });

  test('throttle limits hold across both queues', async () => {
    await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend');
    const qmp = await QmpClient.connect(control);
    await qmp.execute('block_set_io_throttle', { id: 'thr0', iops: 200, iops_max: 20, bps: 0, bps_wr: 0 });
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'thr0' });
    const fe = Frontend.connect(d.socketPath);
    fe.negotiate();
    const q0 = fe.setupRing(0, 256);
    const q1 = fe.setupRing(1, 256);
    const t0 = performance.now();
    for (let i = 0; i < 60; i++) fe.blk(i % 2 ? q1 : q0, BLK.IN, 8 * i, 4096, { indirect: true });
    q0.kick();
    q1.kick();
    q0.waitFor(30, 10000);
    q1.waitFor(30, 10000);
    const ms = performance.now() - t0;
    // 60 requests at 200 IOPS with a burst of 20: at least (60 - 20) / 200 s = 200 ms.
    assert.ok(ms >= 180, `60 requests took only ${ms.toFixed(0)} ms`);
    assert.ok(ms < 2000, `60 requests took ${ms.toFixed(0)} ms`);
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'file0' });
    fe.close();
    qmp.close();
  });

  test('a drain that cannot finish in 5 s fails the change cleanly and the queues go on', { timeout: 60000 }, async () => {
    await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend' && d.logRecords().filter((x) => x.msg === 'session ended; waiting for the next frontend').length >= 2);
    // Storage that takes 6 s per read (a real FUSE file system). Throttled requests cannot hold a
    // drain up: a drain starts them at once, as QEMU does (drain-throttle.test.ts).
    const slowWhile = path.join(dir, 'slow-reads');
    const fuse = await mountFuseFs(path.join(dir, 'fuse'), { slowReadMs: 6000, slowWhile });
    fs.writeFileSync(path.join(fuse.backing, 'slow.img'), '');
    fs.truncateSync(path.join(fuse.backing, 'slow.img'), 16 * MiB);
    const qmp = await QmpClient.connect(control);
    await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'slow1', filename: path.join(fuse.mountpoint, 'slow.img') });
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'slow1' });
    const fe = Frontend.connect(d.socketPath);
    fe.negotiate();
    const q0 = fe.setupRing(0, 256);
    fs.writeFileSync(slowWhile, '');
    fe.blk(q0, BLK.IN, 0, 4096, { indirect: true });
    q0.kick();
    await new Promise((r) => setTimeout(r, 100));
    // The read stays in flight for ~6 s: the swap's drain must give up after 5 s. (The answer comes
    // when the worker acks the undrain: io_uring runs this FUSE read inline, so that is at ~6 s.)
    const t0 = performance.now();
    const swapFails = assert.rejects(qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'file0' }), /drain did not complete within 5000 ms/);
    // Meanwhile the drain is observable and the vhost-user channel keeps answering at once.
    await new Promise((r) => setTimeout(r, 300));
    // A second QMP connection: one connection's commands run in order, like QEMU's monitor.
    const observer = await QmpClient.connect(control);
    const mid = (await observer.execute('query-stats')) as { exports: { drain: { state: string; nesting: number } }[] };
    assert.deepEqual(mid.exports[0]!.drain, { ...mid.exports[0]!.drain, state: 'draining', nesting: 1 });
    const t1 = performance.now();
    assert.ok(fe.callU64(Request.GET_FEATURES) > 0n);
    assert.equal(fe.getConfig().length, 60);
    assert.ok(performance.now() - t1 < 1000, `vhost-user answers took ${(performance.now() - t1).toFixed(0)} ms during the drain`);
    observer.close();
    await swapFails;
    const waited = performance.now() - t0;
    assert.ok(waited >= 4900 && waited < 8000, `gave up after ${waited.toFixed(0)} ms`);
    const stats = (await qmp.execute('query-stats')) as { exports: { 'node-name': string; drain: { state: string; timeouts: number } }[] };
    assert.equal(stats.exports[0]!.drain.state, 'running', 'the queues were resumed');
    assert.equal(stats.exports[0]!.drain.timeouts, 1);
    assert.equal(stats.exports[0]!['node-name'], 'slow1', 'the failed change left the graph as it was');
    // Storage fast again: every request completes, none lost, and the next swap goes through.
    fs.rmSync(slowWhile);
    const done = q0.waitFor(1, 20000);
    assert.equal(done.length, 1);
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'file0' });
    await qmp.execute('blockdev-del', { 'node-name': 'slow1' });
    fe.close();
    qmp.close();
    await fuse.unmount();
  });
  test('blockdev-mirror speed limits the copy; block-job-set-speed lifts it (through vubd-ctl)', { timeout: 30000 }, async () => {
    const qmp = await QmpClient.connect(control);
    const target = path.join(dir, 'mirror-target.img');
    fs.writeFileSync(target, '');
    fs.truncateSync(target, 16 * MiB);
    await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'slow0', filename: target });
    const isJob = (e: { data: Record<string, unknown> }): boolean => e.data['device'] === 'slow';
    const ready = qmp.waitEvent('BLOCK_JOB_READY', isJob, 20000);
    const t0 = performance.now();
    // 16 MiB at 4 MiB/s: READY after ~4 s if the limit holds, well under 1 s without it.
    assert.equal((await ctl(control, 'mirror', 'slow', 'file0', 'slow0', '4M')).code, 0);
    await new Promise((r) => setTimeout(r, 1000));
    const elapsed = (performance.now() - t0) / 1000;
    const [j] = (await qmp.execute('query-jobs')) as { id: string; status: string; speed: number; 'current-progress': number }[];
    assert.equal(j!.status, 'running');
    assert.equal(j!.speed, 4 * MiB);
    // at most the rate times the time so far, plus the chunk in progress
    const allowed = 4 * MiB * elapsed + 2 * MiB;
    assert.ok(j!['current-progress'] <= allowed, `copied ${j!['current-progress']} bytes in ${elapsed.toFixed(2)} s at 4 MiB/s`);
    await assert.rejects(qmp.execute('block-job-set-speed', { device: 'slow', speed: -1 }), /non-negative integer/);
    assert.equal((await ctl(control, 'speed', 'slow', '0')).code, 0);
    const lifted = performance.now();
    const ev = await ready;
    const ms = performance.now() - lifted;
    assert.ok(ms < 2000, `READY came ${ms.toFixed(0)} ms after the limit was lifted`);
    assert.equal(ev.data['speed'], 0);
    await qmp.execute('job-cancel', { id: 'slow' });
    await qmp.execute('job-dismiss', { id: 'slow' });
    await qmp.execute('blockdev-del', { 'node-name': 'slow0' });
    qmp.close();
  });
  test('block_resize reaches the frontend as CONFIG_CHANGE_MSG; a frontend that stops reading its backend channel blocks nothing', { timeout: 60000 }, async () => {
    const fe = Frontend.connect(d.socketPath);
    fe.negotiate();
    fe.setupRing(0);
    const [ours, theirs] = native.socketpair();
    fe.send(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs]);
    native.close(theirs); // QEMU closes its copy too: the backend's end is the backend's alone
    const qmp = await QmpClient.connect(control);
    const within = <T>(p: Promise<T>, what: string): Promise<T> =>
      Promise.race([p, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer within 5 s`)), 5000))]);
    let size = 32 * MiB;
    await within(qmp.execute('block_resize', { 'node-name': 'file0', size }), 'first block_resize');
    assert.equal(fe.getConfig().length, 60);
    const buf = new Uint8Array(64);
    let got: ReturnType<typeof native.recvMsg> = null;
    for (let i = 0; i < 100 && got === null; i++) {
      got = native.recvMsg(ours, buf, 0, buf.length, 0);
      if (got === null) await new Promise((r) => setTimeout(r, 10));
    }
    assert.ok(got !== null, 'a CONFIG_CHANGE_MSG arrived');
    const dv = new DataView(buf.buffer);
    assert.deepEqual([dv.getUint32(0, true), dv.getUint32(4, true), dv.getUint32(8, true)], [BackendRequest.CONFIG_CHANGE_MSG, FLAG_VERSION, 0]);
    // Now never read it again: a socket buffer holds a few hundred such messages, then sends fail.
    for (let i = 0; i < 1500; i++) {
      size += 4096;
      await within(qmp.execute('block_resize', { 'node-name': 'file0', size }), `block_resize ${i}`);
    }
    assert.ok(fe.callU64(Request.GET_FEATURES) > 0n, 'the vhost-user channel still answers');
    await d.waitForLog((r) => r.msg === 'CONFIG_CHANGE_MSG dropped: the frontend is not reading its backend channel');
    const c = fe.getConfig();
    const cfg = new DataView(c.buffer, c.byteOffset, c.byteLength);
    assert.equal(Number(cfg.getBigUint64(0, true)) * 512, size, 'the config space has the last size');
    native.close(ours);
    fe.close();
    qmp.close();
  });
});
