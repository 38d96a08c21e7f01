// Crash recovery through the inflight region (INFLIGHT_SHMFD): a restarted vubd resubmits what
// the previous process left in flight, in fetch order, and skips nothing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, BLK } from '../helpers/frontend.js';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { native } from '../../src/native/index.js';

const MiB = 2 ** 20;

function fill(seed: number, len = 4096): Uint8Array {
  return new Uint8Array(len).fill(seed);
}

function makeImage(dir: string): string {
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 8 * MiB);
  return image;
}

test('a restarted backend resubmits marked heads in fetch order and then serves new ones', async () => {
  const dir = tempDir();
  const image = makeImage(dir);
  const args = [`--blk-file=${image}`, '--num-queues=2', '--aio=sync'];
  const d1 = await startDaemon(args, { dir });
  const fe = Frontend.connect(d1.socketPath);
  fe.negotiate({ inflight: 'new' });
  const ring = fe.setupRing(0, 128);
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 0, fill(1))), 0);
  fe.getVringBase(0);
  fe.disconnect();
  await d1.stop('SIGKILL');

  // The state a crash leaves: three requests fetched (marked, fetched in the order c, a, b) but not
  // completed, and a fourth the backend never fetched.
  const a = fe.blk(ring, BLK.OUT, 100, fill(0xa));
  const b = fe.blk(ring, BLK.OUT, 108, fill(0xb));
  const c = fe.blk(ring, BLK.OUT, 116, fill(0xc));
  const used = ring.usedIdx();
  const region = new DataView(native.mmap(fe.inflight!.fd, fe.inflight!.size, 0, true));
  assert.equal(region.getUint16(8, true), 1, 'backend initialised the region (version 1)');
  assert.equal(region.getUint16(10, true), 128, 'desc_num');
  assert.equal(region.getUint16(14, true), used, 'used_idx recorded after the last batch');
  [c, a, b].forEach((r, k) => {
    const o = 16 + 16 * r.head;
    region.setUint8(o, 1);
    region.setBigUint64(o + 8, 1000n + BigInt(k), true);
  });
  const later = fe.blk(ring, BLK.OUT, 124, fill(0xd));

  const d2 = await startDaemon(args, { dir });
  const fe2 = fe.reconnect(d2.socketPath);
  fe2.negotiate({ inflight: fe.inflight! });
  fe2.setupRing(0, 128, ring, used);
  ring.kick();
  const done = ring.waitFor(4);
  assert.deepEqual(
    done.map((x) => x.head),
    [c.head, a.head, b.head, later.head],
    'resubmitted in counter order, then the new request',
  );
  for (const r of [a, b, c, later]) assert.equal(fe2.statusOf(r), 0);
  await d2.waitForLog((r) => typeof r.msg === 'string' && r.msg.includes('resubmitting 3 requests'));
  const disk = fs.readFileSync(image);
  for (const [sector, v] of [[100, 0xa], [108, 0xb], [116, 0xc], [124, 0xd]] as const) {
    assert.ok(disk.subarray(sector * 512, sector * 512 + 4096).every((x) => x === v), `sector ${sector}`);
  }
  for (let h = 0; h < 128; h++) assert.equal(region.getUint8(16 + 16 * h), 0, `head ${h} no longer marked`);
  fe2.close();
  assert.equal((await d2.stop()).code, 0);
});

test('SIGKILL in the middle of a write stream: after restart every request completes exactly once', async (t) => {
  const dir = tempDir();
  const image = makeImage(dir);
  const args = [`--blk-file=${image}`, '--num-queues=2'];
  const d1 = await startDaemon(args, { dir });
  const fe = Frontend.connect(d1.socketPath);
  fe.negotiate({ inflight: 'new' });
  const ring = fe.setupRing(0, 128);
  const reqs = [];
  for (let i = 0; i < 100; i++) reqs.push(fe.blk(ring, BLK.OUT, 16 * i, fill(i + 1, 8192), { indirect: true }));
  ring.kick();
  // Kill as soon as the first batch is published, while the rest is being processed.
  const deadline = Date.now() + 2000;
  while (ring.usedIdx() === 0 && Date.now() < deadline) {
    /* spin */
  }
  d1.proc.kill('SIGKILL');
  await d1.stop('SIGKILL');
  fe.disconnect();
  const firstRun = ring.collect();

  const d2 = await startDaemon(args, { dir });
  const fe2 = fe.reconnect(d2.socketPath);
  fe2.negotiate({ inflight: fe.inflight! });
  // QEMU's fallback after a failed GET_VRING_BASE: restart from the used index.
  fe2.setupRing(0, 128, ring, ring.usedIdx());
  ring.kick();
  const secondRun = ring.waitFor(100 - firstRun.length);
  t.diagnostic(`completed before the kill: ${firstRun.length}, after the restart: ${secondRun.length}`);
  const heads = [...firstRun, ...secondRun].map((x) => x.head).sort((x, y) => x - y);
  assert.deepEqual(heads, reqs.map((r) => r.head).sort((x, y) => x - y), 'each head completed exactly once');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(ring.collect().length, 0, 'no duplicate completions');
  const disk = fs.readFileSync(image);
  reqs.forEach((r, i) => {
    assert.equal(fe2.statusOf(r), 0);
    assert.ok(disk.subarray(16 * i * 512, 16 * i * 512 + 8192).every((x) => x === i + 1), `request ${i} on disk`);
  });
  fe2.close();
  assert.equal((await d2.stop()).code, 0);
});
