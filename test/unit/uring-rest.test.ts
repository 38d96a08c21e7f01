// Ring.prepRest: the continuation of a read or write that the kernel completed short. It must take
// up the tag's iovecs exactly `done` bytes in, crossing iovec boundaries, at the file offset that
// far on, and refuse what it cannot continue. (The engine uses it; short-transfers.test.ts shows
// it against real short writes and reads at end of file.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native, type Ring } from '../../src/native/index.js';
import { UringEngine } from '../../src/graph/io-engine.js';

function ringOrSkip(t: { skip(msg: string): void }): Ring | null {
  try {
    return new native.Ring(8, 4, 4);
  } catch (e) {
    if (process.env.CI === 'true') throw e;
    t.skip(`io_uring unavailable: ${(e as Error).message}`);
    return null;
  }
}

function completeOne(ring: Ring): [number, number] {
  const out = new Float64Array(2);
  ring.submit();
  for (;;) {
    ring.submitAndWait(1);
    if (ring.reap(out) === 1) return [out[0]!, out[1]!];
  }
}

const file = (): { path: string; fd: number; bytes: Uint8Array } => {
  const p = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-rest-')), 'f');
  const bytes = new Uint8Array(64 * 1024).map((_, i) => (i * 31 + 7) & 0xff);
  fs.writeFileSync(p, bytes);
  return { path: p, fd: fs.openSync(p, 'r+'), bytes };
};

test('prepRest continues a readv `done` bytes in, across iovec boundaries, at the matching file offset', (t) => {
  const ring = ringOrSkip(t);
  if (!ring) return;
  const f = file();
  try {
    const buf = new ArrayBuffer(16384);
    const base = native.addressOf(buf);
    // three iovecs: 1000 + 3000 + 6000 bytes at file offset 5000
    const iov = Float64Array.of(base, 1000, base + 2000, 3000, base + 8000, 6000);
    assert.equal(ring.prepReadv(f.fd, iov, 3, 5000, 2), true);
    assert.deepEqual(completeOne(ring), [2, 10000]);
    new Uint8Array(buf).fill(0);
    // As if only 2500 had arrived: the rest is 1500 bytes of the second iovec and all of the third.
    assert.equal(ring.prepRest(2, 2500), true);
    assert.deepEqual(completeOne(ring), [2, 7500]);
    const g = new Uint8Array(buf);
    assert.ok(g.subarray(0, 1000).every((b) => b === 0), 'the first iovec is not touched again');
    assert.ok(g.subarray(2000, 3500).every((b) => b === 0), 'nor the part of the second that had arrived');
    assert.deepEqual(g.subarray(3500, 5000), f.bytes.subarray(7500, 9000), 'the rest of the second from file offset 5000 + 2500');
    assert.deepEqual(g.subarray(8000, 14000), f.bytes.subarray(9000, 15000));
    // 9999 in all: one byte of the third iovec is left.
    g.fill(0);
    assert.equal(ring.prepRest(2, 9999), true);
    assert.deepEqual(completeOne(ring), [2, 1]);
    assert.equal(g[13999], f.bytes[14999]);
    assert.ok(g.subarray(0, 13999).every((b) => b === 0));
  } finally {
    ring.close();
    fs.closeSync(f.fd);
  }
});

test('prepRest continues a writev; refuses a tag without a read or write, a done that goes back or covers it all', (t) => {
  const ring = ringOrSkip(t);
  if (!ring) return;
  const f = file();
  try {
    const src = new Uint8Array(8192).map((_, i) => (i * 13 + 1) & 0xff);
    const base = native.addressOf(src.buffer);
    const iov = Float64Array.of(base, 4096, base + 4096, 4096);
    assert.equal(ring.prepWritev(f.fd, iov, 2, 0, 1), true);
    assert.deepEqual(completeOne(ring), [1, 8192]);
    fs.writeFileSync(f.path, new Uint8Array(8192)); // same inode: forget what the first write did
    assert.equal(ring.prepRest(1, 5000), true);
    assert.deepEqual(completeOne(ring), [1, 3192]);
    const onDisk = new Uint8Array(fs.readFileSync(f.path));
    assert.ok(onDisk.subarray(0, 5000).every((b) => b === 0));
    assert.deepEqual(onDisk.subarray(5000, 8192), src.subarray(5000));

    assert.throws(() => ring.prepRest(1, 4000), RangeError, 'done cannot go back');
    assert.throws(() => ring.prepRest(1, 8192), RangeError, 'nothing is left');
    assert.throws(() => ring.prepRest(3, 0), RangeError, 'tag 3 never had a read or write');
    assert.equal(ring.prepFsync(f.fd, 1, true), true);
    assert.throws(() => ring.prepRest(1, 6000), RangeError, 'the tag now holds an fsync');
    completeOne(ring);
    assert.throws(() => ring.prepRest(4, 0), RangeError, 'tag out of range');
  } finally {
    ring.close();
    fs.closeSync(f.fd);
  }
});

test('UringEngine delivers a read that ends at end of file once, with the bytes it got', (t) => {
  let engine: UringEngine;
  try {
    engine = new UringEngine(8, 4, 4);
  } catch (e) {
    if (process.env.CI === 'true') throw e;
    t.skip(`io_uring unavailable: ${(e as Error).message}`);
    return;
  }
  const f = file();
  try {
    const buf = new ArrayBuffer(8192);
    const iov = Float64Array.of(native.addressOf(buf), 4096, native.addressOf(buf) + 4096, 4096);
    engine.readv(f.fd, iov, 2, 64 * 1024 - 3000, 0); // 3000 bytes before the end of file
    engine.submit();
    const out = new Float64Array(8);
    const pfd = Int32Array.of(engine.pollFd);
    const rev = new Int32Array(1);
    let got: number[] = [];
    for (let i = 0; i < 100 && got.length === 0; i++) {
      native.pollWait(pfd, 1, rev, 100);
      const n = engine.reap(out);
      got = Array.from(out.subarray(0, 2 * n));
    }
    assert.deepEqual(got, [0, 3000]);
    assert.deepEqual(new Uint8Array(buf, 0, 3000), f.bytes.subarray(64 * 1024 - 3000));
  } finally {
    engine.close();
    fs.closeSync(f.fd);
  }
});
