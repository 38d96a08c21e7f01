// The QEMU-like shape of the protocol fuzzer: a valid start-up and ring start, then guest traffic
// on the started rings (valid virtio-blk requests and hostile descriptor chains), with now and
// then a valid out-of-order message, one mutated message late in the sequence, or a truncated end.
// Most of these sequences reach started queues and drive the queue workers, which the message
// shapes of fuzz-grammar.ts rarely do (a random message usually ends the session first).
import fc from 'fast-check';
import type { Frontend, SplitRing, BlkRequest } from './frontend.js';
import { BLK } from './frontend.js';
import { message, sequence, truncated, validMessage, type Op } from './fuzz-grammar.js';

export type ValidReq =
  | { kind: 'write' | 'read'; sector: number; sectors: number; indirect: boolean; split: number; region: 0 | 1 }
  | { kind: 'flush' | 'getId' }
  | { kind: 'discard' | 'writeZeroes'; sector: number; sectors: number; unmap: boolean };

export const HOSTILE_KINDS = [
  'dataOutside', 'dataHugeLen', 'statusReadOnly', 'headerOnly', 'shortHeader', 'zeroLenData', 'loop', 'nextOutOfRange',
  'headOutOfRange', 'indirectBadLen', 'indirectNested', 'indirectLoop', 'indirectOutside', 'availJump', 'unknownType',
  'readIntoReadOnly', 'writableHeader', 'longChain',
] as const;
export type HostileKind = (typeof HOSTILE_KINDS)[number];

export type RingOp = { op: 'ring'; q: number; req: { t: 'valid'; r: ValidReq } | { t: 'hostile'; kind: HostileKind; p: number } };
export type FuzzOp = Op | RingOp;

/** the fuzz image is 16 MiB: sectors past 32768 are out of range (a valid request that gets IOERR) */
const sector = fc.oneof({ arbitrary: fc.integer({ min: 0, max: 32000 }), weight: 8 }, { arbitrary: fc.constantFrom(32760, 32767, 32768, 2 ** 31, 2 ** 40), weight: 1 });

const validReq: fc.Arbitrary<ValidReq> = fc.oneof(
  {
    arbitrary: fc.record({
      kind: fc.constantFrom('write', 'read') as fc.Arbitrary<'write' | 'read'>,
      sector,
      sectors: fc.integer({ min: 1, max: 16 }),
      indirect: fc.boolean(),
      split: fc.integer({ min: 1, max: 3 }),
      region: fc.constantFrom(0, 1) as fc.Arbitrary<0 | 1>,
    }),
    weight: 6,
  },
  { arbitrary: fc.record({ kind: fc.constantFrom('flush', 'getId') as fc.Arbitrary<'flush' | 'getId'> }), weight: 1 },
  {
    arbitrary: fc.record({ kind: fc.constantFrom('discard', 'writeZeroes') as fc.Arbitrary<'discard' | 'writeZeroes'>, sector, sectors: fc.integer({ min: 1, max: 4096 }), unmap: fc.boolean() }),
    weight: 1,
  },
);

export const ringOp: fc.Arbitrary<RingOp> = fc.record({
  op: fc.constant('ring' as const),
  q: fc.constantFrom(0, 0, 1),
  req: fc.oneof(
    { arbitrary: validReq.map((r) => ({ t: 'valid' as const, r })), weight: 4 },
    { arbitrary: fc.record({ t: fc.constant('hostile' as const), kind: fc.constantFrom(...HOSTILE_KINDS), p: fc.nat({ max: 0xffff }) }), weight: 1 },
  ),
});

const validNegotiate: fc.Arbitrary<Op> = fc.record({
  op: fc.constant('negotiate' as const),
  inflight: fc.constantFrom('none', 'none', 'exact') as fc.Arbitrary<'none' | 'exact'>,
  packed: fc.constant(false),
  memTable: fc.constant(true),
});

const ringPhase: fc.Arbitrary<FuzzOp> = fc.oneof(
  { arbitrary: ringOp, weight: 8 },
  { arbitrary: validMessage, weight: 1 },
);

/** arb in `yes` of `yes + no` cases, else null (fc.option's freq is the other way round: 1/freq are null) */
const sometimes = <T>(arb: fc.Arbitrary<T>, yes: number, no: number): fc.Arbitrary<T | null> =>
  fc.oneof({ arbitrary: arb, weight: yes }, { arbitrary: fc.constant(null), weight: no });

