// Hostile guests: malformed descriptor chains and ring indices on a valid vhost-user session.
// Requests whose status byte can be found get IOERR/UNSUPP; ring damage marks only that queue
// broken; the daemon never crashes and the other queues keep serving.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, SplitRing, BLK, REGION_SIZE } from '../helpers/frontend.js';
import { startDaemon, sleep, type Daemon } from '../helpers/daemon.js';
import { Request } from '../../src/protocol/constants.js';
import { pattern, openSession, closeSession } from '../helpers/sessions.js';

const MiB = 2 ** 20;
const OK = 0;
const IOERR = 1;
const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;




function brokenCount(d: Daemon, queue: number): number {
  return d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('queue marked broken') && r.queue === queue).length;
}

function noWorkerDied(d: Daemon): void {
  assert.equal(d.proc.exitCode, null, 'daemon alive');
  const dead = d.logRecords().filter((r) => r.msg === 'queue worker crashed' || r.msg === 'queue worker exited');
  assert.deepEqual(dead, [], 'no queue worker died');
}

/** Write + read back on a ring through the normal path. */
function ringWorks(fe: Frontend, ring: SplitRing, seed: number): void {
  const data = pattern(seed, 4096);
  const sector = 256 + 8 * seed;
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, sector, data)), OK, `ring ${ring.index} write`);
  const r = fe.run(ring, BLK.IN, sector, 4096, { indirect: true });
  assert.equal(fe.statusOf(r), OK, `ring ${ring.index} read`);
  assert.deepEqual(fe.dataOf(r), data);
}

function header(fe: Frontend, type: number, sector: number): number {
  const g = fe.ram.alloc(16, 16);
  const dv = fe.ram.view(g, 16);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0, true);
  dv.setBigUint64(8, BigInt(sector), true);
  return g;
}

function statusByte(fe: Frontend, region = 0): number {
  const g = fe.ram.alloc(1, 1, region);
  fe.ram.bytes(g, 1)[0] = 0xff;
  return g;
}


