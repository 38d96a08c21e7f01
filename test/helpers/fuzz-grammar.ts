// A grammar of vhost-user frontend behaviour for property-based fuzzing: sequences mix valid
// messages (and whole valid set-up steps) with mutated ones. Ops are plain data so fast-check can
// print and shrink them; `encodeOp` turns one into wire bytes plus the fds to attach, against the
// guest RAM and rings of the run.
import fc from 'fast-check';
import { FLAG_NEED_REPLY, FLAG_VERSION, HEADER_SIZE, MAX_MEM_REGIONS, PF, Request, bit } from '../../src/protocol/constants.js';
import { configPayload, encodeMessage, inflightPayload, vringStatePayload } from '../../src/protocol/codec.js';
import { blkFeatures, blkProtocolFeatures } from '../../src/blk/config.js';

export const OFFERED = blkFeatures(false);
export const OFFERED_PROTOCOL = blkProtocolFeatures();

/** What a fuzz op may attach. ram0/ram1 are the run's guest RAM regions (valid mem-table fds). */
export type FdKind = 'eventfd' | 'memfd0' | 'memfd4k' | 'memfd1m' | 'ram0' | 'ram1' | 'socket' | 'dir' | 'rofile';
/** fds the valid steps attach: the run's ring eventfds (kept open by the test) and inflight regions */
export type StepFd = FdKind | 'kick0' | 'kick1' | 'call0' | 'call1' | 'inflight-exact' | 'inflight-short';

/** An address: inside a RAM region / a ring of the run, or absolute. */
export type Addr = { in: 'ram0' | 'ram1' | 'desc' | 'avail' | 'used'; off: number } | { abs: bigint };

export interface RegionSpec {
  /** ram0/ram1: based on that region, with deltas; raw: absolute fields */
  base: 'ram0' | 'ram1' | 'raw';
  gpa: bigint;
  size: bigint;
  uva: bigint;
  mmapOffset: bigint;
}

export type Body =
  | { t: 'raw'; bytes: number[] }
  | { t: 'u64'; v: bigint }
  | { t: 'state'; index: number; num: number }
  | { t: 'addr'; index: number; flags: number; desc: Addr; used: Addr; avail: Addr; log: Addr }
  | { t: 'mem'; count: number; slots: 'full' | 'exact'; regions: RegionSpec[] }
  | { t: 'region'; r: RegionSpec }
  | { t: 'config'; offset: number; size: number; flags: number; dataLen: number; value?: number }
  | { t: 'inflight'; mmapSize: bigint; mmapOffset: bigint; numQueues: number; queueSize: number };

export interface Mutation {
  flags?: number;
  code?: number;
  /** [position, byte] overwrites inside the payload */
  noise?: [number, number][];
  /** payload cut to this length (header agrees: a decoder size check) */
  cutTo?: number;
  /** bytes appended to the payload (header agrees) */
  extend?: number[];
  /** the header's size field disagrees with the bytes sent: framing is lost */
  sizeLie?: number;
  /** sent in two sendmsg calls split at this byte, the fds with the second part */
  splitAt?: number;
}

export type Op =
  | { op: 'msg'; request: number; needReply: boolean; body: Body; fds: FdKind[]; mut: Mutation | null }
  /** QEMU's start-up up to the rings (GET/SET features, protocol features, owner, backend fd, mem table) */
  | { op: 'negotiate'; inflight: 'none' | 'exact' | 'short'; packed: boolean; memTable: boolean }
  /** QEMU's ring start: NUM(128), BASE, ADDR, KICK, CALL, ENABLE(1) with the run's ring and eventfds */
  | { op: 'startRing'; q: number; needReply: boolean }
  /** a virtio-blk write on a ring started by startRing, then a kick */
  | { op: 'io'; q: number; sector: number }
  /** the bytes of a valid message cut short, then the connection closes (always last) */
  | { op: 'truncated'; request: number; body: Body; cut: number; fds: FdKind[] };

// ---- arbitraries ----

const inflightBytes128 = Math.ceil((16 + 16 * 128) / 64) * 64;

