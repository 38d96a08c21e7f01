// Hostile guests on packed rings (vubd --ring-packed): the split set of hostile-rings.test.ts mapped
// to packed semantics. Requests whose status byte can be found get IOERR; ring damage (chains
// that never end or run into descriptors not made available, buffer ids out of range, bad
// indirect tables, a base out of range) marks only that queue broken; the daemon never crashes.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Frontend, PackedRing, BLK, REGION_SIZE } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, type Daemon } from '../helpers/daemon.js';
import { Request } from '../../src/protocol/constants.js';
import { makeImage, pattern, openSession, closeSession } from '../helpers/sessions.js';

const OK = 0;
const IOERR = 1;
const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;
const Q = 128;

type Desc = { gpa: number | bigint; len: number; flags: number };

function brokenCount(d: Daemon, queue: number): number {
  return d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('queue marked broken') && r.queue === queue).length;
}

function noWorkerDied(d: Daemon): void {
  assert.equal(d.proc.exitCode, null, 'daemon alive');
  const dead = d.logRecords().filter((r) => r.msg === 'queue worker crashed' || r.msg === 'queue worker exited');
  assert.deepEqual(dead, [], 'no queue worker died');
}

function ringWorks(fe: Frontend, ring: PackedRing, seed: number, indirect = true): void {
  const data = pattern(seed, 4096);
  const sector = 256 + 8 * seed;
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, sector, data)), OK, `ring ${ring.index} write`);
  const r = fe.run(ring, BLK.IN, sector, 4096, { indirect });
  assert.equal(fe.statusOf(r), OK, `ring ${ring.index} read`);
  assert.deepEqual(fe.dataOf(r), data);
}

function header(fe: Frontend, type: number, sector = 0): number {
  const g = fe.ram.alloc(16, 16);
  const dv = fe.ram.view(g, 16);
  dv.setUint32(0, type, true);
  dv.setBigUint64(8, BigInt(sector), true);
  return g;
}

function statusByte(fe: Frontend, region = 0): number {
  const g = fe.ram.alloc(1, 1, region);
  fe.ram.bytes(g, 1)[0] = 0xff;
  return g;
}

/** An indirect table in region 1 (packed tables have no next field: entries are walked in order). */
function table(fe: Frontend, entries: Desc[]): number {
  const t = fe.ram.alloc(16 * Math.max(1, entries.length), 16, 1);
  entries.forEach((e, k) => {
    const dv = fe.ram.view(t + 16 * k, 16);
    dv.setBigUint64(0, BigInt(e.gpa), true);
    dv.setUint32(8, e.len, true);
    dv.setUint16(14, e.flags, true);
  });
  return t;
}

