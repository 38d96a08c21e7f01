// virtio-blk request execution: parses the request header and segments from a walked chain,
// checks everything against the node, and starts the I/O. Completion writes the status byte.
import { ChainError, type DescriptorChain } from '../virtio/chain.js';
import { PENDING, type BlockNode, type DataIo, type IoContext } from '../graph/nodes.js';
import { MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SECTOR_SIZE } from './config.js';

export const enum BlkType {
  IN = 0,
  OUT = 1,
  FLUSH = 4,
  GET_ID = 8,
  DISCARD = 11,
  WRITE_ZEROES = 13,
}

export const enum BlkStatus {
  OK = 0,
  IOERR = 1,
  UNSUPP = 2,
}

export const VIRTIO_BLK_ID_BYTES = 20;
const WRITE_ZEROES_FLAG_UNMAP = 1;
const EIO = 5;

const enum Phase {
  MAIN = 0,
  /** write-through: the write (or zeroing, or discard) is done, a flush follows */
  FLUSH_AFTER_WRITE = 1,
}

function changesData(type: number): boolean {
  return type === BlkType.OUT || type === BlkType.WRITE_ZEROES || type === BlkType.DISCARD;
}

/** Per-request state; one per tag, reused. */
export class BlkSlot implements DataIo {
  tag: number;
  iov: Float64Array;
  iovCount = 0;
  offset = 0;
  length = 0;
  type = 0;
  /** status decided before any I/O (bad request); -1 when the I/O result decides */
  fixedStatus = -1;
  usedLen = 0;
  phase = Phase.MAIN;
  /** node the request was issued to (stats and the swap check in tests rely on it) */
  node: BlockNode | null = null;
  /** performance.now() when the request was popped */
  startMs = 0;
  /** ring descriptors the chain occupied (packed rings skip that many when marking it used) */
  ringDescs = 1;
  /** graph generation the request started under */
  generation = 0;
  /** DISCARD / WRITE_ZEROES: the checked segments as [offset, length, unmap] triples, copied out of guest memory */
  ranges: Float64Array | null = null;
  rangeCount = 0;

  constructor(
    tag: number,
    readonly chain: DescriptorChain,
    maxSegs: number,
  ) {
    this.tag = tag;
    this.iov = new Float64Array(2 * maxSegs);
  }

  zeroFill(): void {
    this.chain.zeroWritable(0, this.length);
  }

  copyFromGuest(dst: Uint8Array): void {
    this.chain.readInto(dst, 16, this.length);
  }

  copyToGuest(src: Uint8Array, n: number): void {
    this.chain.writeFrom(src.subarray(0, Math.min(n, this.length)), 0);
  }
}

export interface BlkOptions {
  serial: Uint8Array;
  writeback: boolean;
  readOnly: boolean;
  /** bytes; requests must be aligned to it (QEMU: misaligned sector or length is IOERR). Default 512 */
  logicalBlockSize?: number;
}

export class BlkRequestHandler {
  private readonly hdr = new Uint8Array(16);
  private readonly hdrView = new DataView(this.hdr.buffer);

  /** logical block size - 1, in bytes */
  private lbsMask: number;

  constructor(public opts: BlkOptions) {
    this.lbsMask = (opts.logicalBlockSize ?? SECTOR_SIZE) - 1;
  }

  /** Starts the request; its completion (tag, res) arrives through the engine. */
  start(slot: BlkSlot, node: BlockNode, ctx: IoContext): void {
    const engine = ctx.engine;
    const c = slot.chain;
    slot.fixedStatus = -1;
    slot.phase = Phase.MAIN;
    slot.node = node;
    slot.usedLen = c.writableBytes > 0 ? 1 : 0;
    slot.length = 0;
    if (c.error !== ChainError.NONE || c.readableBytes < 16 || c.writableBytes < 1) {
      return this.fail(slot, engine, BlkStatus.IOERR);
    }
    c.readInto(this.hdr, 0, 16);
    const dv = this.hdrView;
    const type = dv.getUint32(0, true);
    slot.type = type;
    const sectorHi = dv.getUint32(12, true);
    const sector = sectorHi * 0x100000000 + dv.getUint32(8, true);
    const dataOut = c.readableBytes - 16;
    const dataIn = c.writableBytes - 1;
    switch (type) {
      case BlkType.IN:
      case BlkType.OUT: {
        const write = type === BlkType.OUT;
        const len = write ? dataOut : dataIn;
        if (write && (this.opts.readOnly || node.readOnly)) return this.fail(slot, engine, BlkStatus.IOERR);
        if (!this.aligned(sector, len) || !this.inRange(node, sectorHi, sector, len)) {
          return this.fail(slot, engine, BlkStatus.IOERR);
        }
        const n = c.iov(slot.iov, !write, write ? 16 : 0, len);
        if (n < 0) return this.fail(slot, engine, BlkStatus.IOERR);
        slot.iovCount = n;
        slot.offset = sector * SECTOR_SIZE;
        slot.length = len;
        if (!write) slot.usedLen = len + 1;
        if (len === 0) {
          engine.done(slot.tag, 0);
          return;
        }
        if (write) node.write(ctx, slot);
        else node.read(ctx, slot);
        return;
      }
      case BlkType.FLUSH:
        node.flush(ctx, slot.tag);
        return;
      case BlkType.GET_ID: {
        const n = Math.min(VIRTIO_BLK_ID_BYTES, dataIn);
        const id = new Uint8Array(n);
        id.set(this.opts.serial.subarray(0, n));
        c.writeFrom(id, 0);
        slot.usedLen = n + 1;
        engine.done(slot.tag, 0);
        return;
      }
      case BlkType.DISCARD:
      case BlkType.WRITE_ZEROES:
        if (this.opts.readOnly || node.readOnly) return this.fail(slot, engine, BlkStatus.IOERR);
        if (!this.checkRanges(slot, node, type, dataOut)) return this.fail(slot, engine, slot.fixedStatus);
        this.startRange(slot, node, ctx, 0);
        return;
      default:
        return this.fail(slot, engine, BlkStatus.UNSUPP);
    }
  }

