// Main-thread handle of one queue placed on a pool worker: requests to it carry its queue id.
import type { Logger } from '../log.js';
import { DeviceLost } from '../protocol/backend.js';
import type { PoolWorker, PlacedQueue, Without } from './pool-worker.js';
import type { FromWorker, QueueInit, ToQueue } from './messages.js';

type Ack = Extract<FromWorker, { type: 'ack' }>;

export class QueueHandle implements PlacedQueue {
  readonly index: number;
  readonly stats: Int32Array;
  /** settles once the worker took the queue */
  readonly added: Promise<void>;
  private dead: Error | null = null;

  constructor(
    private readonly worker: PoolWorker,
    readonly qid: number,
    init: QueueInit,
    readonly log: Logger,
    private readonly onDeath: (err: Error) => void,
  ) {
    this.index = init.queueIndex;
    this.stats = new Int32Array(init.stats);
    worker.attach(this);
    this.added = worker.request({ type: 'add-queue', qid, init }).then(
      () => undefined,
      (e: Error) => {
        worker.detach(this);
        this.dead ??= e;
        throw e;
      },
    );
    this.added.catch(() => undefined); // observed by ready() and every later request
  }

  /** the pool worker serving this queue */
  get workerIndex(): number {
    return this.worker.index;
  }

  /** settles when the thread that served this queue has ended */
  get threadExited(): Promise<void> {
    return this.worker.exited;
  }

  /** true as soon as its thread failed (before the exit that tells the export) */
  get isDead(): boolean {
    return this.dead !== null || this.worker.isDead;
  }

  workerDied(err: Error): void {
    if (this.dead !== null) return;
    this.dead = err;
    this.onDeath(err);
  }

  /** Sends a control message to this queue and resolves with the worker's ack. */
  async request(msg: Without<ToQueue, 'seq' | 'qid'>): Promise<Ack> {
    if (this.isDead) throw new DeviceLost(`queue ${this.index}: ${(this.dead ?? this.worker.deathReason)?.message ?? 'its worker is gone'}`);
    try {
      return await this.worker.request({ ...msg, qid: this.qid } as Without<ToQueue, 'seq'>);
    } catch (e) {
      const message = `queue ${this.index}: ${(e as Error).message}`;
      throw this.isDead ? new DeviceLost(message) : new Error(message);
    }
  }

  /** Takes the queue off its worker (requests still in flight are abandoned); later requests fail. */
  async remove(): Promise<void> {
    if (this.isDead) return;
    this.dead = new Error(`queue worker ${this.index} exited (removed)`);
    this.worker.detach(this);
    await this.worker.request({ type: 'remove-queue', qid: this.qid }).catch(() => undefined);
  }
}