const u32Edge = fc.oneof(
  fc.constantFrom(0, 1, 2, 3, 7, 0xff, 0x100, 0x1ff, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff),
  fc.integer({ min: 0, max: 0xffffffff }),
);
const vringIndex = fc.oneof({ arbitrary: fc.constantFrom(0, 1), weight: 4 }, { arbitrary: fc.constantFrom(2, 3, 255, 256, 0xffff, 0xffffffff), weight: 1 }, { arbitrary: u32Edge, weight: 1 });
const vringNum = fc.oneof(
  { arbitrary: fc.constantFrom(128, 256, 64), weight: 3 },
  { arbitrary: fc.constantFrom(0, 1, 2, 3, 100, 1023, 1024, 1025, 2048, 32768, 32769, 65535, 65536, 0x80008000, 0xffffffff), weight: 2 },
  { arbitrary: u32Edge, weight: 1 },
);
const u64Edge = fc.oneof(
  fc.constantFrom(0n, 1n, 0x1000n, 0xfffn, 2n ** 32n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, 0x7f0000000000n),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);
const fdKind: fc.Arbitrary<FdKind> = fc.constantFrom('eventfd', 'memfd0', 'memfd4k', 'memfd1m', 'ram0', 'ram1', 'socket', 'dir', 'rofile');
const someFds = (max: number): fc.Arbitrary<FdKind[]> => fc.array(fdKind, { maxLength: max });

const addr: fc.Arbitrary<Addr> = fc.oneof(
  { arbitrary: fc.record({ in: fc.constantFrom('desc', 'avail', 'used') as fc.Arbitrary<'desc' | 'avail' | 'used'>, off: fc.constantFrom(0, 0, 0, 1, 2, 8, -16) }), weight: 3 },
  { arbitrary: fc.record({ in: fc.constantFrom('ram0', 'ram1') as fc.Arbitrary<'ram0' | 'ram1'>, off: fc.constantFrom(0, 4096, 2 ** 20 - 64, 2 ** 20, 2 ** 20 - 4096, -4096) }), weight: 2 },
  { arbitrary: u64Edge.map((abs) => ({ abs })), weight: 1 },
);

const regionSpec: fc.Arbitrary<RegionSpec> = fc.oneof(
  {
    arbitrary: fc.record({
      base: fc.constantFrom('ram0', 'ram1') as fc.Arbitrary<'ram0' | 'ram1'>,
      gpa: fc.constantFrom(0n, 0n, 0n, 0x1000n, -0x1000n),
      size: fc.constantFrom(0n, 0n, 0n, 4096n, -4096n, 1n, -(2n ** 20n), 2n ** 20n),
      uva: fc.constantFrom(0n, 0n, 0n, 0x1000n, 2n ** 20n),
      mmapOffset: fc.constantFrom(0n, 0n, 0n, 4096n, 1n, 2n ** 20n, 2n ** 33n),
    }),
    weight: 4,
  },
  { arbitrary: fc.record({ base: fc.constant('raw' as const), gpa: u64Edge, size: u64Edge, uva: u64Edge, mmapOffset: u64Edge }), weight: 1 },
);

const featureValue = fc.oneof(
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }).map((m) => OFFERED & m),
  fc.constant(OFFERED & ~bit(34)),
  fc.integer({ min: 0, max: 63 }).map((b) => OFFERED | bit(b)),
  u64Edge,
);
const protocolValue = fc.oneof(
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }).map((m) => OFFERED_PROTOCOL & m),
  fc.constant(OFFERED_PROTOCOL),
  fc.integer({ min: 0, max: 63 }).map((b) => OFFERED_PROTOCOL | bit(b)),
  u64Edge,
);

const NO_PAYLOAD = [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.SET_OWNER, Request.RESET_OWNER, Request.RESET_DEVICE, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS];
const STATE = [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE, Request.VRING_KICK];
const FD_VRING = [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR];
const UNKNOWN = fc.oneof(fc.constantFrom(0, 19, 20, 22, 23, 26, 27, 28, 29, 30, 33, 41, 42, 100, 0xffff, 0xffffffff), fc.integer({ min: 41, max: 0xffffffff }));

