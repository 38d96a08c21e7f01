// The rbd node against a real Ceph cluster started by the test (one mon, one memstore OSD):
// the stamped verify workload on 2 queues, a resize by the rbd CLI reaching the frontend, the OSD
// stopped and restarted under load, block_resize through librbd, and the refusals.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { startDaemon, tempDir, type Daemon } from '../helpers/daemon.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { dispose } from '../helpers/sessions.js';
import { BackendRequest, Request } from '../../src/protocol/constants.js';
import { native } from '../../src/native/index.js';
import { CephCluster, cephSkip } from '../helpers/ceph-cluster.js';
import type { VerifyLoadInput, VerifyLoadResult } from '../helpers/verify-load.js';

const MiB = 2 ** 20;

/** a discard / write-zeroes range segment (virtio_blk_discard_write_zeroes) */
function segment(sector: number, num: number, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, num, true);
  dv.setUint32(12, flags, true);
  return b;
}

function startLoad(socketPath: string, queues: number, waitMs = 10000): { result: Promise<VerifyLoadResult>; stop: Int32Array; progress: Int32Array } {
  const stop = new SharedArrayBuffer(4);
  const progress = new SharedArrayBuffer(4 * queues);
  const input: VerifyLoadInput = { socketPath, queues, areaSectors: (2 * MiB) / 512, depth: 8, stop, progress, waitMs };
  const worker = new Worker(new URL('../helpers/verify-load.js', import.meta.url), { workerData: input });
  const result = new Promise<VerifyLoadResult>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  return { result, stop: new Int32Array(stop), progress: new Int32Array(progress) };
}

