// virtio-blk request execution over real guest memory (memfd regions), a real SyncEngine and a
// FileNode on a temp file (or a NullNode). The test plays the driver: it builds the request chain
// in guest memory, and checks the status byte, the used length and the file afterwards.
import { test, describe, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native } from '../../src/native/index.js';
import { type RegionSpec } from '../../src/virtio/memory.js';
import { mapGuestMemory } from '../../src/virtio/memory-map.js';
import { ChainError, DescriptorChain } from '../../src/virtio/chain.js';
import { SplitQueue, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE } from '../../src/virtio/split-queue.js';
import { SyncEngine, UringEngine, type IoEngine } from '../../src/graph/io-engine.js';
import { FileNode, NullNode, PENDING, newNodeStats, type BlockNode } from '../../src/graph/nodes.js';
import { WorkerIoContext } from '../../src/worker/io-context.js';
import { BlkRequestHandler, BlkSlot, type BlkOptions } from '../../src/blk/request.js';

const T_IN = 0;
const T_OUT = 1;
const T_FLUSH = 4;
const T_GET_ID = 8;
const T_DISCARD = 11;
const T_WRITE_ZEROES = 13;
const S_OK = 0;
const S_IOERR = 1;
const S_UNSUPP = 2;
const UNMAP = 1;

// ---- guest memory: two regions with a gap, region 1 at a non-zero mmap offset

const MiB = 0x100000;
const DEFS = [
  { gpa: 0, size: MiB, uva: 0x7f00_0000_0000, mmapOffset: 0 },
  { gpa: 2 * MiB, size: MiB, uva: 0x7f00_4000_0000, mmapOffset: 0x2000 },
];
const R1 = DEFS[1]!.gpa;
const GAP = MiB;

const fds: number[] = [];
const files: Uint8Array[] = [];
const specs: RegionSpec[] = DEFS.map((d, i) => {
  const fd = native.memfdCreate(`blk-test-${i}`, d.mmapOffset + d.size);
  fds.push(fd);
  files.push(new Uint8Array(native.mmap(fd, d.mmapOffset + d.size, 0, true)));
  return { guestPhysAddr: d.gpa, size: d.size, userAddr: d.uva, mmapOffset: d.mmapOffset, fd };
});
const mem = mapGuestMemory(specs);

function gbytes(gpa: number, len: number): Uint8Array {
  const i = DEFS.findIndex((d) => gpa >= d.gpa && gpa + len <= d.gpa + d.size);
  if (i < 0) throw new Error(`test bug: 0x${gpa.toString(16)} not in guest memory`);
  const off = DEFS[i]!.mmapOffset + gpa - DEFS[i]!.gpa;
  return files[i]!.subarray(off, off + len);
}
function uva(gpa: number): number {
  const d = DEFS.find((r) => gpa >= r.gpa && gpa < r.gpa + r.size)!;
  return d.uva + gpa - d.gpa;
}
function pattern(len: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: len }, (_, i) => (i * 31 + seed * 7 + 1) & 0xff);
}

// ---- the disk image

const DISK_SIZE = MiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-blk-'));
const image = path.join(dir, 'disk.img');
fs.writeFileSync(image, new Uint8Array(DISK_SIZE));
const imageFd = fs.openSync(image, 'r+');
const DISK_PATTERN = pattern(DISK_SIZE, 99);
const fileNode = new FileNode({ driver: 'file', name: 'disk', fd: imageFd, path: image, size: DISK_SIZE, readOnly: false, stats: newNodeStats() });

function resetDisk(): void {
  fs.writeSync(imageFd, DISK_PATTERN, 0, DISK_SIZE, 0);
}
function disk(off: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  assert.equal(fs.readSync(imageFd, b, 0, len, off), len);
  return b;
}

after(() => {
  fs.closeSync(imageFd);
  fs.rmSync(dir, { recursive: true, force: true });
  for (const fd of fds) native.close(fd);
});

// ---- request building