/** a u64 as 8 little-endian bytes */
function le64(v: bigint): number[] {
  return Array.from({ length: 8 }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
}

type MsgOp = Extract<Op, { op: 'msg' }>;
const msg = (request: fc.Arbitrary<number>, body: fc.Arbitrary<Body>, fds: fc.Arbitrary<FdKind[]>): fc.Arbitrary<Omit<MsgOp, 'mut'>> =>
  fc.record({ op: fc.constant('msg' as const), request, needReply: fc.boolean(), body, fds });

const plainMessage: fc.Arbitrary<Omit<MsgOp, 'mut'>> = fc.oneof(
  { arbitrary: msg(fc.constantFrom(...NO_PAYLOAD), fc.constantFrom(0, 0, 8).map((n): Body => ({ t: 'raw', bytes: new Array<number>(n).fill(0) })), fc.constant([] as FdKind[])), weight: 4 },
  { arbitrary: msg(fc.constant(Request.SET_FEATURES), featureValue.map((v): Body => ({ t: 'u64', v })), fc.constant([] as FdKind[])), weight: 2 },
  { arbitrary: msg(fc.constant(Request.SET_PROTOCOL_FEATURES), protocolValue.map((v): Body => ({ t: 'u64', v })), fc.constant([] as FdKind[])), weight: 2 },
  { arbitrary: msg(fc.constant(Request.SET_STATUS), u64Edge.map((v): Body => ({ t: 'u64', v })), fc.constant([] as FdKind[])), weight: 1 },
  {
    arbitrary: fc.integer({ min: 0, max: 9 }).chain((count) =>
      msg(
        fc.constant(Request.SET_MEM_TABLE),
        fc.record({ t: fc.constant('mem' as const), count: fc.constant(count), slots: fc.constantFrom('full', 'exact') as fc.Arbitrary<'full' | 'exact'>, regions: fc.array(regionSpec, { minLength: Math.min(count, 8), maxLength: Math.min(count, 8) }) }),
        fc.oneof(fc.constant(Array.from({ length: count }, (_, i): FdKind => (i % 2 === 0 ? 'ram0' : 'ram1'))), someFds(9)),
      ),
    ),
    weight: 3,
  },
  { arbitrary: msg(fc.constantFrom(Request.ADD_MEM_REG, Request.REM_MEM_REG), regionSpec.map((r): Body => ({ t: 'region', r })), fc.oneof(fc.constant(['ram1'] as FdKind[]), someFds(2))), weight: 2 },
  { arbitrary: msg(fc.constantFrom(...STATE), fc.record({ t: fc.constant('state' as const), index: vringIndex, num: vringNum }), fc.oneof({ arbitrary: fc.constant([] as FdKind[]), weight: 5 }, { arbitrary: someFds(2), weight: 1 })), weight: 5 },
  {
    arbitrary: msg(
      fc.constant(Request.SET_VRING_ADDR),
      fc.record({ t: fc.constant('addr' as const), index: vringIndex, flags: fc.constantFrom(0, 0, 1, 0xffffffff), desc: addr, used: addr, avail: addr, log: addr }),
      fc.constant([] as FdKind[]),
    ),
    weight: 3,
  },
  {
    arbitrary: msg(
      fc.constantFrom(...FD_VRING),
      fc.oneof(
        { arbitrary: fc.record({ q: vringIndex, nofd: fc.boolean() }).map(({ q, nofd }): Body => ({ t: 'u64', v: BigInt(q & 0xff) | (nofd ? 0x100n : 0n) })), weight: 4 },
        { arbitrary: u64Edge.map((v): Body => ({ t: 'u64', v })), weight: 1 },
      ),
      fc.oneof({ arbitrary: fc.constant(['eventfd'] as FdKind[]), weight: 3 }, { arbitrary: someFds(3), weight: 1 }),
    ),
    weight: 4,
  },
  {
    arbitrary: msg(
      fc.constantFrom(Request.GET_CONFIG, Request.SET_CONFIG),
      fc.record({
        t: fc.constant('config' as const),
        offset: fc.oneof(fc.constantFrom(0, 0, 1, 20, 59, 60, 255, 256), u32Edge),
        size: fc.oneof(fc.constantFrom(0, 1, 4, 60, 255, 256, 257), u32Edge),
        flags: fc.constantFrom(0, 0, 1, 2),
        dataLen: fc.oneof(fc.constant(-1), fc.constantFrom(0, 1, 60, 300)),
      }),
      fc.constant([] as FdKind[]),
    ),
    weight: 2,
  },
  { arbitrary: msg(fc.constant(Request.SET_BACKEND_REQ_FD), fc.constant({ t: 'raw', bytes: [] } as Body), fc.oneof(fc.constant(['socket'] as FdKind[]), someFds(2))), weight: 1 },
  {
    arbitrary: msg(
      fc.constantFrom(Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD),
      fc.record({
        t: fc.constant('inflight' as const),
        mmapSize: fc.oneof(fc.constantFrom(0n, 4096n, 4224n, 8192n, 2n ** 20n, 2n ** 40n), u64Edge),
        mmapOffset: fc.oneof(fc.constantFrom(0n, 0n, 4096n, 1n, 2n ** 20n), u64Edge),
        numQueues: fc.constantFrom(0, 1, 2, 2, 3, 0xffff),
        queueSize: fc.constantFrom(0, 1, 100, 128, 128, 256, 1024, 2048, 0xffff),
      }),
      fc.oneof(fc.constant(['memfd4k'] as FdKind[]), fc.constant(['memfd1m'] as FdKind[]), someFds(2)),
    ),
    weight: 2,
  },
  {
    // SET_LOG_BASE (mmap_size, mmap_offset) with a bitmap memfd or any fd; SET_LOG_FD with an eventfd or any fd
    arbitrary: msg(
      fc.constant(Request.SET_LOG_BASE),
      fc
        .tuple(fc.oneof(fc.constantFrom(0n, 1n, 8n, 4096n, 4097n, 2n ** 20n, 2n ** 32n, 2n ** 32n + 1n), u64Edge), fc.oneof(fc.constantFrom(0n, 0n, 1n, 4095n, 4096n), u64Edge))
        .map(([size, off]): Body => ({ t: 'raw', bytes: [...le64(size), ...le64(off)] })),
      fc.oneof(fc.constant(['memfd4k'] as FdKind[]), fc.constant(['memfd1m'] as FdKind[]), someFds(2)),
    ),
    weight: 2,
  },
  { arbitrary: msg(fc.constant(Request.SET_LOG_FD), fc.constant({ t: 'raw', bytes: [] } as Body), fc.oneof(fc.constant(['eventfd'] as FdKind[]), someFds(2))), weight: 1 },
  { arbitrary: msg(UNKNOWN, fc.array(fc.integer({ min: 0, max: 255 }), { maxLength: 48 }).map((bytes): Body => ({ t: 'raw', bytes })), someFds(2)), weight: 1 },
);

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ flags: fc.oneof(fc.constantFrom(0, 2, 3, 0x5, 0x9, 0xd, 0x1 | 0x10, 0xffffffff), u32Edge) }),
  fc.record({ code: fc.oneof(fc.integer({ min: 0, max: 45 }), UNKNOWN) }),
  fc.record({ noise: fc.array(fc.tuple(fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }) }),
  fc.record({ cutTo: fc.integer({ min: 0, max: 40 }) }),
  fc.record({ extend: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 1, maxLength: 16 }) }),
  fc.record({ sizeLie: fc.oneof(fc.integer({ min: 0, max: 300 }), fc.constantFrom(4096, 4097, 0x10000, 0xffffffff)) }),
  fc.record({ splitAt: fc.integer({ min: 1, max: 60 }) }),
);

