// An in-repo vhost-user frontend that does what QEMU does: memfd guest memory in two regions,
// eventfds, split rings in guest memory, virtio-blk requests. Blocking and synchronous: the
// backend under test is a separate process.
import { native, POLLIN } from '../../src/native/index.js';
import { F, FLAG_NEED_REPLY, FLAG_VERSION, HEADER_SIZE, PF, Request, bit, hasBit } from '../../src/protocol/constants.js';
import {
  configPayload,
  encodeMessage,
  inflightPayload,
  memTablePayload,
  u64Payload,
  vringAddrPayload,
  logPayload,
  vringStatePayload,
  type MemoryRegion,
} from '../../src/protocol/codec.js';

export const REGION_SIZE = 32 * 2 ** 20;
const UVA_BASE = 0x7f0000000000;

/** Regions larger than this are sparse guests: the test maps (and allocates in) only their first bytes. */
const MAPPED_PREFIX = 2 ** 30;

export class GuestRam {
  /** bytes: what the test process mapped of the region (all of it, or its first MAPPED_PREFIX bytes) */
  readonly regions: { gpa: number; uva: number; size: number; fd: number; bytes: Uint8Array }[] = [];
  private next = 0x1000;
  /** size: of every region, or one entry per region */
  constructor(count = 2, size: number | readonly number[] = REGION_SIZE) {
    let gpa = 0;
    let uva = UVA_BASE;
    for (let i = 0; i < count; i++) {
      const len = typeof size === 'number' ? size : size[i]!;
      const fd = native.memfdCreate(`guest-ram-${i}`, len);
      const buf = native.mmap(fd, Math.min(len, MAPPED_PREFIX), 0, true);
      this.regions.push({ gpa, uva, size: len, fd, bytes: new Uint8Array(buf) });
      // Leave a gap between regions so a buffer cannot silently straddle two of them.
      gpa += len + 0x100000;
      uva += 2 * len;
    }
  }
  get table(): MemoryRegion[] {
    return this.regions.map((r) => ({ guestPhysAddr: r.gpa, size: r.size, userAddr: r.uva, mmapOffset: 0 }));
  }
  /** Bump allocator; `region` picks which region the buffer lands in. */
  alloc(len: number, align = 16, region = 0): number {
    const r = this.regions[region]!;
    if (region > 0) {
      const off = (r as { cursor?: number }).cursor ?? 0x1000;
      const start = Math.ceil(off / align) * align;
      (r as { cursor?: number }).cursor = start + len;
      if (start + len > r.bytes.length) throw new Error('guest RAM exhausted');
      return r.gpa + start;
    }
    const start = Math.ceil(this.next / align) * align;
    this.next = start + len;
    if (this.next > r.bytes.length) throw new Error('guest RAM exhausted');
    return r.gpa + start;
  }
  /** Frees everything allocated in region i (> 0; region 0 holds the rings). */
  resetRegion(i: number): void {
    (this.regions[i] as { cursor?: number }).cursor = 0x1000;
  }
  resetAlloc(): void {
    this.next = 0x1000;
    for (const r of this.regions) (r as { cursor?: number }).cursor = 0x1000;
  }
  private at(gpa: number): { r: GuestRam['regions'][number]; off: number } {
    for (const r of this.regions) if (gpa >= r.gpa && gpa < r.gpa + r.size) return { r, off: gpa - r.gpa };
    throw new Error(`gpa 0x${gpa.toString(16)} not in guest RAM`);
  }
  bytes(gpa: number, len: number): Uint8Array {
    const { r, off } = this.at(gpa);
    return r.bytes.subarray(off, off + len);
  }
  view(gpa: number, len: number): DataView {
    const b = this.bytes(gpa, len);
    return new DataView(b.buffer, b.byteOffset, len);
  }
  uva(gpa: number): number {
    const { r, off } = this.at(gpa);
    return r.uva + off;
  }
  close(): void {
    for (const r of this.regions) native.close(r.fd);
  }
}

