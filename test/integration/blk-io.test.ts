// virtio-blk requests through a real vubd process: real socket, memfd guest RAM, eventfds, rings.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, BLK } from '../helpers/frontend.js';
import { startDaemon, type Daemon } from '../helpers/daemon.js';
import { Request } from '../../src/protocol/constants.js';
import { pattern } from '../helpers/sessions.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;
const UNSUPP = 2;


for (const aio of ['io_uring', 'sync'] as const) {
  describe(`blk I/O (aio=${aio})`, () => {
    let d: Daemon;
    let fe: Frontend;
    let image: string;

    before(async () => {
      const dir = fs.mkdtempSync('/tmp/vubd-io-');
      image = path.join(dir, 'disk.img');
      fs.writeFileSync(image, '');
      fs.truncateSync(image, 16 * MiB);
      d = await startDaemon([`--blk-file=${image}`, '--num-queues=2', `--aio=${aio}`, '--serial=test-serial-0123456789abc', `--control=${path.join(dir, 'qmp.sock')}`], { dir });
      fe = Frontend.connect(d.socketPath);
      fe.negotiate();
    });

    after(async () => {
      fe?.close();
      const r = await d?.stop();
      assert.equal(r?.code, 0);
    });

    test('write then read back, direct and indirect, across both memory regions', () => {
      const ring = fe.setupRing(0, 128);
      const data = pattern(1, 8192);
      const w = fe.run(ring, BLK.OUT, 8, data);
      assert.equal(fe.statusOf(w), OK);
      const r = fe.run(ring, BLK.IN, 8, 8192, { region: 1, indirect: true, split: 3 });
      assert.equal(fe.statusOf(r), OK);
      assert.equal(r.usedLen, 8192 + 1);
      assert.deepEqual(fe.dataOf(r), data);
      // The bytes are in the image file where the sector says.
      const onDisk = fs.readFileSync(image).subarray(8 * 512, 8 * 512 + 8192);
      assert.deepEqual(new Uint8Array(onDisk), data);
    });

    test('flush, GET_ID, unsupported type, out of range', () => {
      const ring = fe.rings[0]!;
      assert.equal(fe.statusOf(fe.run(ring, BLK.FLUSH, 0, 0)), OK);
      const id = fe.run(ring, BLK.GET_ID, 0, 20);
      assert.equal(fe.statusOf(id), OK);
      assert.equal(Buffer.from(fe.dataOf(id)).toString('latin1'), 'test-serial-01234567');
      assert.equal(fe.statusOf(fe.run(ring, BLK.GET_LIFETIME, 0, 16)), UNSUPP);
      assert.equal(fe.statusOf(fe.run(ring, 99, 0, 0)), UNSUPP);
      const sectors = (16 * MiB) / 512;
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, sectors - 1, 1024)), IOERR);
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, sectors - 2, 1024)), OK);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 2 ** 60, new Uint8Array(512))), IOERR);
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, 0, 100)), IOERR, 'data not a multiple of 512');
    });

    test('discard and write zeroes (with and without unmap) read back as zeroes', () => {
      const ring = fe.rings[0]!;
      const data = pattern(2, 64 * 1024);
      for (const sector of [1000, 2000, 3000]) assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, sector, data)), OK);
      const seg = (sector: number, num: number, flags: number): Uint8Array => {
        const b = new Uint8Array(16);
        const dv = new DataView(b.buffer);
        dv.setBigUint64(0, BigInt(sector), true);
        dv.setUint32(8, num, true);
        dv.setUint32(12, flags, true);
        return b;
      };
      assert.equal(fe.statusOf(fe.run(ring, BLK.DISCARD, 0, seg(1000, 128, 0))), OK);
      assert.equal(fe.statusOf(fe.run(ring, BLK.WRITE_ZEROES, 0, seg(2000, 128, 0))), OK);
      assert.equal(fe.statusOf(fe.run(ring, BLK.WRITE_ZEROES, 0, seg(3000, 128, 1))), OK);
      for (const sector of [1000, 2000, 3000]) {
        const r = fe.run(ring, BLK.IN, sector, 64 * 1024);
        assert.equal(fe.statusOf(r), OK);
        assert.ok(fe.dataOf(r).every((b) => b === 0), `sector ${sector} reads back as zeroes`);
      }
      assert.equal(fe.statusOf(fe.run(ring, BLK.DISCARD, 0, seg(1000, 8, 1))), UNSUPP, 'discard with UNMAP flag');
      assert.equal(fe.statusOf(fe.run(ring, BLK.DISCARD, 0, seg(2 ** 40, 8, 0))), IOERR, 'discard out of range');
    });

    test('many requests in flight on two queues complete with the right data', () => {
      const q1 = fe.setupRing(1, 256);
      const q0 = fe.rings[0]!;
      const writes = [];
      for (let i = 0; i < 48; i++) writes.push(fe.blk(i % 2 ? q1 : q0, BLK.OUT, 4096 + 16 * i, pattern(100 + i, 8192), { region: i % 2 }));
      q0.kick();
      q1.kick();
      q0.waitFor(24);
      q1.waitFor(24);
      for (const w of writes) assert.equal(fe.statusOf(w), OK);
      const reads = [];
      for (let i = 0; i < 48; i++) reads.push(fe.blk(i % 2 ? q0 : q1, BLK.IN, 4096 + 16 * i, 8192, { indirect: i % 3 === 0 }));
      q0.kick();
      q1.kick();
      q0.waitFor(24);
      q1.waitFor(24);
      reads.forEach((r, i) => {
        assert.equal(fe.statusOf(r), OK);
        assert.deepEqual(fe.dataOf(r), pattern(100 + i, 8192));
      });
    });

    // Request slots are made as the driver keeps more in flight (not one per ring entry up front):
    // a whole 256-entry ring of requests at once takes every slot up to the queue size, twice.
    test('a whole ring of requests in flight at once, twice: every one completes with its own data', () => {
      const q1 = fe.rings[1]!;
      for (const round of [0, 1]) {
        const writes = [];
        for (let i = 0; i < 256; i++) writes.push(fe.blk(q1, BLK.OUT, 8192 + 8 * i, pattern(1000 * round + i, 4096), { indirect: true, region: i % 2 }));
        q1.kick();
        assert.equal(q1.waitFor(256, 20000).length, 256);
        writes.forEach((w, i) => assert.equal(fe.statusOf(w), OK, `write ${i} of round ${round}`));
        const reads = [];
        for (let i = 0; i < 256; i++) reads.push(fe.blk(q1, BLK.IN, 8192 + 8 * i, 4096, { indirect: true, region: (i + 1) % 2 }));
        q1.kick();
        assert.equal(q1.waitFor(256, 20000).length, 256);
        reads.forEach((r, i) => {
          assert.equal(fe.statusOf(r), OK, `read ${i} of round ${round}`);
          assert.deepEqual(fe.dataOf(r), pattern(1000 * round + i, 4096), `read ${i} of round ${round}`);
        });
      }
    });

    test('GET_VRING_BASE stops the ring and reports the next avail index', () => {
      const q0 = fe.rings[0]!;
      const base = fe.getVringBase(0);
      assert.equal(base, q0.availIdx);
      assert.equal(q0.usedIdx(), q0.availIdx, 'every request was completed before the reply');
      const q1 = fe.rings[1]!;
      assert.equal(fe.getVringBase(1), q1.availIdx);
      assert.ok(fe.callU64(Request.GET_FEATURES) > 0n, 'connection still serves messages');
    });

    test(`the queues that served the I/O above ran on ${aio}, not a silent fallback`, async () => {
      const qmp = await QmpClient.connect(path.join(d.dir, 'qmp.sock'));
      try {
        const stats = (await qmp.execute('query-stats')) as { exports: { queues: { queue: number; engine: string; writeOps: number }[] }[] };
        const queues = stats.exports[0]!.queues;
        assert.equal(queues.length, 2);
        for (const q of queues) {
          assert.ok(q.writeOps > 0, `queue ${q.queue} served writes`);
          assert.equal(q.engine, aio, `queue ${q.queue} engine`);
        }
      } finally {
        qmp.close();
      }
    });
  });
}