export const message: fc.Arbitrary<Op> = fc
  .tuple(plainMessage, fc.oneof({ arbitrary: fc.constant(null), weight: 3 }, { arbitrary: mutation, weight: 1 }))
  .map(([m, mut]) => ({ ...m, mut }));

export const negotiate: fc.Arbitrary<Op> = fc.record({
  op: fc.constant('negotiate' as const),
  inflight: fc.constantFrom('none', 'none', 'none', 'none', 'exact', 'exact', 'exact', 'short') as fc.Arbitrary<'none' | 'exact' | 'short'>,
  packed: fc.boolean(),
  memTable: fc.boolean(),
});

const step: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: message, weight: 10 },
  { arbitrary: negotiate, weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('startRing' as const), q: fc.constantFrom(0, 1), needReply: fc.boolean() }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('io' as const), q: fc.constantFrom(0, 1), sector: fc.constantFrom(0, 8, 32760, 32767, 32768, 2 ** 40) }), weight: 2 },
);

export const truncated: fc.Arbitrary<Op> = plainMessage.chain((m) =>
  fc.record({ op: fc.constant('truncated' as const), request: fc.constant(m.request), body: fc.constant(m.body), cut: fc.integer({ min: 1, max: 400 }), fds: fc.constant(m.fds) }),
);

