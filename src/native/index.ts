// Typed face of the C addon in native-bindings/. Thin syscall wrappers: errors are thrown as
// Error objects carrying `errno` (number) and `code` (e.g. 'EINVAL'); EAGAIN is reported by
// return value (null / -1 / 0) as documented per function, never thrown.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const POLLIN = 0x001;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLNVAL = 0x020;

/** uv_poll readiness flags (for PollHandle). */
export const READABLE = 1;
export const WRITABLE = 2;
export const DISCONNECT = 4;

export interface RecvResult {
  /** bytes received; 0 means the peer closed the connection */
  n: number;
  /** file descriptors received (already CLOEXEC); the caller owns them */
  fds: number[];
  /** MSG_CTRUNC: the kernel dropped fds that did not fit */
  truncated: boolean;
}

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
  groups: number[];
}

export interface PollHandle {
  start(events: number): void;
  stop(): void;
  close(): void;
  ref(): void;
  unref(): void;
}

/**
 * io_uring over raw syscalls. Each in-flight operation is named by a tag in [0, maxTags).
 * The ring keeps per-tag iovec storage, so the iov arrays passed in may be reused at once.
 * iov layout: Float64Array of [hostAddress, length, hostAddress, length, ...].
 */
export interface Ring {
  readonly fd: number;
  readonly entries: number;
  prepReadv(fd: number, iov: Float64Array, iovCount: number, fileOffset: number, tag: number): boolean;
  prepWritev(fd: number, iov: Float64Array, iovCount: number, fileOffset: number, tag: number): boolean;
  prepFsync(fd: number, tag: number, datasync: boolean): boolean;
  prepFallocate(fd: number, mode: number, offset: number, length: number, tag: number): boolean;
  /** the tag's last readv/writev moved `done` bytes in all, less than asked: prepares the same operation for the rest */
  prepRest(tag: number, done: number): boolean;
  /** submits prepared SQEs; returns the number submitted */
  submit(): number;
  /** submit and block until at least minComplete completions are ready */
  submitAndWait(minComplete: number): number;
  /** writes [tag, res, tag, res, ...] into out; returns count of completions; res < 0 is -errno */
  reap(out: Float64Array): number;
  close(): void;
}

/** Where and how to reach an rbd image (QEMU's rbd driver options). */
export interface RbdOpenOptions {
  pool: string;
  image: string;
  /** ceph.conf path; librados' default search when absent */
  conf?: string;
  /** the client id (client.<user>), default admin */
  user?: string;
  /** a cephx key (base64), or a keyring file */
  key?: string;
  keyring?: string;
  namespace?: string;
  /** opens the snapshot, read-only */
  snapshot?: string;
  readOnly?: boolean;
  /** rbd_cache on (writeback) or off (cache=none / direct) */
  cache?: boolean;
  /** for RbdQueues only (share()); its own I/O methods then throw */
  shared?: boolean;
}

/**
 * Async I/O on an rbd image. Operations return 0 once submitted or -errno; their results come from
 * poll() as [tag, res, ...] pairs (res: bytes of a read or write, 0, or -errno) once fd is readable.
 * The iovecs of readv/writev point into memory that stays valid until the completion.
 */
export interface RbdIo {
  readonly fd: number;
  readv(iov: Float64Array, iovCount: number, offset: number, tag: number): number;
  writev(iov: Float64Array, iovCount: number, offset: number, tag: number): number;
  flush(tag: number): number;
  discard(offset: number, length: number, tag: number): number;
  writeZeroes(offset: number, length: number, tag: number): number;
  poll(out: Float64Array): number;
  close(): void;
}

/** One librbd image handle (its own operations complete through rbd_set_image_notification's eventfd). */
export interface RbdImage extends RbdIo {
  /** an id any thread of the process can attach an RbdQueue to while this image is open */
  share(): number;
  size(): number;
  resize(size: number): void;
  /** an eventfd that becomes readable when the image header changes (another client resized it) */
  watch(): number;
  /** waits for what is in flight; the shared connection goes with its last image */
  close(): void;
}

