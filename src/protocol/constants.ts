// The only place vhost-user request codes and feature bits are listed.

export enum Request {
  NONE = 0,
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  CREATE_CRYPTO_SESSION = 26,
  CLOSE_CRYPTO_SESSION = 27,
  POSTCOPY_ADVISE = 28,
  POSTCOPY_LISTEN = 29,
  POSTCOPY_END = 30,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  GPU_SET_SOCKET = 33,
  RESET_DEVICE = 34,
  VRING_KICK = 35,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
}

export enum BackendRequest {
  IOTLB_MSG = 1,
  CONFIG_CHANGE_MSG = 2,
}

export const HEADER_SIZE = 12;
export const FLAG_VERSION = 0x1;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
export const REPLY_FLAGS = FLAG_REPLY | FLAG_VERSION;
/** Largest payload we accept; the biggest legal one (GET/SET_CONFIG) is 12 + 256 bytes. */
export const MAX_PAYLOAD = 4096;
export const MAX_FDS_PER_MESSAGE = 8;
export const MAX_CONFIG_SIZE = 256;
export const MAX_MEM_REGIONS = 8;
/** What we answer to GET_MAX_MEM_SLOTS (QEMU caps x86 at 512). */
export const MAX_MEM_SLOTS = 32;
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;
/** SET_VRING_ADDR flags: log used-ring writes at log_guest_addr */
export const VRING_F_LOG = 0x1;

// virtio device feature bits (as bit numbers)
export const F = {
  BLK_SIZE_MAX: 1,
  BLK_SEG_MAX: 2,
  BLK_GEOMETRY: 4,
  BLK_RO: 5,
  BLK_BLK_SIZE: 6,
  BLK_FLUSH: 9,
  BLK_TOPOLOGY: 10,
  BLK_CONFIG_WCE: 11,
  BLK_MQ: 12,
  BLK_DISCARD: 13,
  BLK_WRITE_ZEROES: 14,
  /** VHOST_F_LOG_ALL: the frontend turns dirty logging on (live migration) */
  LOG_ALL: 26,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  PROTOCOL_FEATURES: 30,
  VERSION_1: 32,
  RING_PACKED: 34,
} as const;

export const PF = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

export function hasBit(mask: bigint, n: number): boolean {
  return (mask & bit(n)) !== 0n;
}

export function requestName(code: number): string {
  return Request[code] ?? `UNKNOWN(${code})`;
}
