// The vhost-user protocol state machine for one frontend connection. It validates every message
// against the negotiated state, owns every fd the frontend sent until the backend is done with
// it, and replies in the exact format QEMU checks. Any ProtocolError closes the connection.
import fs from 'node:fs';
import { native } from '../native/index.js';
import type { Logger } from '../log.js';
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_VERSION,
  F,
  MAX_MEM_SLOTS,
  PF,
  Request,
  VRING_F_LOG,
  bit,
  hasBit,
  requestName,
} from './constants.js';
import {
  ProtocolError,
  configPayload,
  decodePayload,
  inflightPayload,
  encodeMessage,
  encodeReply,
  u64Payload,
  vringStatePayload,
  type Message,
} from './codec.js';
import { Connection, PeerGoneError, type Frame } from './connection.js';
import { DeviceLost, DeviceRefusal, type BackendChannel, type InflightRegion, type RegionWithFd, type VhostBackend, type VringSetup } from './backend.js';
import { inflightQueueBytes } from '../virtio/inflight.js';

/** 1 bit per 4 KiB page: 4 GiB of log covers 128 TiB of guest memory (and is what one mapping may hold) */
const MAX_LOG_BYTES = 2 ** 32;

interface Vring {
  size: number;
  /** log: log_guest_addr when VHOST_VRING_F_LOG is set, else -1 */
  addr: { desc: number; avail: number; used: number; log: number } | null;
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  started: boolean;
}

function freshVring(): Vring {
  return { size: 0, addr: null, base: 0, kickFd: -1, callFd: -1, errFd: -1, enabled: false, started: false };
}

export class Session {
  private readonly conn: Connection;
  private readonly vrings: Vring[];
  private ackedFeatures = 0n;
  private featuresSet = false;
  private ackedProtocol = 0n;
  private regions: RegionWithFd[] = [];
  private backendReqFd = -1;
  private inflight: InflightRegion | null = null;
  /** SET_LOG_FD's eventfd: kept for the frontend's sake, QEMU reads the shared bitmap itself */
  private logFd = -1;
  private queue: Promise<void> = Promise.resolve();
  private pending = 0;
  private closedResolve!: () => void;
  /** resolves when the connection is gone and the backend has been reset */
  readonly closed: Promise<void>;

  constructor(
    fd: number,
    private readonly backend: VhostBackend,
    private readonly log: Logger,
  ) {
    this.vrings = Array.from({ length: backend.numQueues }, freshVring);
    this.closed = new Promise((r) => (this.closedResolve = r));
    this.conn = new Connection(fd, {
      frame: (f) => this.enqueue(f),
      closed: (reason) => this.onClosed(reason),
    });
    backend.onLost((reason) => this.conn.close(reason));
  }

  /** Close the connection (daemon shutdown). */
  close(): void {
    this.conn.close(null);
  }

  private enqueue(frame: Frame): void {
    // Messages are handled strictly in order; reading pauses while one is being handled so a
    // slow GET_VRING_BASE (waiting for in-flight I/O) does not let later messages overtake it.
    this.pending++;
    this.conn.pause();
    this.queue = this.queue.then(async () => {
      try {
        if (this.conn.isOpen) await this.handleFrame(frame);
        else frame.fds.forEach((fd) => native.close(fd));
      } catch (e) {
        const err = e instanceof Error ? e : new Error(String(e));
        if (!(err instanceof ProtocolError) && !(err instanceof DeviceRefusal) && !(err instanceof PeerGoneError) && !(err instanceof DeviceLost)) this.log.error({ err }, 'internal error while handling a message');
        this.conn.close(err);
      } finally {
        if (--this.pending === 0) this.conn.resume();
      }
    });
  }

