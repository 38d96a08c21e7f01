// Worker-thread load: a frontend with `queues` rings that keeps `depth` 4 KiB reads in flight on
// the queues listed in `busy` (the others are set up and left idle), round after round with a
// pause between rounds, until told to stop.
import { parentPort, workerData } from 'node:worker_threads';
import { Frontend, BLK } from './frontend.js';

export interface QueueLoadInput {
  socketPath: string;
  queues: number;
  busy: number[];
  depth: number;
  /** pause between rounds, so the load leaves the (shared, small) machine some CPU */
  pauseMs: number;
  /** Int32Array[0] = 1 asks the load to stop */
  stop: SharedArrayBuffer;
  /** Int32Array[q] = requests completed on queue q, live */
  done: SharedArrayBuffer;
}

export interface QueueLoadResult {
  completed: number;
  badStatus: number;
  /** why it ended early (the backend went away), or null */
  error: string | null;
}

function run(input: QueueLoadInput): QueueLoadResult {
  const stop = new Int32Array(input.stop);
  const done = new Int32Array(input.done);
  const res: QueueLoadResult = { completed: 0, badStatus: 0, error: null };
  const fe = Frontend.connect(input.socketPath);
  try {
    fe.negotiate();
    const rings = Array.from({ length: input.queues }, (_, q) => fe.setupRing(q, 128));
    for (let round = 0; Atomics.load(stop, 0) === 0; round++) {
      const reqs = input.busy.map((q) =>
        Array.from({ length: input.depth }, (_, k) => fe.blk(rings[q]!, BLK.IN, ((round * input.depth + k) % 1024) * 8, 4096, { region: 1 })),
      );
      for (const q of input.busy) rings[q]!.kick();
      input.busy.forEach((q, i) => {
        rings[q]!.waitFor(input.depth, 10000);
        for (const r of reqs[i]!) if (fe.statusOf(r) !== 0) res.badStatus++;
        res.completed += input.depth;
        Atomics.add(done, q, input.depth);
      });
      fe.ram.resetRegion(1);
      if (input.pauseMs > 0) Atomics.wait(stop, 0, 0, input.pauseMs);
    }
  } catch (e) {
    res.error = (e as Error).message;
  }
  fe.close();
  return res;
}

if (parentPort && workerData) parentPort.postMessage(run(workerData as QueueLoadInput));
