// Main-thread handle of one pool worker thread: spawns it ahead of time, sends control messages
// (each followed by a wake on the control eventfd), matches acks to requests, routes the worker's
// log lines to the logger of the queue they are about, and tells every queue it served if it dies.
import { Worker } from 'node:worker_threads';
import { native } from '../native/index.js';
import type { Logger } from '../log.js';
import type { FromWorker, ToWorker, WorkerInit } from './messages.js';

type Ack = Extract<FromWorker, { type: 'ack' }>;
type Pending = { resolve: (m: Ack) => void; reject: (e: Error) => void };
export type Without<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;

/** what a worker needs of the queues placed on it */
export interface PlacedQueue {
  readonly qid: number;
  readonly log: Logger;
  workerDied(err: Error): void;
}

export class PoolWorker {
  readonly index: number;
  private readonly worker: Worker;
  private readonly ctrlFd: number;
  private seq = 0;
  private readonly pending = new Map<number, Pending>();
  private readonly queues = new Map<number, PlacedQueue>();
  private dead: Error | null = null;
  private exitRequested = false;
  readonly exited: Promise<void>;

  constructor(
    init: Omit<WorkerInit, 'ctrlFd'>,
    private readonly log: Logger,
    private readonly onDeath: (err: Error) => void,
  ) {
    this.index = init.index;
    this.ctrlFd = native.eventfd(true);
    this.worker = new Worker(new URL('./worker-loop.js', import.meta.url), {
      workerData: { ...init, ctrlFd: this.ctrlFd } satisfies WorkerInit,
      name: `vubd-worker-${init.index}`,
    });
    this.worker.on('message', (m: FromWorker) => this.onMessage(m));
    this.worker.on('error', (err) => {
      this.log.error({ err, worker: this.index }, 'worker thread crashed');
      this.fail(err);
    });
    this.exited = new Promise((resolve) => {
      this.worker.on('exit', (code) => {
        if (code !== 0) this.log.error({ worker: this.index, code }, 'worker thread exited');
        this.fail(new Error(`worker ${this.index} exited with code ${code}`));
        native.close(this.ctrlFd);
        resolve();
        if (this.exitRequested) return;
        // Only now is the thread gone (nothing uses the queues' fds through it): tell its queues.
        const queues = [...this.queues.values()];
        this.queues.clear();
        for (const q of queues) q.workerDied(this.dead!);
      });
    });
  }

  /** why the thread failed, once it has */
  get deathReason(): Error | null {
    return this.dead;
  }

  get isDead(): boolean {
    return this.dead !== null;
  }

  get queueCount(): number {
    return this.queues.size;
  }

  attach(q: PlacedQueue): void {
    this.queues.set(q.qid, q);
  }

  detach(q: PlacedQueue): void {
    this.queues.delete(q.qid);
  }

  /**
   * The first failure (an uncaught error, or an exit nobody asked for) tells the pool at once, so
   * that its slot has a live thread before any queue is re-placed there ('exit' may come later).
   */
  private fail(err: Error): void {
    const first = this.dead === null;
    this.dead ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    if (first && !this.exitRequested) this.onDeath(this.dead);
  }

  private onMessage(m: FromWorker): void {
    if (m.type === 'log') {
      const log = (m.qid !== undefined ? this.queues.get(m.qid)?.log : undefined) ?? this.log;
      log[m.level]({ worker: this.index, ...m.data }, m.msg);
      return;
    }
    const p = this.pending.get(m.seq);
    if (!p) return;
    this.pending.delete(m.seq);
    if (m.error) p.reject(new Error(m.error));
    else p.resolve(m);
  }

  /** Sends a control message and resolves with the worker's ack. */
  request(msg: Without<ToWorker, 'seq'>): Promise<Ack> {
    if (this.dead) return Promise.reject(this.dead);
    const seq = ++this.seq;
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve, reject });
      this.worker.postMessage({ ...msg, seq } as ToWorker);
      native.eventfdWrite(this.ctrlFd, 1);
    });
  }

  async terminate(): Promise<void> {
    this.exitRequested = true;
    if (!this.dead) {
      await Promise.race([this.request({ type: 'exit' }).catch(() => undefined), new Promise((r) => setTimeout(r, 500))]);
    }
    await Promise.race([this.exited, new Promise((r) => setTimeout(r, 500))]);
    if (!this.dead) await this.worker.terminate();
  }
}
