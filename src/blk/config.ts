// virtio-blk feature set and config space (struct virtio_blk_config, little endian).
import { F, PF, bit } from '../protocol/constants.js';

export const SECTOR_SIZE = 512;
export const SEG_MAX = 126;
/**
 * Descriptors the walk follows per request before it gives up and marks the queue broken. A
 * request needs SEG_MAX + 2 (header and status); twice that leaves room for drivers that count
 * segments their own way (Windows viostor can take its limit from the registry). Without a bound a
 * guest makes the worker read up to 1 GiB of indirect table per request.
 */
export const MAX_CHAIN_DESCRIPTORS = 2 * (SEG_MAX + 2);
export const MAX_DISCARD_SECTORS = 32768 * 64; // 32 MiB per segment
export const MAX_DISCARD_SEG = 16;
export const MAX_WRITE_ZEROES_SECTORS = 32768 * 64;
export const MAX_WRITE_ZEROES_SEG = 16;
/** bytes of struct virtio_blk_config up to and including the secure-erase fields */
export const CONFIG_SPACE_SIZE = 72;
export const WCE_OFFSET = 32;

export interface BlkConfigInput {
  capacityBytes: number;
  blockSize: number;
  numQueues: number;
  writeback: boolean;
  readOnly: boolean;
}

/**
 * Packed rings and crash recovery exclude each other: QEMU cannot restore a packed ring after a
 * backend crash (it has no avail index to replay from) and vubd keeps no packed inflight state,
 * so RING_PACKED is offered only when asked for, and then INFLIGHT_SHMFD is not. GET_FEATURES
 * comes before the frontend acks protocol features, so the choice is made at start-up. A
 * `packed=on` QEMU facing a backend without RING_PACKED negotiates a split ring.
 */
export function blkFeatures(readOnly: boolean, ringPacked = false): bigint {
  let f =
    bit(F.VERSION_1) |
    bit(F.RING_INDIRECT_DESC) |
    bit(F.RING_EVENT_IDX) |
    bit(F.PROTOCOL_FEATURES) |
    bit(F.LOG_ALL) |
    bit(F.BLK_SEG_MAX) |
    bit(F.BLK_BLK_SIZE) |
    bit(F.BLK_TOPOLOGY) |
    bit(F.BLK_MQ) |
    bit(F.BLK_FLUSH) |
    bit(F.BLK_CONFIG_WCE) |
    bit(F.BLK_DISCARD) |
    bit(F.BLK_WRITE_ZEROES);
  if (ringPacked) f |= bit(F.RING_PACKED);
  if (readOnly) f |= bit(F.BLK_RO);
  return f;
}

export function blkProtocolFeatures(ringPacked = false): bigint {
  const f = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.BACKEND_REQ) | bit(PF.CONFIGURE_MEM_SLOTS) | bit(PF.RESET_DEVICE) | bit(PF.LOG_SHMFD);
  return ringPacked ? f : f | bit(PF.INFLIGHT_SHMFD);
}

export function blkConfigSpace(c: BlkConfigInput): Uint8Array {
  const b = new Uint8Array(CONFIG_SPACE_SIZE);
  const dv = new DataView(b.buffer);
  const sectors = Math.floor(c.capacityBytes / SECTOR_SIZE);
  dv.setBigUint64(0, BigInt(sectors), true);
  dv.setUint32(8, 0, true); // size_max (feature not offered)
  dv.setUint32(12, SEG_MAX, true);
  dv.setUint32(20, c.blockSize, true);
  dv.setUint8(24, 0); // physical_block_exp: log2(physical / logical block size); physical = logical
  dv.setUint8(25, 0); // alignment_offset
  dv.setUint16(26, 1, true); // min_io_size (in blocks)
  dv.setUint32(28, 1, true); // opt_io_size (in blocks)
  dv.setUint8(WCE_OFFSET, c.writeback ? 1 : 0);
  dv.setUint16(34, c.numQueues, true);
  dv.setUint32(36, MAX_DISCARD_SECTORS, true);
  dv.setUint32(40, MAX_DISCARD_SEG, true);
  dv.setUint32(44, c.blockSize / SECTOR_SIZE, true); // discard_sector_alignment
  dv.setUint32(48, MAX_WRITE_ZEROES_SECTORS, true);
  dv.setUint32(52, MAX_WRITE_ZEROES_SEG, true);
  dv.setUint8(56, 1); // write_zeroes_may_unmap
  return b;
}