const Q = 32;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;
const HDR = 0x10000;
const STATUS = 0x11000;
const D0 = 0x20000; // data in region 0
const D1 = R1 + 0x20000; // data in region 1

interface Buf {
  gpa: number | bigint;
  len: number;
  write?: boolean;
}

function header(type: number, sector: number | bigint, gpa = HDR): Buf {
  const dv = new DataView(gbytes(gpa, 16).buffer, gbytes(gpa, 16).byteOffset, 16);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0, true);
  dv.setBigUint64(8, BigInt(sector), true);
  return { gpa, len: 16 };
}
function status(gpa = STATUS): Buf {
  gbytes(gpa, 1)[0] = 0xff;
  return { gpa, len: 1, write: true };
}
function statusByte(gpa = STATUS): number {
  return gbytes(gpa, 1)[0]!;
}
function data(gpa: number, bytes: Uint8Array): Buf {
  gbytes(gpa, bytes.length).set(bytes);
  return { gpa, len: bytes.length };
}
function segsPayload(gpa: number, segs: [number | bigint, number, number][]): Buf {
  const b = gbytes(gpa, 16 * segs.length);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  segs.forEach(([sector, num, flags], i) => {
    dv.setBigUint64(16 * i, BigInt(sector), true);
    dv.setUint32(16 * i + 8, num, true);
    dv.setUint32(16 * i + 12, flags, true);
  });
  return { gpa, len: b.byteLength };
}

const engine = new SyncEngine(8);
const defaults: BlkOptions = { serial: new TextEncoder().encode('vubd-serial-0123456789-extra'), writeback: true, readOnly: false };
const TAG = 5;

interface Result {
  usedLen: number;
  /** completions that reached the request (2 when a flush phase followed) */
  phases: number;
  /** operations the engine completed for it (a long range op takes one per step) */
  completions: number;
  /** service rounds that started a deferred step */
  deferredSteps: number;
  slot: BlkSlot;
}

/** Puts bufs on the ring as one chain, pops and walks it, runs the request to completion. */
function run(bufs: Buf[], opts: { node?: BlockNode; handler?: Partial<BlkOptions>; engine?: IoEngine } = {}): Result {
  for (let i = 0; i < bufs.length; i++) {
    const b = bufs[i]!;
    const dv = new DataView(gbytes(DESC + 16 * i, 16).buffer, gbytes(DESC + 16 * i, 16).byteOffset, 16);
    dv.setBigUint64(0, BigInt(b.gpa), true);
    dv.setUint32(8, b.len, true);
    dv.setUint16(12, (b.write ? WRITE : 0) | (i + 1 < bufs.length ? NEXT : 0), true);
    dv.setUint16(14, i + 1, true);
  }
  gbytes(AVAIL, 6 + 2 * Q).fill(0);
  gbytes(USED, 6 + 8 * Q).fill(0);
  const av = new DataView(gbytes(AVAIL, 6).buffer, gbytes(AVAIL, 6).byteOffset, 6);
  av.setUint16(2, 1, true); // avail idx 1, ring[0] = head 0
  const q = new SplitQueue(mem, { size: Q, descAddr: uva(DESC), availAddr: uva(AVAIL), usedAddr: uva(USED) }, 0, false, true);
  assert.equal(q.pending(), 1);
  const chain = new DescriptorChain(16);
  q.walk(q.popHead(), chain);
  const slot = new BlkSlot(TAG, chain, 16);
  const handler = new BlkRequestHandler({ ...defaults, ...opts.handler });
  const ctx = new WorkerIoContext();
  ctx.engine = opts.engine ?? engine;
  handler.start(slot, opts.node ?? fileNode, ctx);
  const out = new Float64Array(8);
  // As the queue worker does: due deferred steps, then completions through the nodes' continuations.
  let phases = 0;
  let completions = 0;
  let deferredSteps = 0;
  const pollFd = Int32Array.of(ctx.engine.pollFd);
  const revents = new Int32Array(1);
  for (let rounds = 1; rounds <= 1000; rounds++) {
    if (ctx.runDueTimers()) deferredSteps++;
    ctx.engine.submit();
    const n = ctx.engine.reap(out);
    if (n === 0) {
      // io_uring: sleep until the kernel completes what it holds (unless a step is due)
      if (pollFd[0]! >= 0 && ctx.msToNextTimer() !== 0) native.pollWait(pollFd, 1, revents, 1000);
      continue;
    }
    assert.equal(n, 1, 'one request, one operation at a time');
    assert.equal(out[0], TAG);
    completions++;
    const res = ctx.runContinuations(TAG, out[1]!);
    if (res === PENDING) continue;
    phases++;
    const usedLen = handler.complete(slot, res, ctx);
    if (usedLen >= 0) {
      assert.equal(ctx.engine.reap(out), 0, 'no stray completions');
      assert.equal(ctx.msToNextTimer(), -1, 'no stray deferred step');
      return { usedLen, phases, completions, deferredSteps, slot };
    }
  }
  throw new Error('request did not finish in 1000 service rounds');
}