export interface Buf {
  gpa: number;
  len: number;
  write: boolean;
}

export class SplitRing {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  kickFd: number;
  callFd: number;
  private freeHead: number[] = [];
  availIdx = 0;
  lastUsed = 0;
  indirectTables: Map<number, number> = new Map();

  constructor(
    readonly ram: GuestRam,
    readonly index: number,
    readonly size: number,
    readonly eventIdx: boolean,
  ) {
    this.desc = ram.alloc(16 * size, 16);
    this.avail = ram.alloc(6 + 2 * size, 2);
    this.used = ram.alloc(6 + 8 * size, 4096);
    ram.bytes(this.desc, 16 * size).fill(0);
    ram.bytes(this.avail, 6 + 2 * size).fill(0);
    ram.bytes(this.used, 6 + 8 * size).fill(0);
    this.kickFd = native.eventfd(true);
    this.callFd = native.eventfd(true);
    for (let i = size - 1; i >= 0; i--) this.freeHead.push(i);
  }

  /** New eventfds, as QEMU makes after a backend restart. */
  reopenFds(): void {
    native.close(this.kickFd);
    native.close(this.callFd);
    this.kickFd = native.eventfd(true);
    this.callFd = native.eventfd(true);
  }

  get free(): number {
    return this.freeHead.length;
  }

  writeDesc(tableGpa: number, i: number, b: { gpa: number; len: number; flags: number; next: number }): void {
    const dv = this.ram.view(tableGpa + 16 * i, 16);
    dv.setBigUint64(0, BigInt(b.gpa), true);
    dv.setUint32(8, b.len, true);
    dv.setUint16(12, b.flags, true);
    dv.setUint16(14, b.next, true);
  }

  /** Adds a chain; returns its head. Uses one descriptor per buffer (or one indirect table). */
  add(bufs: Buf[], indirect = false): number {
    if (indirect) {
      const head = this.freeHead.pop();
      if (head === undefined) throw new Error('ring full');
      const table = this.ram.alloc(16 * bufs.length, 16, 1);
      bufs.forEach((b, k) =>
        this.writeDesc(table, k, { gpa: b.gpa, len: b.len, flags: (b.write ? 2 : 0) | (k + 1 < bufs.length ? 1 : 0), next: k + 1 }),
      );
      this.writeDesc(this.desc, head, { gpa: table, len: 16 * bufs.length, flags: 4, next: 0 });
      this.publishHead(head);
      return head;
    }
    if (this.freeHead.length < bufs.length) throw new Error('ring full');
    const ids = bufs.map(() => this.freeHead.pop()!);
    bufs.forEach((b, k) =>
      this.writeDesc(this.desc, ids[k]!, { gpa: b.gpa, len: b.len, flags: (b.write ? 2 : 0) | (k + 1 < bufs.length ? 1 : 0), next: ids[k + 1] ?? 0 }),
    );
    this.chainIds.set(ids[0]!, ids);
    this.publishHead(ids[0]!);
    return ids[0]!;
  }

  private chainIds = new Map<number, number[]>();

  /** Takes n free descriptor indices for a chain the caller writes by hand (hostile tests); null if too few. */
  takeChain(n: number): number[] | null {
    if (n < 1 || this.freeHead.length < n) return null;
    const ids = Array.from({ length: n }, () => this.freeHead.pop()!);
    this.chainIds.set(ids[0]!, ids);
    return ids;
  }

  /** Raw descriptor write + publish, for hostile chains. */
  addRaw(head: number, descs: { gpa: number; len: number; flags: number; next: number }[]): void {
    descs.forEach((d, k) => this.writeDesc(this.desc, k === 0 ? head : d.next, d));
    this.publishHead(head);
  }

