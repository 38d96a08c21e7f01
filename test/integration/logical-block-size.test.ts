// --logical-block-size=4096 (qemu-storage-daemon's logical-block-size): the config space says
// 4096, requests not aligned to it get IOERR as in QEMU (virtio_blk_sect_range_ok), and a
// 4k-sector block device (a loop device with --sector-size 4096) works with O_DIRECT.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { startDaemon, tempDir, vubdMain } from '../helpers/daemon.js';
import { Frontend, BLK, type DriverRing } from '../helpers/frontend.js';
import { pattern } from '../helpers/sessions.js';
import { openFlags } from '../helpers/fdinfo.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;
const O_DIRECT = 0o40000;

function cleanups(t: { after(fn: () => Promise<void>): void }): (fn: () => unknown) => void {
  const fns: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn();
  });
  return (fn) => void fns.push(fn);
}

function segment(sector: number, num: number, flags = 0): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, num, true);
  dv.setUint32(12, flags, true);
  return b;
}

/** What a 4096-byte logical block size must do, whatever serves it. */
function check4k(fe: Frontend, q: DriverRing): void {
  const c = fe.getConfig();
  const cfg = new DataView(c.buffer, c.byteOffset, c.byteLength);
  assert.equal(cfg.getUint32(20, true), 4096, 'config space blk_size');
  assert.equal(cfg.getUint8(24), 0, 'physical_block_exp: physical = logical');
  assert.equal(cfg.getUint32(44, true), 8, 'discard_sector_alignment in 512-byte sectors');
  assert.equal(Number(cfg.getBigUint64(0, true)), (8 * MiB) / 512, 'capacity stays in 512-byte sectors');

  const data = pattern(4, 8192);
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 8, data)), OK, 'aligned write');
  const r = fe.run(q, BLK.IN, 8, 8192);
  assert.equal(fe.statusOf(r), OK, 'aligned read');
  assert.deepEqual(fe.dataOf(r), data);
  const odd = pattern(5, 4096);
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 24, odd, { misalign: 1 })), OK, 'aligned request, unaligned guest buffer');
  const r2 = fe.run(q, BLK.IN, 24, 4096, { misalign: 513, split: 2 });
  assert.equal(fe.statusOf(r2), OK);
  assert.deepEqual(fe.dataOf(r2), odd);

  assert.equal(fe.statusOf(fe.run(q, BLK.IN, 1, 512)), IOERR, 'a 512-byte read at sector 1');
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 8, pattern(6, 512))), IOERR, 'a 512-byte write at an aligned sector');
  assert.equal(fe.statusOf(fe.run(q, BLK.OUT, 12, pattern(6, 4096))), IOERR, 'a 4096-byte write at sector 12');
  assert.equal(fe.statusOf(fe.run(q, BLK.WRITE_ZEROES, 0, segment(4, 8))), IOERR, 'write-zeroes at sector 4');
  assert.equal(fe.statusOf(fe.run(q, BLK.DISCARD, 0, segment(8, 4))), IOERR, 'discard of half a block');
  assert.equal(fe.statusOf(fe.run(q, BLK.WRITE_ZEROES, 0, segment(40, 8))), OK, 'aligned write-zeroes');
  const r3 = fe.run(q, BLK.IN, 8, 8192);
  assert.deepEqual(fe.dataOf(r3), data, 'the refused requests changed nothing');
  assert.equal(fe.statusOf(fe.run(q, BLK.FLUSH, 0, 0)), OK);
}

test('--logical-block-size=4096 on an image file: blk_size 4096, misaligned requests get IOERR', { timeout: 30000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 8 * MiB);
  const d = await startDaemon([`--blk-file=${img}`, '--num-queues=1', '--logical-block-size=4096'], { dir });
  defer(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  defer(() => fe.close());
  fe.negotiate();
  check4k(fe, fe.setupRing(0, 64));
});

test('a 4k-sector loop device: --cache=none needs --logical-block-size=4096, and then works with O_DIRECT', { timeout: 60000 }, async (t) => {
  const defer = cleanups(t);
  const dir = tempDir();
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = path.join(dir, 'backing.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 8 * MiB);
  const loop = execFileSync('losetup', ['--sector-size', '4096', '-f', '--show', img], { encoding: 'utf8' }).trim();
  defer(() => execFileSync('losetup', ['-d', loop]));
  assert.equal(fs.readFileSync(`/sys/block/${path.basename(loop)}/queue/logical_block_size`, 'utf8').trim(), '4096');

  const refused = spawnSync(process.execPath, [vubdMain, `--socket-path=${path.join(dir, 'no.sock')}`, `--blk-file=${loop}`, '--cache=none'], { encoding: 'utf8', timeout: 20000 });
  assert.equal(refused.status, 1, 'a 512-byte guest on a 4k O_DIRECT device fails at start-up');
  assert.match(refused.stderr, /--logical-block-size=4096/);
  assert.equal(fs.existsSync(path.join(dir, 'no.sock')), false, 'before listening');

  for (const aio of ['io_uring', 'sync']) {
    const d = await startDaemon([`--blk-file=${loop}`, '--num-queues=1', '--cache=none', '--logical-block-size=4096', `--aio=${aio}`], { dir: tempDir() });
    try {
      const flags = openFlags(d, loop);
      assert.equal(flags.length, 1);
      assert.equal(flags[0]! & O_DIRECT, O_DIRECT, 'the device is open O_DIRECT');
      const fe = Frontend.connect(d.socketPath);
      try {
        fe.negotiate();
        check4k(fe, fe.setupRing(0, 64));
      } finally {
        fe.close();
      }
    } finally {
      await d.stop();
    }
  }
});