  private async handleFrame(frame: Frame): Promise<void> {
    const { header } = frame;
    let message: Message;
    try {
      message = decodePayload(header, frame.payload, frame.fds);
    } catch (e) {
      frame.fds.forEach((fd) => native.close(fd));
      throw e;
    }
    this.log.debug({ request: requestName(header.request), size: header.size, fds: frame.fds.length }, 'message');
    const fds = frame.fds;
    const needAck = (header.flags & FLAG_NEED_REPLY) !== 0 && hasBit(this.ackedProtocol, PF.REPLY_ACK);
    let ok = true;
    try {
      ok = await this.handle(message, fds);
    } catch (e) {
      // Refused: the connection goes away (the caller logs why). Every fd of this message that no
      // state took ownership of is closed here, whichever check failed.
      for (const fd of fds) if (!this.ownsFd(fd)) native.close(fd);
      throw e;
    }
    if (needAck && !hasOwnReply(message.request)) {
      this.conn.send(encodeReply(header.request, u64Payload(ok ? 0 : 1)));
    }
  }

  private ownsFd(fd: number): boolean {
    if (fd === this.backendReqFd || fd === this.inflight?.fd || fd === this.logFd) return true;
    if (this.regions.some((r) => r.fd === fd)) return true;
    return this.vrings.some((v) => v.kickFd === fd || v.callFd === fd || v.errFd === fd);
  }

  private vring(index: number, what: string): Vring {
    const v = this.vrings[index];
    if (index >= this.vrings.length || v === undefined) {
      throw new ProtocolError(`${what}: vring index ${index} out of range (device has ${this.vrings.length} queues)`);
    }
    return v;
  }

  private reply(request: Request, payload: Uint8Array, fds: number[] = []): void {
    this.conn.send(encodeReply(request, payload), fds);
  }