  publishHead(head: number): void {
    const av = this.ram.view(this.avail, 6 + 2 * this.size);
    av.setUint16(4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    const u16 = new Uint16Array(av.buffer, av.byteOffset, 2);
    Atomics.store(u16, 1, this.availIdx);
  }

  kick(): void {
    native.eventfdWrite(this.kickFd, 1);
  }

  usedIdx(): number {
    const b = this.ram.bytes(this.used, 4);
    return Atomics.load(new Uint16Array(b.buffer, b.byteOffset, 2), 1);
  }

  /** Completed (head, len) pairs since the last call. */
  collect(): { head: number; len: number }[] {
    const out: { head: number; len: number }[] = [];
    const idx = this.usedIdx();
    const dv = this.ram.view(this.used, 6 + 8 * this.size);
    while (this.lastUsed !== idx) {
      const slot = this.lastUsed % this.size;
      const head = dv.getUint32(4 + 8 * slot, true);
      const len = dv.getUint32(8 + 8 * slot, true);
      out.push({ head, len });
      const ids = this.chainIds.get(head) ?? [head];
      this.chainIds.delete(head);
      this.freeHead.push(...ids);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    if (this.eventIdx) {
      // used_event: ask for an interrupt on the next completion
      this.ram.view(this.avail + 4 + 2 * this.size, 2).setUint16(0, this.lastUsed, true);
    }
    return out;
  }

  /** Waits for the call eventfd (or polls the used ring) until n completions arrived. */
  waitFor(n: number, timeoutMs = 5000): { head: number; len: number }[] {
    return waitForCompletions(this, n, timeoutMs);
  }

  close(): void {
    native.close(this.kickFd);
    native.close(this.callFd);
  }
}

/** A packed ring, driver side (VIRTIO_F_RING_PACKED). */
export class PackedRing {
  readonly desc: number;
  /** driver event suppression area */
  readonly avail: number;
  /** device event suppression area */
  readonly used: number;
  kickFd: number;
  callFd: number;
  next = 0;
  wrap = true;
  usedNext = 0;
  usedWrap = true;
  private freeIds: number[] = [];
  private descsOf = new Map<number, number>();
  private inRing = 0;

  constructor(
    readonly ram: GuestRam,
    readonly index: number,
    readonly size: number,
  ) {
    this.desc = ram.alloc(16 * size, 16);
    this.avail = ram.alloc(4, 4);
    this.used = ram.alloc(4, 4);
    ram.bytes(this.desc, 16 * size).fill(0);
    ram.bytes(this.avail, 4).fill(0);
    ram.bytes(this.used, 4).fill(0);
    this.kickFd = native.eventfd(true);
    this.callFd = native.eventfd(true);
    for (let i = size - 1; i >= 0; i--) this.freeIds.push(i);
  }

  reopenFds(): void {
    native.close(this.kickFd);
    native.close(this.callFd);
    this.kickFd = native.eventfd(true);
    this.callFd = native.eventfd(true);
  }

  add(bufs: Buf[], indirect = false): number {
    const id = this.freeIds.pop();
    const n = indirect ? 1 : bufs.length;
    if (id === undefined || this.inRing + n > this.size) throw new Error('ring full');
    const flagsOf = (k: number, extra: number): number => extra | (this.wrap ? 1 << 7 : 1 << 15);
    const slots: { i: number; flags: number }[] = [];
    const write = (gpa: number, len: number, flags: number, last: boolean): void => {
      const dv = this.ram.view(this.desc + 16 * this.next, 16);
      dv.setBigUint64(0, BigInt(gpa), true);
      dv.setUint32(8, len, true);
      dv.setUint16(12, last ? id : 0, true);
      slots.push({ i: this.next, flags: flagsOf(0, flags) });
      if (++this.next === this.size) {
        this.next = 0;
        this.wrap = !this.wrap;
      }
    };
    if (indirect) {
      const table = this.ram.alloc(16 * bufs.length, 16, 1);
      bufs.forEach((b, k) => {
        const dv = this.ram.view(table + 16 * k, 16);
        dv.setBigUint64(0, BigInt(b.gpa), true);
        dv.setUint32(8, b.len, true);
        dv.setUint16(14, b.write ? 2 : 0, true);
      });
      write(table, 16 * bufs.length, 4, true);
    } else {
      bufs.forEach((b, k) => write(b.gpa, b.len, (b.write ? 2 : 0) | (k + 1 < bufs.length ? 1 : 0), k + 1 === bufs.length));
    }
    // Flags last, the head's flags very last: that is what makes the chain available.
    for (let k = slots.length - 1; k >= 0; k--) {
      const b = this.ram.bytes(this.desc + 16 * slots[k]!.i + 14, 2);
      Atomics.store(new Uint16Array(b.buffer, b.byteOffset, 1), 0, slots[k]!.flags);
    }
    this.descsOf.set(id, n);
    this.inRing += n;
    return id;
  }

  /**
   * Raw descriptors for hostile chains: written at the driver's position with this wrap's
   * AVAIL/USED bits (flags given are the rest), the first one's flags last. `id` goes in every
   * descriptor; the chain is remembered as `descs` long for collect().
   */
  addRaw(id: number, descs: { gpa: number | bigint; len: number; flags: number; id?: number }[]): void {
    const slots: { i: number; flags: number }[] = [];
    for (const d of descs) {
      const dv = this.ram.view(this.desc + 16 * this.next, 16);
      dv.setBigUint64(0, BigInt(d.gpa), true);
      dv.setUint32(8, d.len, true);
      dv.setUint16(12, d.id ?? id, true);
      slots.push({ i: this.next, flags: d.flags | (this.wrap ? 1 << 7 : 1 << 15) });
      if (++this.next === this.size) {
        this.next = 0;
        this.wrap = !this.wrap;
      }
    }
    for (let k = slots.length - 1; k >= 0; k--) {
      const b = this.ram.bytes(this.desc + 16 * slots[k]!.i + 14, 2);
      Atomics.store(new Uint16Array(b.buffer, b.byteOffset, 1), 0, slots[k]!.flags);
    }
    this.freeIds = this.freeIds.filter((f) => f !== id);
    this.descsOf.set(id, descs.length);
    this.inRing += descs.length;
  }

  kick(): void {
    native.eventfdWrite(this.kickFd, 1);
  }

  collect(): { head: number; len: number }[] {
    const out: { head: number; len: number }[] = [];
    for (;;) {
      const b = this.ram.bytes(this.desc + 16 * this.usedNext, 16);
      const flags = Atomics.load(new Uint16Array(b.buffer, b.byteOffset, 8), 7);
      const avail = (flags & (1 << 7)) !== 0;
      const used = (flags & (1 << 15)) !== 0;
      if (avail !== this.usedWrap || used !== this.usedWrap) break;
      const dv = new DataView(b.buffer, b.byteOffset, 16);
      const id = dv.getUint16(12, true);
      const n = this.descsOf.get(id);
      if (n === undefined) throw new Error(`device used unknown id ${id}`);
      out.push({ head: id, len: dv.getUint32(8, true) });
      this.descsOf.delete(id);
      this.freeIds.push(id);
      this.inRing -= n;
      this.usedNext += n;
      if (this.usedNext >= this.size) {
        this.usedNext -= this.size;
        this.usedWrap = !this.usedWrap;
      }
    }
    return out;
  }

  waitFor(n: number, timeoutMs = 5000): { head: number; len: number }[] {
    return waitForCompletions(this, n, timeoutMs);
  }

  close(): void {
    native.close(this.kickFd);
    native.close(this.callFd);
  }
}

/** Collects completions, sleeping on the call eventfd in between, until n arrived. */
function waitForCompletions(ring: { callFd: number; collect(): { head: number; len: number }[] }, n: number, timeoutMs: number): { head: number; len: number }[] {
  const got: { head: number; len: number }[] = [];
  const deadline = Date.now() + timeoutMs;
  const fds = Int32Array.of(ring.callFd);
  const rev = new Int32Array(1);
  while (got.length < n) {
    got.push(...ring.collect());
    if (got.length >= n) break;
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`timed out waiting for ${n} completions (got ${got.length})`);
    if (native.pollWait(fds, 1, rev, Math.min(left, 100)) > 0 && rev[0]! & POLLIN) native.eventfdRead(ring.callFd);
  }
  return got;
}

export type DriverRing = SplitRing | PackedRing;

export const BLK = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, GET_LIFETIME: 10, DISCARD: 11, WRITE_ZEROES: 13 } as const;

