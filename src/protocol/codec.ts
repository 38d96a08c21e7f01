// vhost-user payload codec: bytes <-> typed messages. Every decoder checks the payload size and
// the fd count before anything reads a field; a failure is a ProtocolError, which closes the
// connection (the caller owns and closes the fds).
import {
  HEADER_SIZE,
  MAX_CONFIG_SIZE,
  MAX_MEM_REGIONS,
  MAX_PAYLOAD,
  REPLY_FLAGS,
  Request,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
  requestName,
} from './constants.js';

export class ProtocolError extends Error {}

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export interface MemoryRegion {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

export interface VringAddress {
  index: number;
  flags: number;
  descUserAddr: number;
  usedUserAddr: number;
  availUserAddr: number;
  logGuestAddr: number;
}

export interface ConfigPayload {
  offset: number;
  size: number;
  flags: number;
  data: Uint8Array;
}

export interface InflightPayload {
  mmapSize: number;
  mmapOffset: number;
  numQueues: number;
  queueSize: number;
}

/** SET_LOG_BASE: the dirty bitmap is [mmapOffset, mmapOffset + mmapSize) of the fd sent with it */
export interface LogPayload {
  mmapSize: number;
  mmapOffset: number;
}

export type Message =
  | { request: Request.GET_FEATURES | Request.GET_PROTOCOL_FEATURES | Request.GET_QUEUE_NUM | Request.SET_OWNER | Request.RESET_OWNER | Request.RESET_DEVICE | Request.GET_MAX_MEM_SLOTS | Request.GET_STATUS }
  | { request: Request.SET_FEATURES | Request.SET_PROTOCOL_FEATURES | Request.SET_STATUS; value: bigint }
  | { request: Request.SET_MEM_TABLE; regions: MemoryRegion[] }
  | { request: Request.ADD_MEM_REG | Request.REM_MEM_REG; region: MemoryRegion }
  | { request: Request.SET_VRING_NUM | Request.SET_VRING_BASE | Request.GET_VRING_BASE | Request.SET_VRING_ENABLE | Request.VRING_KICK; index: number; num: number }
  | { request: Request.SET_VRING_ADDR; addr: VringAddress }
  | { request: Request.SET_VRING_KICK | Request.SET_VRING_CALL | Request.SET_VRING_ERR; index: number; noFd: boolean }
  | { request: Request.GET_CONFIG | Request.SET_CONFIG; config: ConfigPayload }
  | { request: Request.SET_BACKEND_REQ_FD }
  | { request: Request.GET_INFLIGHT_FD | Request.SET_INFLIGHT_FD; inflight: InflightPayload }
  | { request: Request.SET_LOG_BASE; log: LogPayload }
  | { request: Request.SET_LOG_FD };

export interface Decoded {
  header: Header;
  message: Message;
}

export function decodeHeader(buf: Uint8Array): Header {
  const dv = new DataView(buf.buffer, buf.byteOffset, HEADER_SIZE);
  const header = { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
  if ((header.flags & 0x3) !== 0x1) throw new ProtocolError(`bad version in flags 0x${header.flags.toString(16)}`);
  if (header.size > MAX_PAYLOAD) throw new ProtocolError(`payload size ${header.size} exceeds ${MAX_PAYLOAD}`);
  return header;
}

/** Reads a u64 that must fit in a JS number (addresses and sizes: 53 bits are plenty). */
function u64(dv: DataView, off: number, what: string): number {
  const hi = dv.getUint32(off + 4, true);
  if (hi >= 0x200000) throw new ProtocolError(`${what} 0x${hi.toString(16)}xxxxxxxx is out of range`);
  return hi * 0x100000000 + dv.getUint32(off, true);
}

function expectSize(h: Header, size: number): void {
  if (h.size !== size) throw new ProtocolError(`${requestName(h.request)}: payload is ${h.size} bytes, expected ${size}`);
}

function expectFds(h: Header, fds: readonly number[], count: number): void {
  if (fds.length !== count) throw new ProtocolError(`${requestName(h.request)}: got ${fds.length} fds, expected ${count}`);
}

function region(dv: DataView, off: number): MemoryRegion {
  const r = {
    guestPhysAddr: u64(dv, off, 'guest_phys_addr'),
    size: u64(dv, off + 8, 'memory_size'),
    userAddr: u64(dv, off + 16, 'userspace_addr'),
    mmapOffset: u64(dv, off + 24, 'mmap_offset'),
  };
  if (r.size === 0) throw new ProtocolError('memory region of size 0');
  if (r.guestPhysAddr + r.size > 2 ** 53 || r.userAddr + r.size > 2 ** 53) throw new ProtocolError('memory region wraps');
  if (r.mmapOffset % 4096 !== 0) throw new ProtocolError(`mmap_offset ${r.mmapOffset} is not page aligned`);
  return r;
}

export function decodePayload(h: Header, payload: Uint8Array, fds: readonly number[]): Message {
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const req = h.request as Request;
  switch (req) {
    case Request.GET_FEATURES:
    case Request.GET_PROTOCOL_FEATURES:
    case Request.GET_QUEUE_NUM:
    case Request.SET_OWNER:
    case Request.RESET_OWNER:
    case Request.RESET_DEVICE:
    case Request.GET_MAX_MEM_SLOTS:
    case Request.GET_STATUS:
      // QEMU sends some of these with an 8-byte zero payload; accept 0 or 8, nothing else.
      if (h.size !== 0 && h.size !== 8) expectSize(h, 0);
      expectFds(h, fds, 0);
      return { request: req };
    case Request.SET_FEATURES:
    case Request.SET_PROTOCOL_FEATURES:
    case Request.SET_STATUS:
      expectSize(h, 8);
      expectFds(h, fds, 0);
      return { request: req, value: dv.getBigUint64(0, true) };
    case Request.SET_MEM_TABLE: {
      if (h.size < 8) expectSize(h, 8);
      const n = dv.getUint32(0, true);
      if (n === 0 || n > MAX_MEM_REGIONS) throw new ProtocolError(`SET_MEM_TABLE: ${n} regions (1..${MAX_MEM_REGIONS} allowed)`);
      // QEMU always sends the full 8-slot array; a shorter payload must still cover n regions.
      if (h.size !== 8 + 32 * MAX_MEM_REGIONS && h.size !== 8 + 32 * n) expectSize(h, 8 + 32 * n);
      expectFds(h, fds, n);
      const regions: MemoryRegion[] = [];
      for (let i = 0; i < n; i++) regions.push(region(dv, 8 + 32 * i));
      return { request: req, regions };
    }
    case Request.ADD_MEM_REG:
    case Request.REM_MEM_REG:
      expectSize(h, 40);
      if (req === Request.ADD_MEM_REG) expectFds(h, fds, 1);
      else if (fds.length > 1) expectFds(h, fds, 0);
      return { request: req, region: region(dv, 8) };
    case Request.SET_VRING_NUM:
    case Request.SET_VRING_BASE:
    case Request.GET_VRING_BASE:
    case Request.SET_VRING_ENABLE:
    case Request.VRING_KICK:
      expectSize(h, 8);
      expectFds(h, fds, 0);
      return { request: req, index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
    case Request.SET_VRING_ADDR:
      expectSize(h, 40);
      expectFds(h, fds, 0);
      return {
        request: req,
        addr: {
          index: dv.getUint32(0, true),
          flags: dv.getUint32(4, true),
          descUserAddr: u64(dv, 8, 'desc_user_addr'),
          usedUserAddr: u64(dv, 16, 'used_user_addr'),
          availUserAddr: u64(dv, 24, 'avail_user_addr'),
          logGuestAddr: u64(dv, 32, 'log_guest_addr'),
        },
      };
    case Request.SET_VRING_KICK:
    case Request.SET_VRING_CALL:
    case Request.SET_VRING_ERR: {
      expectSize(h, 8);
      const v = dv.getUint32(0, true);
      if (dv.getUint32(4, true) !== 0 || (v & ~(VRING_IDX_MASK | VRING_NOFD_MASK)) !== 0) {
        throw new ProtocolError(`${requestName(req)}: reserved bits set in 0x${v.toString(16)}`);
      }
      const noFd = (v & VRING_NOFD_MASK) !== 0;
      expectFds(h, fds, noFd ? 0 : 1);
      return { request: req, index: v & VRING_IDX_MASK, noFd };
    }
    case Request.GET_CONFIG:
    case Request.SET_CONFIG: {
      if (h.size < 12) expectSize(h, 12);
      const offset = dv.getUint32(0, true);
      const size = dv.getUint32(4, true);
      const flags = dv.getUint32(8, true);
      if (size === 0 || size > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE - size) {
        throw new ProtocolError(`${requestName(req)}: config range offset ${offset} size ${size} is invalid`);
      }
      expectSize(h, 12 + size);
      expectFds(h, fds, 0);
      return { request: req, config: { offset, size, flags, data: payload.subarray(12, 12 + size) } };
    }
    case Request.SET_BACKEND_REQ_FD:
      expectSize(h, 0);
      expectFds(h, fds, 1);
      return { request: req };
    case Request.GET_INFLIGHT_FD:
    case Request.SET_INFLIGHT_FD:
      expectSize(h, 24);
      expectFds(h, fds, req === Request.SET_INFLIGHT_FD ? 1 : 0);
      return {
        request: req,
        inflight: {
          mmapSize: u64(dv, 0, 'mmap_size'),
          mmapOffset: u64(dv, 8, 'mmap_offset'),
          numQueues: dv.getUint16(16, true),
          queueSize: dv.getUint16(18, true),
        },
      };
    case Request.SET_LOG_BASE:
      expectSize(h, 16);
      expectFds(h, fds, 1);
      return { request: req, log: { mmapSize: u64(dv, 0, 'mmap_size'), mmapOffset: u64(dv, 8, 'mmap_offset') } };
    case Request.SET_LOG_FD:
      // No payload in the spec; accept the 8-byte zero payload some frontends send, as for GET_FEATURES.
      if (h.size !== 0 && h.size !== 8) expectSize(h, 0);
      expectFds(h, fds, 1);
      return { request: req };
    default:
      throw new ProtocolError(`unsupported request ${requestName(h.request)}`);
  }
}

export function decode(header: Header, payload: Uint8Array, fds: readonly number[]): Decoded {
  return { header, message: decodePayload(header, payload, fds) };
}

// ---- encoding ----

export function encodeMessage(request: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.byteLength);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, payload.byteLength, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

export function encodeReply(request: number, payload: Uint8Array): Uint8Array {
  return encodeMessage(request, REPLY_FLAGS, payload);
}

export function u64Payload(value: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
  return b;
}

export function vringStatePayload(index: number, num: number): Uint8Array {
  const b = new Uint8Array(8);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, index, true);
  dv.setUint32(4, num, true);
  return b;
}

export function configPayload(offset: number, flags: number, data: Uint8Array): Uint8Array {
  const b = new Uint8Array(12 + data.byteLength);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, offset, true);
  dv.setUint32(4, data.byteLength, true);
  dv.setUint32(8, flags, true);
  b.set(data, 12);
  return b;
}

export function inflightPayload(p: InflightPayload): Uint8Array {
  const b = new Uint8Array(24);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(p.mmapSize), true);
  dv.setBigUint64(8, BigInt(p.mmapOffset), true);
  dv.setUint16(16, p.numQueues, true);
  dv.setUint16(18, p.queueSize, true);
  return b;
}

