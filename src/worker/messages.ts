// Messages between the main thread and a pool worker (and the queue contexts it serves). Plain data only: no shared mutable objects.
import type { ChunkSpec } from '../virtio/memory.js';
import type { InflightRegion, VringSetup } from '../protocol/backend.js';
import type { NodeSpec } from '../graph/nodes.js';

/** what a pool worker thread starts with */
export interface WorkerInit {
  /** the worker's index in the pool (its name: worker0, worker1, ...) */
  index: number;
  ctrlFd: number;
  /** adaptive busy-poll window before sleeping (the thread's, covering all its queues) */
  pollUs: number;
  logLevel: string;
}

/** what a queue context starts with: one (export, queue) placed on a worker */
export interface QueueInit {
  exportId: string;
  queueIndex: number;
  aio: 'io_uring' | 'sync';
  maxQueueSize: number;
  node: NodeSpec;
  generation: number;
  serial: Uint8Array;
  writeback: boolean;
  readOnly: boolean;
  /** bytes (512 or 4096): requests not aligned to it get IOERR */
  logicalBlockSize: number;
  /** Int32Array over a SharedArrayBuffer: see StatIndex */
  stats: SharedArrayBuffer;
}

/** the dirty-log bitmap: a process-wide mapping (native.mapShared) and where the bitmap lies in it */
export interface DirtyLogView {
  mapping: number;
  offset: number;
  size: number;
}

/** Messages to one queue context on a worker, keyed by its pool-wide queue id. */
export type ToQueue = { qid: number } & (
  /** views of the chunks the main thread mapped (ids, not fds: nothing to close) */
  | { type: 'memtable'; seq: number; chunks: readonly ChunkSpec[] }
  | { type: 'configure'; seq: number; setup: VringSetup }
  | { type: 'inflight'; seq: number; region: InflightRegion | null }
  | { type: 'stop'; seq: number }
  | { type: 'reset'; seq: number }
  | { type: 'set-node'; seq: number; node: NodeSpec; generation: number }
  | { type: 'set-writeback'; seq: number; writeback: boolean }
  /** enabled: VHOST_F_LOG_ALL; pages are marked while enabled and a log is given */
  | { type: 'dirty-log'; seq: number; log: DirtyLogView | null; enabled: boolean }
  | { type: 'drain'; seq: number }
  | { type: 'undrain'; seq: number }
);

export type ToWorker =
  /** answered once the worker's loop runs: start-up waits for every worker before listening */
  | { type: 'ready'; seq: number }
  /** places a queue on this worker (an export starting, or a queue replacing a dead one) */
  | { type: 'add-queue'; seq: number; qid: number; init: QueueInit }
  /** the queue goes: requests still in flight are abandoned, its mappings dropped */
  | { type: 'remove-queue'; seq: number; qid: number }
  | { type: 'exit'; seq: number }
  | ToQueue;

export type FromWorker =
  | { type: 'ack'; seq: number; lastAvail?: number; error?: string }
  /** qid: the queue the line is about (routed to its export's logger), absent for the worker itself */
  | { type: 'log'; level: 'warn' | 'error' | 'info'; msg: string; qid?: number; data?: Record<string, unknown> };

/** Int32 slots of the shared stats block (Atomics readable from the main thread). */
export const enum StatIndex {
  READ_OPS = 0,
  WRITE_OPS = 1,
  FLUSH_OPS = 2,
  OTHER_OPS = 3,
  ERRORS = 4,
  IN_FLIGHT = 5,
  /** KiB moved, to keep within int32 for long runs (wraps are tolerated by readers) */
  READ_KIB = 6,
  WRITE_KIB = 7,
  NOTIFIES = 8,
  KICKS = 9,
  STATE = 10,
  /** requests that completed under a newer graph generation than they started with (must stay 0) */
  STALE = 11,
  DRAINS = 12,
  /** test-only: VUBD_TEST_FAULT already fired for this queue */
  FAULT_FIRED = 13,
  /** the I/O engine serving the queue: 0 none yet, 1 sync, 2 io_uring */
  ENGINE = 14,
  /** latency histogram: bucket b counts requests that took [2^(b-1), 2^b) microseconds */
  HIST_BASE = 16,
  HIST_BUCKETS = 24,
  COUNT = 40,
}

export const enum QueueState {
  IDLE = 0,
  RUNNING = 1,
  DRAINED = 2,
  BROKEN = 3,
}
