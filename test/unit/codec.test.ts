// vhost-user codec: frontend encoders round-trip through decodeHeader/decodePayload, and every
// malformed message (size, fd count, region count, ranges, reserved bits, unknown code) is a
// ProtocolError, never another exception.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  FLAG_NEED_REPLY,
  FLAG_VERSION,
  HEADER_SIZE,
  MAX_MEM_REGIONS,
  MAX_PAYLOAD,
  REPLY_FLAGS,
  Request,
} from '../../src/protocol/constants.js';
import {
  ProtocolError,
  configPayload,
  decodeHeader,
  decodePayload,
  encodeMessage,
  encodeReply,
  inflightPayload,
  memTablePayload,
  singleRegionPayload,
  u64Payload,
  vringAddrPayload,
  vringStatePayload,
  type Header,
  logPayload,
  type MemoryRegion,
  type Message,
} from '../../src/protocol/codec.js';

/** Encodes a frontend message and decodes it the way the connection + session do. */
function roundTrip(request: number, payload: Uint8Array, fds: readonly number[] = [], flags = FLAG_VERSION): { h: Header; m: Message } {
  const wire = encodeMessage(request, flags, payload);
  const h = decodeHeader(wire.subarray(0, HEADER_SIZE));
  assert.equal(h.size, payload.byteLength);
  const m = decodePayload(h, wire.subarray(HEADER_SIZE), fds);
  return { h, m };
}

function header(request: number, size: number, flags = FLAG_VERSION): Header {
  return { request, flags, size };
}

function rejects(request: number, payload: Uint8Array, fds: readonly number[], msg?: RegExp): void {
  assert.throws(
    () => decodePayload(header(request, payload.byteLength), payload, fds),
    (e: unknown) => {
      assert.ok(e instanceof ProtocolError, `expected ProtocolError, got ${String(e)}`);
      if (msg) assert.match(e.message, msg);
      return true;
    },
  );
}

function headerBytes(request: number, flags: number, size: number): Uint8Array {
  const b = new Uint8Array(HEADER_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, size, true);
  return b;
}

const R1: MemoryRegion = { guestPhysAddr: 0, size: 0x8000_0000, userAddr: 0x7f12_3456_0000, mmapOffset: 0 };
const R2: MemoryRegion = { guestPhysAddr: 0x1_0000_0000, size: 0x4000_0000, userAddr: 0x7f99_0000_0000, mmapOffset: 0x8000_0000 };

describe('decodeHeader', () => {
  test('accepts version 1 with or without NEED_REPLY and reads the three fields', () => {
    const h = decodeHeader(headerBytes(Request.SET_FEATURES, FLAG_VERSION | FLAG_NEED_REPLY, 8));
    assert.deepEqual(h, { request: Request.SET_FEATURES, flags: 0x9, size: 8 });
  });

  test('reads from a subarray with a non-zero byteOffset', () => {
    const big = new Uint8Array(20);
    big.set(headerBytes(Request.GET_CONFIG, 1, 80), 5);
    assert.deepEqual(decodeHeader(big.subarray(5)), { request: Request.GET_CONFIG, flags: 1, size: 80 });
  });

  for (const flags of [0x0, 0x2, 0x3, 0x4, 0x8, 0xffff_fffe]) {
    test(`rejects version bits in flags 0x${flags.toString(16)}`, () => {
      assert.throws(() => decodeHeader(headerBytes(Request.GET_FEATURES, flags, 0)), ProtocolError);
    });
  }

  test('accepts MAX_PAYLOAD, rejects MAX_PAYLOAD + 1 and 0xffffffff', () => {
    assert.equal(decodeHeader(headerBytes(Request.GET_FEATURES, 1, MAX_PAYLOAD)).size, MAX_PAYLOAD);
    assert.throws(() => decodeHeader(headerBytes(Request.GET_FEATURES, 1, MAX_PAYLOAD + 1)), ProtocolError);
    assert.throws(() => decodeHeader(headerBytes(Request.GET_FEATURES, 1, 0xffff_ffff)), ProtocolError);
  });
});

