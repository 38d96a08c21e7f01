// The main thread's side of dirty logging: the bitmap of SET_LOG_BASE mapped once for the process,
// and whether VHOST_F_LOG_ALL is on. Every change reaches the queue workers through the drained
// barrier, so no request is half-logged across a switch. (Correctness does not depend on it:
// workers mark pages when a request completes, under whatever log is current then.)
import { native } from '../native/index.js';
import type { Logger } from '../log.js';
import type { DirtyLogRegion } from '../protocol/backend.js';
import type { DrainBarrier } from '../graph/drain.js';
import { DrainTimeoutError } from '../graph/drain.js';
import type { DirtyLogView } from './messages.js';
import { ProtocolError } from '../protocol/codec.js';

const PAGE = 4096;
/** how long a logging switch waits for in-flight requests before it goes ahead without the barrier */
const DRAIN_TIMEOUT_MS = 5000;

export class DirtyLogControl {
  private view: DirtyLogView | null = null;
  private enabled = false;

  constructor(
    private readonly barrier: DrainBarrier,
    private readonly broadcast: (view: DirtyLogView | null, enabled: boolean) => Promise<void>,
    private readonly log: Logger,
  ) {}

  get active(): boolean {
    return this.enabled && this.view !== null;
  }

  /** SET_LOG_BASE: maps the new bitmap, switches every worker to it, then lets go of the old one. */
  async setRegion(r: DirtyLogRegion): Promise<void> {
    const start = r.mmapOffset - (r.mmapOffset % PAGE);
    let mapping: number;
    try {
      mapping = native.mapShared(r.fd, r.mmapOffset - start + r.mmapSize, start, true);
    } catch (e) {
      throw new ProtocolError(`SET_LOG_BASE: the dirty log cannot be mapped: ${(e as Error).message}`);
    }
    const next: DirtyLogView = { mapping, offset: r.mmapOffset - start, size: r.mmapSize };
    const old = this.view;
    try {
      await this.apply(next, this.enabled, 'dirty log replaced');
    } catch (e) {
      native.releaseMapping(mapping); // workers that took a view hold their own reference
      throw e;
    }
    this.view = next;
    if (old !== null) native.releaseMapping(old.mapping);
  }

  /** SET_FEATURES: VHOST_F_LOG_ALL on or off. */
  async setEnabled(on: boolean): Promise<void> {
    if (on === this.enabled) return;
    await this.apply(this.view, on, on ? 'dirty logging on (live migration)' : 'dirty logging off');
    this.enabled = on;
  }

  /** The session ended or the device was reset: the workers' reset dropped their views. */
  forget(): void {
    if (this.view !== null) native.releaseMapping(this.view.mapping);
    this.view = null;
    this.enabled = false;
  }

  private async apply(view: DirtyLogView | null, enabled: boolean, what: string): Promise<void> {
    let drained = false;
    try {
      await this.barrier.drain(DRAIN_TIMEOUT_MS);
      drained = true;
    } catch (e) {
      if (!(e instanceof DrainTimeoutError)) throw e;
      this.log.warn(`${what}: queues did not drain within ${DRAIN_TIMEOUT_MS} ms; switching them without the barrier`);
    }
    try {
      await this.broadcast(view, enabled);
    } finally {
      if (drained) await this.barrier.undrain();
    }
    this.log.info({ bytes: view?.size ?? 0, logging: enabled && view !== null }, what);
  }
}
