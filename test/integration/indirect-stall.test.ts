// A guest that posts huge indirect tables must not stall its queue: the walk stops at the queue
// size and the segment limit, so a VM stop (GET_VRING_BASE) is still answered at once.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { GuestRam, BLK, type Frontend } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, type Daemon } from '../helpers/daemon.js';
import { makeImage, openSession, closeSession } from '../helpers/sessions.js';

const MiB = 2 ** 20;
const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;
const TABLE_BYTES = 64 * MiB;
/** the number: a VM stop must not wait behind the hostile walks */
const STOP_MS = 100;

/** Header and status byte in region 0, one 512-byte readable data buffer. */
function buffers(fe: Frontend): { hdr: number; data: number; status: number } {
  const hdr = fe.ram.alloc(16, 16);
  const dv = fe.ram.view(hdr, 16);
  dv.setUint32(0, BLK.OUT, true);
  dv.setBigUint64(8, 0n, true);
  return { hdr, data: fe.ram.alloc(512, 512), status: fe.ram.alloc(1, 1) };
}

function writeEntry(fe: Frontend, table: number, k: number, gpa: number, len: number, flags: number, next: number): void {
  const dv = fe.ram.view(table + 16 * k, 16);
  dv.setBigUint64(0, BigInt(gpa), true);
  dv.setUint32(8, len, true);
  dv.setUint16(12, flags, true);
  dv.setUint16(14, next, true);
}

function timedStop(fe: Frontend, index: number): number {
  const t0 = performance.now();
  fe.getVringBase(index);
  return performance.now() - t0;
}

function brokenLines(d: Daemon): number {
  return d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('queue marked broken')).length;
}

describe('huge indirect tables do not stall the queue', () => {
  let d: Daemon;
  /** a second daemon with --ring-packed, for the packed ring */
  let dp: Daemon;

  before(async () => {
    const dir = tempDir('vubd-indirect-stall-');
    d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1'], { dir });
    const dirp = tempDir('vubd-indirect-stall-packed-');
    dp = await startDaemon([`--blk-file=${makeImage(dirp)}`, '--num-queues=1', '--ring-packed'], { dir: dirp });
  });

  after(async () => {
    for (const x of [d, dp]) {
      const r = await x?.stop();
      assert.equal(r?.code, 0);
    }
  });

  test(`split ring: 256 requests with ${TABLE_BYTES / MiB} MiB indirect tables, GET_VRING_BASE within ${STOP_MS} ms`, async (t) => {
    // Region 1 holds the table; all heads share it. Its chain is as long as a 16-bit next allows
    // (65536 descriptors) and ends at a valid status byte, so without a limit every head walks it all.
    const ram = new GuestRam(2, TABLE_BYTES + 4 * MiB);
    const brokenBefore = brokenLines(d);
    const { fe, conn } = await openSession(d, ram);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 256);
      const b = buffers(fe);
      const table = fe.ram.alloc(TABLE_BYTES, 16, 1);
      writeEntry(fe, table, 0, b.hdr, 16, NEXT, 1);
      for (let k = 1; k < 0xffff; k++) writeEntry(fe, table, k, b.data, 512, NEXT, k + 1);
      writeEntry(fe, table, 0xffff, b.status, 1, WRITE, 0);
      for (let h = 0; h < 256; h++) {
        ring.writeDesc(ring.desc, h, { gpa: table, len: TABLE_BYTES, flags: INDIRECT, next: 0 });
        ring.publishHead(h);
      }
      ring.kick();
      await sleep(30); // the worker is busy with the tables now
      const ms = timedStop(fe, 0);
      t.diagnostic(`GET_VRING_BASE answered in ${ms.toFixed(1)} ms`);
      assert.ok(ms < STOP_MS, `GET_VRING_BASE took ${ms.toFixed(1)} ms`);
      await d.waitForLog(() => brokenLines(d) > brokenBefore, 3000);
    } finally {
      await closeSession(d, fe, conn);
    }
    assert.equal(d.proc.exitCode, null, 'daemon alive');
  });

  test(`packed ring: 64 requests with ${TABLE_BYTES / MiB} MiB indirect tables, GET_VRING_BASE within ${STOP_MS} ms`, async (t) => {
    // A packed indirect table is walked entry by entry: every entry is a real 512-byte buffer.
    const ram = new GuestRam(2, TABLE_BYTES + 4 * MiB);
    const brokenBefore = brokenLines(dp);
    const { fe, conn } = await openSession(dp, ram);
    try {
      fe.negotiate({ packed: true });
      const ring = fe.setupPackedRing(0, 128);
      const b = buffers(fe);
      const table = fe.ram.alloc(TABLE_BYTES, 16, 1);
      const bytes = fe.ram.bytes(table, TABLE_BYTES);
      writeEntry(fe, table, 0, b.data, 512, 0, 0);
      for (let filled = 16; filled < TABLE_BYTES; filled *= 2) bytes.copyWithin(filled, 0, Math.min(filled, TABLE_BYTES - filled));
      writeEntry(fe, table, 0, b.hdr, 16, 0, 0);
      writeEntry(fe, table, TABLE_BYTES / 16 - 1, b.status, 1, WRITE, 0);
      for (let id = 0; id < 64; id++) ring.addRaw(id, [{ gpa: table, len: TABLE_BYTES, flags: INDIRECT }]);
      ring.kick();
      await sleep(30);
      const ms = timedStop(fe, 0);
      t.diagnostic(`GET_VRING_BASE answered in ${ms.toFixed(1)} ms`);
      assert.ok(ms < STOP_MS, `GET_VRING_BASE took ${ms.toFixed(1)} ms`);
      await dp.waitForLog(() => brokenLines(dp) > brokenBefore, 3000);
    } finally {
      await closeSession(dp, fe, conn);
    }
    assert.equal(dp.proc.exitCode, null, 'daemon alive');
  });
});
