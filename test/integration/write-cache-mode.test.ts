// The write-cache mode follows the virtio spec and QEMU: it is set at feature negotiation (a driver
// that cannot flush gets write-through), a SET_CONFIG(wce) is acknowledged only once every queue
// runs in the new mode, RESET_DEVICE and a new session return to the configured mode, and in
// write-through every write-type request (OUT, WRITE_ZEROES, DISCARD) is flushed before it completes.
// What is observed is real: the fsync calls that reach a FUSE file system under the image.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { startDaemon, tempDir, type Daemon } from '../helpers/daemon.js';
import { fsyncCount, mountFuseFs, type FuseFsOptions } from '../helpers/fuse-fs.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { pattern } from '../helpers/sessions.js';
import { configPayload } from '../../src/protocol/codec.js';
import { F, Request } from '../../src/protocol/constants.js';
import { native } from '../../src/native/index.js';

const MiB = 2 ** 20;
const OK = 0;
const WCE = 32;

function segment(sector: number, num: number, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, num, true);
  dv.setUint32(12, flags, true);
  return b;
}

interface Setup {
  dir: string;
  d: Daemon;
  /** fsync calls that reached the image's file system so far */
  fsyncs(): number;
}

/** vubd serving an image on a FUSE mount that counts fsyncs; cleanups registered on t. */
async function serve(t: { after(fn: () => Promise<void>): void }, args: string[], fuseOpts: FuseFsOptions = {}): Promise<Setup> {
  const dir = tempDir();
  const counter = path.join(dir, 'fsyncs');
  const fuse = await mountFuseFs(dir, { ...fuseOpts, countFsyncs: counter });
  fs.writeFileSync(path.join(fuse.backing, 'disk.img'), '');
  fs.truncateSync(path.join(fuse.backing, 'disk.img'), 16 * MiB);
  let d: Daemon;
  try {
    d = await startDaemon([`--blk-file=${path.join(fuse.mountpoint, 'disk.img')}`, '--log-level=warn', ...args], { dir });
  } catch (e) {
    await fuse.unmount();
    throw e;
  }
  t.after(async () => {
    await d.stop();
    await fuse.unmount();
  });
  return { dir, d, fsyncs: () => fsyncCount(counter) };
}

function setWce(fe: Frontend, on: boolean): bigint {
  return fe.ack(Request.SET_CONFIG, configPayload(WCE, 0, Uint8Array.of(on ? 1 : 0)));
}

test('a driver without CONFIG_WCE and FLUSH gets write-through: wce reads 0, every write is flushed before it completes', { timeout: 60000 }, async (t) => {
  const s = await serve(t, []);
  const fe = Frontend.connect(s.d.socketPath);
  t.after(() => fe.close());
  fe.negotiate({ without: [F.BLK_FLUSH, F.BLK_CONFIG_WCE] });
  assert.equal(fe.getConfig()[WCE], 0, 'the config space says write-through');
  const q = fe.setupRing(0, 64);
  const before = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, pattern(1, 8192))), OK);
  assert.equal(s.fsyncs(), before + 1, 'the write reached stable storage before it completed');
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 64, pattern(2, 4096))), OK);
  assert.equal(s.fsyncs(), before + 2);
});

test('a driver with CONFIG_WCE but without FLUSH gets write-through and cannot switch to write-back', { timeout: 60000 }, async (t) => {
  const s = await serve(t, []);
  const fe = Frontend.connect(s.d.socketPath);
  t.after(() => fe.close());
  fe.negotiate({ without: [F.BLK_FLUSH] });
  assert.equal(fe.getConfig()[WCE], 0);
  assert.equal(setWce(fe, true), 1n, 'write-back for a driver that cannot flush is refused');
  assert.equal(fe.getConfig()[WCE], 0);
  const q = fe.setupRing(0, 64);
  const before = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, pattern(3, 4096))), OK);
  assert.equal(s.fsyncs(), before + 1);
});

test('a driver with FLUSH (with or without CONFIG_WCE) gets the configured write-back: wce reads 1, writes are not flushed', { timeout: 60000 }, async (t) => {
  const s = await serve(t, []);
  for (const without of [[], [F.BLK_CONFIG_WCE]]) {
    const fe = Frontend.connect(s.d.socketPath);
    fe.negotiate({ without });
    assert.equal(fe.getConfig()[WCE], 1);
    const q = fe.setupRing(0, 64);
    const before = s.fsyncs();
    assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, pattern(4, 4096))), OK);
    assert.equal(s.fsyncs(), before, 'no flush behind a write-back write');
    fe.close();
    await new Promise((r) => setTimeout(r, 100)); // the next connection waits for this session to end
  }
});

