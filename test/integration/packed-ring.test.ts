// Packed rings (VIRTIO_F_RING_PACKED) end to end through a vubd process. vubd offers them only
// with --ring-packed, and then not INFLIGHT_SHMFD (QEMU cannot restore a packed ring after a crash).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Frontend, BLK } from '../helpers/frontend.js';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { makeImage, openSession } from '../helpers/sessions.js';
import { F, PF, Request, bit, hasBit } from '../../src/protocol/constants.js';
import { u64Payload } from '../../src/protocol/codec.js';

function pattern(seed: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + i * 7) & 0xff;
  return b;
}

test('default vubd offers INFLIGHT_SHMFD and not RING_PACKED; --ring-packed the reverse, and says so at start-up', async () => {
  for (const packed of [false, true]) {
    const dir = tempDir();
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', ...(packed ? ['--ring-packed'] : [])], { dir });
    try {
      const fe = Frontend.connect(d.socketPath);
      const features = fe.callU64(Request.GET_FEATURES);
      const protocol = fe.callU64(Request.GET_PROTOCOL_FEATURES);
      fe.close();
      fe.ram.close();
      assert.equal(hasBit(features, F.RING_PACKED), packed, `RING_PACKED offered with packed=${packed}`);
      assert.equal(hasBit(protocol, PF.INFLIGHT_SHMFD), !packed, `INFLIGHT_SHMFD offered with packed=${packed}`);
      const notes = d.logRecords().filter((r) => typeof r.msg === 'string' && /crash recovery is off/.test(r.msg));
      assert.equal(notes.length, packed ? 1 : 0, 'one start-up line says crash recovery is off for packed rings');
      if (packed) assert.equal(notes[0]!.level, 30, 'at info level');
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  }
});

test('packed rings: wrap-around, indirect and direct chains, two queues, GET/SET_VRING_BASE', async () => {
  const dir = tempDir();
  const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2', '--ring-packed'], { dir });
  const fe = Frontend.connect(d.socketPath);
  fe.negotiate({ packed: true });
  // 100 is not a power of two: packed rings allow it.
  const q0 = fe.setupPackedRing(0, 100);
  const q1 = fe.setupPackedRing(1, 64);
  for (let round = 0; round < 12; round++) {
    const writes = [];
    for (let k = 0; k < 20; k++) {
      const ring = k % 2 ? q1 : q0;
      writes.push(fe.blk(ring, BLK.OUT, 8 * (20 * round + k), pattern(round * 100 + k, 4096), { indirect: k % 3 === 0, region: 1 }));
    }
    q0.kick();
    q1.kick();
    q0.waitFor(10);
    q1.waitFor(10);
    for (const w of writes) assert.equal(fe.statusOf(w), 0);
    const reads = [];
    for (let k = 0; k < 20; k++) {
      const ring = k % 2 ? q0 : q1;
      reads.push(fe.blk(ring, BLK.IN, 8 * (20 * round + k), 4096, { indirect: k % 4 === 0, region: 1, split: 2 }));
    }
    q0.kick();
    q1.kick();
    const done = [...q0.waitFor(10), ...q1.waitFor(10)];
    assert.ok(done.every((c) => c.len === 4097), 'used length is data + status');
    reads.forEach((r, k) => {
      assert.equal(fe.statusOf(r), 0);
      assert.deepEqual(fe.dataOf(r), pattern(round * 100 + k, 4096), `round ${round} request ${k}`);
    });
    fe.ram.resetRegion(1);
  }
  assert.ok(!q0.wrap || q0.next !== 0, 'the rings wrapped at least once');
  // GET_VRING_BASE reports the device's packed indices; restarting from them continues cleanly.
  const base = fe.getVringBase(0);
  const expected = (q0.next | (q0.wrap ? 0x8000 : 0) | (q0.usedNext << 16) | (q0.usedWrap ? 0x80000000 : 0)) >>> 0;
  assert.equal(base, expected);
  fe.setupPackedRing(0, 100, q0, base);
  const w = fe.run(q0, BLK.OUT, 4000, pattern(7, 512));
  assert.equal(fe.statusOf(w), 0);
  const r = fe.run(q0, BLK.IN, 4000, 512);
  assert.deepEqual(fe.dataOf(r), pattern(7, 512));
  fe.close();
  assert.equal((await d.stop()).code, 0);
});

test('SET_FEATURES switching RING_PACKED on a running ring is refused', async () => {
  // Before: accepted, and the worker kept serving the ring as split with the driver now packed.
  const dir = tempDir();
  const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', '--ring-packed'], { dir });
  try {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate({ packed: false });
      fe.setupRing(0, 128);
      fe.send(Request.SET_FEATURES, u64Payload(fe.features | bit(F.RING_PACKED)));
      assert.ok(fe.isClosedByPeer(3000), 'backend closed the connection');
    } finally {
      fe.close();
      fe.ram.close();
    }
    const rec = await d.waitForLog((r) => r.msg === 'vhost-user connection closed' && r.conn === conn);
    assert.match(rec.reason as string, /RING_PACKED while ring 0 is running/);
  } finally {
    assert.equal((await d.stop()).code, 0);
  }
});
