// Main-thread handle of one queue worker: spawns it ahead of time, sends control messages (each
// followed by a wake on the control eventfd) and matches acks to requests.
import { Worker } from 'node:worker_threads';
import { native } from '../native/index.js';
import type { Logger } from '../log.js';
import { StatIndex, type FromWorker, type ToWorker, type WorkerInit } from './messages.js';

type Pending = { resolve: (m: Extract<FromWorker, { type: 'ack' }>) => void; reject: (e: Error) => void };
type Without<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;

export class QueueWorkerHandle {
  readonly index: number;
  readonly stats: Int32Array;
  private readonly worker: Worker;
  private readonly ctrlFd: number;
  private seq = 0;
  private readonly pending = new Map<number, Pending>();
  private dead: Error | null = null;
  readonly exited: Promise<void>;

  /**
   * `stats` carries the counters over from a worker this one replaces; `onDeath` runs once if the
   * thread ends without being asked to.
   */
  constructor(
    init: Omit<WorkerInit, 'ctrlFd' | 'stats'>,
    private readonly log: Logger,
    stats: SharedArrayBuffer = new SharedArrayBuffer(4 * StatIndex.COUNT),
    private readonly onDeath: (err: Error) => void = () => {},
  ) {
    this.index = init.queueIndex;
    this.ctrlFd = native.eventfd(true);
    this.stats = new Int32Array(stats);
    const workerInit: WorkerInit = { ...init, ctrlFd: this.ctrlFd, stats };
    this.worker = new Worker(new URL('./queue-worker.js', import.meta.url), {
      workerData: workerInit,
      name: `vubd-queue-${init.queueIndex}`,
    });
    this.worker.on('message', (m: FromWorker) => this.onMessage(m));
    this.worker.on('error', (err) => {
      this.log.error({ err, queue: this.index }, 'queue worker crashed');
      this.fail(err);
    });
    this.exited = new Promise((resolve) => {
      this.worker.on('exit', (code) => {
        if (code !== 0) this.log.error({ queue: this.index, code }, 'queue worker exited');
        const asked = this.exitRequested;
        this.fail(new Error(`queue worker ${this.index} exited with code ${code}`));
        native.close(this.ctrlFd);
        resolve();
        if (!asked) this.onDeath(this.dead!);
      });
    });
  }

  private exitRequested = false;

  get isDead(): boolean {
    return this.dead !== null;
  }

  private fail(err: Error): void {
    this.dead ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  private onMessage(m: FromWorker): void {
    if (m.type === 'log') {
      this.log[m.level](m.data ?? {}, m.msg);
      return;
    }
    const p = this.pending.get(m.seq);
    if (!p) return;
    this.pending.delete(m.seq);
    if (m.error) p.reject(new Error(`queue ${this.index}: ${m.error}`));
    else p.resolve(m);
  }

  /** Sends a control message and resolves with the worker's ack. */
  request(msg: Without<ToWorker, 'seq'>): Promise<Extract<FromWorker, { type: 'ack' }>> {
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