describe('hostile packed rings', () => {
  let d: Daemon;
  let seed = 1;

  before(async () => {
    const dir = tempDir('vubd-hostile-packed-');
    d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=2', '--ring-packed'], { dir });
  });

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  /** A request the backend can answer: it completes with `want` in its status byte, both rings keep working. */
  async function answered(name: string, build: (fe: Frontend) => { descs: Desc[]; status: number | null; check?: () => void }, want: number | null, usedLen?: number): Promise<void> {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate({ packed: true });
      const q0 = fe.setupPackedRing(0, Q);
      const q1 = fe.setupPackedRing(1, Q);
      const r = build(fe);
      q1.addRaw(5, r.descs);
      q1.kick();
      const done = q1.waitFor(1, 3000);
      assert.equal(done[0]!.head, 5, `${name}: the hostile id was completed`);
      if (usedLen !== undefined) assert.equal(done[0]!.len, usedLen, `${name}: used length`);
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
   * Ring damage: a valid request made available just before it completes, queue 1 is marked
   * broken once (logged), queue 0 keeps working, GET_VRING_BASE is answered, the next session
   * serves queue 1 again.
   */
  async function broken(name: string, damage: (fe: Frontend, ring: PackedRing) => void, opts: { goodFirst?: boolean; indirect?: boolean } = {}): Promise<void> {
    const before1 = brokenCount(d, 1);
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate({ packed: true, indirect: opts.indirect ?? true });
      const q0 = fe.setupPackedRing(0, Q);
      const q1 = fe.setupPackedRing(1, Q);
      const good = (opts.goodFirst ?? true) ? fe.blk(q1, BLK.OUT, 40, pattern(seed++, 512)) : null;
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
      ringWorks(fe, q0, seed++, opts.indirect ?? true);
      assert.ok(fe.callU64(Request.GET_FEATURES) > 0n, 'channel still answers');
      fe.getVringBase(1);
    } finally {
      await closeSession(d, fe, conn);
    }
    const again = await openSession(d);
    try {
      again.fe.negotiate({ packed: true });
      ringWorks(again.fe, again.fe.setupPackedRing(1, Q), seed++);
    } finally {
      await closeSession(d, again.fe, again.conn);
    }
    noWorkerDied(d);
  }

  // ---- requests with a findable status byte ----

  test('data buffer in a hole between regions: IOERR', async () => {
    await answered('hole', (fe) => {
      const st = statusByte(fe);
      const descs = [{ gpa: header(fe, BLK.IN), len: 16, flags: NEXT }, { gpa: REGION_SIZE + 0x1000, len: 512, flags: NEXT | WRITE }, { gpa: st, len: 1, flags: WRITE }];
      return { descs, status: st };
    }, IOERR);
  });

  test('data buffer running off the end of the last region: IOERR, nothing written', async () => {
    await answered('straddle', (fe) => {
      const st = statusByte(fe);
      const gpa = fe.ram.regions[1]!.gpa + REGION_SIZE - 256;
      fe.ram.bytes(gpa, 256).fill(0xaa);
      const descs = [{ gpa: header(fe, BLK.IN), len: 16, flags: NEXT }, { gpa, len: 512, flags: NEXT | WRITE }, { gpa: st, len: 1, flags: WRITE }];
      return { descs, status: st, check: () => assert.ok(fe.ram.bytes(gpa, 256).every((b) => b === 0xaa), 'in-region part untouched') };
    }, IOERR);
  });

  test('write whose data address is beyond 2^53: IOERR', async () => {
    await answered('huge address', (fe) => {
      const st = statusByte(fe);
      const descs = [{ gpa: header(fe, BLK.OUT), len: 16, flags: NEXT }, { gpa: 0xfffffffffffff000n, len: 512, flags: NEXT }, { gpa: st, len: 1, flags: WRITE }];
      return { descs, status: st };
    }, IOERR);
  });

  test('device-readable buffer after a writable one: IOERR', async () => {
    await answered('bad order', (fe) => {
      const st = statusByte(fe);
      const descs = [{ gpa: header(fe, BLK.OUT), len: 16, flags: NEXT }, { gpa: st, len: 1, flags: NEXT | WRITE }, { gpa: fe.ram.alloc(512, 512), len: 512, flags: 0 }];
      return { descs, status: st };
    }, IOERR);
  });

  test('bad buffers inside an indirect table: IOERR in the status byte', async () => {
    await answered('indirect hole', (fe) => {
      const st = statusByte(fe);
      const t = table(fe, [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }, { gpa: REGION_SIZE + 0x1000, len: 512, flags: WRITE }, { gpa: st, len: 1, flags: WRITE }]);
      return { descs: [{ gpa: t, len: 48, flags: INDIRECT }], status: st };
    }, IOERR);
  });

  test('chain with no writable status byte: completed with nothing written', async () => {
    await answered('no status', (fe) => {
      const h = header(fe, BLK.OUT);
      const data = fe.ram.alloc(512, 512);
      fe.ram.bytes(data, 512).set(pattern(99, 512));
      return {
        descs: [{ gpa: h, len: 16, flags: NEXT }, { gpa: data, len: 512, flags: 0 }],
        status: null,
        check: () => {
          assert.deepEqual(fe.ram.bytes(data, 512), pattern(99, 512), 'readable buffer not written');
          assert.deepEqual(fe.ram.bytes(h, 16).subarray(0, 4), Uint8Array.of(1, 0, 0, 0), 'header not written');
        },
      };
    }, null);
  });

  test('header only, no writable byte at all (IN): completed, used length 0', async () => {
    await answered('header only', (fe) => ({ descs: [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }], status: null }), null, 0);
  });

  // ---- ring damage: the queue is marked broken ----

  test('a chain that never ends (every descriptor of the ring has NEXT)', async () => {
    await broken('never ends', (fe, ring) => {
      const h = header(fe, BLK.IN);
      ring.addRaw(7, Array.from({ length: Q }, () => ({ gpa: h, len: 16, flags: NEXT })));
    }, { goodFirst: false }); // the whole ring is the chain
  });

  test('a chain whose NEXT runs into a descriptor that was not made available', async () => {
    await broken('next into unavailable', (fe, ring) => ring.addRaw(7, [{ gpa: header(fe, BLK.IN), len: 16, flags: NEXT }]));
  });

  for (const id of [Q, 0xffff]) {
    test(`buffer id ${id} >= queue size`, async () => {
      await broken(`id ${id}`, (fe, ring) => ring.addRaw(1, [{ gpa: header(fe, BLK.IN), len: 16, flags: NEXT }, { gpa: statusByte(fe), len: 1, flags: WRITE, id }]));
    });
  }

  for (const [what, len] of [
    ['length 0', 0],
    ['length 17 (not a multiple of 16)', 17],
    ['length 0xfffffff0 (beyond guest memory)', 0xfffffff0],
  ] as const) {
    test(`indirect descriptor with ${what}`, async () => {
      await broken(`indirect ${what}`, (fe, ring) => {
        const t = table(fe, [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }, { gpa: statusByte(fe), len: 1, flags: WRITE }]);
        ring.addRaw(1, [{ gpa: t, len, flags: INDIRECT }]);
      });
    });
  }

  test('indirect table in a hole / nested indirect / indirect with NEXT / indirect after a direct descriptor', async () => {
    await broken('indirect table in hole', (_fe, ring) => ring.addRaw(1, [{ gpa: REGION_SIZE + 0x1000, len: 64, flags: INDIRECT }]));
    await broken('nested indirect', (fe, ring) => {
      const inner = table(fe, [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }, { gpa: statusByte(fe), len: 1, flags: WRITE }]);
      ring.addRaw(1, [{ gpa: table(fe, [{ gpa: inner, len: 32, flags: INDIRECT }]), len: 16, flags: INDIRECT }]);
    });
    await broken('indirect with NEXT', (fe, ring) => {
      const t = table(fe, [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }, { gpa: statusByte(fe), len: 1, flags: WRITE }]);
      ring.addRaw(1, [{ gpa: t, len: 32, flags: INDIRECT | NEXT }, { gpa: statusByte(fe), len: 1, flags: WRITE }]);
    });
    await broken('indirect after a direct descriptor', (fe, ring) => {
      const t = table(fe, [{ gpa: fe.ram.alloc(512, 512), len: 512, flags: WRITE }, { gpa: statusByte(fe), len: 1, flags: WRITE }]);
      ring.addRaw(1, [{ gpa: header(fe, BLK.IN), len: 16, flags: NEXT }, { gpa: t, len: 32, flags: INDIRECT }]);
    });
  });

  test('indirect table longer than the queue (300 entries on a 128-entry queue)', async () => {
    await broken('table longer than the queue', (fe, ring) => {
      const data = fe.ram.alloc(512, 512, 1);
      const entries: Desc[] = [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }];
      for (let k = 1; k < 299; k++) entries.push({ gpa: data, len: 512, flags: WRITE });
      entries.push({ gpa: statusByte(fe), len: 1, flags: WRITE });
      ring.addRaw(1, [{ gpa: table(fe, entries), len: 16 * 300, flags: INDIRECT }]);
    });
  });

  test('indirect descriptor without INDIRECT_DESC negotiated', async () => {
    await broken('indirect not negotiated', (fe, ring) => {
      const t = table(fe, [{ gpa: header(fe, BLK.IN), len: 16, flags: 0 }, { gpa: statusByte(fe), len: 1, flags: WRITE }]);
      ring.addRaw(1, [{ gpa: t, len: 32, flags: INDIRECT }]);
    }, { indirect: false });
  });

  for (const [what, base] of [
    ['avail', (0x80008000 | Q) >>> 0],
    ['used', (0x8000 | (Q << 16)) >>> 0],
  ] as const) {
    test(`SET_VRING_BASE with a ${what} index beyond the queue size: queue broken, GET_VRING_BASE answered`, async () => {
      const before = brokenCount(d, 0);
      const { fe, conn } = await openSession(d);
      try {
        fe.negotiate({ packed: true });
        fe.setupPackedRing(0, Q, undefined, base);
        await d.waitForLog(() => brokenCount(d, 0) > before, 3000);
        noWorkerDied(d);
        assert.equal(fe.getVringBase(0), base, 'the base it was given, untouched');
        ringWorks(fe, fe.setupPackedRing(1, Q), seed++);
      } finally {
        await closeSession(d, fe, conn);
      }
    });
  }
});