  /** Returns false for a refused-but-harmless request (REPLY_ACK answers 1). */
  private async handle(m: Message, fds: number[]): Promise<boolean> {
    const b = this.backend;
    switch (m.request) {
      case Request.GET_FEATURES:
        this.reply(m.request, u64Payload(b.features));
        return true;
      case Request.SET_FEATURES: {
        const extra = m.value & ~b.features;
        if (extra !== 0n) throw new ProtocolError(`SET_FEATURES acks unoffered bits 0x${extra.toString(16)}`);
        // QEMU re-sends features on running rings only to toggle dirty logging; a running ring
        // cannot change its layout (split <-> packed) under the driver.
        const running = this.vrings.findIndex((v) => v.started);
        if (running >= 0 && this.featuresSet && ((m.value ^ this.ackedFeatures) & bit(F.RING_PACKED)) !== 0n) {
          throw new ProtocolError(`SET_FEATURES switches RING_PACKED while ring ${running} is running`);
        }
        this.ackedFeatures = m.value;
        this.featuresSet = true;
        await b.setAckedFeatures(m.value);
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled (spec, "Ring states").
        if (!hasBit(m.value, F.PROTOCOL_FEATURES)) for (const v of this.vrings) v.enabled = true;
        await this.reconfigureStarted();
        return true;
      }
      case Request.GET_PROTOCOL_FEATURES:
        this.reply(m.request, u64Payload(b.protocolFeatures));
        return true;
      case Request.SET_PROTOCOL_FEATURES: {
        const extra = m.value & ~b.protocolFeatures;
        if (extra !== 0n) throw new ProtocolError(`SET_PROTOCOL_FEATURES acks unoffered bits 0x${extra.toString(16)}`);
        this.ackedProtocol = m.value;
        return true;
      }
      case Request.GET_QUEUE_NUM:
        this.reply(m.request, u64Payload(b.numQueues));
        return true;
      case Request.GET_MAX_MEM_SLOTS:
        this.reply(m.request, u64Payload(MAX_MEM_SLOTS));
        return true;
      case Request.SET_OWNER:
        return true;
      case Request.RESET_OWNER:
      case Request.RESET_DEVICE:
        await this.resetDevice();
        return true;
      case Request.GET_STATUS:
        this.reply(m.request, u64Payload(0));
        return true;
      case Request.SET_STATUS:
        return true;
      case Request.SET_MEM_TABLE: {
        const regions = m.regions.map((r, i) => ({ ...r, fd: fds[i]! }));
        regions.forEach(checkRegionFile);
        await b.setMemTable(regions);
        const old = this.regions;
        this.regions = regions;
        old.forEach((r) => native.close(r.fd));
        return true;
      }
      case Request.ADD_MEM_REG: {
        if (this.regions.length >= MAX_MEM_SLOTS) {
          throw new ProtocolError(`ADD_MEM_REG: already ${this.regions.length} regions (max ${MAX_MEM_SLOTS})`);
        }
        checkRegionFile({ ...m.region, fd: fds[0]! });
        const regions = [...this.regions, { ...m.region, fd: fds[0]! }];
        await b.setMemTable(regions);
        this.regions = regions;
        return true;
      }
      case Request.REM_MEM_REG: {
        const r = m.region;
        const i = this.regions.findIndex(
          (x) => x.guestPhysAddr === r.guestPhysAddr && x.userAddr === r.userAddr && x.size === r.size,
        );
        if (i < 0) {
          this.log.warn({ gpa: r.guestPhysAddr, size: r.size }, 'REM_MEM_REG for an unknown region');
          fds.forEach((fd) => native.close(fd)); // the spec lets a frontend send a stray fd here
          return false;
        }
        const removed = this.regions[i]!;
        const regions = this.regions.filter((_, k) => k !== i);
        await b.setMemTable(regions);
        this.regions = regions;
        native.close(removed.fd);
        fds.forEach((fd) => native.close(fd));
        return true;
      }
      case Request.SET_VRING_NUM: {
        const v = this.vring(m.index, 'SET_VRING_NUM');
        // Split rings need a power of two; packed rings only a size within bounds.
        const packed = hasBit(this.ackedFeatures, F.RING_PACKED);
        if (m.num === 0 || m.num > b.maxQueueSize || (!packed && (m.num & (m.num - 1)) !== 0)) {
          throw new ProtocolError(`SET_VRING_NUM: size ${m.num} must be ${packed ? 'in' : 'a power of two in'} 1..${b.maxQueueSize}`);
        }
        v.size = m.num;
        return true;
      }
      case Request.SET_VRING_BASE: {
        const v = this.vring(m.index, 'SET_VRING_BASE');
        // Split: the next avail index. Packed: avail idx | wrap << 15 | used idx << 16 | wrap << 31.
        if (m.num > 0xffff && !hasBit(this.ackedFeatures, F.RING_PACKED)) throw new ProtocolError(`SET_VRING_BASE: base ${m.num} out of range`);
        v.base = m.num;
        return true;
      }
      case Request.SET_VRING_ADDR: {
        const v = this.vring(m.addr.index, 'SET_VRING_ADDR');
        if ((m.addr.flags & ~VRING_F_LOG) !== 0) throw new ProtocolError(`SET_VRING_ADDR: unknown flags 0x${m.addr.flags.toString(16)}`);
        const log = (m.addr.flags & VRING_F_LOG) !== 0 ? m.addr.logGuestAddr : -1;
        v.addr = { desc: m.addr.descUserAddr, avail: m.addr.availUserAddr, used: m.addr.usedUserAddr, log };
        if (v.started) await this.configure(m.addr.index);
        return true;
      }
      case Request.SET_VRING_KICK:
      case Request.SET_VRING_CALL:
      case Request.SET_VRING_ERR: {
        const v = this.vring(m.index, requestName(m.request));
        const fd = m.noFd ? -1 : fds[0]!;
        if (fd >= 0) checkEventFd(fd, requestName(m.request));
        const key = m.request === Request.SET_VRING_KICK ? 'kickFd' : m.request === Request.SET_VRING_CALL ? 'callFd' : 'errFd';
        const old = v[key];
        const wasStarted = v.started;
        v[key] = fd;
        // A kick fd starts the ring (spec: rings are started by a kick).
        if (m.request === Request.SET_VRING_KICK && v.size > 0 && v.addr !== null) v.started = true;
        try {
          if (v.started) await this.configure(m.index);
        } catch (e) {
          // The worker kept its old setup: the old fd stays ours (it may still be in use), the new one is dropped.
          v[key] = old;
          v.started = wasStarted;
          throw e;
        }
        // Only now does no thread use the old fd any more.
        if (old >= 0) native.close(old);
        return true;
      }
      case Request.SET_VRING_ENABLE: {
        const v = this.vring(m.index, 'SET_VRING_ENABLE');
        if (!hasBit(this.ackedFeatures, F.PROTOCOL_FEATURES) && this.featuresSet) {
          throw new ProtocolError('SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES negotiated');
        }
        if (m.num > 1) throw new ProtocolError(`SET_VRING_ENABLE: value ${m.num} is not 0 or 1`);
        v.enabled = m.num === 1;
        if (v.started) await this.configure(m.index);
        return true;
      }
      case Request.GET_VRING_BASE: {
        const v = this.vring(m.index, 'GET_VRING_BASE');
        let next = v.base;
        if (v.started) next = await b.stopQueue(m.index);
        v.started = false;
        v.base = next;
        for (const key of ['kickFd', 'callFd'] as const) {
          if (v[key] >= 0) native.close(v[key]);
          v[key] = -1;
        }
        this.reply(m.request, vringStatePayload(m.index, next));
        return true;
      }
      case Request.VRING_KICK:
        throw new ProtocolError('VRING_KICK without INBAND_NOTIFICATIONS');
      case Request.GET_CONFIG: {
        const space = b.getConfig();
        const out = new Uint8Array(m.config.size);
        out.set(space.subarray(m.config.offset, m.config.offset + m.config.size));
        this.reply(m.request, configPayload(m.config.offset, m.config.flags, out));
        return true;
      }
      case Request.SET_CONFIG:
        return await b.setConfig(m.config.offset, m.config.data, m.config.flags);
      case Request.SET_BACKEND_REQ_FD: {
        if (this.backendReqFd >= 0) native.close(this.backendReqFd);
        this.backendReqFd = fds[0]!;
        // Our end only (QEMU keeps the other end of its socketpair): a frontend that stops
        // reading it must cost a dropped notification, never a blocked main thread.
        try {
          native.setBlocking(this.backendReqFd, false);
        } catch (err) {
          throw new ProtocolError(`SET_BACKEND_REQ_FD: not a usable fd (${(err as Error).message})`);
        }
        b.setBackendChannel(this.backendChannel());
        return true;
      }
      case Request.SET_LOG_BASE: {
        if (!hasBit(this.ackedProtocol, PF.LOG_SHMFD)) throw new ProtocolError('SET_LOG_BASE without LOG_SHMFD negotiated');
        const { mmapSize, mmapOffset } = m.log;
        if (mmapSize === 0 || mmapSize > MAX_LOG_BYTES) throw new ProtocolError(`SET_LOG_BASE: a log of ${mmapSize} bytes is invalid (1..${MAX_LOG_BYTES})`);
        checkFileCovers(fds[0]!, mmapOffset, mmapSize, 'dirty log');
        await b.setDirtyLog({ fd: fds[0]!, mmapSize, mmapOffset });
        native.close(fds.splice(0, 1)[0]!); // mapped (the mapping keeps the file); out of fds, so no error path closes it again
        this.log.info({ bytes: mmapSize }, 'dirty log mapped');
        // QEMU waits for this reply before it frees the old log
        if (this.conn.isOpen) this.reply(m.request, u64Payload(0));
        return true;
      }
      case Request.SET_LOG_FD: {
        checkEventFd(fds[0]!, 'SET_LOG_FD');
        if (this.logFd >= 0) native.close(this.logFd);
        this.logFd = fds[0]!;
        return true;
      }
      case Request.GET_INFLIGHT_FD:
      case Request.SET_INFLIGHT_FD: {
        if (!hasBit(this.ackedProtocol, PF.INFLIGHT_SHMFD)) {
          throw new ProtocolError(`${requestName(m.request)} without INFLIGHT_SHMFD negotiated`);
        }
        const { numQueues, queueSize } = m.inflight;
        const perQueue = inflightQueueBytes(queueSize);
        if (numQueues === 0 || numQueues > b.numQueues || queueSize === 0 || queueSize > b.maxQueueSize || (queueSize & (queueSize - 1)) !== 0) {
          throw new ProtocolError(`${requestName(m.request)}: ${numQueues} queues of ${queueSize} is invalid for this device`);
        }
        if (m.request === Request.GET_INFLIGHT_FD) {
          const mmapSize = numQueues * perQueue;
          const fd = native.memfdCreate('vubd-inflight', mmapSize);
          try {
            this.reply(m.request, inflightPayload({ mmapSize, mmapOffset: 0, numQueues, queueSize }), [fd]);
          } finally {
            native.close(fd);
          }
          return true;
        }
        if (m.inflight.mmapSize < numQueues * perQueue || m.inflight.mmapOffset % 4096 !== 0) {
          throw new ProtocolError(`SET_INFLIGHT_FD: region of ${m.inflight.mmapSize} bytes at ${m.inflight.mmapOffset} is too small or misaligned`);
        }
        checkFileCovers(fds[0]!, m.inflight.mmapOffset, m.inflight.mmapSize, 'inflight region');
        const old = this.inflight;
        this.inflight = { fd: fds[0]!, mmapSize: m.inflight.mmapSize, mmapOffset: m.inflight.mmapOffset, numQueues, queueSize };
        try {
          await b.setInflight(this.inflight);
        } finally {
          if (old) native.close(old.fd); // workers keep their mappings, not the fd; the old region is no longer ours
        }
        return true;
      }
    }
  }