describe('hostile descriptor chains and ring indices', () => {
  let d: Daemon;
  let seed = 1;

  before(async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-hostile-rings-');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 16 * MiB);
    d = await startDaemon([`--blk-file=${image}`, '--num-queues=2'], { dir });
  });

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  /** A request the backend can answer: it completes with `status`, then both rings keep working. */
  async function answered(name: string, build: (fe: Frontend, ring: SplitRing) => { head: number; status: number | null; check?: () => void }, want: number | null): Promise<void> {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const q0 = fe.setupRing(0, 128);
      const q1 = fe.setupRing(1, 128);
      const r = build(fe, q1);
      q1.kick();
      const done = q1.waitFor(1, 3000);
      assert.equal(done[0]!.head, r.head, `${name}: the hostile head was completed`);
      if (r.status !== null && want !== null) assert.equal(fe.ram.bytes(r.status, 1)[0], want, `${name}: status byte`);
      r.check?.();
      noWorkerDied(d);
      ringWorks(fe, q1, seed++);
      ringWorks(fe, q0, seed++);
    } finally {
      await closeSession(d, fe, conn);
    }
  }

  /**
   * Ring damage: a valid request published just before it still completes, the queue is marked
   * broken (logged), queue 0 keeps working, the channel answers GET_VRING_BASE, and the next
   * session serves queue 1 again.
   */
  async function broken(name: string, damage: (fe: Frontend, ring: SplitRing) => void, goodFirst = true): Promise<void> {
    const before1 = brokenCount(d, 1);
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const q0 = fe.setupRing(0, 128);
      const q1 = fe.setupRing(1, 128);
      const good = goodFirst ? fe.blk(q1, BLK.OUT, 40, pattern(seed++, 512)) : null;
      damage(fe, q1);
      q1.kick();
      if (good) {
        const done = q1.waitFor(1, 3000);
        assert.equal(done[0]!.head, good.head, `${name}: the valid request before the damage completed`);
        assert.equal(fe.statusOf(good), OK);
      }
      await d.waitForLog(() => brokenCount(d, 1) > before1, 3000);
      await sleep(100); // a second broken line would show up here
      assert.equal(brokenCount(d, 1), before1 + 1, `${name}: queue 1 marked broken once`);
      assert.equal(brokenCount(d, 0), 0, `${name}: queue 0 untouched`);
      noWorkerDied(d);
      ringWorks(fe, q0, seed++);
      assert.ok(fe.callU64(Request.GET_FEATURES) > 0n, 'channel still answers');
      fe.getVringBase(1);
    } finally {
      await closeSession(d, fe, conn);
    }
    const again = await openSession(d);
    try {
      again.fe.negotiate();
      ringWorks(again.fe, again.fe.setupRing(1, 128), seed++);
    } finally {
      await closeSession(d, again.fe, again.conn);
    }
    noWorkerDied(d);
  }

  // ---- requests with a findable status byte ----

  test('data buffer in a hole between regions: IOERR, queue still works', async () => {
    await answered('hole', (fe, ring) => {
      const h = header(fe, BLK.IN, 0);
      const st = statusByte(fe);
      const hole = REGION_SIZE + 0x1000; // region 1 starts at REGION_SIZE + 1 MiB
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa: hole, len: 512, flags: NEXT | WRITE, next: 122 });
      ring.writeDesc(ring.desc, 122, { gpa: st, len: 1, flags: WRITE, next: 0 });
      ring.publishHead(120);
      return { head: 120, status: st };
    }, IOERR);
  });

  test('data buffer running off the end of the last region: IOERR, nothing written', async () => {
    await answered('straddle', (fe, ring) => {
      const h = header(fe, BLK.IN, 0);
      const st = statusByte(fe);
      const last = fe.ram.regions[1]!;
      const gpa = last.gpa + REGION_SIZE - 256;
      fe.ram.bytes(gpa, 256).fill(0xaa);
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa, len: 512, flags: NEXT | WRITE, next: 122 });
      ring.writeDesc(ring.desc, 122, { gpa: st, len: 1, flags: WRITE, next: 0 });
      ring.publishHead(120);
      return { head: 120, status: st, check: () => assert.ok(fe.ram.bytes(gpa, 256).every((b) => b === 0xaa), 'in-region part untouched') };
    }, IOERR);
  });

  test('write whose data address is beyond 2^53: IOERR', async () => {
    await answered('huge address', (fe, ring) => {
      const h = header(fe, BLK.OUT, 0);
      const st = statusByte(fe);
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa: 0, len: 512, flags: NEXT, next: 122 });
      // writeDesc takes a number; patch the high word by hand
      fe.ram.view(ring.desc + 16 * 121, 8).setBigUint64(0, 0xfffffffffffff000n, true);
      ring.writeDesc(ring.desc, 122, { gpa: st, len: 1, flags: WRITE, next: 0 });
      ring.publishHead(120);
      return { head: 120, status: st };
    }, IOERR);
  });

  test('device-readable buffer after a writable one: IOERR', async () => {
    await answered('bad order', (fe, ring) => {
      const h = header(fe, BLK.OUT, 0);
      const st = statusByte(fe);
      const data = fe.ram.alloc(512, 512);
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa: st, len: 1, flags: NEXT | WRITE, next: 122 });
      ring.writeDesc(ring.desc, 122, { gpa: data, len: 512, flags: 0, next: 0 });
      ring.publishHead(120);
      return { head: 120, status: st };
    }, IOERR);
  });

  test('chain with no writable status byte: completed with nothing written, queue still works', async () => {
    await answered('no status', (fe, ring) => {
      const h = header(fe, BLK.OUT, 0);
      const data = fe.ram.alloc(512, 512);
      fe.ram.bytes(data, 512).set(pattern(99, 512));
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa: data, len: 512, flags: 0, next: 0 });
      ring.publishHead(120);
      return {
        head: 120,
        status: null,
        check: () => {
          assert.deepEqual(fe.ram.bytes(data, 512), pattern(99, 512), 'readable buffer not written');
          assert.deepEqual(fe.ram.bytes(h, 16).subarray(0, 4), Uint8Array.of(1, 0, 0, 0), 'header not written');
        },
      };
    }, null);
  });

  test('header only, no writable byte at all (IN): completed, used length 0', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const q1 = fe.setupRing(1, 128);
      const h = header(fe, BLK.IN, 0);
      q1.writeDesc(q1.desc, 120, { gpa: h, len: 16, flags: 0, next: 0 });
      q1.publishHead(120);
      q1.kick();
      const done = q1.waitFor(1, 3000);
      assert.deepEqual(done, [{ head: 120, len: 0 }]);
      ringWorks(fe, q1, seed++);
    } finally {
      await closeSession(d, fe, conn);
    }
  });

  // ---- ring damage: the queue is marked broken ----

  test('descriptor chain that loops (direct)', async () => {
    await broken('loop', (fe, ring) => {
      const h = header(fe, BLK.IN, 0);
      const data = fe.ram.alloc(512, 512);
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa: data, len: 512, flags: NEXT | WRITE, next: 122 });
      ring.writeDesc(ring.desc, 122, { gpa: data, len: 512, flags: NEXT | WRITE, next: 120 });
      ring.publishHead(120);
    });
  });

  test('descriptor chain that loops inside an indirect table', async () => {
    await broken('indirect loop', (fe, ring) => {
      const h = header(fe, BLK.IN, 0);
      const table = fe.ram.alloc(16 * 4, 16, 1);
      ring.writeDesc(table, 0, { gpa: h, len: 16, flags: NEXT, next: 1 });
      ring.writeDesc(table, 1, { gpa: h, len: 16, flags: NEXT, next: 2 });
      ring.writeDesc(table, 2, { gpa: h, len: 16, flags: NEXT, next: 1 });
      ring.writeDesc(ring.desc, 120, { gpa: table, len: 16 * 4, flags: INDIRECT, next: 0 });
      ring.publishHead(120);
    });
  });

  test('next index beyond the queue size', async () => {
    await broken('next out of range', (fe, ring) => {
      const h = header(fe, BLK.IN, 0);
      ring.writeDesc(ring.desc, 120, { gpa: h, len: 16, flags: NEXT, next: 4000 });
      ring.publishHead(120);
    });
  });

  for (const head of [128, 0xffff]) {
    test(`head index ${head} >= queue size in the avail ring`, async () => {
      await broken(`head ${head}`, (_fe, ring) => ring.publishHead(head));
    });
  }

  test('avail idx jumped by more than the queue size', async () => {
    await broken('avail jump', (fe, ring) => {
      ring.availIdx = (ring.availIdx + 129) & 0xffff;
      const av = fe.ram.bytes(ring.avail, 4);
      Atomics.store(new Uint16Array(av.buffer, av.byteOffset, 2), 1, ring.availIdx);
    }, false); // with the index garbage the device cannot tell which entries are real
  });

  for (const [what, len] of [
    ['length 0', 0],
    ['length 17 (not a multiple of 16)', 17],
    ['length 0xfffffff0 (beyond guest memory)', 0xfffffff0],
  ] as const) {
    test(`indirect descriptor with ${what}`, async () => {
      await broken(`indirect ${what}`, (fe, ring) => {
        const table = fe.ram.alloc(64, 16, 1);
        ring.writeDesc(table, 0, { gpa: header(fe, BLK.IN, 0), len: 16, flags: NEXT, next: 1 });
        ring.writeDesc(table, 1, { gpa: statusByte(fe), len: 1, flags: WRITE, next: 0 });
        ring.writeDesc(ring.desc, 120, { gpa: table, len, flags: INDIRECT, next: 0 });
        ring.publishHead(120);
      });
    });
  }

  test('indirect table longer than the queue (300 entries on a 128-entry queue)', async () => {
    // Refused whole: the spec bounds a chain by the queue size, and reading it would let a guest
    // make the worker walk up to 1 GiB of table per request.
    await broken('table longer than the queue', (fe, ring) => {
      const n = 300;
      const h = header(fe, BLK.IN, 0);
      const st = statusByte(fe, 1);
      const table = fe.ram.alloc(16 * n, 16, 1);
      const data = fe.ram.alloc(512 * (n - 2), 512, 1);
      ring.writeDesc(table, 0, { gpa: h, len: 16, flags: NEXT, next: 1 });
      for (let k = 1; k < n - 1; k++) ring.writeDesc(table, k, { gpa: data + 512 * (k - 1), len: 512, flags: NEXT | WRITE, next: k + 1 });
      ring.writeDesc(table, n - 1, { gpa: st, len: 1, flags: WRITE, next: 0 });
      ring.writeDesc(ring.desc, 120, { gpa: table, len: 16 * n, flags: INDIRECT, next: 0 });
      ring.publishHead(120);
    });
  });

  test('indirect table in a hole / nested indirect / indirect with NEXT', async () => {
    await broken('indirect table in hole', (_fe, ring) => {
      ring.writeDesc(ring.desc, 120, { gpa: REGION_SIZE + 0x1000, len: 64, flags: INDIRECT, next: 0 });
      ring.publishHead(120);
    });
    await broken('nested indirect', (fe, ring) => {
      const inner = fe.ram.alloc(32, 16, 1);
      const outer = fe.ram.alloc(32, 16, 1);
      ring.writeDesc(inner, 0, { gpa: header(fe, BLK.IN, 0), len: 16, flags: NEXT, next: 1 });
      ring.writeDesc(inner, 1, { gpa: statusByte(fe), len: 1, flags: WRITE, next: 0 });
      ring.writeDesc(outer, 0, { gpa: inner, len: 32, flags: INDIRECT, next: 0 });
      ring.writeDesc(ring.desc, 120, { gpa: outer, len: 16, flags: INDIRECT, next: 0 });
      ring.publishHead(120);
    });
    await broken('indirect with NEXT', (fe, ring) => {
      const table = fe.ram.alloc(32, 16, 1);
      ring.writeDesc(table, 0, { gpa: header(fe, BLK.IN, 0), len: 16, flags: NEXT, next: 1 });
      ring.writeDesc(table, 1, { gpa: statusByte(fe), len: 1, flags: WRITE, next: 0 });
      ring.writeDesc(ring.desc, 120, { gpa: table, len: 32, flags: INDIRECT | NEXT, next: 121 });
      ring.writeDesc(ring.desc, 121, { gpa: statusByte(fe), len: 1, flags: WRITE, next: 0 });
      ring.publishHead(120);
    });
  });
});

