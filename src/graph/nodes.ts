// Block nodes as a worker runs them. A node is built from a plain NodeSpec (sent from the main
// thread); files are opened by the main thread and used here by fd number.
import { native, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../native/index.js';
import type { IoEngine } from './io-engine.js';

export type NodeSpec =
  | { driver: 'file'; name: string; fd: number; path: string; size: number; readOnly: boolean }
  | { driver: 'null'; name: string; size: number; readOnly: boolean };

/** One data transfer; iov points into guest memory (zero copy). */
export interface DataIo {
  tag: number;
  iov: Float64Array;
  iovCount: number;
  offset: number;
  length: number;
  /** fills the guest buffers of a read with zeroes (nodes without data use it) */
  zeroFill(): void;
}

export interface BlockNode {
  readonly name: string;
  readonly size: number;
  readonly readOnly: boolean;
  read(e: IoEngine, io: DataIo): void;
  write(e: IoEngine, io: DataIo): void;
  flush(e: IoEngine, tag: number): void;
  /** synchronous: 0 or -errno */
  discard(offset: number, length: number): number;
  /** synchronous: 0 or -errno */
  writeZeroes(offset: number, length: number, unmap: boolean): number;
}

const ENOTSUP = 95;
const EOPNOTSUPP = 95;

export class FileNode implements BlockNode {
  readonly name: string;
  readonly size: number;
  readonly readOnly: boolean;
  private readonly fd: number;
  private zeroes: Float64Array | null = null;
  private zeroBuf: ArrayBuffer | null = null;

  constructor(spec: Extract<NodeSpec, { driver: 'file' }>) {
    this.name = spec.name;
    this.size = spec.size;
    this.readOnly = spec.readOnly;
    this.fd = spec.fd;
  }
  read(e: IoEngine, io: DataIo): void {
    e.readv(this.fd, io.iov, io.iovCount, io.offset, io.tag);
  }
  write(e: IoEngine, io: DataIo): void {
    e.writev(this.fd, io.iov, io.iovCount, io.offset, io.tag);
  }
  flush(e: IoEngine, tag: number): void {
    e.fsync(this.fd, tag);
  }
  discard(offset: number, length: number): number {
    const r = native.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    // Discard is a hint: a file system that cannot punch holes still succeeds.
    return r === -EOPNOTSUPP ? 0 : r;
  }
  writeZeroes(offset: number, length: number, unmap: boolean): number {
    const mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    const r = native.fallocate(this.fd, mode, offset, length);
    if (r !== -ENOTSUP) return r;
    return this.writeZeroBuffers(offset, length);
  }
  private writeZeroBuffers(offset: number, length: number): number {
    const chunk = 1 << 20;
    if (this.zeroBuf === null) {
      this.zeroBuf = new ArrayBuffer(chunk);
      this.zeroes = new Float64Array(2);
    }
    // A JS-owned zero buffer is fine here: this path is rare and synchronous.
    const iov = this.zeroes!;
    iov[0] = native.addressOf(this.zeroBuf);
    for (let done = 0; done < length; ) {
      const n = Math.min(chunk, length - done);
      iov[1] = n;
      const r = native.pwritev(this.fd, iov, 1, offset + done);
      if (r < 0) return r;
      done += r;
    }
    return 0;
  }
}

export class NullNode implements BlockNode {
  readonly name: string;
  readonly size: number;
  readonly readOnly: boolean;
  constructor(spec: Extract<NodeSpec, { driver: 'null' }>) {
    this.name = spec.name;
    this.size = spec.size;
    this.readOnly = spec.readOnly;
  }
  read(e: IoEngine, io: DataIo): void {
    io.zeroFill();
    e.done(io.tag, io.length);
  }
  write(e: IoEngine, io: DataIo): void {
    e.done(io.tag, io.length);
  }
  flush(e: IoEngine, tag: number): void {
    e.done(tag, 0);
  }
  discard(): number {
    return 0;
  }
  writeZeroes(): number {
    return 0;
  }
}

export function buildNode(spec: NodeSpec): BlockNode {
  switch (spec.driver) {
    case 'file':
      return new FileNode(spec);
    case 'null':
      return new NullNode(spec);
  }
}