export interface BlkRequest {
  head: number;
  status: number;
  data: number;
  dataLen: number;
}

export class Frontend {
  readonly fd: number;
  readonly ram: GuestRam;
  rings: SplitRing[] = [];
  packedRings: PackedRing[] = [];
  features = 0n;
  protocolFeatures = 0n;
  backendReqFds: [number, number] | null = null;

  private constructor(fd: number, ram: GuestRam) {
    this.fd = fd;
    this.ram = ram;
  }

  /** A new connection sharing this frontend's guest RAM, rings and inflight region. */
  reconnect(socketPath: string): Frontend {
    const fe = new Frontend(native.connectUnix(socketPath), this.ram);
    fe.rings = this.rings;
    fe.inflight = this.inflight;
    return fe;
  }

  static connect(socketPath: string, ram = new GuestRam()): Frontend {
    return new Frontend(native.connectUnix(socketPath), ram);
  }

  send(request: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = [], flags = FLAG_VERSION): void {
    const msg = encodeMessage(request, flags, payload);
    const n = native.sendMsg(this.fd, msg, 0, msg.byteLength, fds);
    if (n !== msg.byteLength) throw new Error(`short send ${n}`);
  }

  sendRaw(bytes: Uint8Array, fds: number[] = []): void {
    native.sendMsg(this.fd, bytes, 0, bytes.byteLength, fds);
  }