  /**
   * Handles a completion. Returns the used length when the request is finished (status written),
   * or -1 when another phase was started for it.
   */
  complete(slot: BlkSlot, res: number, ctx: IoContext): number {
    let status: number;
    if (slot.fixedStatus >= 0) status = slot.fixedStatus;
    else if (res < 0) status = BlkStatus.IOERR;
    else if (slot.phase !== Phase.MAIN) status = BlkStatus.OK; // res of the flush phase is 0, not a length
    else if (slot.type === BlkType.OUT && res !== slot.length) status = BlkStatus.IOERR; // the engines already went on after short writes
    else if (slot.type === BlkType.IN && res < slot.length) {
      // Short only at end of file (the engines go on after short reads): the file shrank under the
      // node, and what lies past its end reads as zeroes, as in QEMU.
      slot.chain.zeroWritable(res, slot.length - res);
      status = BlkStatus.OK;
    } else status = BlkStatus.OK;
    // Write-through: every request that changes the disk is durable before it completes.
    if (status === BlkStatus.OK && slot.phase === Phase.MAIN && !this.opts.writeback && changesData(slot.type)) {
      slot.phase = Phase.FLUSH_AFTER_WRITE;
      slot.node!.flush(ctx, slot.tag);
      return -1;
    }
    slot.chain.setLastWritableByte(status);
    return slot.usedLen;
  }

  private fail(slot: BlkSlot, engine: IoContext['engine'], status: BlkStatus): void {
    slot.fixedStatus = status;
    engine.done(slot.tag, -EIO);
  }

  /** offset and length are whole logical blocks (virtio sectors are 512 bytes whatever the block size) */
  private aligned(sector: number, bytes: number): boolean {
    const m = this.lbsMask;
    return (sector * SECTOR_SIZE) % (m + 1) === 0 && bytes % (m + 1) === 0;
  }

  private inRange(node: BlockNode, sectorHi: number, sector: number, len: number): boolean {
    return sectorHi < 0x200000 && sector * SECTOR_SIZE + len <= node.size;
  }

  /**
   * DISCARD / WRITE_ZEROES: every segment is checked before any runs, and copied out of guest
   * memory so the guest cannot change it afterwards. False with slot.fixedStatus set when refused.
   */
  private checkRanges(slot: BlkSlot, node: BlockNode, type: number, dataOut: number): boolean {
    const c = slot.chain;
    const discard = type === BlkType.DISCARD;
    const maxSeg = discard ? MAX_DISCARD_SEG : MAX_WRITE_ZEROES_SEG;
    const maxSectors = discard ? MAX_DISCARD_SECTORS : MAX_WRITE_ZEROES_SECTORS;
    const nseg = dataOut / 16;
    slot.fixedStatus = BlkStatus.IOERR;
    if (dataOut === 0 || dataOut % 16 !== 0 || nseg > maxSeg) return false;
    const ranges = (slot.ranges ??= new Float64Array(3 * Math.max(MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SEG)));
    const seg = this.hdr;
    const dv = this.hdrView;
    for (let i = 0; i < nseg; i++) {
      c.readInto(seg, 16 + 16 * i, 16);
      const hi = dv.getUint32(4, true);
      const sector = hi * 0x100000000 + dv.getUint32(0, true);
      const num = dv.getUint32(8, true);
      const flags = dv.getUint32(12, true);
      const allowed = discard ? 0 : WRITE_ZEROES_FLAG_UNMAP;
      if ((flags & ~allowed) !== 0) {
        slot.fixedStatus = BlkStatus.UNSUPP;
        return false;
      }
      if (num > maxSectors || !this.aligned(sector, num * SECTOR_SIZE) || !this.inRange(node, hi, sector, num * SECTOR_SIZE)) return false;
      ranges[3 * i] = sector * SECTOR_SIZE;
      ranges[3 * i + 1] = num * SECTOR_SIZE;
      ranges[3 * i + 2] = flags & WRITE_ZEROES_FLAG_UNMAP;
    }
    slot.rangeCount = nseg;
    slot.fixedStatus = -1;
    return true;
  }

  /** Runs segment i, then (through a continuation) the ones after it; the first error ends the request. */
  private startRange(slot: BlkSlot, node: BlockNode, ctx: IoContext, i: number): void {
    if (i + 1 < slot.rangeCount) {
      ctx.then(slot.tag, (res) => {
        if (res < 0) return res;
        this.startRange(slot, node, ctx, i + 1);
        return PENDING;
      });
    }
    const r = slot.ranges!;
    if (slot.type === BlkType.DISCARD) node.discard(ctx, slot.tag, r[3 * i]!, r[3 * i + 1]!);
    else node.writeZeroes(ctx, slot.tag, r[3 * i]!, r[3 * i + 1]!, r[3 * i + 2] !== 0);
  }
}