describe('round trips of the frontend encoders', () => {
  test('memTablePayload (full 8-slot array) -> SET_MEM_TABLE', () => {
    const p = memTablePayload([R1, R2]);
    assert.equal(p.byteLength, 8 + 32 * MAX_MEM_REGIONS);
    const { m } = roundTrip(Request.SET_MEM_TABLE, p, [10, 11]);
    assert.deepEqual(m, { request: Request.SET_MEM_TABLE, regions: [R1, R2] });
  });

  test('SET_MEM_TABLE with a payload of exactly 8 + 32n bytes', () => {
    const p = memTablePayload([R1, R2]).subarray(0, 8 + 64);
    const { m } = roundTrip(Request.SET_MEM_TABLE, p.slice(), [3, 4]);
    assert.deepEqual(m, { request: Request.SET_MEM_TABLE, regions: [R1, R2] });
  });

  test('SET_MEM_TABLE with 8 regions and addresses up to 2^53', () => {
    const regions: MemoryRegion[] = [];
    for (let i = 0; i < 8; i++) regions.push({ guestPhysAddr: i * 2 ** 40, size: 2 ** 30 + i, userAddr: 2 ** 52 + i * 2 ** 40, mmapOffset: i * 4096 });
    regions[7] = { guestPhysAddr: 2 ** 53 - 4096, size: 4096, userAddr: 2 ** 53 - 8192, mmapOffset: 2 ** 32 - 4096 };
    const { m } = roundTrip(Request.SET_MEM_TABLE, memTablePayload(regions), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(m, { request: Request.SET_MEM_TABLE, regions });
  });

  test('accepts regions over 4 GiB; rejects an mmap_offset that is not page aligned', () => {
    const big = [{ guestPhysAddr: 0, size: 2 ** 33, userAddr: 0x10000, mmapOffset: 4096 }];
    assert.deepEqual(roundTrip(Request.SET_MEM_TABLE, memTablePayload(big), [3]).m, { request: Request.SET_MEM_TABLE, regions: big });
    const odd = [{ guestPhysAddr: 0, size: 4096, userAddr: 0x10000, mmapOffset: 100 }];
    assert.throws(() => roundTrip(Request.SET_MEM_TABLE, memTablePayload(odd), [3]), /not page aligned/);
  });

  test('singleRegionPayload -> ADD_MEM_REG (1 fd) and REM_MEM_REG (0 or 1 fd)', () => {
    const p = singleRegionPayload(R2);
    assert.equal(p.byteLength, 40);
    assert.deepEqual(roundTrip(Request.ADD_MEM_REG, p, [7]).m, { request: Request.ADD_MEM_REG, region: R2 });
    assert.deepEqual(roundTrip(Request.REM_MEM_REG, p, []).m, { request: Request.REM_MEM_REG, region: R2 });
    assert.deepEqual(roundTrip(Request.REM_MEM_REG, p, [7]).m, { request: Request.REM_MEM_REG, region: R2 });
  });

  test('vringAddrPayload -> SET_VRING_ADDR', () => {
    const addr = {
      index: 3,
      flags: 1,
      descUserAddr: 0x7f00_0000_1000,
      usedUserAddr: 0x7f00_0000_3000,
      availUserAddr: 0x7f00_0000_2000,
      logGuestAddr: 2 ** 53 - 1,
    };
    const { m } = roundTrip(Request.SET_VRING_ADDR, vringAddrPayload(addr));
    assert.deepEqual(m, { request: Request.SET_VRING_ADDR, addr });
  });

  for (const req of [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE, Request.VRING_KICK]) {
    test(`vringStatePayload -> ${Request[req]}`, () => {
      const { m } = roundTrip(req, vringStatePayload(5, 0xffff_fffe));
      assert.deepEqual(m, { request: req, index: 5, num: 0xffff_fffe });
    });
  }

  for (const req of [Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_STATUS]) {
    test(`u64Payload -> ${Request[req]} keeps all 64 bits`, () => {
      const v = (1n << 63n) | (1n << 32n) | (1n << 30n) | 0x1234n;
      assert.deepEqual(roundTrip(req, u64Payload(v)).m, { request: req, value: v });
      assert.deepEqual(roundTrip(req, u64Payload(0xabcd)).m, { request: req, value: 0xabcdn });
    });
  }

  for (const req of [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.SET_OWNER, Request.RESET_OWNER, Request.RESET_DEVICE, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS]) {
    test(`${Request[req]} with a 0- or 8-byte payload`, () => {
      assert.deepEqual(roundTrip(req, new Uint8Array(0)).m, { request: req });
      assert.deepEqual(roundTrip(req, u64Payload(0)).m, { request: req });
    });
  }

  test('configPayload -> GET_CONFIG and SET_CONFIG', () => {
    const data = new Uint8Array(72).map((_, i) => i * 3 + 1);
    for (const req of [Request.GET_CONFIG, Request.SET_CONFIG]) {
      const { m } = roundTrip(req, configPayload(0, 0, data));
      assert.equal(m.request, req);
      if (m.request !== Request.GET_CONFIG && m.request !== Request.SET_CONFIG) throw new Error('unreachable');
      assert.equal(m.config.offset, 0);
      assert.equal(m.config.size, 72);
      assert.equal(m.config.flags, 0);
      assert.deepEqual([...m.config.data], [...data]);
    }
    // the last byte of config space, and the whole 256 bytes
    const one = roundTrip(Request.SET_CONFIG, configPayload(255, 1, new Uint8Array([0x5a]))).m;
    assert.deepEqual(one.request === Request.SET_CONFIG && { ...one.config, data: [...one.config.data] }, { offset: 255, size: 1, flags: 1, data: [0x5a] });
    const all = roundTrip(Request.GET_CONFIG, configPayload(0, 0, new Uint8Array(256))).m;
    assert.equal(all.request === Request.GET_CONFIG && all.config.size, 256);
  });

  test('logPayload -> SET_LOG_BASE (1 fd); SET_LOG_FD (1 fd, no payload)', () => {
    const log = { mmapSize: 4096 * 3, mmapOffset: 8192 };
    assert.deepEqual(roundTrip(Request.SET_LOG_BASE, logPayload(log), [9]).m, { request: Request.SET_LOG_BASE, log });
    assert.deepEqual(roundTrip(Request.SET_LOG_FD, new Uint8Array(0), [9]).m, { request: Request.SET_LOG_FD });
  });

  test('inflightPayload -> GET_INFLIGHT_FD (no fd) and SET_INFLIGHT_FD (1 fd)', () => {
    const inflight = { mmapSize: 0x1_2345_6000, mmapOffset: 0x1000, numQueues: 4, queueSize: 256 };
    assert.deepEqual(roundTrip(Request.GET_INFLIGHT_FD, inflightPayload(inflight)).m, { request: Request.GET_INFLIGHT_FD, inflight });
    assert.deepEqual(roundTrip(Request.SET_INFLIGHT_FD, inflightPayload(inflight), [9]).m, { request: Request.SET_INFLIGHT_FD, inflight });
  });

  test('SET_VRING_KICK/CALL/ERR: index with an fd, or the no-fd bit without one', () => {
    for (const req of [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]) {
      assert.deepEqual(roundTrip(req, u64Payload(0x07), [12]).m, { request: req, index: 7, noFd: false });
      assert.deepEqual(roundTrip(req, u64Payload(0x1ff), []).m, { request: req, index: 0xff, noFd: true });
    }
  });

  test('SET_BACKEND_REQ_FD with its fd', () => {
    assert.deepEqual(roundTrip(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), [5]).m, { request: Request.SET_BACKEND_REQ_FD });
  });
});

