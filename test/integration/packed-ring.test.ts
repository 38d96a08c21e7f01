// Packed rings (VIRTIO_F_RING_PACKED) end to end through a vubd process.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, BLK } from '../helpers/frontend.js';
import { startDaemon, tempDir } from '../helpers/daemon.js';

const MiB = 2 ** 20;

function pattern(seed: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + i * 7) & 0xff;
  return b;
}

test('packed rings: wrap-around, indirect and direct chains, two queues, GET/SET_VRING_BASE', async () => {
  const dir = tempDir();
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 16 * MiB);
  const d = await startDaemon([`--blk-file=${image}`, '--num-queues=2'], { dir });
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
