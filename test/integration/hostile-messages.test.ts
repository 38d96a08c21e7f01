// Malformed vhost-user messages against a real vubd: each one must close that connection with a log
// line saying why, leak no fd the frontend sent, and leave the daemon serving the next frontend.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, SplitRing, BLK, REGION_SIZE } from '../helpers/frontend.js';
import { startDaemon, sleep, type Daemon } from '../helpers/daemon.js';
import { native } from '../../src/native/index.js';
import { F, FLAG_VERSION, HEADER_SIZE, PF, Request, bit } from '../../src/protocol/constants.js';
import { inflightQueueBytes } from '../../src/virtio/inflight.js';
import {
  configPayload,
  encodeMessage,
  inflightPayload,
  memTablePayload,
  u64Payload,
  vringAddrPayload,
  vringStatePayload,
  type MemoryRegion,
} from '../../src/protocol/codec.js';
import { dispose, fdsSettle, pattern, openSession, sessionEnded } from '../helpers/sessions.js';
import { mappingsSettle, sealWrite, sharedMappingCount } from '../helpers/guest-maps.js';

const MiB = 2 ** 20;
const NUM_QUEUES = 2;

/** A fresh frontend does the whole QEMU sequence and a write + read-back on queue 0. */
async function worksEndToEnd(d: Daemon, seed: number): Promise<void> {
  const { fe, conn } = await openSession(d);
  try {
    fe.negotiate();
    const ring = fe.setupRing(0, 128);
    const data = pattern(seed, 4096);
    const sector = 64 + 8 * (seed % 100);
    const w = fe.run(ring, BLK.OUT, sector, data);
    assert.equal(fe.statusOf(w), 0, 'write status');
    const r = fe.run(ring, BLK.IN, sector, 4096, { region: 1 });
    assert.equal(fe.statusOf(r), 0, 'read status');
    assert.deepEqual(fe.dataOf(r), data);
  } finally {
    dispose(fe);
  }
  await sessionEnded(d, conn);
}