beforeEach(() => resetDisk());

describe('IN / OUT on a file', () => {
  test('OUT: two segments in two regions land in the file, zero copy', () => {
    const a = pattern(512, 1);
    const b = pattern(1024, 2);
    const r = run([header(T_OUT, 3), data(D0, a), data(D1, b), status()]);
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 1);
    assert.equal(r.phases, 1);
    assert.deepEqual(disk(3 * 512, 1536), Uint8Array.from([...a, ...b]));
    assert.deepEqual(disk(0, 1536), DISK_PATTERN.subarray(0, 1536), 'bytes before untouched');
    assert.deepEqual(disk(3 * 512 + 1536, 512), DISK_PATTERN.subarray(3 * 512 + 1536, 3 * 512 + 2048), 'bytes after untouched');
    // the iovecs point straight into the mapped guest regions
    assert.equal(r.slot.iovCount, 2);
    assert.deepEqual([...r.slot.iov.subarray(0, 4)], [mem.regions[0]!.hostAddr + D0, 512, mem.regions[1]!.hostAddr + (D1 - R1), 1024]);
    assert.equal(mem.regions[1]!.hostAddr, native.addressOf(mem.regions[1]!.buffer) + mem.regions[1]!.base);
  });

  test('IN: data from the file into two writable buffers, status in its own buffer', () => {
    gbytes(D0, 512).fill(0xaa);
    gbytes(D1, 1536).fill(0xaa);
    const r = run([header(T_IN, 7), { gpa: D0, len: 512, write: true }, { gpa: D1, len: 1024, write: true }, status()]);
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 1024 + 512 + 1);
    assert.deepEqual(gbytes(D0, 512), DISK_PATTERN.subarray(7 * 512, 8 * 512));
    assert.deepEqual(gbytes(D1, 1024), DISK_PATTERN.subarray(8 * 512, 10 * 512));
    assert.equal(gbytes(D1 + 1024, 1)[0], 0xaa, 'byte after the buffer untouched');
  });

  test('IN: data and status byte in one 513-byte buffer; header split over two buffers', () => {
    header(T_IN, 1, HDR);
    const hdrBytes = gbytes(HDR, 16).slice();
    gbytes(R1 + 0x100, 8).set(hdrBytes.subarray(8)); // second half of the header in region 1
    gbytes(D1, 514).fill(0xaa);
    const r = run([{ gpa: HDR, len: 8 }, { gpa: R1 + 0x100, len: 8 }, { gpa: D1, len: 513, write: true }]);
    assert.equal(r.usedLen, 513);
    assert.deepEqual(gbytes(D1, 512), DISK_PATTERN.subarray(512, 1024));
    assert.equal(gbytes(D1 + 512, 1)[0], S_OK);
    assert.equal(gbytes(D1 + 513, 1)[0], 0xaa);
  });

  test('zero-length IN and OUT succeed without I/O', () => {
    assert.equal(run([header(T_IN, 0), status()]).usedLen, 1);
    assert.equal(statusByte(), S_OK);
    assert.equal(run([header(T_OUT, 0), status()]).usedLen, 1);
    assert.equal(statusByte(), S_OK);
  });

  test('the last sector is in range; one byte more is not', () => {
    const last = DISK_SIZE / 512 - 1;
    const a = pattern(512, 3);
    run([header(T_OUT, last), data(D0, a), status()]);
    assert.equal(statusByte(), S_OK);
    assert.deepEqual(disk(DISK_SIZE - 512, 512), a);
    resetDisk();
    const r = run([header(T_OUT, last), data(D0, pattern(1024, 4)), status()]);
    assert.equal(statusByte(), S_IOERR);
    assert.equal(r.usedLen, 1);
    assert.deepEqual(disk(DISK_SIZE - 512, 512), DISK_PATTERN.subarray(DISK_SIZE - 512));
  });

  for (const sector of [DISK_SIZE / 512, 2 ** 32, 2 ** 44, 2n ** 53n, 2n ** 64n - 1n]) {
    test(`out of range: sector ${sector}`, () => {
      gbytes(D0, 512).fill(0xaa);
      const r = run([header(T_IN, sector), { gpa: D0, len: 512, write: true }, status()]);
      assert.equal(statusByte(), S_IOERR);
      assert.equal(r.usedLen, 1);
      assert.deepEqual(gbytes(D0, 512), new Uint8Array(512).fill(0xaa), 'nothing read into the buffer');
      run([header(T_OUT, sector), data(D0, pattern(512, 5)), status()]);
      assert.equal(statusByte(), S_IOERR);
    });
  }

  test('data length not a multiple of 512', () => {
    run([header(T_OUT, 0), data(D0, pattern(100, 6)), status()]);
    assert.equal(statusByte(), S_IOERR);
    run([header(T_OUT, 0), data(D0, pattern(512, 6)), data(D1, pattern(1, 6)), status()]);
    assert.equal(statusByte(), S_IOERR);
    assert.deepEqual(disk(0, 1024), DISK_PATTERN.subarray(0, 1024));
    run([header(T_IN, 0), { gpa: D0, len: 1000, write: true }, status()]);
    assert.equal(statusByte(), S_IOERR);
  });

  test('a read past the end of the file (node larger than its file) reads zeroes there, as in QEMU', () => {
    const big = new FileNode({ driver: 'file', name: 'big', fd: imageFd, path: image, size: 2 * DISK_SIZE, readOnly: false, stats: newNodeStats() });
    gbytes(D0, 1024).fill(0xee);
    run([header(T_IN, DISK_SIZE / 512), { gpa: D0, len: 512, write: true }, status()], { node: big });
    assert.equal(statusByte(), S_OK);
    assert.deepEqual(gbytes(D0, 512), new Uint8Array(512), 'all of it past the end');
    gbytes(D0, 1024).fill(0xee);
    run([header(T_IN, DISK_SIZE / 512 - 1), { gpa: D0, len: 1024, write: true }, status()], { node: big });
    assert.equal(statusByte(), S_OK, 'half of the read is past the end of the file');
    assert.deepEqual(gbytes(D0, 512), DISK_PATTERN.subarray(DISK_SIZE - 512, DISK_SIZE), 'the half before the end is the data');
    assert.deepEqual(gbytes(D0 + 512, 512), new Uint8Array(512), 'the half past it zeroes');
  });
});