// Valid messages in any order: what a confused (or restarting) frontend may send. Values are in
// range, fds are of the right kind; only the order and the combination are arbitrary.
const q01 = fc.constantFrom(0, 1);
const ramRegion = (base: 'ram0' | 'ram1'): RegionSpec => ({ base, gpa: 0n, size: 0n, uva: 0n, mmapOffset: 0n });
const ringAddr = (q: number): Body => ({ t: 'addr', index: q, flags: 0, desc: { in: 'desc', off: 0 }, used: { in: 'used', off: 0 }, avail: { in: 'avail', off: 0 }, log: { abs: 0n } });
const validMsg = (request: fc.Arbitrary<number>, body: fc.Arbitrary<Body>, fds: fc.Arbitrary<StepFd[]> = fc.constant([])): fc.Arbitrary<Op> =>
  fc.record({ op: fc.constant('msg' as const), request, needReply: fc.boolean(), body, fds: fds as fc.Arbitrary<FdKind[]>, mut: fc.constant(null) });
export const validMessage: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: validCore(), weight: 12 },
  { arbitrary: validMsg(fc.constant(Request.GET_INFLIGHT_FD), fc.constant({ t: 'inflight', mmapSize: 0n, mmapOffset: 0n, numQueues: 2, queueSize: 128 } as Body)), weight: 1 },
  {
    arbitrary: validMsg(fc.constant(Request.SET_INFLIGHT_FD), fc.constant({ t: 'inflight', mmapSize: BigInt(2 * inflightBytes128), mmapOffset: 0n, numQueues: 2, queueSize: 128 } as Body), fc.constant(['inflight-exact'] as StepFd[])),
    weight: 1,
  },
);

function validCore(): fc.Arbitrary<Op> {
  return fc.oneof(
    validMsg(fc.constantFrom(...NO_PAYLOAD), fc.constant({ t: 'raw', bytes: [] } as Body)),
    validMsg(fc.constant(Request.SET_FEATURES), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }).map((m): Body => ({ t: 'u64', v: (OFFERED & m & (m & 1n ? ~0n : ~bit(34))) | bit(30) }))),
    validMsg(fc.constant(Request.SET_PROTOCOL_FEATURES), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }).map((m): Body => ({ t: 'u64', v: OFFERED_PROTOCOL & (m | bit(PF.REPLY_ACK)) }))),
    validMsg(fc.constant(Request.SET_MEM_TABLE), fc.constantFrom(1, 2).map((n): Body => ({ t: 'mem', count: n, slots: 'full', regions: [ramRegion('ram0'), ramRegion('ram1')].slice(0, n) })), fc.constant([])).map((m) =>
      m.op === 'msg' && m.body.t === 'mem' ? { ...m, fds: m.body.count === 1 ? (['ram0'] as FdKind[]) : (['ram0', 'ram1'] as FdKind[]) } : m,
    ),
    validMsg(fc.constantFrom(Request.ADD_MEM_REG, Request.REM_MEM_REG), fc.constantFrom<'ram0' | 'ram1'>('ram0', 'ram1').map((b): Body => ({ t: 'region', r: ramRegion(b) }))).map((m) =>
      m.op === 'msg' && m.body.t === 'region' ? { ...m, fds: [m.body.r.base as FdKind] } : m,
    ),
    validMsg(fc.constant(Request.SET_VRING_NUM), fc.record({ t: fc.constant('state' as const), index: q01, num: fc.constantFrom(64, 128, 128, 256, 100) })),
    validMsg(fc.constant(Request.SET_VRING_BASE), fc.record({ t: fc.constant('state' as const), index: q01, num: fc.constantFrom(0, 0, 1, 127, 0xffff) })),
    validMsg(fc.constant(Request.GET_VRING_BASE), fc.record({ t: fc.constant('state' as const), index: q01, num: fc.constant(0) })),
    validMsg(fc.constant(Request.SET_VRING_ENABLE), fc.record({ t: fc.constant('state' as const), index: q01, num: fc.constantFrom(0, 1, 1) })),
    validMsg(fc.constant(Request.SET_VRING_ADDR), fc.tuple(q01, q01).map(([q, layout]) => ({ ...(ringAddr(layout) as Extract<Body, { t: 'addr' }>), index: q }))),
    fc.tuple(fc.constantFrom(...FD_VRING), q01, fc.constantFrom('own', 'own', 'eventfd', 'nofd')).map(([request, q, f]): Op => ({
      op: 'msg',
      request,
      needReply: false,
      body: { t: 'u64', v: BigInt(q) | (f === 'nofd' ? 0x100n : 0n) },
      fds: (f === 'nofd' ? [] : f === 'eventfd' ? ['eventfd'] : [request === Request.SET_VRING_CALL ? `call${q}` : `kick${q}`]) as FdKind[],
      mut: null,
    })),
    validMsg(fc.constant(Request.GET_CONFIG), fc.constantFrom(60, 8, 1).map((size): Body => ({ t: 'config', offset: 0, size, flags: 0, dataLen: size }))),
    validMsg(fc.constant(Request.SET_CONFIG), fc.constantFrom(0, 1).map((v): Body => ({ t: 'config', offset: 32, size: 1, flags: 0, dataLen: 1, value: v }) as Body)),
    validMsg(fc.constant(Request.SET_BACKEND_REQ_FD), fc.constant({ t: 'raw', bytes: [] } as Body), fc.constant(['socket'] as StepFd[])),
  );
}