// Frontend-side encoders (used by the in-repo frontend driver and tests).

export function logPayload(p: LogPayload): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(p.mmapSize), true);
  dv.setBigUint64(8, BigInt(p.mmapOffset), true);
  return b;
}

export function memTablePayload(regions: readonly MemoryRegion[]): Uint8Array {
  const b = new Uint8Array(8 + 32 * MAX_MEM_REGIONS);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => writeRegion(dv, 8 + 32 * i, r));
  return b;
}

export function singleRegionPayload(r: MemoryRegion): Uint8Array {
  const b = new Uint8Array(40);
  writeRegion(new DataView(b.buffer), 8, r);
  return b;
}

function writeRegion(dv: DataView, off: number, r: MemoryRegion): void {
  dv.setBigUint64(off, BigInt(r.guestPhysAddr), true);
  dv.setBigUint64(off + 8, BigInt(r.size), true);
  dv.setBigUint64(off + 16, BigInt(r.userAddr), true);
  dv.setBigUint64(off + 24, BigInt(r.mmapOffset), true);
}

export function vringAddrPayload(a: VringAddress): Uint8Array {
  const b = new Uint8Array(40);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, a.index, true);
  dv.setUint32(4, a.flags, true);
  dv.setBigUint64(8, BigInt(a.descUserAddr), true);
  dv.setBigUint64(16, BigInt(a.usedUserAddr), true);
  dv.setBigUint64(24, BigInt(a.availUserAddr), true);
  dv.setBigUint64(32, BigInt(a.logGuestAddr), true);
  return b;
}