describe('read-only', () => {
  test('OUT is refused when the handler is read-only; IN still works', () => {
    run([header(T_OUT, 0), data(D0, pattern(512, 7)), status()], { handler: { readOnly: true } });
    assert.equal(statusByte(), S_IOERR);
    assert.deepEqual(disk(0, 512), DISK_PATTERN.subarray(0, 512));
    run([header(T_IN, 0), { gpa: D0, len: 512, write: true }, status()], { handler: { readOnly: true } });
    assert.equal(statusByte(), S_OK);
    assert.deepEqual(gbytes(D0, 512), DISK_PATTERN.subarray(0, 512));
  });

  test('OUT, DISCARD and WRITE_ZEROES are refused on a read-only node', () => {
    const ro = new FileNode({ driver: 'file', name: 'ro', fd: imageFd, path: image, size: DISK_SIZE, readOnly: true, stats: newNodeStats() });
    run([header(T_OUT, 0), data(D0, pattern(512, 8)), status()], { node: ro });
    assert.equal(statusByte(), S_IOERR);
    run([header(T_DISCARD, 0), segsPayload(D0, [[0, 8, 0]]), status()], { node: ro });
    assert.equal(statusByte(), S_IOERR);
    run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[0, 8, 0]]), status()], { node: ro });
    assert.equal(statusByte(), S_IOERR);
    assert.deepEqual(disk(0, 4096), DISK_PATTERN.subarray(0, 4096));
  });
});

