// Guest memory mapped once per process: reference-counted mappings, views in any thread, the
// SIGBUS rescue over a table that grows past any fixed size, and tables that fail part-way.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { native, isErrno } from '../../src/native/index.js';
import { GuestMemoryMap, GuestMemoryMapError } from '../../src/virtio/memory-map.js';
import { GuestMemory } from '../../src/virtio/memory.js';
import { guestMappings, sealWrite } from '../helpers/guest-maps.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const addon = createRequire(import.meta.url).resolve('../../../native-bindings/build/Release/vubd_native.node');

/** Runs `body` in a worker with `n` (the addon) and `workerData` in scope; resolves with what it posts. */
async function inWorker<T>(body: string, workerData: unknown): Promise<T> {
  const code = `const { parentPort, workerData } = require('node:worker_threads'); const n = require(${JSON.stringify(addon)}); ${body}`;
  const w = new Worker(code, { eval: true, workerData });
  const msg = await new Promise<T>((res, rej) => {
    w.once('message', res);
    w.once('error', rej);
  });
  await new Promise((res) => w.once('exit', res));
  return msg;
}

test('a chunk mapped once: views in this thread and a worker share its pages; the last reference unmaps it', async () => {
  const fd = native.memfdCreate('guest-ram-shared', 64 * 1024);
  const live0 = native.liveMappings();
  try {
    const id = native.mapShared(fd, 64 * 1024, 0, true);
    assert.equal(native.liveMappings(), live0 + 1);
    const a = native.viewMapping(id);
    const b = native.viewMapping(id);
    assert.equal(native.addressOf(a), native.addressOf(b), 'views of one mapping, not new mappings');
    new Uint8Array(a)[10] = 0x5a;
    const seen = await inWorker<{ addr: number; byte: number; unmapped: boolean }>(
      `const v = n.viewMapping(workerData); const u = new Uint8Array(v); const byte = u[10]; u[11] = 0xa5;
       const addr = n.addressOf(v); parentPort.postMessage({ addr, byte, unmapped: n.unmap(v) });`,
      id,
    );
    assert.deepEqual(seen, { addr: native.addressOf(a), byte: 0x5a, unmapped: true });
    assert.equal(new Uint8Array(b)[11], 0xa5);
    assert.equal(guestMappings(process.pid).filter((m) => m.file === 'guest-ram-shared').length, 1, 'one mapping in the process');

    assert.equal(native.releaseMapping(id), true, "the owner's reference");
    assert.equal(native.releaseMapping(id), false, 'only once');
    assert.equal(native.liveMappings(), live0 + 1, 'views keep it mapped');
    assert.equal(native.unmap(a), true);
    assert.equal(a.byteLength, 0, 'detached');
    assert.equal(native.unmap(a), false, 'a view drops its reference once');
    assert.equal(new Uint8Array(b)[10], 0x5a, 'the other view still works');
    assert.equal(native.unmap(b), true);
    assert.equal(native.liveMappings(), live0, 'unmapped with the last reference');
    assert.equal(guestMappings(process.pid).filter((m) => m.file === 'guest-ram-shared').length, 0);
    assert.throws(() => native.viewMapping(id), (e: unknown) => isErrno(e, 'ENOENT'), 'a released id names nothing');

    // retain: one more owner reference, dropped separately
    const id2 = native.mapShared(fd, 4096, 0, true);
    assert.equal(native.retainMapping(id2), true);
    assert.equal(native.releaseMapping(id2), true);
    assert.equal(native.liveMappings(), live0 + 1);
    assert.equal(native.releaseMapping(id2), true);
    assert.equal(native.liveMappings(), live0);
    assert.equal(native.retainMapping(id2), false);
    const id3 = native.mapShared(fd, 4096, 0, true);
    assert.notEqual(id3, id2, 'a reused slot gets a new id');
    assert.equal(native.releaseMapping(id3), true);
    assert.equal(native.liveMappings(), live0);
  } finally {
    native.close(fd);
  }
});

test('a worker that exits without unmapping drops its references', async () => {
  const fd = native.memfdCreate('guest-ram-exit', 4096);
  const live0 = native.liveMappings();
  try {
    const id = native.mapShared(fd, 4096, 0, true);
    await inWorker(`n.viewMapping(workerData); n.viewMapping(workerData); parentPort.postMessage(0);`, id);
    assert.equal(native.releaseMapping(id), true);
    assert.equal(native.liveMappings(), live0);
  } finally {
    native.close(fd);
  }
});

test('a worker that ends with views still attached does not crash the process and drops their references', async () => {
  // V8 crashed (SIGSEGV in ArrayBufferSweeper::ReleaseAll) tearing down a worker whose views of
  // guest memory were still attached; the env's cleanup hook now detaches them first.
  const fd = native.memfdCreate('guest-ram-teardown', 1 << 20);
  const live0 = native.liveMappings();
  try {
    const id = native.mapShared(fd, 1 << 20, 0, true);
    for (let i = 0; i < 4; i++) {
      await inWorker<number>(
        `const a = new Uint8Array(n.viewMapping(workerData)); a[0] = 1; const b = new Uint8Array(n.mmap(${fd}, 4096, 0, true)); b[1] = 2; parentPort.postMessage(1);`,
        id,
      );
    }
    native.releaseMapping(id);
    assert.equal(native.liveMappings(), live0, 'every reference the workers held is gone');
  } finally {
    native.close(fd);
  }
});