/** negotiate, start one or both rings, guest traffic; sometimes a late mutation (then more traffic) or a truncated end */
export const qemuLikeSequence: fc.Arbitrary<FuzzOp[]> = fc
  .tuple(
    validNegotiate,
    fc.constantFrom([0], [1], [0, 1], [0, 1], [0, 1]),
    fc.boolean(),
    fc.array(ringPhase, { minLength: 2, maxLength: 8 }),
    sometimes(fc.tuple(message, fc.array(ringOp, { maxLength: 3 })), 1, 3),
    sometimes(truncated, 1, 9),
  )
  .map(([neg, queues, needReply, traffic, late, end]) => {
    // guest traffic goes to the rings this sequence started
    const onStarted = (o: FuzzOp): FuzzOp => (o.op === 'ring' ? { ...o, q: queues[o.q % queues.length]! } : o);
    return [
      neg,
      ...queues.map((q): Op => ({ op: 'startRing', q, needReply })),
      ...traffic.map(onStarted),
      ...(late ? [late[0], ...late[1].map(onStarted)] : []),
      ...(end ? [end] : []),
    ];
  });

/** The fuzzer's sequences: the message shapes of fuzz-grammar.ts (2 in 5) and the QEMU-like shape (3 in 5). */
export const fuzzSequence: fc.Arbitrary<FuzzOp[]> = fc.oneof({ arbitrary: sequence as fc.Arbitrary<FuzzOp[]>, weight: 2 }, { arbitrary: qemuLikeSequence, weight: 3 });

// ---- posting requests on the driver's ring ----

const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;

interface Desc {
  gpa: number;
  len: number;
  flags: number;
  /** index into the chain this one links to (default: the following one) */
  link?: number;
  /** a raw next index (overrides link) */
  next?: number;
}

function header(fe: Frontend, type: number, sectorNo: number, region: number): number {
  const g = fe.ram.alloc(16, 16, region);
  const dv = fe.ram.view(g, 16);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0, true);
  dv.setBigUint64(8, BigInt(sectorNo), true);
  return g;
}

function buffer(fe: Frontend, len: number, region: number): number {
  const g = fe.ram.alloc(len, 512, region);
  fe.ram.bytes(g, Math.min(len, 1)).fill(0xff);
  return g;
}

/** Writes a chain into the descriptor table (`table` = an indirect table when given) and returns its ids. */
function writeChain(ring: SplitRing, descs: Desc[], table?: number): number[] | null {
  const ids = table === undefined ? ring.takeChain(descs.length) : descs.map((_, i) => i);
  if (ids === null) return null;
  descs.forEach((d, i) => {
    const hasNext = (d.flags & NEXT) !== 0;
    const next = d.next ?? (hasNext ? ids[d.link ?? i + 1] ?? 0 : 0);
    ring.writeDesc(table ?? ring.desc, ids[i]!, { gpa: d.gpa, len: d.len >>> 0, flags: d.flags, next });
  });
  return ids;
}

/** The guest memory layout of the fuzz run: the gap after region 0 and the end of the last region. */
function holes(fe: Frontend): { gap: number; pastEnd: number } {
  const [r0, r1] = fe.ram.regions;
  return { gap: r0!.gpa + r0!.size + 0x1000, pastEnd: r1!.gpa + r1!.size + 0x10000 };
}

/**
 * Posts a hostile request (or ring damage) on the ring; returns its head, or null if the ring or
 * the guest RAM has no room. The caller kicks.
 */
