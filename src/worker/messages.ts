// Messages between the main thread and a queue worker. Plain data only: no shared mutable objects.
import type { ChunkSpec } from '../virtio/memory.js';
import type { InflightRegion, VringSetup } from '../protocol/backend.js';
import type { NodeSpec } from '../graph/nodes.js';

export interface WorkerInit {
  queueIndex: number;
  ctrlFd: number;
  aio: 'io_uring' | 'sync';
  maxQueueSize: number;
  node: NodeSpec;
  generation: number;
  serial: Uint8Array;
  writeback: boolean;
  readOnly: boolean;
  /** bytes (512 or 4096): requests not aligned to it get IOERR */
  logicalBlockSize: number;
  logLevel: string;
  /** Int32Array over a SharedArrayBuffer: see StatIndex */
  stats: SharedArrayBuffer;
  pollUs: number;
}

/** the dirty-log bitmap: a process-wide mapping (native.mapShared) and where the bitmap lies in it */
export interface DirtyLogView {
  mapping: number;
  offset: number;
  size: number;
}

export type ToWorker =
  /** answered once the worker's loop runs: start-up waits for every worker before listening */
  | { type: 'ready'; seq: number }
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
  | { type: 'exit'; seq: number };

export type FromWorker =
  | { type: 'ack'; seq: number; lastAvail?: number; error?: string }
  | { type: 'log'; level: 'warn' | 'error' | 'info'; msg: string; data?: Record<string, unknown> };

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