  private backendChannel(): BackendChannel {
    const fd = this.backendReqFd;
    return {
      configChanged: () => {
        if (fd !== this.backendReqFd || fd < 0) return;
        const msg = encodeMessage(BackendRequest.CONFIG_CHANGE_MSG, FLAG_VERSION, new Uint8Array(0));
        try {
          const n = native.sendMsg(fd, msg, 0, msg.byteLength, []);
          if (n !== msg.byteLength) {
            this.log.warn({ sent: n }, 'CONFIG_CHANGE_MSG dropped: the frontend is not reading its backend channel');
          }
        } catch (err) {
          this.log.warn({ err }, 'could not send CONFIG_CHANGE_MSG to the frontend');
        }
      },
    };
  }

  private setupOf(index: number): VringSetup {
    const v = this.vrings[index]!;
    return {
      index,
      size: v.size,
      descUserAddr: v.addr!.desc,
      availUserAddr: v.addr!.avail,
      usedUserAddr: v.addr!.used,
      base: v.base,
      kickFd: v.kickFd,
      callFd: v.callFd,
      errFd: v.errFd,
      enabled: v.enabled,
      eventIdx: hasBit(this.ackedFeatures, F.RING_EVENT_IDX),
      indirect: hasBit(this.ackedFeatures, F.RING_INDIRECT_DESC),
      packed: hasBit(this.ackedFeatures, F.RING_PACKED),
      logGuestAddr: v.addr!.log,
    };
  }

