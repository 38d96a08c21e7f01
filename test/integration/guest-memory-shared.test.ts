// Guest memory is mapped once per process, whatever the queue count, and released as soon as
// nothing uses it: after a session, after a table that failed part-way, and under continuous load
// when the frontend replaces its table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG). /proc/PID/maps
// of the vubd process is the witness.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Frontend, GuestRam, BLK, type SplitRing } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, type Daemon } from '../helpers/daemon.js';
import { closeSession, openSession } from '../helpers/sessions.js';
import { guestMappings, mappingsSettle, sealWrite } from '../helpers/guest-maps.js';
import { native } from '../../src/native/index.js';
import { FLAG_NEED_REPLY, FLAG_VERSION, Request } from '../../src/protocol/constants.js';
import { memTablePayload, singleRegionPayload, type MemoryRegion } from '../../src/protocol/codec.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const CHUNK = GiB;
const OVERLAP = 2 * MiB;
const OK = 0;

/** What vubd should map for these memfds: every chunk of every region, as file@offset+size. */
function chunksOf(regions: { file: string; size: number }[]): string[] {
  const out: string[] = [];
  for (const r of regions) for (let off = 0; off < r.size; off += CHUNK) out.push(`${r.file}@${off}+${Math.min(CHUNK + OVERLAP, r.size - off)}`);
  return out.sort();
}

function mapped(d: Daemon): string[] {
  return guestMappings(d.proc.pid!)
    .map((m) => `${m.file}@${m.offset}+${m.size}`)
    .sort();
}

const ramChunks = (ram: GuestRam): string[] => chunksOf(ram.regions.map((r, i) => ({ file: `guest-ram-${i}`, size: r.size })));

test('a 64-queue vubd attaches a 64 GiB guest, each chunk mapped once, and serves its queues', { timeout: 180000 }, async () => {
  const d = await startDaemon(['--blk-driver=null', '--size=1G', '--num-queues=64'], { readyTimeoutMs: 90000 });
  const ram = new GuestRam(2, [64 * MiB, 64 * GiB - 64 * MiB]); // sparse memfds
  const fe = Frontend.connect(d.socketPath, ram);
  let served = false;
  try {
    fe.negotiate(); // before: 64 workers x 65 chunks overflowed the 4096 tracked mappings
    const rings = [0, 1, 63].map((q) => fe.setupRing(q, 64));
    for (const ring of rings) {
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8, new Uint8Array(4096).fill(7))), OK, `queue ${ring.index} write`);
      const r = fe.run(ring, BLK.IN, 8, 4096, { region: 1 });
      assert.equal(fe.statusOf(r), OK, `queue ${ring.index} read`);
      assert.ok(fe.dataOf(r).every((b) => b === 0), 'the null driver reads zeroes');
    }
    // A buffer 40 GiB into region 1 is served through that chunk (the test maps a window of it).
    const r1 = ram.regions[1]!;
    const win = new Uint8Array(native.mmap(r1.fd, 8192, 40 * GiB, true));
    win.fill(0xee);
    const hdr = ram.alloc(16, 16);
    ram.view(hdr, 16).setUint32(0, BLK.IN, true);
    const status = ram.alloc(1, 1);
    ram.bytes(status, 1)[0] = 0xff;
    const ring = rings[2]!;
    ring.add([
      { gpa: hdr, len: 16, write: false },
      { gpa: r1.gpa + 40 * GiB + 4096, len: 4096, write: true },
      { gpa: status, len: 1, write: true },
    ]);
    ring.kick();
    ring.waitFor(1, 10000);
    assert.equal(ram.bytes(status, 1)[0], OK);
    assert.ok(win.subarray(4096).every((b) => b === 0) && win.subarray(0, 4096).every((b) => b === 0xee), 'exactly the far buffer was read into');
    native.unmap(win.buffer as ArrayBuffer);

    assert.deepEqual(mapped(d), ramChunks(ram), 'every guest chunk mapped exactly once in vubd');
    served = true;
  } finally {
    fe.close();
    ram.close();
    if (!served) await d.stop(); // never leave a 64-worker daemon behind
  }
  try {
    await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend', 20000);
    assert.equal(await mappingsSettle(d.proc.pid!, 0), 0, 'nothing mapped after the session');
  } finally {
    const r = await d.stop();
    assert.equal(r.code, 0);
  }
});