test('SET_CONFIG(wce) is acknowledged only once every queue runs in the new mode, even a queue busy in a slow read', { timeout: 60000 }, async (t) => {
  const dirHint = tempDir();
  const slow = path.join(dirHint, 'slow');
  // Synchronous I/O: queue 1's worker is inside a 1.5 s read when the mode changes.
  const s = await serve(t, ['--num-queues=2', '--aio=sync'], { slowReadMs: 1500, slowWhile: slow });
  const fe = Frontend.connect(s.d.socketPath);
  t.after(() => fe.close());
  fe.negotiate();
  const q0 = fe.setupRing(0, 64);
  const q1 = fe.setupRing(1, 64);
  let n = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 0, pattern(5, 4096))), OK);
  assert.equal(s.fsyncs(), n, 'write-back to begin with');

  fs.writeFileSync(slow, '');
  const read = fe.blk(q1, BLK.IN, 0, 4096);
  q1.kick();
  await new Promise((r) => setTimeout(r, 300));
  const t0 = performance.now();
  assert.equal(setWce(fe, false), 0n, 'write-through accepted');
  const ackMs = performance.now() - t0;
  fs.unlinkSync(slow);
  // Sent right after the ack: it must run in write-through although its queue was busy at the switch.
  const write = fe.blk(q1, BLK.OUT, 128, pattern(6, 4096));
  q1.kick();
  const done = q1.waitFor(2, 10000).map((c) => c.head);
  assert.deepEqual(done.sort(), [read.head, write.head].sort());
  t.diagnostic(`REPLY_ACK after ${ackMs.toFixed(0)} ms`);
  assert.equal(fe.statusOf(read), OK);
  assert.equal(fe.statusOf(write), OK);
  assert.equal(s.fsyncs(), n + 1, "the write on the queue that was busy was flushed: its worker had switched before the ack");
  n = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 8, pattern(7, 4096))), OK);
  assert.equal(s.fsyncs(), n + 1, 'and so was the write on the other queue');
  assert.equal(fe.getConfig()[WCE], 0);

  assert.equal(setWce(fe, true), 0n, 'back to write-back');
  n = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q0, BLK.OUT, 16, pattern(8, 4096))), OK);
  assert.equal(fe.statusOf(fe.run(q1, BLK.OUT, 24, pattern(9, 4096))), OK);
  assert.equal(s.fsyncs(), n, 'no flushes in write-back');
  assert.equal(fe.getConfig()[WCE], 1);
});

test('RESET_DEVICE and a new session return to the configured write-back mode', { timeout: 60000 }, async (t) => {
  const s = await serve(t, []);
  const fe = Frontend.connect(s.d.socketPath);
  fe.negotiate();
  assert.equal(setWce(fe, false), 0n);
  let q = fe.setupRing(0, 64);
  let n = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 0, pattern(10, 4096))), OK);
  assert.equal(s.fsyncs(), n + 1, 'write-through as the guest asked');

  assert.equal(fe.ack(Request.RESET_DEVICE), 0n);
  native.close(fe.backendReqFds![0]);
  fe.negotiate();
  assert.equal(fe.getConfig()[WCE], 1, 'after RESET_DEVICE the config space shows the configured mode');
  q = fe.setupRing(0, 64);
  n = s.fsyncs();
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 8, pattern(11, 4096))), OK);
  assert.equal(s.fsyncs(), n, 'and writes are write-back again');

  assert.equal(setWce(fe, false), 0n);
  fe.close();
  await new Promise((r) => setTimeout(r, 100));
  const fe2 = Frontend.connect(s.d.socketPath);
  t.after(() => fe2.close());
  fe2.negotiate();
  assert.equal(fe2.getConfig()[WCE], 1, 'a new session starts in the configured mode');
  const q2 = fe2.setupRing(0, 64);
  n = s.fsyncs();
  assert.equal(fe2.statusOf(fe2.run(q2, BLK.OUT, 16, pattern(12, 4096))), OK);
  assert.equal(s.fsyncs(), n);
});

for (const aio of ['io_uring', 'sync'] as const) {
  test(`aio=${aio}: in write-through WRITE_ZEROES and DISCARD are flushed before they complete`, { timeout: 60000 }, async (t) => {
    const s = await serve(t, [`--aio=${aio}`]);
    const fe = Frontend.connect(s.d.socketPath);
    t.after(() => fe.close());
    fe.negotiate();
    assert.equal(setWce(fe, false), 0n);
    const q = fe.setupRing(0, 64);
    let n = s.fsyncs();
    assert.equal(fe.statusOf(fe.run(q, BLK.WRITE_ZEROES, 0, segment(0, 128, 0))), OK);
    assert.equal(s.fsyncs(), n + 1, 'WRITE_ZEROES was flushed');
    n = s.fsyncs();
    assert.equal(fe.statusOf(fe.run(q, BLK.WRITE_ZEROES, 0, segment(256, 128, 1))), OK);
    assert.equal(s.fsyncs(), n + 1, 'WRITE_ZEROES with UNMAP was flushed');
    n = s.fsyncs();
    assert.equal(fe.statusOf(fe.run(q, BLK.DISCARD, 0, segment(512, 128, 0))), OK);
    assert.equal(s.fsyncs(), n + 1, 'DISCARD was flushed');
    assert.equal(setWce(fe, true), 0n);
    n = s.fsyncs();
    assert.equal(fe.statusOf(fe.run(q, BLK.WRITE_ZEROES, 0, segment(0, 128, 0))), OK);
    assert.equal(fe.statusOf(fe.run(q, BLK.DISCARD, 0, segment(512, 128, 0))), OK);
    assert.equal(s.fsyncs(), n, 'not in write-back');
  });
}