describe('FLUSH, GET_ID, unknown types', () => {
  test('FLUSH', () => {
    const r = run([header(T_FLUSH, 0), status()]);
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 1);
  });

  for (const type of [2, 3, 5, 99, 0xffff_ffff]) {
    test(`unknown type ${type} is UNSUPP`, () => {
      const r = run([header(type, 0), data(D0, pattern(512, 9)), status()]);
      assert.equal(statusByte(), S_UNSUPP);
      assert.equal(r.usedLen, 1);
      assert.deepEqual(disk(0, 512), DISK_PATTERN.subarray(0, 512));
    });
  }

  test('GET_ID writes 20 bytes of a longer serial', () => {
    gbytes(D0, 32).fill(0xee);
    const r = run([header(T_GET_ID, 0), { gpa: D0, len: 20, write: true }, status()]);
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 21);
    assert.deepEqual(gbytes(D0, 20), defaults.serial.subarray(0, 20));
    assert.equal(gbytes(D0 + 20, 1)[0], 0xee);
  });

  test('GET_ID truncates to a short buffer', () => {
    gbytes(D0, 32).fill(0xee);
    const r = run([header(T_GET_ID, 0), { gpa: D0, len: 8, write: true }, status()]);
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 9);
    assert.deepEqual(gbytes(D0, 8), defaults.serial.subarray(0, 8));
    assert.equal(gbytes(D0 + 8, 1)[0], 0xee);
  });

  test('GET_ID pads a short serial with zeroes', () => {
    gbytes(D0, 32).fill(0xee);
    const serial = new TextEncoder().encode('abc');
    const r = run([header(T_GET_ID, 0), { gpa: D0, len: 20, write: true }, status()], { handler: { serial } });
    assert.equal(r.usedLen, 21);
    assert.deepEqual([...gbytes(D0, 20)], [0x61, 0x62, 0x63, ...new Array(17).fill(0)]);
  });
});