/** Keeps `depth` reads in flight on each ring, topping up as they complete; requests are numbered. */
class Load {
  /** numbers of the requests submitted and not completed yet */
  readonly pending = new Set<number>();
  private next = 0;
  private readonly byHead = new Map<SplitRing, Map<number, number>>();
  topUp = true;
  completed = 0;

  constructor(
    private readonly fe: Frontend,
    private readonly rings: SplitRing[],
    private readonly depth: number,
  ) {
    for (const r of rings) this.byHead.set(r, new Map());
    this.pump();
  }

  pump(): void {
    for (const ring of this.rings) {
      const heads = this.byHead.get(ring)!;
      for (const c of ring.collect()) {
        this.pending.delete(heads.get(c.head)!);
        heads.delete(c.head);
        this.completed++;
      }
      if (!this.topUp) continue;
      let added = 0;
      while (heads.size < this.depth) {
        const n = this.next++;
        const req = this.fe.blk(ring, BLK.IN, 8 * (n % 1000), 512, { region: 1 });
        heads.set(req.head, n);
        this.pending.add(n);
        added++;
      }
      if (added > 0) ring.kick();
    }
  }

  /** Pumps until every request in `ids` completed (the load goes on meanwhile). */
  async finish(ids: ReadonlySet<number>, timeoutMs = 15000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.pump();
      if (![...ids].some((n) => this.pending.has(n))) return;
      if (Date.now() > deadline) throw new Error(`requests still pending after ${timeoutMs} ms`);
      await sleep(5);
    }
  }
}