describe('hostile vhost-user messages', () => {
  let d: Daemon;
  let fdsAtStart = 0;
  let fdsAfterWarmup = 0;
  /** shared mappings (guest memory, inflight regions) of the idle daemon after the warm-up */
  let mapsAtStart = 0;
  let seed = 1;

  before(async () => {
    const dir = fs.mkdtempSync('/tmp/vubd-hostile-msg-');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 16 * MiB);
    // sync I/O: no io_uring fds, so the daemon's fd count is the same before and after sessions.
    d = await startDaemon([`--blk-file=${image}`, `--num-queues=${NUM_QUEUES}`, '--aio=sync'], { dir });
    fdsAtStart = d.fdCount();
    // Warm up both workers (each maps memory and builds its request table on first use).
    const { fe, conn } = await openSession(d);
    fe.negotiate();
    for (let q = 0; q < NUM_QUEUES; q++) {
      const ring = fe.setupRing(q, 128);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8, pattern(q, 512))), 0);
    }
    dispose(fe);
    await sessionEnded(d, conn);
    fdsAfterWarmup = await fdsSettle(d, fdsAtStart);
    mapsAtStart = await mappingsSettle(d.proc.pid!, 0, sharedMappingCount);
  });

  const mapsSettle = (): Promise<number> => mappingsSettle(d.proc.pid!, mapsAtStart, sharedMappingCount);

  after(async () => {
    const r = await d?.stop();
    assert.equal(r?.code, 0, 'daemon exits 0 on SIGTERM after all the abuse');
  });

  /**
   * Runs `hostile` on a fresh connection and checks: the backend closes it, logs why (matching
   * `reason`), closes every fd that came with it, and a new frontend then works end to end.
   */
  async function refused(
    reason: RegExp,
    hostile: (fe: Frontend) => void | Promise<void>,
    opts: { peerCloses?: boolean } = {},
  ): Promise<void> {
    const fdsBefore = d.fdCount(); // the previous session has ended: nothing is closing right now
    const { fe, conn } = await openSession(d);
    try {
      await hostile(fe);
      if (opts.peerCloses ?? true) assert.ok(fe.isClosedByPeer(3000), 'backend closed the connection');
    } finally {
      dispose(fe);
    }
    const rec = await d.waitForLog((r) => r.msg === 'vhost-user connection closed' && r.conn === conn);
    assert.equal(typeof rec.reason, 'string', 'the close log line carries a reason');
    assert.match(rec.reason as string, reason);
    await sessionEnded(d, conn);
    assert.equal(d.proc.exitCode, null, 'daemon still running');
    assert.equal(await fdsSettle(d, fdsBefore), fdsBefore, 'every fd sent with the refused connection was closed');
    assert.equal(await mapsSettle(), mapsAtStart, 'nothing the refused connection sent stays mapped');
    await worksEndToEnd(d, seed++);
  }

  const hdr = (request: number, flags: number, size: number): Uint8Array => {
    const b = new Uint8Array(HEADER_SIZE);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, request, true);
    dv.setUint32(4, flags, true);
    dv.setUint32(8, size, true);
    return b;
  };

  const efds = (n: number): number[] => Array.from({ length: n }, () => native.eventfd(true));
  const sendAndClose = (fe: Frontend, request: number, payload: Uint8Array, fds: number[]): void => {
    try {
      fe.send(request, payload, fds);
    } finally {
      fds.forEach((fd) => native.close(fd));
    }
  };

  test('header with wrong version bits', async () => {
    for (const flags of [0x0, 0x2, 0x3]) {
      await refused(/version/i, (fe) => fe.sendRaw(hdr(Request.GET_FEATURES, flags, 0)));
    }
  });

  test('payload size larger than 4096', async () => {
    await refused(/4097|size|exceed/i, (fe) => fe.sendRaw(hdr(Request.SET_MEM_TABLE, FLAG_VERSION, 4097)));
    await refused(/size|exceed/i, (fe) => fe.sendRaw(hdr(Request.GET_CONFIG, FLAG_VERSION, 0xffffffff)));
  });

  test('truncated message then close (peer closed mid-message), fds attached', async () => {
    await refused(
      /mid-message|truncat|closed/i,
      (fe) => {
        const payload = memTablePayload(fe.ram.table);
        const msg = encodeMessage(Request.SET_MEM_TABLE, FLAG_VERSION, payload);
        fe.sendRaw(msg.subarray(0, HEADER_SIZE + 20), fe.ram.regions.map((r) => r.fd));
        // dispose() closes our end right after this, mid-message
      },
      { peerCloses: false },
    );
    // truncated inside the header itself
    await refused(/mid-message|truncat|closed/i, (fe) => {
      fe.sendRaw(hdr(Request.GET_FEATURES, FLAG_VERSION, 0).subarray(0, 5));
    }, { peerCloses: false });
  });

  test('SET_MEM_TABLE with 0 regions (an fd attached anyway)', async () => {
    await refused(/0 regions|region/i, (fe) => {
      sendAndClose(fe, Request.SET_MEM_TABLE, memTablePayload([]), [native.memfdCreate('x', 4096)]);
    });
  });

  test('SET_MEM_TABLE with 9 regions (8 fds)', async () => {
    await refused(/9 regions|region/i, (fe) => {
      const b = new Uint8Array(8 + 32 * 9);
      const dv = new DataView(b.buffer);
      dv.setUint32(0, 9, true);
      for (let i = 0; i < 9; i++) {
        dv.setBigUint64(8 + 32 * i, BigInt(i * 0x1000000), true);
        dv.setBigUint64(16 + 32 * i, 0x100000n, true);
        dv.setBigUint64(24 + 32 * i, BigInt(0x7f0000000000 + i * 0x1000000), true);
      }
      sendAndClose(fe, Request.SET_MEM_TABLE, b, Array.from({ length: 8 }, () => native.memfdCreate('r', 0x100000)));
    });
  });

  test('SET_MEM_TABLE with 2 regions but 1 fd', async () => {
    await refused(/fd/i, (fe) => fe.send(Request.SET_MEM_TABLE, memTablePayload(fe.ram.table), [fe.ram.regions[0]!.fd]));
  });

  test('SET_MEM_TABLE with a region of size 0', async () => {
    await refused(/size 0|region/i, (fe) => {
      const t: MemoryRegion[] = [{ ...fe.ram.table[0]!, size: 0 }];
      fe.send(Request.SET_MEM_TABLE, memTablePayload(t), [fe.ram.regions[0]!.fd]);
    });
  });

  test('SET_MEM_TABLE that cannot be mapped, replacing a valid table', async () => {
    // mmap_offset puts the region past the end of its memfd (mapping it would SIGBUS on the first
    // access): refused, and the fds of both the refused table and the valid table it was meant to
    // replace must be closed.
    await refused(/4 GiB|mmap|offset|region|internal|map/i, (fe) => {
      fe.negotiate();
      const t: MemoryRegion[] = fe.ram.table.map((r) => ({ ...r, mmapOffset: 8 * 2 ** 30 }));
      fe.send(Request.SET_MEM_TABLE, memTablePayload(t), fe.ram.regions.map((r) => r.fd), FLAG_VERSION | 0x8);
    });
  });

  test('SET_MEM_TABLE whose second region is a sealed memfd (its shared mmap fails after the first region mapped)', async () => {
    const sealed = native.memfdCreate('guest-ram-sealed', REGION_SIZE);
    try {
      sealWrite(sealed);
      // before: every worker kept its mapping of region 0, and the maps check below failed
      await refused(/Operation not permitted/, (fe) => {
        fe.negotiate();
        fe.send(Request.SET_MEM_TABLE, memTablePayload(fe.ram.table), [fe.ram.regions[0]!.fd, sealed], FLAG_VERSION | 0x8);
      });
    } finally {
      native.close(sealed);
    }
  });

  test('SET_VRING_NUM: index >= num-queues, size 0, not a power of two, > 32768', async () => {
    const cases: [number, number, RegExp][] = [
      [NUM_QUEUES, 128, /index|range/i],
      [0xffffffff, 128, /index|range/i],
      [0, 0, /size|power/i],
      [0, 100, /size|power/i],
      [0, 65536, /size|power/i],
      [0, 0x80000000, /size|power/i],
    ];
    for (const [index, num, why] of cases) {
      await refused(why, (fe) => {
        fe.negotiate();
        fe.send(Request.SET_VRING_NUM, vringStatePayload(index, num));
      });
    }
  });

  test('SET_VRING_ADDR for an out-of-range index', async () => {
    for (const index of [NUM_QUEUES, 255, 0xffffffff]) {
      await refused(/index|range/i, (fe) => {
        fe.negotiate();
        const g = fe.ram.regions[0]!;
        fe.send(
          Request.SET_VRING_ADDR,
          vringAddrPayload({ index, flags: 0, descUserAddr: g.uva + 0x10000, usedUserAddr: g.uva + 0x20000, availUserAddr: g.uva + 0x30000, logGuestAddr: 0 }),
        );
      });
    }
  });

  test('SET_VRING_ADDR with addresses beyond 2^53', async () => {
    await refused(/range|addr/i, (fe) => {
      fe.negotiate();
      const b = vringAddrPayload({ index: 0, flags: 0, descUserAddr: 0, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 });
      new DataView(b.buffer).setBigUint64(8, 0xfffffffffffff000n, true);
      fe.send(Request.SET_VRING_ADDR, b);
    });
  });

  test('SET_VRING_KICK with 9 fds in one message', async () => {
    await refused(/fds|8/i, (fe) => {
      fe.negotiate();
      sendAndClose(fe, Request.SET_VRING_KICK, u64Payload(0), efds(9));
    });
  });

  test('SET_VRING_KICK with reserved bits set (fd attached)', async () => {
    for (const v of [0x200n, 0x8000n, 1n << 32n, 1n << 63n]) {
      await refused(/reserved/i, (fe) => {
        fe.negotiate();
        sendAndClose(fe, Request.SET_VRING_KICK, u64Payload(v), efds(1));
      });
    }
  });

  for (const request of [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]) {
    test(`${Request[request]} for an out-of-range queue index (fd attached)`, async () => {
      await refused(/index|range/i, (fe) => {
        fe.negotiate();
        sendAndClose(fe, request, u64Payload(NUM_QUEUES + 3), efds(1));
      });
    });
  }

  test('SET_VRING_KICK with the no-fd bit but an fd attached, and without the bit but no fd', async () => {
    await refused(/fd/i, (fe) => {
      fe.negotiate();
      sendAndClose(fe, Request.SET_VRING_KICK, u64Payload(0x100), efds(1));
    });
    await refused(/fd/i, (fe) => {
      fe.negotiate();
      fe.send(Request.SET_VRING_KICK, u64Payload(0));
    });
  });

  test('unknown request codes (99 with an fd, 0, 45)', async () => {
    await refused(/unsupported|unknown|99/i, (fe) => sendAndClose(fe, 99, u64Payload(0), efds(1)));
    await refused(/unsupported|unknown|NONE|0/i, (fe) => fe.send(0, new Uint8Array(0)));
    await refused(/unsupported|unknown|45/i, (fe) => fe.send(45, new Uint8Array(0)));
  });

  test('SET_FEATURES with bits not offered', async () => {
    await refused(/unoffered|offer|feature/i, (fe) => {
      const offered = fe.callU64(Request.GET_FEATURES);
      fe.send(Request.SET_FEATURES, u64Payload(offered | bit(25))); // bit 25 is not offered (26, LOG_ALL, is)
    });
    await refused(/unoffered|offer|feature/i, (fe) => {
      fe.callU64(Request.GET_PROTOCOL_FEATURES);
      fe.send(Request.SET_PROTOCOL_FEATURES, u64Payload(1n << 62n));
    });
  });

  test('SET_FEATURES acking RING_PACKED, which vubd offers only with --ring-packed', async () => {
    // The layout switch on a running ring is refused too: test/integration/packed-ring.test.ts.
    await refused(/unoffered bits 0x400000000/, (fe) => {
      fe.negotiate({ packed: false });
      fe.setupRing(0, 128);
      fe.send(Request.SET_FEATURES, u64Payload(fe.features | bit(F.RING_PACKED)));
    });
  });

  test('GET_CONFIG with size 0 and size 1000', async () => {
    await refused(/config|size/i, (fe) => fe.send(Request.GET_CONFIG, configPayload(0, 0, new Uint8Array(0))));
    await refused(/config|size/i, (fe) => fe.send(Request.GET_CONFIG, configPayload(0, 0, new Uint8Array(1000))));
    // header size disagreeing with the config size field
    await refused(/config|size|bytes/i, (fe) => {
      const p = configPayload(0, 0, new Uint8Array(60));
      new DataView(p.buffer).setUint32(4, 200, true);
      fe.send(Request.GET_CONFIG, p);
    });
  });

  test('SET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated', async () => {
    await refused(/inflight/i, (fe) => {
      fe.negotiate();
      sendAndClose(
        fe,
        Request.SET_INFLIGHT_FD,
        inflightPayload({ mmapSize: 4096, mmapOffset: 0, numQueues: NUM_QUEUES, queueSize: 128 }),
        [native.memfdCreate('inflight', 4096)],
      );
    });
  });

  test('SET_INFLIGHT_FD whose region reaches past the end of its file, then a ring start (found by protocol-fuzz)', async () => {
    // Mapping it succeeds; the worker's first touch of the missing page (inflight recovery when
    // queue 1 starts) would kill the daemon with SIGBUS.
    const perQueue = inflightQueueBytes(128);
    const variants = [
      { name: 'file shorter than mmap_size', fileSize: 4096, mmapOffset: 0 },
      { name: 'mmap_offset past the end', fileSize: 2 * perQueue, mmapOffset: 4096 },
    ];
    for (const v of variants) {
      await refused(/inflight region.*beyond the end/i, (fe) => {
        const offered = fe.callU64(Request.GET_FEATURES);
        const pf = fe.callU64(Request.GET_PROTOCOL_FEATURES);
        fe.send(Request.SET_PROTOCOL_FEATURES, u64Payload(pf & (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.INFLIGHT_SHMFD))));
        fe.features = offered & ~bit(F.RING_PACKED);
        fe.send(Request.SET_FEATURES, u64Payload(fe.features));
        assert.equal(fe.ack(Request.SET_MEM_TABLE, memTablePayload(fe.ram.table), fe.ram.regions.map((r) => r.fd)), 0n);
        const fd = native.memfdCreate('inflight', v.fileSize);
        const p = inflightPayload({ mmapSize: 2 * perQueue, mmapOffset: v.mmapOffset, numQueues: NUM_QUEUES, queueSize: 128 });
        sendAndClose(fe, Request.SET_INFLIGHT_FD, p, [fd]);
        try {
          fe.setupRing(1, 128); // before the fix: SIGBUS in queue 1's worker
        } catch {
          /* the backend closed the connection */
        }
      });
    }
  });

  test('second SET_INFLIGHT_FD on a read-only fd: refused before mapping, and the first region\'s fd is closed too', async () => {
    // A read-only file passes the size check but cannot be mapped writable (EACCES in the worker):
    // the session refuses it by its access mode. The region it was meant to replace is no longer
    // owned by anyone: it must be closed, not leaked.
    const ro = path.join(d.dir, 'inflight-ro');
    fs.writeFileSync(ro, new Uint8Array(2 * inflightQueueBytes(128)));
    await refused(/inflight region fd is not open for reading and writing/i, (fe) => {
      fe.negotiate({ inflight: 'new' });
      const fd = fs.openSync(ro, 'r');
      const p = inflightPayload({ mmapSize: 2 * inflightQueueBytes(128), mmapOffset: 0, numQueues: NUM_QUEUES, queueSize: 128 });
      try {
        sendAndClose(fe, Request.SET_INFLIGHT_FD, p, [fd]);
      } finally {
        native.close(fe.inflight!.fd);
      }
    });
  });

  test('frontend that never reads its replies (socket buffer full): connection closed, SIGTERM still works', async () => {
    // Before: the reply send spun in the main thread until the peer read, so nothing else ran
    // (not even the SIGTERM handler) for as long as the frontend kept the connection open.
    await refused(/not reading|replies|buffer/i, async (fe) => {
      native.setBlocking(fe.fd, false);
      const msg = encodeMessage(Request.GET_CONFIG, FLAG_VERSION, configPayload(0, 0, new Uint8Array(256)));
      const deadline = Date.now() + 3000;
      let stalled = 0;
      while (Date.now() < deadline && stalled < 150) {
        let n: number;
        try {
          n = native.sendMsg(fe.fd, msg, 0, msg.byteLength, []);
        } catch {
          break; // EPIPE: the backend closed it
        }
        if (n < 0) {
          stalled++;
          await sleep(10);
        } else stalled = 0;
      }
    });
  });

  test('ring addresses outside guest memory, then kick: ring not served, daemon alive', async () => {
    // desc table in the unmapped gap after region 0; used ring running off the end of the last region.
    const variants: { name: string; place: (fe: Frontend, ring: SplitRing) => { desc: number; avail: number; used: number } }[] = [
      {
        name: 'desc in a hole',
        place: (fe, ring) => ({ desc: fe.ram.regions[0]!.uva + REGION_SIZE + 0x1000, avail: fe.ram.uva(ring.avail), used: fe.ram.uva(ring.used) }),
      },
      {
        name: 'used ring past the end of the last region',
        place: (fe, ring) => {
          const last = fe.ram.regions[fe.ram.regions.length - 1]!;
          return { desc: fe.ram.uva(ring.desc), avail: fe.ram.uva(ring.avail), used: last.uva + REGION_SIZE - 64 };
        },
      },
      {
        name: 'avail ring below all regions',
        place: (fe, ring) => ({ desc: fe.ram.uva(ring.desc), avail: 0x1000, used: fe.ram.uva(ring.used) }),
      },
    ];
    for (const v of variants) {
      const fdsBefore = d.fdCount();
      const brokenBefore = d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('queue marked broken')).length;
      const { fe, conn } = await openSession(d);
      try {
        fe.negotiate();
        const ring = new SplitRing(fe.ram, 0, 128, true);
        const a = v.place(fe, ring);
        fe.send(Request.SET_VRING_NUM, vringStatePayload(0, 128));
        fe.send(Request.SET_VRING_BASE, vringStatePayload(0, 0));
        fe.send(Request.SET_VRING_ADDR, vringAddrPayload({ index: 0, flags: 0, descUserAddr: a.desc, usedUserAddr: a.used, availUserAddr: a.avail, logGuestAddr: 0 }));
        fe.send(Request.SET_VRING_KICK, u64Payload(0), [ring.kickFd]);
        fe.send(Request.SET_VRING_CALL, u64Payload(0), [ring.callFd]);
        let stillOpen = true;
        try {
          fe.ack(Request.SET_VRING_ENABLE, vringStatePayload(0, 1));
        } catch {
          stillOpen = false; // closing the connection is an acceptable answer too
        }
        fe.rings[0] = ring;
        const req = fe.blk(ring, BLK.OUT, 0, pattern(7, 512));
        ring.kick();
        await sleep(300);
        assert.equal(ring.usedIdx(), 0, `${v.name}: nothing was completed`);
        assert.equal(fe.statusOf(req), 0xff, `${v.name}: status byte untouched`);
        assert.equal(d.proc.exitCode, null, `${v.name}: daemon alive`);
        if (stillOpen) {
          const broken = d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('queue marked broken'));
          assert.ok(broken.length > brokenBefore, `${v.name}: the refusal is logged`);
          // the channel keeps answering and GET_VRING_BASE does not hang on a ring that never ran
          assert.ok(fe.callU64(Request.GET_FEATURES) > 0n);
          fe.getVringBase(0);
        }
      } finally {
        dispose(fe);
      }
      await sessionEnded(d, conn);
      assert.ok(!d.logRecords().some((r) => r.msg === 'queue worker crashed' || r.msg === 'queue worker exited'), 'no worker died');
      assert.equal(await fdsSettle(d, fdsBefore), fdsBefore, `${v.name}: fds released`);
      assert.equal(await mapsSettle(), mapsAtStart, `${v.name}: guest memory unmapped`);
      await worksEndToEnd(d, seed++); // queue 0 serves again after being refused
    }
  });

  test('the frontend truncates its guest memory under a running ring: queue broken, daemon alive (SIGBUS caught)', async () => {
    const fdsBefore = d.fdCount();
    const { fe, conn } = await openSession(d);
    try {
      fe.negotiate();
      const ring = fe.setupRing(0, 128);
      assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8, pattern(3, 512))), 0, 'served before the truncation');
      fe.blk(ring, BLK.OUT, 16, pattern(4, 4096)); // on the ring, not kicked yet
      for (const r of fe.ram.regions) fs.ftruncateSync(r.fd, 0);
      ring.kick(); // before the fix: the worker's next ring read killed the daemon with SIGBUS
      await d.waitForLog((r) => typeof r.msg === 'string' && r.msg.includes('guest memory shrank under vubd'));
      assert.equal(d.proc.exitCode, null, 'daemon alive');
      assert.equal(d.proc.signalCode, null, 'daemon not killed by a signal');
      assert.ok(fe.callU64(Request.GET_FEATURES) > 0n, 'the vhost-user channel still answers');
    } finally {
      dispose(fe);
    }
    await sessionEnded(d, conn);
    assert.equal(await fdsSettle(d, fdsBefore), fdsBefore, 'fds released');
    assert.equal(await mapsSettle(), mapsAtStart, 'the truncated memory is unmapped');
    await worksEndToEnd(d, seed++);
  });

  test('after all of that: same fd count as at start, no worker died', async () => {
    const n = await fdsSettle(d, fdsAtStart);
    assert.equal(fdsAfterWarmup, fdsAtStart, 'a served session leaves no fd behind');
    assert.equal(n, fdsAtStart, `fd count ${n} vs ${fdsAtStart} right after start`);
    assert.equal(mapsAtStart, 0, 'a served session leaves no mapping behind');
    assert.equal(await mapsSettle(), mapsAtStart);
    assert.ok(!d.logRecords().some((r) => r.msg === 'queue worker crashed' || r.msg === 'queue worker exited'));
    await worksEndToEnd(d, seed++);
  });
});