describe('DISCARD and WRITE_ZEROES', () => {
  test('DISCARD with the UNMAP flag is UNSUPP and changes nothing', () => {
    const r = run([header(T_DISCARD, 0), segsPayload(D0, [[0, 8, UNMAP]]), status()]);
    assert.equal(statusByte(), S_UNSUPP);
    assert.equal(r.usedLen, 1);
    assert.deepEqual(disk(0, 4096), DISK_PATTERN.subarray(0, 4096));
  });

  test('DISCARD in range is OK, out of range is IOERR', () => {
    run([header(T_DISCARD, 0), segsPayload(D0, [[8, 8, 0]]), status()]);
    assert.equal(statusByte(), S_OK);
    run([header(T_DISCARD, 0), segsPayload(D0, [[DISK_SIZE / 512 - 4, 8, 0]]), status()]);
    assert.equal(statusByte(), S_IOERR);
  });

  test('WRITE_ZEROES zeroes each segment (with and without UNMAP) and nothing else', () => {
    const r = run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[2, 1, 0], [10, 2, UNMAP]]), status()]);
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 1);
    assert.deepEqual(disk(1024, 512), new Uint8Array(512));
    assert.deepEqual(disk(5120, 1024), new Uint8Array(1024));
    assert.deepEqual(disk(0, 1024), DISK_PATTERN.subarray(0, 1024));
    assert.deepEqual(disk(1536, 5120 - 1536), DISK_PATTERN.subarray(1536, 5120));
    assert.deepEqual(disk(6144, 1024), DISK_PATTERN.subarray(6144, 7168));
  });

  test('WRITE_ZEROES segments spread over two descriptors', () => {
    const p = segsPayload(D0, [[4, 1, 0], [6, 1, 0]]);
    const second = gbytes(D0 + 16, 16).slice();
    gbytes(D1, 16).set(second);
    run([header(T_WRITE_ZEROES, 0), { gpa: p.gpa, len: 16 }, { gpa: D1, len: 16 }, status()]);
    assert.equal(statusByte(), S_OK);
    assert.deepEqual(disk(2048, 512), new Uint8Array(512));
    assert.deepEqual(disk(2560, 512), DISK_PATTERN.subarray(2560, 3072));
    assert.deepEqual(disk(3072, 512), new Uint8Array(512));
  });

  test('WRITE_ZEROES with unknown flags is UNSUPP', () => {
    run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[0, 1, 2]]), status()]);
    assert.equal(statusByte(), S_UNSUPP);
    assert.deepEqual(disk(0, 512), DISK_PATTERN.subarray(0, 512));
  });

  test('every segment is checked before any runs', () => {
    run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[0, 8, 0], [DISK_SIZE / 512, 1, 0]]), status()]);
    assert.equal(statusByte(), S_IOERR);
    run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[0, 8, 0], [2n ** 60n, 1, 0]]), status()]);
    assert.equal(statusByte(), S_IOERR);
    run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[0, 8, 0], [8, 1, 4]]), status()]);
    assert.equal(statusByte(), S_UNSUPP);
    assert.deepEqual(disk(0, 4096), DISK_PATTERN.subarray(0, 4096), 'the first, valid segment did not run');
  });

  test('bad segment payloads are IOERR', () => {
    run([header(T_WRITE_ZEROES, 0), data(D0, new Uint8Array(20)), status()]);
    assert.equal(statusByte(), S_IOERR, 'not a multiple of 16');
    run([header(T_DISCARD, 0), status()]);
    assert.equal(statusByte(), S_IOERR, 'no segment');
    const many: [number, number, number][] = Array.from({ length: 17 }, (_, i) => [i, 1, 0]);
    run([header(T_WRITE_ZEROES, 0), segsPayload(D0, many), status()]);
    assert.equal(statusByte(), S_IOERR, '17 segments');
    assert.deepEqual(disk(0, 17 * 512), DISK_PATTERN.subarray(0, 17 * 512));
  });
});