describe('broken chains do not leak request slots', () => {
  let d: Daemon;
  before(async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-hostile-slots-');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 4 * MiB);
    d = await startDaemon([`--blk-file=${image}`, '--num-queues=1'], { dir });
  });
  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  test('6 x (looping chain, GET_VRING_BASE, restart ring) on a 4-entry queue: valid requests still complete', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 4); // the worker sizes its request table from the first ring: 4 slots
      assert.equal(fe.statusOf(fe.run(ring, BLK.FLUSH, 0, 0)), OK);
      const h = header(fe, BLK.IN, 0);
      for (let round = 0; round < 6; round++) {
        const before = brokenCount(d, 0);
        ring.writeDesc(ring.desc, 3, { gpa: h, len: 16, flags: NEXT, next: 3 }); // self loop
        ring.publishHead(3);
        ring.kick();
        await d.waitForLog(() => brokenCount(d, 0) > before, 3000);
        const base = fe.getVringBase(0);
        assert.equal(base, ring.availIdx, 'the looping head was consumed');
        fe.restartRing(ring, base, false);
        let status = -1;
        try {
          const r = fe.run(ring, BLK.FLUSH, 0, 0);
          status = fe.statusOf(r);
        } catch (e) {
          assert.fail(`round ${round}: a valid request after ${round + 1} broken chains did not complete (${(e as Error).message})`);
        }
        assert.equal(status, OK);
      }
      noWorkerDied(d);
    } finally {
      await closeSession(d, fe, conn);
    }
  });
});