async function until(what: string, cond: () => boolean, timeoutMs = 30000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const skip = cephSkip();

describe('rbd node on a real Ceph cluster', { skip, timeout: 300000 }, () => {
  let ceph: CephCluster;
  let dir: string;
  let d: Daemon;
  let qmp: QmpClient;
  before(async () => {
    ceph = await CephCluster.start({ images: { disk: 16 * MiB, resized: 8 * MiB, osd: 16 * MiB, queue: 4 * MiB } });
    dir = tempDir('vubd-rbd-');
    const control = path.join(dir, 'qmp.sock');
    d = await startDaemon([`--control=${control}`, '--workers=2', '--aio=io_uring'], { dir, exportless: true });
    qmp = await QmpClient.connect(control);
  });
  after(async () => {
    qmp?.close();
    await d?.stop();
    ceph?.stop();
  });

  const addRbd = (node: string, image: string, extra: Record<string, unknown> = {}): Promise<unknown> =>
    qmp.execute('blockdev-add', { driver: 'rbd', 'node-name': node, pool: ceph.pool, image, conf: ceph.conf, user: 'admin', ...extra });
  const addExport = async (id: string, node: string, queues = 2): Promise<string> => {
    const sock = path.join(dir, `${id}.sock`);
    await qmp.execute('block-export-add', { type: 'vhost-user-blk', id, 'node-name': node, addr: { type: 'unix', path: sock }, writable: true, 'num-queues': queues });
    return sock;
  };

  test('the stamped verify workload on 2 queues: 0 lost, 0 verify errors, counted in query-stats; data visible to rbd export', async () => {
    await addRbd('r0', 'disk', { cache: { direct: true } });
    const nodes = await qmp.execute<{ 'node-name': string; drv: string; file: string; image: { 'virtual-size': number } }[]>('query-named-block-nodes');
    const r0 = nodes.find((n) => n['node-name'] === 'r0')!;
    assert.equal(r0.drv, 'rbd');
    assert.equal(r0.file, `rbd:${ceph.pool}/disk`);
    assert.equal(r0.image['virtual-size'], 16 * MiB);
    const sock = await addExport('e0', 'r0');
    const load = startLoad(sock, 2);
    await until('10 rounds on each queue', () => Math.min(...load.progress) >= 10, 120000);
    Atomics.store(load.stop, 0, 1);
    const r = await load.result;
    assert.equal(r.firstError, null, r.firstError ?? '');
    assert.equal(r.lost + r.verifyErrors + r.badStatus, 0);
    assert.ok(r.reads > 0 && r.reads === r.writes);
    const stats = await qmp.execute<{ nodes: { 'node-name': string; 'read-ops': number; 'write-ops': number }[] }>('query-stats');
    const s = stats.nodes.find((n) => n['node-name'] === 'r0')!;
    assert.ok(s['read-ops'] >= r.reads && s['write-ops'] >= r.writes, `node counters ${JSON.stringify(s)} cover the workload`);
    // A flush, a discard and write-zeroes through librbd, then the image as another client reads it.
    const fe = Frontend.connect(sock);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 64);
      const data = new Uint8Array(8192).fill(0x5a);
      const w = fe.run(ring, BLK.OUT, 2048, data);
      assert.equal(fe.statusOf(w), 0);
      assert.equal(fe.statusOf(fe.run(ring, BLK.FLUSH, 0, 0)), 0, 'flush');
      assert.equal(fe.statusOf(fe.run(ring, BLK.WRITE_ZEROES, 0, segment(2048 + 8, 8, 0))), 0, 'write zeroes');
      assert.equal(fe.statusOf(fe.run(ring, BLK.DISCARD, 0, segment(4096, 8, 0))), 0, 'discard');
      assert.equal(fe.statusOf(fe.run(ring, BLK.FLUSH, 0, 0)), 0, 'flush');
    } finally {
      dispose(fe);
    }
    const img = await ceph.exportImage('disk');
    assert.equal(img.length, 16 * MiB);
    const at = 2048 * 512;
    assert.ok(img.subarray(at, at + 4096).every((b) => b === 0x5a), 'the written block');
    assert.ok(img.subarray(at + 4096, at + 8192).every((b) => b === 0), 'the zeroed block');
    for (let tries = 0; ; tries++) {
      try {
        await qmp.execute('block-export-del', { id: 'e0' });
        break;
      } catch (e) {
        if (tries > 200) throw e;
        await new Promise((res) => setTimeout(res, 20));
      }
    }
  });

  test('a resize by the rbd CLI reaches the frontend as CONFIG_CHANGE_MSG with the new capacity; block_resize goes through librbd', async () => {
    await addRbd('r1', 'resized');
    const sock = await addExport('e1', 'r1', 1);
    const fe = Frontend.connect(sock);
    const [ours, theirs] = native.socketpair();
    try {
      fe.negotiate();
      fe.setupRing(0);
      fe.send(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs]);
      native.close(theirs);
      const capacity = (): number => {
        const c = fe.getConfig();
        return Number(new DataView(c.buffer, c.byteOffset, c.byteLength).getBigUint64(0, true)) * 512;
      };
      assert.equal(capacity(), 8 * MiB);
      const recvChange = async (): Promise<void> => {
        const buf = new Uint8Array(64);
        await until('a CONFIG_CHANGE_MSG', () => native.recvMsg(ours, buf, 0, buf.length, 0) !== null, 30000);
        assert.equal(new DataView(buf.buffer).getUint32(0, true), BackendRequest.CONFIG_CHANGE_MSG);
      };
      await ceph.rbd(['resize', '--size', '12M', `${ceph.pool}/resized`]);
      await recvChange();
      assert.equal(capacity(), 12 * MiB, 'the guest sees the size the other client set');
      await qmp.execute('block_resize', { 'node-name': 'r1', size: 20 * MiB });
      await recvChange();
      assert.equal(capacity(), 20 * MiB);
      const info = JSON.parse(await ceph.rbd(['info', '--format', 'json', `${ceph.pool}/resized`])) as { size: number };
      assert.equal(info.size, 20 * MiB, 'block_resize resized the image in the cluster');
    } finally {
      native.close(ours);
      dispose(fe);
    }
  });

  test('the OSD stopped and restarted under the verify workload: requests wait, then complete; 0 lost, 0 verify errors', async () => {
    await addRbd('r2', 'osd');
    const sock = await addExport('e2', 'r2');
    const load = startLoad(sock, 2, 60000);
    await until('3 rounds', () => Math.min(...load.progress) >= 3, 60000);
    await ceph.killOsd();
    const at = Math.min(...load.progress);
    await new Promise((r) => setTimeout(r, 2000));
    assert.ok(Math.min(...load.progress) <= at + 1, 'no progress while the only OSD is down');
    const down = Date.now();
    await ceph.startOsd();
    await until('3 more rounds after the restart', () => Math.min(...load.progress) >= at + 4, 60000);
    const resumedMs = Date.now() - down;
    Atomics.store(load.stop, 0, 1);
    const r = await load.result;
    assert.equal(r.firstError, null, r.firstError ?? '');
    assert.equal(r.lost + r.verifyErrors + r.badStatus, 0);
    assert.ok(resumedMs < 60000, `resumed ${resumedMs} ms after the OSD came back`);
  });

  test('an RbdQueue on a shared image handle: I/O in order, the image outlives its opener while a queue uses it, the last close ends the connection', async () => {
    const before = native.rbdConnections!();
    const own = new native.RbdImage({ pool: ceph.pool, image: 'queue', conf: ceph.conf, user: 'admin', cache: false });
    assert.throws(() => own.share(), /shared: true/, 'an image with its own completion eventfd is not shared');
    own.close();
    const img = new native.RbdImage({ pool: ceph.pool, image: 'queue', conf: ceph.conf, user: 'admin', cache: false, shared: true });
    const id = img.share();
    assert.equal(img.share(), id, 'one id per image');
    assert.throws(() => img.flush(1), /RbdQueue/, 'a shared image takes I/O only through its queues');
    const q = new native.RbdQueue(id);
    const out = new Float64Array(2 * 4);
    const reap = async (want: number): Promise<number[]> => {
      const got: number[] = [];
      const deadline = Date.now() + 20000;
      while (got.length < 2 * want) {
        const n = q.poll(out);
        for (let i = 0; i < 2 * n; i++) got.push(out[i]!);
        if (Date.now() > deadline) throw new Error(`only ${got.length / 2} of ${want} completions`);
        if (n === 0) await new Promise((r) => setTimeout(r, 5));
      }
      return got;
    };
    const buf = new ArrayBuffer(8192);
    new Uint8Array(buf).fill(0xc3);
    const iov = new Float64Array([native.addressOf(buf), 8192]);
    assert.equal(q.writev(iov, 1, 65536, 7), 0);
    assert.deepEqual(await reap(1), [7, 8192], 'a write reports its bytes');
    assert.equal(q.flush(8), 0);
    assert.deepEqual(await reap(1), [8, 0]);
    img.close();
    assert.throws(() => img.share(), /closed/);
    // the opener is gone, the queue still reads what it wrote (10 completions through a 4-entry out array)
    const back = new ArrayBuffer(8192);
    const iov2 = new Float64Array([native.addressOf(back), 8192]);
    for (let t = 0; t < 10; t++) assert.equal(q.readv(iov2, 1, 65536, 100 + t), 0);
    const done = await reap(10);
    assert.deepEqual(done.filter((_, i) => i % 2 === 0).sort((a, b) => a - b), Array.from({ length: 10 }, (_, t) => 100 + t));
    assert.ok(done.filter((_, i) => i % 2 === 1).every((r) => r === 8192));
    assert.ok(new Uint8Array(back).every((b) => b === 0xc3));
    assert.equal(native.rbdConnections!(), before + 1, 'the connection stays while the queue uses the image');
    q.close();
    assert.equal(native.rbdConnections!(), before, 'the last close shut the image and its connection');
    assert.throws(() => q.readv(iov2, 1, 0, 1), /closed/);
    assert.throws(() => new native.RbdQueue(id), /no longer open/);
  });

  test('the command line serves an rbd image: --blk-file=rbd:POOL/IMAGE:conf=PATH:id=admin --cache=none', async () => {
    await ceph.createImage('cli', 4 * MiB);
    const cd = await startDaemon([`--blk-file=rbd:${ceph.pool}/cli:conf=${ceph.conf}:id=admin`, '--cache=none', '--num-queues=1', '--workers=1'], { dir: tempDir('vubd-rbd-cli-') });
    const fe = Frontend.connect(cd.socketPath);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 64);
      const data = new Uint8Array(4096).fill(0xc3);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8, data)), 0);
      const r = fe.run(ring, BLK.IN, 8, 4096);
      assert.equal(fe.statusOf(r), 0);
      assert.ok(fe.dataOf(r).every((b) => b === 0xc3), 'read back what was written');
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, (4 * MiB) / 512, 512)), 1, 'a read past the end fails with IOERR');
    } finally {
      dispose(fe);
      await cd.stop();
    }
    const img = await ceph.exportImage('cli');
    assert.ok(img.subarray(8 * 512, 8 * 512 + 4096).every((b) => b === 0xc3), 'the rbd CLI reads the block');
  });

  test('refusals: key-secret without a secret object, a missing image, a snapshot is read-only', async () => {
    await assert.rejects(addRbd('bad0', 'disk', { 'key-secret': 'sec0' }), /key-secret.*'key'.*'keyring'/);
    await assert.rejects(addRbd('bad1', 'nonexistent'), /Could not open rbd image 'rbd\/nonexistent'.*No such file/);
    await ceph.rbd(['snap', 'create', `${ceph.pool}/disk@s1`]);
    await addRbd('snap', 'disk', { snapshot: 's1' });
    const nodes = await qmp.execute<{ 'node-name': string; ro: boolean }[]>('query-named-block-nodes');
    assert.equal(nodes.find((n) => n['node-name'] === 'snap')!.ro, true);
    await assert.rejects(qmp.execute('block_resize', { 'node-name': 'snap', size: 32 * MiB }), /read-only/);
    await qmp.execute('blockdev-del', { 'node-name': 'snap' });
  });
});
