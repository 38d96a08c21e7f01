// A guest's 1 GiB WRITE_ZEROES on a file system without fallocate (a real FUSE mount, so vubd
// falls back to writing zeroes) must not stall the other requests of its queue: small reads
// posted meanwhile complete in bounded time, long before the zeroing is done.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { Frontend, BLK, type SplitRing } from '../helpers/frontend.js';
import { native, POLLIN } from '../../src/native/index.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const OK = 0;

function segment(sector: number, num: number, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, num, true);
  dv.setUint32(12, flags, true);
  return b;
}

/** Waits until `head` completes; returns the other heads that completed meanwhile. */
function waitHead(ring: SplitRing, head: number, timeoutMs: number): number[] {
  const others: number[] = [];
  const deadline = Date.now() + timeoutMs;
  const fds = Int32Array.of(ring.callFd);
  const rev = new Int32Array(1);
  for (;;) {
    let found = false;
    for (const c of ring.collect()) {
      if (c.head === head) found = true;
      else others.push(c.head);
    }
    if (found) return others;
    if (Date.now() > deadline) throw new Error(`request ${head} not completed within ${timeoutMs} ms`);
    if (native.pollWait(fds, 1, rev, 20) > 0 && rev[0]! & POLLIN) native.eventfdRead(ring.callFd);
  }
}

for (const aio of ['io_uring', 'sync'] as const) {
  test(`aio=${aio}: reads on the queue of a 1 GiB WRITE_ZEROES (zero-write fallback) are not held up`, { timeout: 180000 }, async (t) => {
    const dir = tempDir();
    const fuse = await mountFuseFs(dir, { punchZeroWrites: true });
    const image = path.join(fuse.backing, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, GiB + 64 * MiB);
    // Data the zeroing must erase, at its start, middle and end.
    const fd = fs.openSync(image, 'r+');
    for (const off of [0, GiB / 2, GiB - 4096]) fs.writeSync(fd, Buffer.alloc(4096, 0xab), 0, 4096, off);
    fs.closeSync(fd);
    const d = await startDaemon([`--blk-file=${path.join(fuse.mountpoint, 'disk.img')}`, '--num-queues=1', `--aio=${aio}`, '--log-level=warn'], { dir });
    const fe = Frontend.connect(d.socketPath);
    t.after(async () => {
      fe.close();
      await d.stop();
      await fuse.unmount();
    });
    fe.negotiate();
    const ring = fe.setupRing(0, 128);

    const t0 = performance.now();
    const wz = fe.blk(ring, BLK.WRITE_ZEROES, 0, segment(0, GiB / 512, 0));
    ring.kick();
    const latencies: number[] = [];
    let zeroingMs = -1;
    for (let i = 0; zeroingMs < 0; i++) {
      assert.ok(performance.now() - t0 < 120000, 'the zeroing did not finish in 120 s');
      const r0 = performance.now();
      const rd = fe.blk(ring, BLK.IN, GiB / 512 + (i % 1024) * 8, 4096, { region: 1 });
      ring.kick();
      const others = waitHead(ring, rd.head, 60000);
      latencies.push(performance.now() - r0);
      assert.equal(fe.statusOf(rd), OK);
      fe.ram.resetRegion(1); // region 0 keeps the rings and the zeroing request
      if (others.includes(wz.head)) zeroingMs = performance.now() - t0;
    }
    assert.equal(fe.statusOf(wz), OK);
    const max = latencies.reduce((m, x) => Math.max(m, x), 0);
    // The last read is the one that saw the zeroing complete: the others were served while it ran.
    const during = latencies.length - 1;
    t.diagnostic(`zeroing took ${zeroingMs.toFixed(0)} ms; ${during} reads completed meanwhile, max latency ${max.toFixed(1)} ms`);
    assert.ok(max < 200, `a read waited ${max.toFixed(1)} ms behind the zeroing`);
    assert.ok(during >= 10, `reads were served while the zeroing ran (${during})`);
    for (const off of [0, GiB / 2, GiB - 4096]) {
      const r = fe.run(ring, BLK.IN, off / 512, 4096, { region: 1 });
      assert.ok(fe.dataOf(r).every((b) => b === 0), `offset ${off} reads back as zeroes`);
      fe.ram.resetRegion(1);
    }
  });
}