describe('rejects', () => {
  test('each request with a wrong payload size', () => {
    const cases: [Request, number, number[]][] = [
      [Request.GET_FEATURES, 4, []],
      [Request.GET_FEATURES, 16, []],
      [Request.GET_QUEUE_NUM, 1, []],
      [Request.SET_OWNER, 9, []],
      [Request.RESET_DEVICE, 7, []],
      [Request.SET_FEATURES, 0, []],
      [Request.SET_FEATURES, 7, []],
      [Request.SET_FEATURES, 9, []],
      [Request.SET_PROTOCOL_FEATURES, 16, []],
      [Request.SET_STATUS, 4, []],
      [Request.SET_VRING_NUM, 4, []],
      [Request.SET_VRING_BASE, 12, []],
      [Request.GET_VRING_BASE, 0, []],
      [Request.SET_VRING_ENABLE, 9, []],
      [Request.VRING_KICK, 7, []],
      [Request.SET_VRING_ADDR, 39, []],
      [Request.SET_VRING_ADDR, 41, []],
      [Request.SET_VRING_KICK, 4, [3]],
      [Request.SET_VRING_CALL, 16, [3]],
      [Request.SET_VRING_ERR, 0, [3]],
      [Request.ADD_MEM_REG, 32, [3]],
      [Request.REM_MEM_REG, 48, []],
      [Request.SET_BACKEND_REQ_FD, 8, [3]],
      [Request.GET_INFLIGHT_FD, 16, []],
      [Request.SET_INFLIGHT_FD, 25, [3]],
      [Request.SET_MEM_TABLE, 4, []],
      [Request.GET_CONFIG, 8, []],
    ];
    for (const [req, size, fds] of cases) {
      rejects(req, new Uint8Array(size), fds, /payload is \d+ bytes, expected \d+/);
    }
  });

  test('SET_MEM_TABLE whose payload does not match its region count', () => {
    const full = memTablePayload([R1, R2]);
    // 2 regions in 8 + 32 * 3 bytes: neither the full array nor exactly n regions
    rejects(Request.SET_MEM_TABLE, full.slice(0, 8 + 96), [1, 2], /expected 72/);
    // 2 regions claimed, only one present
    rejects(Request.SET_MEM_TABLE, full.slice(0, 8 + 32), [1, 2], /expected 72/);
    rejects(Request.SET_MEM_TABLE, full.slice(0, 8 + 65), [1, 2], /expected 72/);
  });

  test('GET_CONFIG / SET_CONFIG whose payload size disagrees with its size field', () => {
    const p = configPayload(0, 0, new Uint8Array(16));
    rejects(Request.GET_CONFIG, p.slice(0, 12 + 15), [], /expected 28/);
    const longer = new Uint8Array(12 + 17);
    longer.set(p);
    rejects(Request.SET_CONFIG, longer, [], /expected 28/);
  });

  test('wrong fd counts', () => {
    const mt = memTablePayload([R1, R2]);
    rejects(Request.SET_MEM_TABLE, mt, [1], /got 1 fds, expected 2/);
    rejects(Request.SET_MEM_TABLE, mt, [1, 2, 3], /got 3 fds, expected 2/);
    rejects(Request.SET_VRING_KICK, u64Payload(0x100), [4], /got 1 fds, expected 0/);
    rejects(Request.SET_VRING_CALL, u64Payload(0x001), [], /got 0 fds, expected 1/);
    rejects(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), [], /got 0 fds, expected 1/);
    rejects(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), [1, 2], /got 2 fds, expected 1/);
    rejects(Request.ADD_MEM_REG, singleRegionPayload(R1), [], /expected 1/);
    rejects(Request.REM_MEM_REG, singleRegionPayload(R1), [1, 2], /got 2 fds/);
    rejects(Request.SET_INFLIGHT_FD, inflightPayload({ mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 128 }), [], /expected 1/);
    rejects(Request.GET_INFLIGHT_FD, inflightPayload({ mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 128 }), [3], /expected 0/);
    rejects(Request.GET_FEATURES, new Uint8Array(0), [3], /expected 0/);
    rejects(Request.SET_FEATURES, u64Payload(1), [3], /expected 0/);
    rejects(Request.SET_VRING_NUM, vringStatePayload(0, 128), [3], /expected 0/);
    rejects(Request.SET_VRING_ADDR, vringAddrPayload({ index: 0, flags: 0, descUserAddr: 0, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 }), [3], /expected 0/);
    rejects(Request.GET_CONFIG, configPayload(0, 0, new Uint8Array(8)), [3], /expected 0/);
  });

  test('SET_MEM_TABLE with 0 or 9 regions', () => {
    const p = new Uint8Array(8 + 32 * MAX_MEM_REGIONS);
    const dv = new DataView(p.buffer);
    for (const n of [0, 9, 0xffff_ffff]) {
      dv.setUint32(0, n, true);
      rejects(Request.SET_MEM_TABLE, p, [], /regions/);
    }
  });

  test('memory regions of size 0 or wrapping past 2^53', () => {
    rejects(Request.SET_MEM_TABLE, memTablePayload([R1, { ...R2, size: 0 }]), [1, 2], /size 0/);
    rejects(Request.ADD_MEM_REG, singleRegionPayload({ ...R1, size: 0 }), [1], /size 0/);
    rejects(Request.SET_MEM_TABLE, memTablePayload([{ guestPhysAddr: 2 ** 53 - 4096, size: 8192, userAddr: 0, mmapOffset: 0 }]), [1], /wraps/);
    rejects(Request.ADD_MEM_REG, singleRegionPayload({ guestPhysAddr: 0, size: 8192, userAddr: 2 ** 53 - 4096, mmapOffset: 0 }), [1], /wraps/);
  });

  test('u64 fields at or beyond 2^53', () => {
    const big = 2n ** 53n;
    const fields = [0, 8, 16, 24];
    for (const f of fields) {
      const p = memTablePayload([R1]);
      new DataView(p.buffer).setBigUint64(8 + f, big, true);
      rejects(Request.SET_MEM_TABLE, p, [1], /out of range/);
      const q = singleRegionPayload(R1);
      new DataView(q.buffer).setBigUint64(8 + f, 0xffff_ffff_ffff_ffffn, true);
      rejects(Request.REM_MEM_REG, q, [], /out of range/);
    }
    for (const f of [8, 16, 24, 32]) {
      const p = vringAddrPayload({ index: 0, flags: 0, descUserAddr: 0x1000, usedUserAddr: 0x2000, availUserAddr: 0x3000, logGuestAddr: 0 });
      new DataView(p.buffer).setBigUint64(f, big, true);
      rejects(Request.SET_VRING_ADDR, p, [], /out of range/);
    }
    const inf = inflightPayload({ mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 128 });
    new DataView(inf.buffer).setBigUint64(0, big, true);
    rejects(Request.GET_INFLIGHT_FD, inf, [], /out of range/);
    // the largest value below 2^53 is fine
    const ok = vringAddrPayload({ index: 0, flags: 0, descUserAddr: 2 ** 53 - 1, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 });
    const m = decodePayload(header(Request.SET_VRING_ADDR, 40), ok, []);
    assert.equal(m.request === Request.SET_VRING_ADDR && m.addr.descUserAddr, 2 ** 53 - 1);
  });

  test('GET_CONFIG / SET_CONFIG with an invalid range', () => {
    const bad = (offset: number, size: number, payloadData = size): Uint8Array => {
      const p = new Uint8Array(12 + payloadData);
      const dv = new DataView(p.buffer);
      dv.setUint32(0, offset, true);
      dv.setUint32(4, size, true);
      return p;
    };
    for (const req of [Request.GET_CONFIG, Request.SET_CONFIG]) {
      rejects(req, bad(0, 0), [], /config range/);
      rejects(req, bad(0, 257), [], /config range/);
      rejects(req, bad(200, 57), [], /config range/);
      rejects(req, bad(256, 1), [], /config range/);
      rejects(req, bad(0xffff_ffff, 2, 2), [], /config range/);
      rejects(req, bad(1, 0xffff_ffff, 8), [], /config range/);
      rejects(req, new Uint8Array(11), [], /expected 12/);
    }
    // the boundary offset + size == 256 is accepted
    const m = decodePayload(header(Request.GET_CONFIG, 12 + 56), bad(200, 56), []);
    assert.equal(m.request === Request.GET_CONFIG && m.config.offset, 200);
  });

  test('reserved bits in SET_VRING_KICK / CALL / ERR', () => {
    for (const req of [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]) {
      rejects(req, u64Payload(0x200), [3], /reserved bits/);
      rejects(req, u64Payload(0x8000_0000), [3], /reserved bits/);
      rejects(req, u64Payload(0x1_0000_0000n), [3], /reserved bits/);
      rejects(req, u64Payload(0x300), [], /reserved bits/);
    }
  });

  test('SET_LOG_BASE: exactly 16 bytes and one fd; SET_LOG_FD: no payload (or 8 zero bytes) and one fd', () => {
    rejects(Request.SET_LOG_BASE, new Uint8Array(8), [3], /payload is 8 bytes, expected 16/);
    rejects(Request.SET_LOG_BASE, new Uint8Array(16), [], /got 0 fds, expected 1/);
    rejects(Request.SET_LOG_BASE, new Uint8Array(16), [3, 4], /got 2 fds, expected 1/);
    rejects(Request.SET_LOG_FD, new Uint8Array(12), [3], /payload is 12 bytes/);
    rejects(Request.SET_LOG_FD, new Uint8Array(0), [], /got 0 fds/);
  });

  for (const code of [0, 19, 20, 22, 23, 26, 33, 41, 99, 2 ** 31, 0xffff_ffff]) {
    test(`unknown or unsupported request code ${code}`, () => {
      rejects(code, new Uint8Array(0), [], /unsupported request/);
      rejects(code, new Uint8Array(8), [], /unsupported request/);
    });
  }
});