export interface Native {
  listenUnix(path: string, backlog: number): number;
  connectUnix(path: string): number;
  socketpair(): [number, number];
  /** -1 when no connection is pending */
  accept(listenFd: number): number;
  /** null when nothing is available (EAGAIN) */
  recvMsg(fd: number, buf: Uint8Array, offset: number, length: number, maxFds: number): RecvResult | null;
  /** -1 on EAGAIN; MSG_NOSIGNAL */
  sendMsg(fd: number, buf: Uint8Array, offset: number, length: number, fds: readonly number[]): number;
  setBlocking(fd: number, blocking: boolean): void;
  close(fd: number): void;
  dup(fd: number): number;
  /** SO_PEERCRED of a connected unix socket; groups: the peer's supplementary groups (SO_PEERGROUPS), [] if unknown */
  peerCred(fd: number): PeerCred;
  /** what an fd is (for inherited fds); throws ENOTSOCK for a non-socket */
  socketInfo(fd: number): { unix: boolean; stream: boolean; listening: boolean };
  /** NSS lookups (getpwnam_r/getgrnam_r); null when the name is unknown */
  lookupUser(name: string): { uid: number; gid: number } | null;
  lookupGroup(name: string): number | null;
  /** one datagram to a unix socket path ("@name": abstract namespace) on a fresh socket, as sd_notify does */
  sendDatagram(path: string, buf: Uint8Array): number;
  /** a bound non-blocking unix datagram socket (read with recvMsg) */
  bindDatagram(path: string): number;

  /** readiness on the Node event loop (uv_poll_t); cb(status, events) */
  poll(fd: number, events: number, cb: (status: number, events: number) => void): PollHandle;
  /**
   * Blocking poll(2) for worker threads: fds[i] with POLLIN (or events[i]); revents written to revents[i].
   * Returns number of ready fds, 0 on timeout. EINTR returns 0. timeoutMs < 0 waits forever.
   */
  pollWait(fds: Int32Array, nfds: number, revents: Int32Array, timeoutMs: number, events?: Int32Array): number;

  /**
   * A non-blocking, CLOEXEC stream socket connecting to a numeric IPv4/IPv6 address and port
   * ('inet', TCP_NODELAY) or a unix socket path. pending: the connect is in progress (wait for
   * POLLOUT, then socketError). Throws for an immediate failure (ECONNREFUSED, ENOENT, ...).
   */
  streamConnect(kind: 'inet' | 'unix', address: string, port: number): { fd: number; pending: boolean };
  /** SO_ERROR: 0 once a pending connect succeeded, else its errno */
  socketError(fd: number): number;
  /** sendmsg of an iov (same layout as Ring's), MSG_NOSIGNAL|MSG_DONTWAIT: bytes sent or -errno (-11 EAGAIN) */
  sendv(fd: number, iov: Float64Array, iovCount: number): number;
  /** recvmsg into an iov, MSG_DONTWAIT: bytes, 0 when the peer closed, or -errno (-11 EAGAIN) */
  recvv(fd: number, iov: Float64Array, iovCount: number): number;

