// Dirty logging for live migration against a real vubd: the frontend shares a bitmap memfd
// (SET_LOG_BASE), turns VHOST_F_LOG_ALL on and flags its rings (VHOST_VRING_F_LOG), and every guest
// page vubd writes must then be marked: IN data, status bytes, used rings (split) or descriptors
// and the event area (packed). Pages vubd only reads must not be; nothing is marked with logging off.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, BLK, type DriverRing } from '../helpers/frontend.js';
import { startDaemon, tempDir, type Daemon } from '../helpers/daemon.js';
import { dispose, fdsSettle, openSession, pattern, sessionEnded } from '../helpers/sessions.js';
import { mountFuseFs } from '../helpers/fuse-fs.js';
import { native } from '../../src/native/index.js';
import { FLAG_NEED_REPLY, FLAG_VERSION, Request } from '../../src/protocol/constants.js';
import { encodeMessage, logPayload, vringAddrPayload } from '../../src/protocol/codec.js';

const MiB = 2 ** 20;
const PAGE = 4096;
/** 4 KiB of bitmap covers 128 MiB of guest-physical space: both test regions */
const LOG_BYTES = 4096;

interface Log {
  fd: number;
  bits: Uint8Array;
  close(): void;
}

function newLog(size = LOG_BYTES, name = 'vubd-dirty-log'): Log {
  const fd = native.memfdCreate(name, size);
  const buf = native.mmap(fd, size, 0, true);
  return {
    fd,
    bits: new Uint8Array(buf),
    close: () => {
      native.unmap(buf);
      native.close(fd);
    },
  };
}

function marked(log: Log): Set<number> {
  const out = new Set<number>();
  log.bits.forEach((b, i) => {
    for (let k = 0; k < 8; k++) if (b & (1 << k)) out.add(8 * i + k);
  });
  return out;
}

function pagesOf(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
}

function assertMarked(log: Log, pages: number[], what: string): void {
  const m = marked(log);
  const missing = pages.filter((p) => !m.has(p));
  assert.deepEqual(missing, [], `${what}: pages not marked`);
}

function usedRingPages(ring: DriverRing): number[] {
  return pagesOf(ring.used, 4 + 8 * ring.size + 2);
}

