// The fixed pool of worker threads, made by the main thread at start-up (never per export or per
// request: the posix-aio-compat seed). Exports place each of their queues on one worker; a worker
// serves any number of queues. A worker that dies is replaced at once in its slot, and every queue
// it served is told (their exports end their sessions and re-place the queues before the next).
import os from 'node:os';
import type { Logger } from '../log.js';
import { PoolWorker } from './pool-worker.js';
import { QueueHandle } from './handle.js';
import { StatIndex, type QueueInit } from './messages.js';

export interface PoolOptions {
  /** threads (default: the CPU count) */
  workers?: number;
  pollUs: number;
  logLevel: string;
}

export class WorkerPool {
  readonly size: number;
  private readonly slots: PoolWorker[];
  private nextQid = 1;
  /** where the last default placement went: the next one starts after it */
  private cursor = -1;
  private closed = false;

  constructor(
    private readonly opts: PoolOptions,
    private readonly log: Logger,
  ) {
    this.size = Math.max(1, opts.workers ?? os.availableParallelism());
    this.slots = Array.from({ length: this.size }, (_, i) => this.spawn(i));
  }

  private spawn(index: number): PoolWorker {
    const w = new PoolWorker({ index, pollUs: this.opts.pollUs, logLevel: this.opts.logLevel }, this.log, (err) => this.died(index, w, err));
    return w;
  }

  /** A worker failed unasked: a fresh thread takes its slot now; its queues learn of the death when it has exited. */
  private died(index: number, w: PoolWorker, err: Error): void {
    if (this.closed || this.slots[index] !== w) return;
    this.log.error({ worker: index, queues: w.queueCount, err: err.message }, 'worker thread died; replacing it');
    this.slots[index] = this.spawn(index);
  }

  /** Resolves once every worker runs its loop (a worker that cannot start is a start-up failure). */
  async ready(timeoutMs = 10000): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`worker threads did not start within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([Promise.all(this.slots.map((w) => w.request({ type: 'ready' }))), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** queues currently placed on each worker */
  load(): number[] {
    return this.slots.map((w) => w.queueCount);
  }

  /**
   * The workers for `count` new queues: `mapping[q]` where given (an iothread-vq-mapping), else
   * round robin, each queue to the least loaded worker after the previous pick.
   */
  place(count: number, mapping?: readonly number[]): number[] {
    if (mapping !== undefined) {
      if (mapping.length !== count) throw new Error(`the mapping names ${mapping.length} queues, the export has ${count}`);
      const bad = mapping.find((w) => !Number.isInteger(w) || w < 0 || w >= this.size);
      if (bad !== undefined) throw new Error(`worker${bad} does not exist (the pool has worker0..worker${this.size - 1})`);
      return [...mapping];
    }
    const load = this.load();
    const out: number[] = [];
    for (let q = 0; q < count; q++) {
      let best = -1;
      for (let k = 1; k <= this.size; k++) {
        const w = (this.cursor + k) % this.size;
        if (best < 0 || load[w]! < load[best]!) best = w;
      }
      this.cursor = best;
      load[best]!++;
      out.push(best);
    }
    return out;
  }

  /**
   * Places one queue on worker `index`; the handle's `added` settles once the worker took it (later
   * requests queue behind it). `stats` carries the counters over from a queue this one replaces;
   * `onDeath` runs once if the worker thread dies under it.
   */
  addQueue(index: number, init: Omit<QueueInit, 'stats'>, log: Logger, onDeath: (err: Error) => void, stats?: SharedArrayBuffer): QueueHandle {
    if (this.closed) throw new Error('the worker pool is shut down');
    const w = this.slots[index];
    if (w === undefined) throw new Error(`worker${index} does not exist`);
    const buf = stats ?? new SharedArrayBuffer(4 * StatIndex.COUNT);
    if (stats !== undefined) Atomics.store(new Int32Array(buf), StatIndex.IN_FLIGHT, 0);
    return new QueueHandle(w, this.nextQid++, { ...init, stats: buf }, log, onDeath);
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.slots.map((w) => w.terminate()));
  }
}
