// Pool worker thread entry: serves any number of queues (of any exports), each in its own
// QueueContext, and sleeps in one poll covering the control eventfd and every queue's kick and
// completion fds. Control messages arrive on parentPort and are read synchronously after the
// control eventfd wakes us; queue messages carry the queue id they are for.
import { parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { native, POLLERR, POLLIN, POLLNVAL } from '../native/index.js';
import { BrokenQueueError } from '../virtio/split-queue.js';
import { QueueContext } from './queue-context.js';
import type { FromWorker, ToWorker, WorkerInit } from './messages.js';
import { faultInjection } from './fault-injection.js';

class WorkerLoop {
  private readonly port = parentPort!;
  private readonly queues = new Map<number, QueueContext>();
  /** the same contexts as an array: the loop walks it every pass */
  private list: QueueContext[] = [];
  private exiting = false;
  private pollFds = new Int32Array(1);
  private revents = new Int32Array(1);
  /** poll events per fd: POLLIN, or what a completion source asks for (POLLOUT while its send is pending) */
  private pollEvents = new Int32Array(1);
  /** per poll slot: the context whose kick (or completion fd) it is; null for the control fd */
  private owners: (QueueContext | null)[] = [];
  private kickSlot: boolean[] = [];
  /** adaptive busy-poll window before sleeping, in ms (0 = off); at most init.pollUs */
  private readonly pollMaxMs: number;
  private pollMs: number;

  constructor(private readonly init: WorkerInit) {
    this.pollMaxMs = Math.max(0, init.pollUs) / 1000;
    this.pollMs = this.pollMaxMs;
  }

  private post(m: FromWorker): void {
    this.port.postMessage(m);
  }

  run(): void {
    for (;;) {
      this.handleControl();
      if (this.exiting) break;
      let progressed = false;
      for (const q of this.list) {
        // Outside the try: an injected death ends the thread, as an uncaught bug would.
        if (faultInjection.armed) faultInjection.maybeDie(q.init.exportId, q.init.queueIndex, q.stats, () => q.hasRequests());
        try {
          if (q.step()) progressed = true;
        } catch (e) {
          // Whatever went wrong stays with this queue: the thread and its other queues live on.
          q.fault(e);
        }
      }
      if (progressed) continue;
      if (this.pollMs > 0 && this.busyPoll()) continue;
      let pending = false;
      for (const q of this.list) if (q.armKick()) pending = true;
      if (pending) continue;
      this.sleep();
    }
    for (const q of this.list) q.close();
  }

  /**
   * Spins for up to the poll window waiting for new avail entries, I/O completions or control
   * messages on any queue; returns true if one arrived. The window adapts: it shrinks when
   * polling did not pay.
   */
  private busyPoll(): boolean {
    const until = performance.now() + this.pollMs;
    const list = this.list;
    let spins = 0;
    for (;;) {
      for (let i = 0; i < list.length; i++) {
        const q = list[i]!;
        try {
          if (q.pollOnce()) return true;
        } catch (e) {
          q.fault(e);
          return true;
        }
      }
      if ((++spins & 7) === 0) {
        if (this.handleControl()) return true;
        for (let i = 0; i < list.length; i++) if (list[i]!.ctx.hasDueTimer()) return true;
        if (performance.now() >= until) {
          // Nothing came within the window: halve it (it regrows after short sleeps).
          this.pollMs = this.pollMs / 2 < 0.001 ? 0.001 : this.pollMs / 2;
          return false;
        }
      }
    }
  }

  private sleep(): void {
    let need = 1;
    for (const q of this.list) need += 2 + q.ctx.sources.length;
    if (this.pollFds.length < need) {
      this.pollFds = new Int32Array(need);
      this.revents = new Int32Array(need);
      this.pollEvents = new Int32Array(need);
    }
    const fds = this.pollFds;
    const events = this.pollEvents;
    events.fill(POLLIN);
    const owners = this.owners;
    const kickSlot = this.kickSlot;
    let n = 0;
    owners[n] = null;
    fds[n++] = this.init.ctrlFd;
    let timeout = -1;
    for (const q of this.list) {
      const kick = q.kickFd;
      if (kick >= 0) {
        owners[n] = q;
        kickSlot[n] = true;
        fds[n++] = kick;
      }
      const io = q.ioFd;
      if (io >= 0) {
        owners[n] = q;
        kickSlot[n] = false;
        fds[n++] = io;
      }
      // rbd/nbd clients: readable means completions (or a connection event) to service
      for (const src of q.ctx.sources) {
        const fd = src.pollFd;
        if (fd < 0) continue;
        owners[n] = q;
        kickSlot[n] = false;
        events[n] = src.pollEvents ?? POLLIN;
        fds[n++] = fd;
      }
      const t = q.ctx.msToNextTimer();
      if (t >= 0 && (timeout < 0 || t < timeout)) timeout = t;
    }
    const t0 = this.pollMaxMs > 0 ? performance.now() : 0;
    native.pollWait(fds, n, this.revents, timeout, events);
    // A sleep shorter than the longest window would have been caught by polling: grow it.
    if (this.pollMaxMs > 0 && performance.now() - t0 < this.pollMaxMs) this.pollMs = Math.min(this.pollMaxMs, this.pollMs * 2);
    for (let i = 0; i < n; i++) {
      const ev = this.revents[i]!;
      const q = owners[i]!;
      if (q === null) {
        if ((ev & POLLIN) !== 0) native.eventfdRead(fds[i]!);
        continue;
      }
      if (!kickSlot[i]) continue; // completions are reaped by the next step
      try {
        // A kick fd that poll cannot wait on would turn this sleep into a spin.
        if ((ev & (POLLNVAL | POLLERR)) !== 0) throw new BrokenQueueError(`kick fd ${fds[i]} cannot be polled (revents 0x${ev.toString(16)})`);
        if ((ev & POLLIN) !== 0) q.kicked();
      } catch (e) {
        q.fault(e);
      }
    }
  }

  /** Applies queued control messages; returns true if there were any. */
  private handleControl(): boolean {
    for (let any = false; ; any = true) {
      const got = receiveMessageOnPort(this.port);
      if (got === undefined) return any;
      const m = got.message as ToWorker;
      try {
        this.apply(m);
      } catch (e) {
        this.post({ type: 'ack', seq: m.seq, error: (e as Error).message });
      }
    }
  }

  private apply(m: ToWorker): void {
    switch (m.type) {
      case 'ready':
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'exit':
        this.exiting = true;
        this.post({ type: 'ack', seq: m.seq });
        return;
      case 'add-queue': {
        if (this.queues.has(m.qid)) throw new Error(`queue id ${m.qid} is already on this worker`);
        const q = new QueueContext(m.qid, m.init, (msg) => this.post(msg));
        this.queues.set(m.qid, q);
        this.list = [...this.queues.values()];
        this.post({ type: 'ack', seq: m.seq });
        return;
      }
      case 'remove-queue': {
        const q = this.queues.get(m.qid);
        if (q !== undefined) {
          this.queues.delete(m.qid);
          this.list = [...this.queues.values()];
          q.close();
        }
        this.post({ type: 'ack', seq: m.seq });
        return;
      }
      default: {
        const q = this.queues.get(m.qid);
        if (q === undefined) throw new Error(`no queue ${m.qid} on this worker`);
        q.apply(m);
      }
    }
  }
}

new WorkerLoop(workerData as WorkerInit).run();