describe('dirty logging (VHOST_F_LOG_ALL, LOG_SHMFD)', () => {
  let d: Daemon;
  let dir: string;

  before(async () => {
    dir = tempDir('vubd-dirty-log-');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, pattern(3, 16 * MiB));
    d = await startDaemon([`--blk-file=${image}`, '--num-queues=2'], { dir });
  });

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  test('offered: VHOST_F_LOG_ALL and LOG_SHMFD', async () => {
    const { fe, conn } = await openSession(d);
    try {
      assert.ok((fe.callU64(Request.GET_FEATURES) & (1n << 26n)) !== 0n, 'VHOST_F_LOG_ALL (bit 26)');
      assert.ok((fe.callU64(Request.GET_PROTOCOL_FEATURES) & (1n << 1n)) !== 0n, 'LOG_SHMFD (protocol bit 1)');
    } finally {
      dispose(fe);
    }
    await sessionEnded(d, conn);
  });

  test('while logging: IN data, status bytes and the used ring are marked, buffers vubd only reads are not; off: nothing', async () => {
    const { fe, conn } = await openSession(d);
    const log = newLog();
    try {
      fe.negotiate({ log: true });
      const ring = fe.setupRing(0, 128);
      assert.equal(fe.setLogBase(log.fd, LOG_BYTES), 0n, 'SET_LOG_BASE answered with 0');
      fe.setLogging(true);

      log.bits.fill(0);
      const r = fe.run(ring, BLK.IN, 0, 64 * 1024, { region: 1, split: 3 });
      assert.equal(fe.statusOf(r), 0);
      assertMarked(log, pagesOf(r.data, r.dataLen), 'IN data');
      assertMarked(log, pagesOf(r.status, 1), 'status byte');
      assertMarked(log, usedRingPages(ring), 'used ring');
      const expected = new Set([...pagesOf(r.data, r.dataLen), ...pagesOf(r.status, 1), ...usedRingPages(ring)]);
      const extra = [...marked(log)].filter((p) => !expected.has(p));
      assert.deepEqual(extra, [], 'no page vubd did not write is marked');

      // A write: vubd reads the data buffers and writes only the status byte and the used ring.
      log.bits.fill(0);
      const w = fe.run(ring, BLK.OUT, 256, pattern(5, 64 * 1024), { region: 1 });
      assert.equal(fe.statusOf(w), 0);
      const m = marked(log);
      const inner = pagesOf(w.data, w.dataLen).slice(1, -1); // the first and last may share a page with header or status
      assert.ok(inner.length >= 14);
      assert.deepEqual(inner.filter((p) => m.has(p)), [], 'pages vubd only read are not marked');
      assertMarked(log, pagesOf(w.status, 1), 'status byte of the write');
      assertMarked(log, usedRingPages(ring), 'used ring');

      // A read that fails at once (past the end of the disk) writes only its status byte, however
      // large the buffers it names: they are not marked.
      log.bits.fill(0);
      const bad = fe.run(ring, BLK.IN, 16 * 2048, 512 * 1024, { region: 1 });
      assert.equal(fe.statusOf(bad), 1, 'IOERR');
      assert.deepEqual([...marked(log)].filter((p) => pagesOf(bad.data, bad.dataLen).slice(0, -1).includes(p)), [], 'unwritten buffers not marked');
      assertMarked(log, pagesOf(bad.status, 1), 'status byte of the failed read');

      // GET_ID writes its 20 bytes.
      log.bits.fill(0);
      const id = fe.run(ring, BLK.GET_ID, 0, 20, { region: 1 });
      assertMarked(log, [...pagesOf(id.data, 20), ...pagesOf(id.status, 1)], 'GET_ID buffer');

      // Logging off (QEMU after migration or migrate_cancel): nothing more is marked.
      fe.setLogging(false);
      log.bits.fill(0);
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, 0, 64 * 1024, { region: 1 })), 0);
      assert.equal(marked(log).size, 0, 'with VHOST_F_LOG_ALL off nothing is marked');
      await d.waitForLog((x) => x.msg === 'dirty logging off');
    } finally {
      dispose(fe);
      log.close();
    }
    await sessionEnded(d, conn);
  });

  test('requests on every queue are logged; a new SET_LOG_BASE moves the marks to the new bitmap', async () => {
    const { fe, conn } = await openSession(d);
    const first = newLog();
    const second = newLog();
    try {
      fe.negotiate({ log: true });
      const rings = [fe.setupRing(0, 128), fe.setupRing(1, 256)];
      fe.setLogBase(first.fd, LOG_BYTES);
      fe.setLogging(true);
      for (const ring of rings) {
        first.bits.fill(0);
        const r = fe.run(ring, BLK.IN, 64, 8192, { region: 1 });
        assertMarked(first, [...pagesOf(r.data, 8192), ...pagesOf(r.status, 1), ...usedRingPages(ring)], `queue ${ring.index}`);
      }
      // QEMU grows the log when memory is hot-plugged: SET_LOG_BASE again, then it frees the old one.
      assert.equal(fe.setLogBase(second.fd, LOG_BYTES), 0n);
      first.bits.fill(0);
      const r = fe.run(rings[1]!, BLK.IN, 128, 8192, { region: 1 });
      assert.equal(marked(first).size, 0, 'the old bitmap is no longer written');
      assertMarked(second, [...pagesOf(r.data, 8192), ...usedRingPages(rings[1]!)], 'the new bitmap');
    } finally {
      dispose(fe);
      first.close();
      second.close();
    }
    await sessionEnded(d, conn);
  });

  test('SET_LOG_BASE with NEED_REPLY gets exactly one reply; the bitmap is unmapped when the session ends', async () => {
    const { fe, conn } = await openSession(d);
    const log = newLog(LOG_BYTES, 'vubd-log-unmap-check');
    try {
      fe.negotiate({ log: true });
      fe.setupRing(0, 128);
      fe.send(Request.SET_LOG_BASE, logPayload({ mmapSize: LOG_BYTES, mmapOffset: 0 }), [log.fd], FLAG_VERSION | FLAG_NEED_REPLY);
      const r = fe.recv();
      assert.equal(r.request, Request.SET_LOG_BASE);
      assert.equal(r.payload.length, 8);
      assert.ok(fe.callU64(Request.GET_FEATURES) > 0n, 'the next reply is GET_FEATURES, not a second SET_LOG_BASE reply');
      assert.match(fs.readFileSync(`/proc/${d.proc.pid}/maps`, 'utf8'), /memfd:vubd-log-unmap-check/, 'mapped while the session runs');
    } finally {
      dispose(fe);
      log.close();
    }
    await sessionEnded(d, conn);
    const deadline = Date.now() + 3000;
    while (/memfd:vubd-log-unmap-check/.test(fs.readFileSync(`/proc/${d.proc.pid}/maps`, 'utf8')) && Date.now() < deadline) await new Promise((x) => setTimeout(x, 20));
    assert.doesNotMatch(fs.readFileSync(`/proc/${d.proc.pid}/maps`, 'utf8'), /memfd:vubd-log-unmap-check/, 'no mapping of the log is left');
  });

  test('a frontend that disconnects while SET_LOG_BASE waits for the drain: its fd is closed once, no internal error', async () => {
    const fuse = await mountFuseFs(dir, { slowReadMs: 400 });
    const slowImage = path.join(fuse.mountpoint, 'slow.img');
    fs.writeFileSync(path.join(fuse.backing, 'slow.img'), pattern(9, 4 * MiB));
    // sync I/O: no io_uring fd appears with the first ring, so the fd count before and after compare
    const sd = await startDaemon([`--blk-file=${slowImage}`, '--num-queues=1', '--aio=sync'], { dir: tempDir('vubd-dirty-log-slow-') });
    try {
      const fdsBefore = sd.fdCount();
      const { fe, conn } = await openSession(sd);
      const log = newLog();
      try {
        fe.negotiate({ log: true });
        const ring = fe.setupRing(0, 128);
        fe.blk(ring, BLK.IN, 0, 1024 * 1024, { region: 1 }); // ~3 s through the slow file system
        ring.kick();
        await new Promise((r) => setTimeout(r, 200));
        fe.send(Request.SET_LOG_BASE, logPayload({ mmapSize: LOG_BYTES, mmapOffset: 0 }), [log.fd]);
        await new Promise((r) => setTimeout(r, 200));
      } finally {
        dispose(fe); // gone while the drain waits for the read
        log.close();
      }
      await sessionEnded(sd, conn);
      assert.deepEqual(sd.logRecords().filter((r) => r.msg === 'internal error while handling a message'), [], 'no internal error (a second close of the log fd was one)');
      assert.equal(await fdsSettle(sd, fdsBefore, 5000), fdsBefore, 'every fd closed, none twice');
    } finally {
      await sd.stop();
      await fuse.unmount();
    }
  });

  test('a log too small for the guest: an error line, never a write past it; requests still complete', async () => {
    const { fe, conn } = await openSession(d);
    const log = newLog(LOG_BYTES, 'vubd-small-log');
    try {
      fe.negotiate({ log: true });
      const ring = fe.setupRing(0, 128);
      fe.setLogBase(log.fd, 8); // 8 bytes: 64 pages, 256 KiB; region 1 starts at 33 MiB
      fe.setLogging(true);
      log.bits.fill(0);
      const r = fe.run(ring, BLK.IN, 0, 4096, { region: 1 });
      assert.equal(fe.statusOf(r), 0);
      await d.waitForLog((x) => typeof x.msg === 'string' && /outside the dirty log/.test(x.msg));
      assert.ok(log.bits.subarray(8).every((b) => b === 0), 'nothing written past the 8 bytes the frontend named');
    } finally {
      dispose(fe);
      log.close();
    }
    await sessionEnded(d, conn);
  });

  test('hostile: SET_LOG_BASE without LOG_SHMFD, past the end of its file, of size 0; SET_LOG_FD with a non-eventfd; unknown SET_VRING_ADDR flags', async () => {
    const fdsBefore = await fdsSettle(d, d.fdCount());
    const cases: { reason: RegExp; run: (fe: Frontend) => void }[] = [
      {
        reason: /SET_LOG_BASE without LOG_SHMFD/,
        run: (fe) => {
          fe.negotiate();
          const log = newLog();
          fe.send(Request.SET_LOG_BASE, logPayload({ mmapSize: LOG_BYTES, mmapOffset: 0 }), [log.fd]);
          log.close();
        },
      },
      {
        reason: /dirty log .* beyond the end/,
        run: (fe) => {
          fe.negotiate({ log: true });
          const log = newLog();
          fe.send(Request.SET_LOG_BASE, logPayload({ mmapSize: 2 * LOG_BYTES, mmapOffset: 0 }), [log.fd]);
          log.close();
        },
      },
      {
        reason: /log of 0 bytes/,
        run: (fe) => {
          fe.negotiate({ log: true });
          const log = newLog();
          fe.send(Request.SET_LOG_BASE, logPayload({ mmapSize: 0, mmapOffset: 0 }), [log.fd]);
          log.close();
        },
      },
      {
        reason: /SET_LOG_FD: fd is not an eventfd/,
        run: (fe) => {
          fe.negotiate({ log: true });
          const m = native.memfdCreate('not-an-eventfd', 4096);
          fe.send(Request.SET_LOG_FD, new Uint8Array(0), [m]);
          native.close(m);
        },
      },
      {
        reason: /SET_VRING_ADDR: unknown flags 0x2/,
        run: (fe) => {
          fe.negotiate({ log: true });
          fe.send(Request.SET_VRING_ADDR, vringAddrPayload({ index: 0, flags: 2, descUserAddr: 0, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 }));
        },
      },
    ];
    for (const c of cases) {
      const { fe, conn } = await openSession(d);
      try {
        c.run(fe);
        assert.ok(fe.isClosedByPeer(3000), `closed: ${c.reason}`);
      } finally {
        dispose(fe);
      }
      const rec = await d.waitForLog((r) => r.msg === 'vhost-user connection closed' && r.conn === conn);
      assert.match(String(rec.reason), c.reason);
      await sessionEnded(d, conn);
    }
    // A SET_LOG_FD eventfd is accepted and closed with the session.
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate({ log: true });
      const efd = native.eventfd(true);
      const msg = encodeMessage(Request.SET_LOG_FD, FLAG_VERSION | FLAG_NEED_REPLY, new Uint8Array(0));
      native.sendMsg(fe.fd, msg, 0, msg.byteLength, [efd]);
      native.close(efd);
      const r = fe.recv();
      assert.equal(new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true), 0n, 'SET_LOG_FD acked');
      const ring = fe.setupRing(0, 128);
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, 0, 4096, { region: 1 })), 0, 'and the device serves');
    } finally {
      dispose(fe);
    }
    await sessionEnded(d, conn);
    assert.equal(await fdsSettle(d, fdsBefore), fdsBefore, 'no fd of the refused or ended sessions is left');
    assert.equal(d.proc.exitCode, null);
  });
});

test('packed ring: used descriptors (written in place in the descriptor ring) and the device event area are marked', async (t) => {
  const dir = tempDir('vubd-dirty-log-packed-');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, pattern(4, 4 * MiB));
  const d = await startDaemon([`--blk-file=${image}`, '--num-queues=1', '--ring-packed'], { dir });
  t.after(() => d.stop());
  const fe = Frontend.connect(d.socketPath);
  const log = newLog();
  try {
    fe.negotiate({ log: true, packed: true });
    const ring = fe.setupPackedRing(0, 64);
    fe.setLogBase(log.fd, LOG_BYTES);
    fe.setLogging(true);
    log.bits.fill(0);
    const r = fe.run(ring, BLK.IN, 8, 8192, { region: 1 });
    assert.equal(fe.statusOf(r), 0);
    assertMarked(log, [...pagesOf(r.data, 8192), ...pagesOf(r.status, 1)], 'data and status');
    assertMarked(log, pagesOf(ring.desc, 16 * 64), 'descriptor ring');
    assertMarked(log, pagesOf(ring.used, 4), 'device event area');
  } finally {
    dispose(fe);
    log.close();
  }
});