describe('sessions, failed tables and table changes under load', () => {
  let d: Daemon;
  let control: string;

  before(async () => {
    const dir = tempDir('vubd-guest-memory-');
    control = path.join(dir, 'control.sock');
    d = await startDaemon(['--blk-driver=null', '--size=1G', '--num-queues=2', `--control=${control}`], { dir });
  });

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0);
  });

  async function servedSession(): Promise<void> {
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 64);
      assert.equal(fe.statusOf(fe.run(ring, BLK.IN, 8, 4096)), OK);
      assert.deepEqual(mapped(d), ramChunks(fe.ram), 'the two regions, mapped once');
    } finally {
      await closeSession(d, fe, conn);
    }
    assert.equal(await mappingsSettle(d.proc.pid!, 0), 0, 'nothing mapped after the session');
  }

  test('50 sessions in a row: each maps its regions once, and nothing stays after it', async () => {
    for (let i = 0; i < 50; i++) await servedSession();
  });

  const TiB = 2 ** 40;
  const badTables: { name: string; reason: RegExp; regions: () => { table: MemoryRegion[]; fds: number[] } }[] = [
    {
      // mmap of chunk 0 of region 1 fails after the three chunks of region 0 were mapped
      name: 'a sealed memfd (EPERM) after a 3 GiB region',
      reason: /guest memory cannot be mapped: region 1 .*Operation not permitted/,
      regions: () => {
        const big = native.memfdCreate('guest-ram-big', 3 * GiB);
        const sealed = native.memfdCreate('guest-ram-sealed', 16 * MiB);
        sealWrite(sealed);
        const table = [
          { guestPhysAddr: 0, size: 3 * GiB, userAddr: 0x7f00_0000_0000, mmapOffset: 0 },
          { guestPhysAddr: 4 * GiB, size: 16 * MiB, userAddr: 0x7f10_0000_0000, mmapOffset: 0 },
        ];
        return { table, fds: [big, sealed] };
      },
    },
    {
      // before: each worker mapped 4096 chunks, then failed and kept them
      name: 'a 40 TiB region (past the mapping budget)',
      reason: /guest memory cannot be mapped: the table needs 40960 more mappings/,
      regions: () => ({ table: [{ guestPhysAddr: 0, size: 40 * TiB, userAddr: 0x1000_0000_0000, mmapOffset: 0 }], fds: [native.memfdCreate('guest-ram-huge', 40 * TiB)] }),
    },
  ];
  for (const bad of badTables) {
    test(`a table with ${bad.name} is refused, leaves nothing mapped, and the next frontend is served`, { timeout: 120000 }, async () => {
      const { table, fds } = bad.regions();
      try {
        const { fe, conn } = await openSession(d);
        try {
          fe.negotiate(); // a good table first, then the bad one replaces it
          assert.equal(fe.statusOf(fe.run(fe.setupRing(0, 64), BLK.IN, 8, 512)), OK);
          fe.send(Request.SET_MEM_TABLE, memTablePayload(table), fds, FLAG_VERSION | FLAG_NEED_REPLY);
          assert.ok(fe.isClosedByPeer(60000), 'the connection is closed');
        } finally {
          fe.close();
          fe.ram.close();
        }
        await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn === conn, 60000);
        assert.deepEqual(guestMappings(d.proc.pid!), [], 'no chunk of either table is left mapped');
        const rec = d.logRecords().find((r) => r.msg === 'vhost-user connection closed' && r.conn === conn);
        assert.match(String(rec?.reason), bad.reason, 'the close is logged with the reason');
      } finally {
        fds.forEach((fd) => native.close(fd));
      }
      await servedSession();
    });
  }

  test('table changes under continuous load on 2 queues: replaced memory goes when its requests are done', { timeout: 60000 }, async () => {
    const qmp = await QmpClient.connect(control);
    // Throttled requests stay in flight for a while: the queues never go idle during the test.
    await qmp.execute('blockdev-add', { driver: 'throttle', 'node-name': 'thr0', file: 'null0', limits: { 'iops-total': 200 } });
    await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'thr0' });
    const { fe, conn } = await openSession(d);
    const extraFd = native.memfdCreate('guest-ram-extra', 16 * MiB);
    const extra: MemoryRegion = { guestPhysAddr: 4 * GiB, size: 16 * MiB, userAddr: 0x7f80_0000_0000, mmapOffset: 0 };
    try {
      fe.negotiate();
      const load = new Load(fe, [fe.setupRing(0, 64), fe.setupRing(1, 64)], 16);
      const base = ramChunks(fe.ram);
      const withExtra = [...base, ...chunksOf([{ file: 'guest-ram-extra', size: extra.size }])].sort();
      /** Sends a change, waits for the requests started before it (the load goes on), then looks at the maps. */
      const change = async (what: string, send: () => bigint, want: string[]): Promise<void> => {
        load.pump();
        const before = new Set(load.pending);
        assert.ok(before.size > 0, 'requests are in flight when the table changes');
        assert.equal(send(), 0n, `${what} acked`);
        await load.finish(before);
        assert.ok(load.pending.size > 0, `${what}: the load still runs while we look`);
        assert.deepEqual(mapped(d), want, `${what}: only the current table is mapped`);
      };
      for (let round = 0; round < 4; round++) {
        await change('SET_MEM_TABLE re-sent', () => fe.ack(Request.SET_MEM_TABLE, memTablePayload(fe.ram.table), fe.ram.regions.map((r) => r.fd)), base);
        await change('ADD_MEM_REG', () => fe.ack(Request.ADD_MEM_REG, singleRegionPayload(extra), [extraFd]), withExtra);
        await change('REM_MEM_REG', () => fe.ack(Request.REM_MEM_REG, singleRegionPayload(extra)), base);
      }
      load.topUp = false;
      await load.finish(new Set(load.pending));
      assert.ok(load.completed > 100, `${load.completed} requests completed`);
    } finally {
      await closeSession(d, fe, conn);
      native.close(extraFd);
      await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'null0' });
      qmp.close();
    }
    assert.equal(await mappingsSettle(d.proc.pid!, 0), 0, 'nothing mapped after the session');
  });
});