describe('broken packed chains do not leak request slots', () => {
  let d: Daemon;
  before(async () => {
    const dir = tempDir('vubd-hostile-packed-slots-');
    d = await startDaemon([`--blk-file=${makeImage(dir, 4 * 2 ** 20)}`, '--num-queues=1', '--ring-packed'], { dir });
  });
  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  test('6 x (bad id, GET_VRING_BASE, a new ring) on a 4-entry queue: valid requests still complete', async () => {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate({ packed: true });
      const rings: PackedRing[] = [];
      for (let round = 0; round < 6; round++) {
        const ring = fe.setupPackedRing(0, 4); // the worker sizes its request table from the first ring: 4 slots
        rings.push(ring);
        assert.equal(fe.statusOf(fe.run(ring, BLK.FLUSH, 0, 0)), OK, `round ${round}: flush before the damage`);
        const before = brokenCount(d, 0);
        ring.addRaw(1, [{ gpa: header(fe, BLK.IN), len: 16, flags: NEXT }, { gpa: statusByte(fe), len: 1, flags: WRITE, id: 9 }]);
        ring.kick();
        await d.waitForLog(() => brokenCount(d, 0) > before, 3000);
        fe.getVringBase(0);
      }
      assert.equal(fe.statusOf(fe.run(fe.setupPackedRing(0, 4), BLK.FLUSH, 0, 0)), OK, 'a valid request after 6 broken chains');
      for (const r of rings) r.close();
      noWorkerDied(d);
    } finally {
      await closeSession(d, fe, conn);
    }
  });
});