const validStep: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: validMessage, weight: 8 },
  { arbitrary: fc.record({ op: fc.constant('startRing' as const), q: q01, needReply: fc.boolean() }), weight: 3 },
  { arbitrary: fc.record({ op: fc.constant('io' as const), q: q01, sector: fc.constantFrom(0, 8, 1000, 32767, 32768) }), weight: 3 },
  { arbitrary: negotiate, weight: 1 },
);

/**
 * 1..12 ops, two shapes: anything (mutated and random messages, sometimes after a valid
 * negotiation), or a valid negotiation followed by valid messages and set-up steps in any order
 * with at most one hostile message somewhere. Either may end with a truncated message.
 */
export const sequence: fc.Arbitrary<Op[]> = fc
  .oneof(
    fc.tuple(fc.option(negotiate, { freq: 2 }), fc.array(step, { minLength: 1, maxLength: 11 })).map(([pre, body]) => [...(pre ? [pre] : []), ...body]),
    fc
      .tuple(negotiate, fc.array(validStep, { minLength: 1, maxLength: 10 }), fc.option(fc.tuple(fc.nat(), message), { freq: 2 }))
      .map(([pre, body, bad]) => {
        const ops = [pre, ...body];
        if (bad) ops.splice(1 + (bad[0] % (body.length + 1)), 0, bad[1]);
        return ops;
      }),
  )
  .chain((ops) => fc.option(truncated, { freq: 6 }).map((last) => [...ops, ...(last ? [last] : [])].slice(0, 12)));

// ---- encoding ----

/** Per-run context the encoder resolves addresses and fds against. */
export interface RunContext {
  /** frontend virtual address, gpa and size of each RAM region */
  ram: { uva: number; gpa: number; size: number }[];
  /** frontend virtual addresses of the ring parts of queue q (size 128) */
  ring(q: number): { desc: number; avail: number; used: number };
}

export interface Wire {
  bytes: Uint8Array;
  fds: StepFd[];
  /** false when the header's size lies: the byte stream is out of step from here on */
  framed: boolean;
  /** the request code the header carries */
  request: number;
  /** the flags the header carries */
  flags: number;
  /** send bytes [0, splitAt) alone, then the rest with the fds */
  splitAt?: number;
}

const clampU64 = (v: bigint): bigint => ((v % 2n ** 64n) + 2n ** 64n) % 2n ** 64n;

function resolveAddr(a: Addr, q: number, ctx: RunContext): bigint {
  if ('abs' in a) return a.abs;
  if (a.in === 'ram0' || a.in === 'ram1') return clampU64(BigInt(ctx.ram[a.in === 'ram0' ? 0 : 1]!.uva) + BigInt(a.off));
  return clampU64(BigInt(ctx.ring(q & 1)[a.in]) + BigInt(a.off));
}

function resolveRegion(r: RegionSpec, ctx: RunContext): bigint[] {
  if (r.base === 'raw') return [r.gpa, r.size, r.uva, r.mmapOffset];
  const g = ctx.ram[r.base === 'ram0' ? 0 : 1]!;
  return [clampU64(BigInt(g.gpa) + r.gpa), clampU64(BigInt(g.size) + r.size), clampU64(BigInt(g.uva) + r.uva), r.mmapOffset];
}