test('SIGBUS in a mapping viewed from a worker: rescued once, in the one mapping every view sees', async () => {
  const fd = native.memfdCreate('guest-ram-sigbus', 8192);
  try {
    const id = native.mapShared(fd, 8192, 0, true);
    const mine = new Uint8Array(native.viewMapping(id));
    mine[0] = 9;
    fs.ftruncateSync(fd, 4096);
    const before = native.sigbusRescues();
    const seen = await inWorker<number[]>(`const u = new Uint8Array(n.viewMapping(workerData)); parentPort.postMessage([u[0], u[4096]]);`, id);
    assert.deepEqual(seen, [9, 0], 'the worker read a zero page past the new end instead of dying');
    assert.equal(native.sigbusRescues(), before + 1);
    assert.equal(mine[4096], 0, 'this thread sees the same zero page');
    assert.equal(native.sigbusRescues(), before + 1, 'without another fault: the page was patched in the shared mapping');
    native.releaseMapping(id);
    native.unmap(mine.buffer as ArrayBuffer);
  } finally {
    native.close(fd);
  }
});

test('more than 4096 mappings are tracked, and a SIGBUS in the newest one is still rescued', () => {
  const fd = native.memfdCreate('guest-ram-many', 8192);
  const live0 = native.liveMappings();
  const ids: number[] = [];
  try {
    for (let i = 0; i < 5000; i++) ids.push(native.mapShared(fd, 8192, 0, true));
    assert.equal(native.liveMappings(), live0 + 5000);
    const last = new Uint8Array(native.viewMapping(ids[ids.length - 1]!));
    fs.ftruncateSync(fd, 4096);
    const before = native.sigbusRescues();
    assert.equal(last[4096], 0);
    assert.equal(native.sigbusRescues(), before + 1);
    native.unmap(last.buffer as ArrayBuffer);
  } finally {
    for (const id of ids) native.releaseMapping(id);
    native.close(fd);
  }
  assert.equal(native.liveMappings(), live0);
});

test('GuestMemoryMap: a table that fails part-way leaves nothing mapped', () => {
  const ok = native.memfdCreate('guest-ram-0', 3 * GiB); // sparse: three chunks
  const sealed = native.memfdCreate('guest-ram-1', 4 * MiB);
  const odd = native.memfdCreate('guest-ram-2', 4 * MiB);
  const live0 = native.liveMappings();
  try {
    sealWrite(sealed);
    const good = { guestPhysAddr: 0, size: 3 * GiB, userAddr: 0x7f0000000000, mmapOffset: 0, fd: ok };
    assert.throws(
      () => GuestMemoryMap.map([good, { guestPhysAddr: 4 * GiB, size: 4 * MiB, userAddr: 0x7f1000000000, mmapOffset: 0, fd: sealed }]),
      (e: unknown) => e instanceof GuestMemoryMapError && /region 1 .*Operation not permitted/.test(e.message),
    );
    assert.equal(native.liveMappings(), live0, 'the chunks of region 0 were released');
    assert.deepEqual(guestMappings(process.pid), []);
    assert.throws(
      () => GuestMemoryMap.map([good, { guestPhysAddr: 4 * GiB, size: MiB, userAddr: 0x7f1000000000, mmapOffset: 100, fd: odd }]),
      (e: unknown) => e instanceof GuestMemoryMapError && /region 1 .*not page aligned/.test(e.message),
    );
    assert.equal(native.liveMappings(), live0);

    // The good table maps, and a table that keeps region 0 keeps its mappings.
    const first = GuestMemoryMap.map([good]);
    assert.equal(first.chunks.length, 3);
    const odd2 = { guestPhysAddr: 4 * GiB, size: MiB, userAddr: 0x7f1000000000, mmapOffset: 0, fd: odd };
    const second = GuestMemoryMap.map([good, odd2], first);
    assert.deepEqual(second.chunks.slice(0, 3).map((c) => c.mapping), first.chunks.map((c) => c.mapping));
    assert.equal(native.liveMappings(), live0 + 4);
    const view = new GuestMemory(second.chunks);
    first.release();
    second.release();
    assert.equal(native.liveMappings(), live0 + 4, "a worker's view keeps every chunk");
    view.hold();
    view.retire();
    assert.equal(native.liveMappings(), live0 + 4, 'a retired table stays while a request uses it');
    view.drop();
    assert.equal(native.liveMappings(), live0, 'and goes with that request');
    assert.deepEqual(guestMappings(process.pid), []);
  } finally {
    for (const fd of [ok, sealed, odd]) native.close(fd);
  }
});