  private async configure(index: number): Promise<void> {
    await this.backend.configureQueue(this.setupOf(index));
  }

  private async reconfigureStarted(): Promise<void> {
    for (let i = 0; i < this.vrings.length; i++) if (this.vrings[i]!.started) await this.configure(i);
  }

  private async resetDevice(): Promise<void> {
    await this.backend.reset();
    for (let i = 0; i < this.vrings.length; i++) {
      const v = this.vrings[i]!;
      for (const key of ['kickFd', 'callFd', 'errFd'] as const) if (v[key] >= 0) native.close(v[key]);
      this.vrings[i] = freshVring();
    }
    this.ackedFeatures = 0n;
    this.featuresSet = false;
  }

  private onClosed(reason: Error | null): void {
    if (reason) this.log.warn({ reason: reason.message }, 'vhost-user connection closed');
    else this.log.info('frontend disconnected');
    // Wait for the message in progress, then stop all rings, then release every fd.
    this.queue = this.queue.then(async () => {
      try {
        await this.resetDevice();
      } catch (err) {
        this.log.error({ err }, 'error while resetting the device after disconnect');
      }
      this.regions.forEach((r) => native.close(r.fd));
      this.regions = [];
      this.backend.setBackendChannel(null);
      if (this.inflight) native.close(this.inflight.fd);
      this.inflight = null;
      if (this.backendReqFd >= 0) native.close(this.backendReqFd);
      this.backendReqFd = -1;
      if (this.logFd >= 0) native.close(this.logFd);
      this.logFd = -1;
      this.backend.onLost(null);
      try {
        await this.backend.recover();
      } catch (err) {
        this.log.error({ err }, 'the device could not be restored for the next frontend');
      }
      this.closedResolve();
    });
  }
}