describe('long DISCARD and WRITE_ZEROES run in bounded steps, one per service round', () => {
  // tmpfs has no FALLOC_FL_ZERO_RANGE: write zeroes falls back to writing zero buffers.
  const shmDir = fs.mkdtempSync('/dev/shm/vubd-blk-');
  const SIZE = 8 * MiB;
  const shmImage = path.join(shmDir, 'disk.img');
  fs.writeFileSync(shmImage, new Uint8Array(SIZE).fill(0x5a));
  const shmFd = fs.openSync(shmImage, 'r+');
  const shmNode = new FileNode({ driver: 'file', name: 'shm', fd: shmFd, path: shmImage, size: SIZE, readOnly: false, stats: newNodeStats() });
  const sparseImage = path.join(dir, 'sparse.img');
  fs.writeFileSync(sparseImage, '');
  fs.truncateSync(sparseImage, 256 * MiB);
  const sparseFd = fs.openSync(sparseImage, 'r+');
  const sparseNode = new FileNode({ driver: 'file', name: 'sparse', fd: sparseFd, path: sparseImage, size: 256 * MiB, readOnly: false, stats: newNodeStats() });
  const uring = new UringEngine(8, 8, 16);
  after(() => {
    uring.close();
    fs.closeSync(shmFd);
    fs.closeSync(sparseFd);
    fs.rmSync(shmDir, { recursive: true, force: true });
  });
  const shmBytes = (off: number, len: number): Uint8Array => {
    const b = new Uint8Array(len);
    assert.equal(fs.readSync(shmFd, b, 0, len, off), len);
    return b;
  };

  for (const [name, eng] of [['sync', engine], ['io_uring', uring]] as const) {
    test(`${name}: 3.5 MiB of zeroes without fallocate: one 1 MiB write per round, exactly the range`, () => {
      fs.writeSync(shmFd, new Uint8Array(SIZE).fill(0x5a), 0, SIZE, 0);
      const start = 1024; // sector 1024 = 512 KiB
      const sectors = 7 * 1024; // 3.5 MiB
      const r = run([header(T_WRITE_ZEROES, 0), segsPayload(D0, [[start, sectors, 0]]), status()], { node: shmNode, engine: eng });
      assert.equal(statusByte(), S_OK);
      assert.equal(r.completions, 5, 'a refused fallocate, then four zero writes');
      assert.equal(r.deferredSteps, 3, 'each write after the first waited for the next service round');
      assert.ok(shmBytes(start * 512, sectors * 512).every((b) => b === 0), 'the range is zero');
      assert.ok(shmBytes(0, start * 512).every((b) => b === 0x5a), 'before it untouched');
      assert.ok(shmBytes((start + sectors) * 512, SIZE - (start + sectors) * 512).every((b) => b === 0x5a), 'after it untouched');
    });
  }

  test('sync: a 200 MiB DISCARD is several bounded fallocate steps; io_uring hands the kernel one', () => {
    const seg = (): Buf => segsPayload(D0, [[0, (200 * MiB) / 512, 0]]);
    const sync = run([header(T_DISCARD, 0), seg(), status()], { node: sparseNode });
    assert.equal(statusByte(), S_OK);
    assert.equal(sync.completions, 4, 'four fallocate steps of at most 64 MiB');
    assert.equal(sync.deferredSteps, 3);
    const ring = run([header(T_DISCARD, 0), seg(), status()], { node: sparseNode, engine: uring });
    assert.equal(statusByte(), S_OK);
    assert.equal(ring.completions, 1, 'one fallocate in the kernel\'s workers');
  });
});

describe('writethrough (writeback = false)', () => {
  // Regression: the flush phase's result (fsync: 0) was compared with slot.length as if it were
  // the write's byte count, so every writethrough write reported IOERR.
  test('OUT issues a flush phase, then completes OK', () => {
    const a = pattern(1024, 10);
    const r = run([header(T_OUT, 4), data(D0, a), status()], { handler: { writeback: false } });
    assert.equal(r.phases, 2, 'complete() returned -1 once and started a flush');
    assert.equal(r.usedLen, 1);
    assert.deepEqual(disk(2048, 1024), a);
    assert.equal(statusByte(), S_OK);
  });

  test('IN does not flush', () => {
    const r = run([header(T_IN, 4), { gpa: D0, len: 512, write: true }, status()], { handler: { writeback: false } });
    assert.equal(r.phases, 1);
    assert.equal(statusByte(), S_OK);
  });

  test('a refused OUT does not flush', () => {
    const r = run([header(T_OUT, 0), data(D0, pattern(100, 11)), status()], { handler: { writeback: false } });
    assert.equal(r.phases, 1);
    assert.equal(statusByte(), S_IOERR);
  });
});

