// Worker-thread verify workload: stamps every sector it writes with (queue, round, sector), reads
// each batch back and checks it, on every queue, until told to stop. Runs in its own thread so the
// test's main thread stays free to drive the control socket.
import { parentPort, workerData } from 'node:worker_threads';
import { Frontend, BLK, type BlkRequest } from './frontend.js';

export interface VerifyLoadInput {
  socketPath: string;
  queues: number;
  /** sectors [0, areaSectors) of each queue's area; queue q uses area q */
  areaSectors: number;
  depth: number;
  /** Int32Array[0] = 1 asks the workload to stop */
  stop: SharedArrayBuffer;
  /** Int32Array[q] = rounds done on queue q, updated live */
  progress: SharedArrayBuffer;
  /** how long a batch may take before its requests count as lost (default 10 s) */
  waitMs?: number;
}

export interface VerifyLoadResult {
  ops: number;
  writes: number;
  reads: number;
  verifyErrors: number;
  badStatus: number;
  lost: number;
  firstError: string | null;
}

const BLOCK = 4096;

function stamp(buf: Uint8Array, queue: number, round: number, sector: number): void {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let o = 0; o < buf.length; o += 16) {
    dv.setUint32(o, 0x56554244, true); // "VUBD"
    dv.setUint32(o + 4, queue, true);
    dv.setUint32(o + 8, round, true);
    dv.setUint32(o + 12, sector + (o >> 9), true);
  }
}

function run(input: VerifyLoadInput): VerifyLoadResult {
  const stop = new Int32Array(input.stop);
  const progress = new Int32Array(input.progress);
  const res: VerifyLoadResult = { ops: 0, writes: 0, reads: 0, verifyErrors: 0, badStatus: 0, lost: 0, firstError: null };
  const fe = Frontend.connect(input.socketPath);
  fe.negotiate();
  const rings = Array.from({ length: input.queues }, (_, q) => fe.setupRing(q, 128));
  const expect = new Uint8Array(BLOCK);
  const note = (msg: string): void => {
    res.firstError ??= msg;
  };
  for (let round = 1; Atomics.load(stop, 0) === 0; round++) {
    const batches: { q: number; sector: number; req: BlkRequest }[][] = rings.map(() => []);
    const sectorsPerBlock = BLOCK / 512;
    for (let q = 0; q < rings.length; q++) {
      for (let k = 0; k < input.depth; k++) {
        const slot = (round * input.depth + k) % Math.floor(input.areaSectors / sectorsPerBlock);
        const sector = q * input.areaSectors + slot * sectorsPerBlock;
        const data = new Uint8Array(BLOCK);
        stamp(data, q, round, sector);
        batches[q]!.push({ q, sector, req: fe.blk(rings[q]!, BLK.OUT, sector, data, { indirect: true, region: 1 }) });
      }
      rings[q]!.kick();
    }
    for (let q = 0; q < rings.length; q++) {
      try {
        rings[q]!.waitFor(input.depth, input.waitMs ?? 10000);
      } catch (e) {
        res.lost += input.depth;
        note(`queue ${q} round ${round} writes: ${(e as Error).message}`);
        fe.close();
        return res;
      }
      for (const b of batches[q]!) {
        res.writes++;
        if (fe.statusOf(b.req) !== 0) {
          res.badStatus++;
          note(`write status ${fe.statusOf(b.req)} at sector ${b.sector}`);
        }
      }
    }
    const reads = batches.map((bs, q) => {
      const rs = bs.map((b) => ({ ...b, req: fe.blk(rings[q]!, BLK.IN, b.sector, BLOCK, { indirect: true, region: 1 }) }));
      rings[q]!.kick();
      return rs;
    });
    for (let q = 0; q < rings.length; q++) {
      try {
        rings[q]!.waitFor(input.depth, input.waitMs ?? 10000);
      } catch (e) {
        res.lost += input.depth;
        note(`queue ${q} round ${round} reads: ${(e as Error).message}`);
        fe.close();
        return res;
      }
      for (const r of reads[q]!) {
        res.reads++;
        if (fe.statusOf(r.req) !== 0) {
          res.badStatus++;
          note(`read status ${fe.statusOf(r.req)} at sector ${r.sector}`);
          continue;
        }
        stamp(expect, q, round, r.sector);
        const got = fe.dataOf(r.req);
        if (!got.every((v, i) => v === expect[i])) {
          res.verifyErrors++;
          note(`verify error at sector ${r.sector} (queue ${q}, round ${round})`);
        }
      }
      Atomics.store(progress, q, round);
    }
    res.ops += 2 * input.depth * rings.length;
    // Region 1 holds the request buffers; start it over each round (rings live in region 0).
    fe.ram.resetRegion(1);
  }
  fe.close();
  return res;
}

if (parentPort && workerData) parentPort.postMessage(run(workerData as VerifyLoadInput));