/**
 * A region must lie inside its file: mapping past the end succeeds but the first access would
 * kill the daemon with SIGBUS.
 */
function checkRegionFile(r: RegionWithFd): void {
  checkFileCovers(r.fd, r.mmapOffset, r.size, 'memory region');
}

/** Refuses an fd that is not a regular file holding [offset, offset + size) (memfd, hugetlbfs, shm, tmpfile). */
function checkFileCovers(fd: number, offset: number, size: number, what: string): void {
  let fileSize: number;
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new ProtocolError(`${what} fd is not a regular file (memfd, hugetlbfs or shm expected)`);
    fileSize = st.size;
  } catch (e) {
    if (e instanceof ProtocolError) throw e;
    throw new ProtocolError(`${what} fd cannot be examined: ${(e as Error).message}`);
  }
  if (offset + size > fileSize) {
    throw new ProtocolError(`${what} [${offset}, ${offset + size}) lies beyond the end of its ${fileSize}-byte file`);
  }
  if (!openReadWrite(fd)) throw new ProtocolError(`${what} fd is not open for reading and writing (a shared writable mapping needs O_RDWR)`);
}

/**
 * Kick, call and err fds must be eventfds: a worker reads and writes them as 8-byte counters,
 * and a pipe or file there would make it fail or block. They are made non-blocking, so a
 * saturated counter (a frontend can write 2^64-2 into it) never blocks a worker in write(2).
 */
function checkEventFd(fd: number, what: string): void {
  const info = fdInfo(fd);
  if (info instanceof Error) throw new ProtocolError(`${what}: fd cannot be examined: ${info.message}`);
  if (!/^eventfd-count:/m.test(info)) throw new ProtocolError(`${what}: fd is not an eventfd`);
  try {
    native.setBlocking(fd, false);
  } catch (e) {
    throw new ProtocolError(`${what}: cannot make the eventfd non-blocking: ${(e as Error).message}`);
  }
}

/** The fd's access mode from /proc/self/fdinfo (true where that cannot be read: the mmap then reports it). */
function openReadWrite(fd: number): boolean {
  const info = fdInfo(fd);
  if (info instanceof Error) return true;
  const m = /^flags:\s*([0-7]+)/m.exec(info);
  return m === null || (parseInt(m[1]!, 8) & 3) === 2; // O_ACCMODE == O_RDWR
}

/** /proc/self/fdinfo of one of our fds, or why it could not be read. */
function fdInfo(fd: number): string | Error {
  try {
    return fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  } catch (e) {
    return e as Error;
  }
}

function hasOwnReply(r: Request): boolean {
  return (
    r === Request.GET_FEATURES ||
    r === Request.GET_PROTOCOL_FEATURES ||
    r === Request.GET_QUEUE_NUM ||
    r === Request.GET_MAX_MEM_SLOTS ||
    r === Request.GET_VRING_BASE ||
    r === Request.GET_CONFIG ||
    r === Request.GET_INFLIGHT_FD ||
    r === Request.SET_LOG_BASE ||
    r === Request.GET_STATUS
  );
}

export { bit };