describe('malformed chains', () => {
  test('no writable descriptor (no status byte): completes with used length 0, touches nothing', () => {
    header(T_IN, 0);
    const before = gbytes(HDR, 16).slice();
    gbytes(D0, 512).fill(0xaa);
    const r = run([{ gpa: HDR, len: 16 }, { gpa: D0, len: 512 }]);
    assert.equal(r.usedLen, 0);
    assert.deepEqual(gbytes(HDR, 16), before);
    assert.deepEqual(gbytes(D0, 512), new Uint8Array(512).fill(0xaa));
    const r2 = run([header(T_OUT, 0), data(D0, pattern(512, 12))]);
    assert.equal(r2.usedLen, 0);
    assert.deepEqual(disk(0, 512), DISK_PATTERN.subarray(0, 512));
  });

  test('a header shorter than 16 bytes is IOERR', () => {
    header(T_IN, 0);
    const r = run([{ gpa: HDR, len: 12 }, status()]);
    assert.equal(statusByte(), S_IOERR);
    assert.equal(r.usedLen, 1);
  });

  test('a data buffer outside guest memory is IOERR, the status byte is still written', () => {
    const r = run([header(T_OUT, 0), { gpa: GAP + 0x1000, len: 512 }, status()]);
    assert.equal(r.slot.chain.error, ChainError.BAD_ADDRESS);
    assert.equal(statusByte(), S_IOERR);
    assert.equal(r.usedLen, 1);
    assert.deepEqual(disk(0, 512), DISK_PATTERN.subarray(0, 512));
    run([header(T_IN, 0), { gpa: 2n ** 60n, len: 512, write: true }, status()]);
    assert.equal(statusByte(), S_IOERR);
  });

  // Regression: with more buffers than DescriptorChain.maxSegments the status buffer was dropped
  // and IOERR was written into the last byte of the last recorded data buffer.
  test('too many segments: IOERR goes to the real status byte, not into a data buffer', () => {
    const bufs: Buf[] = [header(T_IN, 0)];
    for (let i = 0; i < 15; i++) {
      gbytes(D0 + 0x1000 * i, 512).fill(0xaa);
      bufs.push({ gpa: D0 + 0x1000 * i, len: 512, write: true });
    }
    bufs.push(status()); // 17 descriptors, the chain holds 16
    const r = run(bufs);
    assert.equal(r.slot.chain.error, ChainError.TOO_MANY_SEGMENTS);
    assert.equal(r.usedLen, 1);
    assert.equal(gbytes(D0 + 0x1000 * 14 + 511, 1)[0], 0xaa, 'last data buffer untouched');
    assert.equal(statusByte(), S_IOERR);
  });

  test('readable after writable (BAD_ORDER) is IOERR', () => {
    const r = run([header(T_OUT, 0), { gpa: D1, len: 512, write: true }, data(D0, pattern(512, 13)), status()]);
    assert.equal(r.slot.chain.error, ChainError.BAD_ORDER);
    assert.equal(statusByte(), S_IOERR);
    assert.deepEqual(disk(0, 512), DISK_PATTERN.subarray(0, 512));
  });
});

describe('null node', () => {
  const nul = new NullNode({ driver: 'null', name: 'null', size: 64 * MiB, readOnly: false, stats: newNodeStats() });

  test('IN zero-fills the guest buffers, OUT succeeds', () => {
    gbytes(D0, 512).fill(0xaa);
    gbytes(D1, 1024).fill(0xaa);
    const r = run([header(T_IN, 1000), { gpa: D0, len: 512, write: true }, { gpa: D1, len: 1024, write: true }, status()], { node: nul });
    assert.equal(statusByte(), S_OK);
    assert.equal(r.usedLen, 1537);
    assert.deepEqual(gbytes(D0, 512), new Uint8Array(512));
    assert.deepEqual(gbytes(D1, 1024), new Uint8Array(1024));
    run([header(T_OUT, 1000), data(D0, pattern(512, 14)), status()], { node: nul });
    assert.equal(statusByte(), S_OK);
    run([header(T_OUT, 64 * MiB / 512), data(D0, pattern(512, 14)), status()], { node: nul });
    assert.equal(statusByte(), S_IOERR);
  });
});
