// What the vhost-user Session needs from a device. The Session knows nothing about blk; the
// device knows nothing about the wire format.
import type { MemoryRegion } from './codec.js';

export interface RegionWithFd extends MemoryRegion {
  fd: number;
}

/** Everything a queue worker needs to run one ring. fds stay owned by the Session. */
export interface VringSetup {
  index: number;
  size: number;
  descUserAddr: number;
  availUserAddr: number;
  usedUserAddr: number;
  /** next avail index to process (split: bits 0-15) */
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  eventIdx: boolean;
  indirect: boolean;
  packed: boolean;
  /** guest-physical address where the ring's device-written area is logged (VHOST_VRING_F_LOG), or -1 */
  logGuestAddr: number;
}

/** The dirty-log bitmap of SET_LOG_BASE: [mmapOffset, mmapOffset + mmapSize) of fd */
export interface DirtyLogRegion {
  fd: number;
  mmapSize: number;
  mmapOffset: number;
}

export interface VhostBackend {
  readonly numQueues: number;
  readonly maxQueueSize: number;
  /** virtio feature bits the device offers (including VHOST_USER_F_PROTOCOL_FEATURES) */
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  /** the full device config space */
  getConfig(): Uint8Array;
  /** resolves false to refuse the write (read-only field); true once the device acts on it (the REPLY_ACK follows) */
  setConfig(offset: number, data: Uint8Array, flags: number): Promise<boolean>;
  /** resolves once the device runs with what the features imply (the write-cache mode) */
  setAckedFeatures(features: bigint): Promise<void>;
  /**
   * maps the table once for the process and gives every worker a view; the fds are not used once it
   * resolves. Rejects with a ProtocolError, leaving nothing of the new table mapped, if a region cannot be mapped.
   */
  setMemTable(regions: readonly RegionWithFd[]): Promise<void>;
  /** (re)configures a ring; resolves once the worker applied it and no longer uses older fds */
  configureQueue(setup: VringSetup): Promise<void>;
  /** stops a ring after its in-flight requests complete; resolves with the next avail index */
  stopQueue(index: number): Promise<number>;
  /** stop every ring and forget guest memory (disconnect, RESET_DEVICE) */
  reset(): Promise<void>;
  /** maps the dirty-log bitmap (SET_LOG_BASE) for every worker; the fd is not used once it resolves */
  setDirtyLog(region: DirtyLogRegion): Promise<void>;
  /** the inflight tracking region from SET_INFLIGHT_FD (fd stays owned by the Session) */
  setInflight(region: InflightRegion | null): Promise<void>;
  /** the channel for backend-initiated messages, or null when it goes away */
  setBackendChannel(channel: BackendChannel | null): void;
  /**
   * Called with a reason when the device lost part of itself (a queue worker died) and the
   * session must end; null to stop listening.
   */
  onLost(listener: ((reason: Error) => void) | null): void;
  /** resolves once the device is whole again (dead workers replaced); the next session waits for it */
  recover(): Promise<void>;
}

/** The device refuses a request for a reason of its own (not a protocol error): the connection closes with this message. */
export class DeviceRefusal extends Error {}

/** The device lost a queue under the message (its worker thread died): the session ends, the device recovers. */
export class DeviceLost extends Error {}

export interface InflightRegion {
  fd: number;
  mmapSize: number;
  mmapOffset: number;
  numQueues: number;
  queueSize: number;
}

export interface BackendChannel {
  /** tells the frontend that the config space changed (resize) */
  configChanged(): void;
}