  /** maps [offset, offset+length) of fd shared; offset page aligned; length <= 4 GiB; unmapped by unmap() or the finalizer */
  mmap(fd: number, length: number, offset: number, writable: boolean): ArrayBuffer;
  /**
   * Maps like mmap, once for the whole process, and returns the mapping's id. Any thread turns the
   * id into views (viewMapping); the pages stay until releaseMapping(id) and every view's unmap.
   */
  mapShared(fd: number, length: number, offset: number, writable: boolean): number;
  /** a new ArrayBuffer over the mapping's pages, holding a reference (unmap() drops it); throws ENOENT for an unknown id */
  viewMapping(id: number): ArrayBuffer;
  /** one more owner reference, as mapShared's (a new memory table keeping this chunk); false if none is left */
  retainMapping(id: number): boolean;
  /** drops an owner reference (mapShared's or retainMapping's); false if the id names no mapping or it was released already */
  releaseMapping(id: number): boolean;
  /** host virtual address of an ArrayBuffer's first byte (for iovecs) */
  addressOf(buf: ArrayBuffer): number;
  /** drops a view's reference now (from mmap or viewMapping) and detaches it (its views see length 0); false if not ours or already done */
  unmap(buf: ArrayBuffer): boolean;
  /** mappings alive in the process, each counted once however many views it has */
  liveMappings(): number;
  /** SIGBUS faults inside our mappings (a frontend truncated a mapped file) patched with a zero page, process-wide */
  sigbusRescues(): number;

  eventfd(nonblock: boolean): number;
  /** counter value; 0 means nothing pending (EAGAIN on a non-blocking eventfd) */
  eventfdRead(fd: number): number;
  eventfdWrite(fd: number, value: number): void;
  memfdCreate(name: string, size: number): number;

  /** sync I/O fallback; same iov layout as Ring; returns bytes or -errno (never throws for I/O errors) */
  preadv(fd: number, iov: Float64Array, iovCount: number, fileOffset: number): number;
  pwritev(fd: number, iov: Float64Array, iovCount: number, fileOffset: number): number;
  fsync(fd: number, datasync: boolean): number;
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  /** size in bytes of a block device (BLKGETSIZE64) */
  blockDeviceSize(fd: number): number;
  /** CPU time of the calling thread in microseconds (CLOCK_THREAD_CPUTIME_ID) */
  threadCpuMicros(): number;

  /**
   * Open file description byte-range lock (fcntl F_OFD_SETLK), type F_RDLCK, F_WRLCK or F_UNLCK.
   * false when another open file description holds a conflicting lock (EAGAIN/EACCES).
   */
  ofdSetLock(fd: number, type: number, start: number, len: number): boolean;
  /** F_OFD_GETLK: null when the lock could be placed, else the first conflicting lock (pid is -1 for an OFD lock) */
  ofdGetLock(fd: number, type: number, start: number, len: number): { type: number; start: number; len: number; pid: number } | null;
  readonly F_RDLCK: number;
  readonly F_WRLCK: number;
  readonly F_UNLCK: number;

  /** alwaysAsync: every operation goes to the kernel's async workers, never runs inline in submit() (which would block on e.g. FUSE) */
  Ring: new (entries: number, maxTags: number, maxSegs: number, alwaysAsync?: boolean) => Ring;

  /** false when the addon was built without librbd-dev (RbdImage then always throws) */
  readonly rbdAvailable: boolean;
  /** connects (or reuses the process's connection with the same settings) and opens; blocks meanwhile */
  RbdImage: new (opts: RbdOpenOptions) => RbdImage;
  /**
   * One queue context's I/O on a shared image (RbdImage.share()): its own eventfd and completion
   * list, filled by librbd's callback thread without a lock. Keeps the image open until closed.
   */
  RbdQueue: new (shareId: number) => RbdIo;
  /** cluster connections open in the process (absent without librbd) */
  rbdConnections?(): number;
}

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

function findAddon(): string {
  // dist/src/native -> repo root is three levels up; src/native (ts-node style) is two.
  for (const up of ['../../..', '../..']) {
    const candidate = path.resolve(here, up, 'native-bindings/build/Release/vubd_native.node');
    try {
      require.resolve(candidate);
      return candidate;
    } catch {
      /* try the next layout */
    }
  }
  throw new Error('vubd native addon not built: run `npm install` (needs make, g++ and Node headers)');
}

export const native: Native = require(findAddon()) as Native;

export interface ErrnoError extends Error {
  errno: number;
  code: string;
}

export function isErrno(e: unknown, code: string): e is ErrnoError {
  return typeof e === 'object' && e !== null && (e as ErrnoError).code === code;
}