function writeU64s(dv: DataView, off: number, vs: bigint[]): void {
  vs.forEach((v, i) => dv.setBigUint64(off + 8 * i, clampU64(v), true));
}

export function encodeBody(request: number, b: Body, ctx: RunContext): Uint8Array {
  switch (b.t) {
    case 'raw':
      return Uint8Array.from(b.bytes);
    case 'u64': {
      const out = new Uint8Array(8);
      new DataView(out.buffer).setBigUint64(0, clampU64(b.v), true);
      return out;
    }
    case 'state':
      return vringStatePayload(b.index >>> 0, b.num >>> 0);
    case 'addr': {
      const out = new Uint8Array(40);
      const dv = new DataView(out.buffer);
      dv.setUint32(0, b.index >>> 0, true);
      dv.setUint32(4, b.flags >>> 0, true);
      writeU64s(dv, 8, [resolveAddr(b.desc, b.index, ctx), resolveAddr(b.used, b.index, ctx), resolveAddr(b.avail, b.index, ctx), resolveAddr(b.log, b.index, ctx)]);
      return out;
    }
    case 'mem': {
      const slots = b.slots === 'full' ? MAX_MEM_REGIONS : Math.min(b.count, b.regions.length);
      const out = new Uint8Array(8 + 32 * Math.max(slots, b.regions.length));
      const dv = new DataView(out.buffer);
      dv.setUint32(0, b.count, true);
      b.regions.forEach((r, i) => writeU64s(dv, 8 + 32 * i, resolveRegion(r, ctx)));
      return out;
    }
    case 'region': {
      const out = new Uint8Array(40);
      writeU64s(new DataView(out.buffer), 8, resolveRegion(b.r, ctx));
      return out;
    }
    case 'config': {
      const len = b.dataLen >= 0 ? b.dataLen : b.size <= 300 ? b.size : 0;
      const p = configPayload(b.offset >>> 0, b.flags, new Uint8Array(len).fill(b.value ?? 0));
      new DataView(p.buffer).setUint32(4, b.size >>> 0, true);
      return p;
    }
    case 'inflight': {
      const p = inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues: b.numQueues, queueSize: b.queueSize });
      writeU64s(new DataView(p.buffer), 0, [b.mmapSize, b.mmapOffset]);
      return p;
    }
  }
  void request;
}

/** The wire form of a 'msg' or 'truncated' op. */
export function encodeOp(op: Extract<Op, { op: 'msg' | 'truncated' }>, ctx: RunContext): Wire {
  if (op.op === 'truncated') {
    const full = encodeMessage(op.request, FLAG_VERSION, encodeBody(op.request, op.body, ctx));
    return { bytes: full.subarray(0, Math.max(1, Math.min(op.cut, full.length - 1))), fds: op.fds, framed: false, request: op.request, flags: FLAG_VERSION };
  }
  let payload = encodeBody(op.request, op.body, ctx);
  const m = op.mut ?? {};
  if (m.noise) {
    payload = payload.slice();
    for (const [pos, byte] of m.noise) if (payload.length > 0) payload[pos % payload.length] = byte;
  }
  if (m.cutTo !== undefined) payload = payload.subarray(0, Math.min(m.cutTo, payload.length));
  if (m.extend) payload = Uint8Array.from([...payload, ...m.extend]);
  const request = m.code ?? op.request;
  const flags = m.flags ?? (FLAG_VERSION | (op.needReply ? FLAG_NEED_REPLY : 0));
  const bytes = encodeMessage(request, flags, payload);
  if (m.sizeLie !== undefined && m.sizeLie !== payload.length) {
    new DataView(bytes.buffer).setUint32(8, m.sizeLie >>> 0, true);
    return { bytes, fds: op.fds, framed: false, request, flags };
  }
  return { bytes, fds: op.fds, framed: true, request, flags, ...(m.splitAt !== undefined && m.splitAt < bytes.length ? { splitAt: m.splitAt } : {}) };
}