export function postHostile(fe: Frontend, ring: SplitRing, kind: HostileKind, p: number): number | null {
  const { gap, pastEnd } = holes(fe);
  const hdr = (type: number = BLK.OUT): Desc => ({ gpa: header(fe, type, 8 + (p % 1000), 1), len: 16, flags: NEXT });
  const status = (flags = WRITE): Desc => ({ gpa: buffer(fe, 1, 1), len: 1, flags });
  const data = (len = 4096, flags = NEXT): Desc => ({ gpa: buffer(fe, len, 1), len, flags });
  const publish = (descs: Desc[]): number | null => {
    const ids = writeChain(ring, descs);
    if (ids === null) return null;
    ring.publishHead(ids[0]!);
    return ids[0]!;
  };
  const indirect = (tableDescs: Desc[], len?: number, gpa?: number): number | null => {
    const table = gpa ?? fe.ram.alloc(16 * tableDescs.length, 16, 1);
    if (gpa === undefined) writeChain(ring, tableDescs, table);
    return publish([{ gpa: table, len: len ?? 16 * tableDescs.length, flags: INDIRECT }]);
  };
  switch (kind) {
    case 'dataOutside':
      return publish([hdr(), { gpa: p % 2 ? gap : pastEnd, len: 4096, flags: NEXT }, status()]);
    case 'dataHugeLen':
      return publish([hdr(BLK.IN), { gpa: buffer(fe, 4096, 1), len: 0xffffffff - (p % 4096), flags: NEXT | WRITE }, status()]);
    case 'statusReadOnly':
      return publish([hdr(), data(), status(0)]);
    case 'headerOnly':
      return publish([{ ...hdr(), flags: 0 }]);
    case 'shortHeader':
      return publish([{ ...hdr(), len: p % 16 }, status()]);
    case 'zeroLenData':
      return publish([hdr(BLK.IN), { ...data(512, NEXT | WRITE), len: 0 }, status()]);
    case 'loop':
      return publish([hdr(), { ...data(), link: 0 }]);
    case 'nextOutOfRange':
      return publish([{ ...hdr(), next: ring.size + (p % 0xff00) }, status()]);
    case 'headOutOfRange':
      ring.publishHead(ring.size + (p % (0x10000 - ring.size)));
      return -1;
    case 'indirectBadLen':
      return indirect([hdr(), data(), status()], [0, 15, 17, 16 * 4 + 8, 16 * (ring.size + 1), 0xfffffff0][p % 6]!);
    case 'indirectNested':
      return indirect([hdr(), { gpa: fe.ram.alloc(48, 16, 1), len: 48, flags: INDIRECT | NEXT }, status()]);
    case 'indirectLoop':
      return indirect([hdr(), data(), { ...status(), flags: WRITE | NEXT, link: p % 3 }]);
    case 'indirectOutside':
      return indirect([], 48, p % 2 ? gap : pastEnd);
    case 'availJump':
      ring.availIdx = (ring.availIdx + ring.size + 1 + (p % 1000)) & 0xffff;
      ring.publishHead(0);
      return -1;
    case 'unknownType':
      return publish([hdr(99 + (p % 100)), data(512), status()]);
    case 'readIntoReadOnly':
      return publish([hdr(BLK.IN), data(4096, NEXT), status()]);
    case 'writableHeader':
      return publish([{ ...hdr(), flags: NEXT | WRITE }, data(), status()]);
    case 'longChain': {
      const n = Math.min(ring.free, 100);
      if (n < 3) return null;
      return publish([hdr(), ...Array.from({ length: n - 2 }, () => data(512)), status()]);
    }
  }
}

/** Posts a valid virtio-blk request; null if the ring or the guest RAM has no room. */
export function postValid(fe: Frontend, ring: SplitRing, r: ValidReq): BlkRequest | null {
  try {
    switch (r.kind) {
      case 'write':
      case 'read': {
        const len = 512 * r.sectors;
        const data = r.kind === 'write' ? new Uint8Array(len).fill(r.sector & 0xff) : len;
        return fe.blk(ring, r.kind === 'write' ? BLK.OUT : BLK.IN, r.sector, data, { indirect: r.indirect, split: r.split, region: r.region });
      }
      case 'flush':
        return fe.blk(ring, BLK.FLUSH, 0, 0, { region: 1 });
      case 'getId':
        return fe.blk(ring, BLK.GET_ID, 0, 20, { region: 1 });
      case 'discard':
      case 'writeZeroes': {
        const seg = new Uint8Array(16);
        const dv = new DataView(seg.buffer);
        dv.setBigUint64(0, BigInt(r.sector), true);
        dv.setUint32(8, r.sectors, true);
        dv.setUint32(12, r.kind === 'writeZeroes' && r.unmap ? 1 : 0, true);
        return fe.blk(ring, r.kind === 'discard' ? BLK.DISCARD : BLK.WRITE_ZEROES, 0, seg, { region: 1 });
      }
    }
  } catch (e) {
    if (/ring full|exhausted/.test((e as Error).message)) return null;
    throw e;
  }
}