  /** Reads one reply; throws on EOF or timeout. */
  recv(timeoutMs = 5000): { request: number; flags: number; payload: Uint8Array; fds: number[] } {
    const hdr = new Uint8Array(HEADER_SIZE);
    const fds: number[] = [];
    this.readExactly(hdr, fds, timeoutMs);
    const dv = new DataView(hdr.buffer);
    const payload = new Uint8Array(dv.getUint32(8, true));
    if (payload.length > 0) this.readExactly(payload, fds, timeoutMs);
    return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), payload, fds };
  }

  private readExactly(buf: Uint8Array, fds: number[], timeoutMs: number): void {
    let off = 0;
    const rev = new Int32Array(1);
    while (off < buf.length) {
      if (native.pollWait(Int32Array.of(this.fd), 1, rev, timeoutMs) === 0) throw new Error('timed out waiting for a reply');
      const r = native.recvMsg(this.fd, buf, off, buf.length - off, 8);
      if (r === null) continue;
      if (r.n === 0) throw new Error('backend closed the connection');
      fds.push(...r.fds);
      off += r.n;
    }
  }

  /** True once the backend has closed the connection (EOF within timeoutMs). */
  isClosedByPeer(timeoutMs = 2000): boolean {
    const rev = new Int32Array(1);
    const buf = new Uint8Array(64);
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (native.pollWait(Int32Array.of(this.fd), 1, rev, 50) === 0) continue;
      try {
        const r = native.recvMsg(this.fd, buf, 0, buf.length, 8);
        if (r === null) continue;
        r.fds.forEach((fd) => native.close(fd));
        if (r.n === 0) return true;
      } catch {
        return true;
      }
    }
    return false;
  }

  call(request: number, payload?: Uint8Array, fds?: number[]): Uint8Array {
    this.send(request, payload, fds);
    const r = this.recv();
    if (r.request !== request) throw new Error(`reply to ${r.request}, expected ${request}`);
    if (r.flags !== 0x5) throw new Error(`reply flags 0x${r.flags.toString(16)}, expected 0x5`);
    r.fds.forEach((fd) => native.close(fd));
    return r.payload;
  }

  callU64(request: number): bigint {
    const p = this.call(request);
    if (p.length !== 8) throw new Error(`u64 reply of ${p.length} bytes`);
    return new DataView(p.buffer, p.byteOffset).getBigUint64(0, true);
  }

  /** Sends with NEED_REPLY and returns the REPLY_ACK value (0 = success). */
  ack(request: number, payload?: Uint8Array, fds?: number[]): bigint {
    this.send(request, payload, fds, FLAG_VERSION | FLAG_NEED_REPLY);
    const r = this.recv();
    if (r.request !== request || r.flags !== 0x5 || r.payload.length !== 8) throw new Error('bad REPLY_ACK');
    return new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true);
  }

  getConfig(size = 60): Uint8Array {
    const p = this.call(Request.GET_CONFIG, configPayload(0, 0, new Uint8Array(size)));
    return p.subarray(12);
  }

  /** QEMU 7.2's start-up sequence up to (not including) the rings. */
  negotiate(
    opts: {
      eventIdx?: boolean;
      indirect?: boolean;
      packed?: boolean;
      inflight?: { fd: number; size: number; queueSize: number } | 'new';
      /** offered feature bits this driver does not take (e.g. a guest without FLUSH or CONFIG_WCE) */
      without?: number[];
      /** take LOG_SHMFD (dirty logging is turned on later, with setLogging, as QEMU does when migrating) */
      log?: boolean;
    } = {},
  ): void {
    const offered = this.callU64(Request.GET_FEATURES);
    if (!hasBit(offered, F.PROTOCOL_FEATURES)) throw new Error('backend lacks PROTOCOL_FEATURES');
    const pf = this.callU64(Request.GET_PROTOCOL_FEATURES);
    this.protocolFeatures = pf & (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.BACKEND_REQ) | bit(PF.CONFIGURE_MEM_SLOTS) | bit(PF.RESET_DEVICE));
    if (opts.inflight) this.protocolFeatures |= pf & bit(PF.INFLIGHT_SHMFD);
    if (opts.log) this.protocolFeatures |= pf & bit(PF.LOG_SHMFD);
    this.send(Request.SET_PROTOCOL_FEATURES, u64Payload(this.protocolFeatures));
    this.callU64(Request.GET_QUEUE_NUM);
    this.callU64(Request.GET_MAX_MEM_SLOTS);
    const [mine, theirs] = native.socketpair();
    this.backendReqFds = [mine, theirs];
    if (this.ack(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs]) !== 0n) throw new Error('SET_BACKEND_REQ_FD failed');
    native.close(theirs);
    this.send(Request.SET_OWNER);
    // LOG_ALL is not negotiated at start: QEMU sets it only while it migrates (setLogging).
    let want = offered & ~(bit(F.RING_EVENT_IDX) | bit(F.RING_INDIRECT_DESC) | bit(F.RING_PACKED) | bit(F.LOG_ALL));
    if (opts.eventIdx ?? true) want |= offered & bit(F.RING_EVENT_IDX);
    if (opts.indirect ?? true) want |= offered & bit(F.RING_INDIRECT_DESC);
    if (opts.packed) {
      if (!hasBit(offered, F.RING_PACKED)) throw new Error('backend does not offer RING_PACKED');
      want |= bit(F.RING_PACKED);
    }
    for (const b of opts.without ?? []) want &= ~bit(b);
    this.features = want;
    if (opts.inflight === 'new') this.inflight = this.getInflight(2, 128);
    else if (opts.inflight) this.inflight = opts.inflight;
    if (this.inflight) {
      const p = inflightPayload({ mmapSize: this.inflight.size, mmapOffset: 0, numQueues: 2, queueSize: this.inflight.queueSize });
      if (this.ack(Request.SET_INFLIGHT_FD, p, [this.inflight.fd]) !== 0n) throw new Error('SET_INFLIGHT_FD failed');
    }
    this.send(Request.SET_FEATURES, u64Payload(want));
    if (this.ack(Request.SET_MEM_TABLE, memTablePayload(this.ram.table), this.ram.regions.map((r) => r.fd)) !== 0n) {
      throw new Error('SET_MEM_TABLE failed');
    }
  }

  inflight: { fd: number; size: number; queueSize: number } | null = null;

  /** GET_INFLIGHT_FD: the backend creates the region; we keep the fd like QEMU does. */
  getInflight(numQueues: number, queueSize: number): { fd: number; size: number; queueSize: number } {
    this.send(Request.GET_INFLIGHT_FD, inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues, queueSize }));
    const r = this.recv();
    if (r.request !== Request.GET_INFLIGHT_FD || r.flags !== 0x5 || r.payload.length !== 24 || r.fds.length !== 1) throw new Error('bad GET_INFLIGHT_FD reply');
    const dv = new DataView(r.payload.buffer, r.payload.byteOffset);
    return { fd: r.fds[0]!, size: Number(dv.getBigUint64(0, true)), queueSize };
  }

  setupRing(index: number, size = 128, existing?: SplitRing, base = 0): SplitRing {
    const ring = existing ?? new SplitRing(this.ram, index, size, hasBit(this.features, F.RING_EVENT_IDX));
    this.startRing(ring, index, size, existing !== undefined, base);
    this.rings[index] = ring;
    return ring;
  }

  setupPackedRing(index: number, size = 128, existing?: PackedRing, base = 0x80008000): PackedRing {
    const ring = existing ?? new PackedRing(this.ram, index, size);
    this.startRing(ring, index, size, existing !== undefined, base);
    this.packedRings[index] = ring;
    return ring;
  }

  /** Re-sends a ring's setup at `base`, as QEMU does when it restarts a stopped ring; newFds as after a reconnect. */
  restartRing(ring: DriverRing, base: number, newFds: boolean): void {
    this.startRing(ring, ring.index, ring.size, newFds, base);
  }

  /** QEMU's per-ring start sequence; a restarted ring gets new eventfds like after a reconnect. */
  private startRing(ring: DriverRing, index: number, size: number, restart: boolean, base: number): void {
    this.send(Request.SET_VRING_NUM, vringStatePayload(index, size));
    this.send(Request.SET_VRING_BASE, vringStatePayload(index, base));
    this.send(
      Request.SET_VRING_ADDR,
      vringAddrPayload({ index, flags: this.logRings ? 1 : 0, descUserAddr: this.ram.uva(ring.desc), usedUserAddr: this.ram.uva(ring.used), availUserAddr: this.ram.uva(ring.avail), logGuestAddr: this.logRings ? ring.used : 0 }),
    );
    if (restart) ring.reopenFds();
    this.send(Request.SET_VRING_KICK, u64Payload(index), [ring.kickFd]);
    this.send(Request.SET_VRING_CALL, u64Payload(index), [ring.callFd]);
    if (this.ack(Request.SET_VRING_ENABLE, vringStatePayload(index, 1)) !== 0n) throw new Error('SET_VRING_ENABLE failed');
  }

  /** rings' used areas are logged (VHOST_VRING_F_LOG in SET_VRING_ADDR) */
  logRings = false;

  /** SET_LOG_BASE with a dirty-log memfd; returns the reply's u64. */
  setLogBase(fd: number, size: number, offset = 0): bigint {
    const p = this.call(Request.SET_LOG_BASE, logPayload({ mmapSize: size, mmapOffset: offset }), [fd]);
    if (p.length !== 8) throw new Error(`SET_LOG_BASE reply of ${p.length} bytes`);
    return new DataView(p.buffer, p.byteOffset).getBigUint64(0, true);
  }

  /** QEMU's vhost_dev_set_log: SET_FEATURES with or without LOG_ALL, then every started ring's SET_VRING_ADDR. */
  setLogging(on: boolean): void {
    this.features = on ? this.features | bit(F.LOG_ALL) : this.features & ~bit(F.LOG_ALL);
    if (this.ack(Request.SET_FEATURES, u64Payload(this.features)) !== 0n) throw new Error('SET_FEATURES failed');
    this.logRings = on;
    for (const ring of [...this.rings, ...this.packedRings]) {
      if (ring !== undefined && ring !== null) this.sendRingAddr(ring, ring.index);
    }
  }

  private sendRingAddr(ring: DriverRing, index: number): void {
    const addr = { index, flags: this.logRings ? 1 : 0, descUserAddr: this.ram.uva(ring.desc), usedUserAddr: this.ram.uva(ring.used), availUserAddr: this.ram.uva(ring.avail), logGuestAddr: this.logRings ? ring.used : 0 };
    if (this.ack(Request.SET_VRING_ADDR, vringAddrPayload(addr)) !== 0n) throw new Error('SET_VRING_ADDR failed');
  }

  getVringBase(index: number): number {
    const p = this.call(Request.GET_VRING_BASE, vringStatePayload(index, 0));
    return new DataView(p.buffer, p.byteOffset).getUint32(4, true);
  }

  /** Queues a virtio-blk request; data buffer lands in region `region`. */
  /** misalign: the data buffer starts this many bytes past a 512-byte boundary (O_DIRECT bounce buffers) */
  blk(ring: DriverRing, type: number, sector: number, data: Uint8Array | number, opts: { indirect?: boolean; region?: number; split?: number; misalign?: number } = {}): BlkRequest {
    const hdr = this.ram.alloc(16, 16, opts.region ?? 0);
    const dv = this.ram.view(hdr, 16);
    dv.setUint32(0, type, true);
    dv.setUint32(4, 0, true);
    dv.setBigUint64(8, BigInt(sector), true);
    const dataLen = typeof data === 'number' ? data : data.length;
    const bufs: Buf[] = [{ gpa: hdr, len: 16, write: false }];
    let dataGpa = 0;
    if (dataLen > 0) {
      dataGpa = this.ram.alloc(dataLen + (opts.misalign ?? 0), 512, opts.region ?? 0) + (opts.misalign ?? 0);
      if (typeof data !== 'number') this.ram.bytes(dataGpa, dataLen).set(data);
      else this.ram.bytes(dataGpa, dataLen).fill(0xee);
      const write = type === BLK.IN || type === BLK.GET_ID || type === BLK.GET_LIFETIME;
      const parts = opts.split ?? 1;
      const step = Math.ceil(dataLen / parts);
      for (let o = 0; o < dataLen; o += step) bufs.push({ gpa: dataGpa + o, len: Math.min(step, dataLen - o), write });
    }
    const status = this.ram.alloc(1, 1, opts.region ?? 0);
    this.ram.bytes(status, 1)[0] = 0xff;
    bufs.push({ gpa: status, len: 1, write: true });
    const head = ring.add(bufs, opts.indirect ?? false);
    return { head, status, data: dataGpa, dataLen };
  }

  statusOf(r: BlkRequest): number {
    return this.ram.bytes(r.status, 1)[0]!;
  }

  dataOf(r: BlkRequest): Uint8Array {
    return this.ram.bytes(r.data, r.dataLen);
  }

  /** Submits one request, waits for it, returns its status. */
  run(ring: DriverRing, type: number, sector: number, data: Uint8Array | number, opts: { indirect?: boolean; region?: number; split?: number; misalign?: number } = {}): BlkRequest & { usedLen: number } {
    const r = this.blk(ring, type, sector, data, opts);
    ring.kick();
    const done = ring.waitFor(1);
    if (done[0]!.head !== r.head) throw new Error(`completed head ${done[0]!.head}, expected ${r.head}`);
    return { ...r, usedLen: done[0]!.len };
  }

  close(): void {
    for (const r of this.rings) r?.close();
    for (const r of this.packedRings) r?.close();
    if (this.backendReqFds) native.close(this.backendReqFds[0]);
    native.close(this.fd);
  }

  /** Drops the connection but keeps guest RAM, rings and the inflight fd (a backend restart). */
  disconnect(): void {
    if (this.backendReqFds) native.close(this.backendReqFds[0]);
    this.backendReqFds = null;
    native.close(this.fd);
  }
}