/** True if the daemon answers this message (so a sentinel reply proves everything before was handled). */
export function repliesTo(request: number): boolean {
  return (
    request === Request.GET_FEATURES ||
    request === Request.GET_PROTOCOL_FEATURES ||
    request === Request.GET_QUEUE_NUM ||
    request === Request.GET_MAX_MEM_SLOTS ||
    request === Request.GET_VRING_BASE ||
    request === Request.GET_CONFIG ||
    request === Request.GET_INFLIGHT_FD ||
    request === Request.GET_STATUS
  );
}

const wire = (request: number, payload: Uint8Array = new Uint8Array(0), fds: StepFd[] = [], needReply = false): Wire => {
  const flags = FLAG_VERSION | (needReply ? FLAG_NEED_REPLY : 0);
  return { bytes: encodeMessage(request, flags, payload), fds, framed: true, request, flags };
};

/** QEMU 7.2's start-up messages (as the in-repo Frontend.negotiate sends them), without waiting for replies. */
export function negotiateWires(op: Extract<Op, { op: 'negotiate' }>, ctx: RunContext): Wire[] {
  const u64 = (v: bigint): Uint8Array => encodeBody(0, { t: 'u64', v }, ctx);
  const w: Wire[] = [
    wire(Request.GET_FEATURES),
    wire(Request.GET_PROTOCOL_FEATURES),
    wire(Request.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FOR_NEGOTIATE(op.inflight !== 'none'))),
    wire(Request.GET_QUEUE_NUM),
    wire(Request.GET_MAX_MEM_SLOTS),
    wire(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), ['socket'], true),
    wire(Request.SET_OWNER),
  ];
  if (op.inflight !== 'none') {
    const p = inflightPayload({ mmapSize: 2 * INFLIGHT_QUEUE_BYTES, mmapOffset: 0, numQueues: 2, queueSize: 128 });
    w.push(wire(Request.SET_INFLIGHT_FD, p, [op.inflight === 'exact' ? 'inflight-exact' : 'inflight-short'], true));
  }
  const features = (OFFERED & ~bit(34)) | (op.packed ? OFFERED & bit(34) : 0n);
  w.push(wire(Request.SET_FEATURES, u64(features)));
  if (op.memTable) {
    const regions: RegionSpec[] = ctx.ram.map((_, i) => ({ base: i === 0 ? 'ram0' : 'ram1', gpa: 0n, size: 0n, uva: 0n, mmapOffset: 0n }));
    w.push(wire(Request.SET_MEM_TABLE, encodeBody(0, { t: 'mem', count: regions.length, slots: 'full', regions }, ctx), ['ram0', 'ram1'], true));
  }
  return w;
}

/** QEMU's per-ring start sequence for queue q with the run's ring at size 128. */
export function startRingWires(op: Extract<Op, { op: 'startRing' }>, ctx: RunContext): Wire[] {
  const r = ctx.ring(op.q);
  const a: Body = { t: 'addr', index: op.q, flags: 0, desc: { abs: BigInt(r.desc) }, used: { abs: BigInt(r.used) }, avail: { abs: BigInt(r.avail) }, log: { abs: 0n } };
  const kick: StepFd = op.q === 0 ? 'kick0' : 'kick1';
  const call: StepFd = op.q === 0 ? 'call0' : 'call1';
  return [
    wire(Request.SET_VRING_NUM, vringStatePayload(op.q, 128)),
    wire(Request.SET_VRING_BASE, vringStatePayload(op.q, 0)),
    wire(Request.SET_VRING_ADDR, encodeBody(0, a, ctx)),
    wire(Request.SET_VRING_KICK, encodeBody(0, { t: 'u64', v: BigInt(op.q) }, ctx), [kick]),
    wire(Request.SET_VRING_CALL, encodeBody(0, { t: 'u64', v: BigInt(op.q) }, ctx), [call]),
    wire(Request.SET_VRING_ENABLE, vringStatePayload(op.q, 1), [], op.needReply),
  ];
}

/** Bytes of one queue's inflight area for 128 descriptors (spec layout, 64-byte aligned). */
export const INFLIGHT_QUEUE_BYTES = inflightBytes128;

export const PROTOCOL_FOR_NEGOTIATE = (inflight: boolean): bigint =>
  OFFERED_PROTOCOL & (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.BACKEND_REQ) | bit(PF.CONFIGURE_MEM_SLOTS) | bit(PF.RESET_DEVICE) | (inflight ? bit(PF.INFLIGHT_SHMFD) : 0n));

export { HEADER_SIZE };