describe('properties', () => {
  const codes = Object.values(Request).filter((v): v is number => typeof v === 'number');
  const legalSizes = [0, 8, 12, 24, 28, 40, 72, 8 + 32 * MAX_MEM_REGIONS, 12 + 72, 12 + 256];

  test('decodePayload returns a message or throws ProtocolError, nothing else', () => {
    const arbHeader = fc.record({
      request: fc.oneof(fc.constantFrom(...codes), fc.integer({ min: 0, max: 64 }), fc.nat({ max: 0xffff_ffff })),
      flags: fc.nat({ max: 0xffff_ffff }).map((f) => ((f & ~0x3) | 0x1) >>> 0),
      size: fc.oneof(fc.constantFrom(...legalSizes), fc.integer({ min: 0, max: 600 })),
    });
    const arb = arbHeader.chain((h) =>
      fc.record({
        h: fc.constant(h),
        payload: fc.uint8Array({ minLength: h.size, maxLength: h.size }),
        // make the count/offset/size words small often, so decoding goes deep
        small: fc.option(fc.tuple(fc.integer({ min: 0, max: 10 }), fc.integer({ min: 0, max: 300 })), { nil: undefined }),
        fds: fc.array(fc.integer({ min: 0, max: 1000 }), { minLength: 0, maxLength: 8 }),
      }),
    );
    fc.assert(
      fc.property(arb, ({ h, payload, small, fds }) => {
        if (small && payload.byteLength >= 8) {
          const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
          dv.setUint32(0, small[0], true);
          dv.setUint32(4, small[1], true);
        }
        // the header passes decodeHeader (version 1, size <= MAX_PAYLOAD)
        const wire = headerBytes(h.request, h.flags, h.size);
        const hh = decodeHeader(wire);
        try {
          const m = decodePayload(hh, payload, fds);
          assert.equal(m.request, h.request);
        } catch (e) {
          if (!(e instanceof ProtocolError)) throw e;
        }
      }),
      { numRuns: 3000 },
    );
  });

  test('encodeReply: flags exactly 0x5, the request code, the size and the payload', () => {
    assert.equal(REPLY_FLAGS, 0x5);
    fc.assert(
      fc.property(fc.nat({ max: 0xffff_ffff }), fc.uint8Array({ maxLength: 300 }), (request, payload) => {
        const out = encodeReply(request, payload);
        assert.equal(out.byteLength, HEADER_SIZE + payload.byteLength);
        const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
        assert.equal(dv.getUint32(0, true), request);
        assert.equal(dv.getUint32(4, true), 0x5);
        assert.equal(dv.getUint32(8, true), payload.byteLength);
        assert.deepEqual([...out.subarray(HEADER_SIZE)], [...payload]);
        // and a reply is a valid version-1 header
        assert.deepEqual(decodeHeader(out), { request, flags: 0x5, size: payload.byteLength });
      }),
    );
  });
});
