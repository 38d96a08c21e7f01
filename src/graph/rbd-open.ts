// The main thread's side of rbd nodes: blockdev-add's options (QEMU's rbd driver names), the
// image handle that gives the size, resizes, and watches for resizes made by other clients.
import { native, READABLE, type PollHandle, type RbdImage, type RbdIo, type RbdOpenOptions } from '../native/index.js';
import { newNodeStats } from './nodes.js';
import { rbdOpenOptions } from './rbd-node.js';
import { GraphError, rbdName, type NodeDef } from './snapshot.js';
import type { CacheOptions } from './open.js';
import type { BlockGraph } from './graph.js';
import { logger } from '../log.js';

const log = logger('rbd');

export type RbdNodeDef = Extract<NodeDef, { driver: 'rbd' }>;

export const NO_LIBRBD = 'the rbd driver needs librbd (Debian package librbd-dev; rebuild vubd with npm run build:native)';

/** QEMU's rbd options as blockdev-add and the config file take them. */
export interface RbdArgs {
  pool: string;
  image: string;
  conf?: string;
  user?: string;
  namespace?: string;
  snapshot?: string;
  /** ours: the cephx key itself (QEMU takes it through a secret object, key-secret) */
  key?: string;
  /** ours: a keyring file (QEMU reads one named in the conf file; so does librados here) */
  keyring?: string;
}

/** The parts of an rbd node a worker needs besides the handle (what spec() sends). */
export function rbdSpecOptions(def: RbdNodeDef): RbdOpenOptions & { noFlush: boolean } {
  return { ...rbdOpenOptions(def), noFlush: def.noFlush };
}

/** Parses QEMU's rbd filename form: rbd:pool[/namespace]/image[@snap][:key=value...] (conf, id, keyring, key). */
export function parseRbdFilename(s: string): RbdArgs {
  if (!s.startsWith('rbd:')) throw new GraphError(`'${s}' is not an rbd filename (rbd:pool/image[@snap][:conf=PATH][:id=USER])`);
  const [spec = '', ...opts] = s.slice(4).split(':');
  const at = spec.indexOf('@');
  const pathPart = at >= 0 ? spec.slice(0, at) : spec;
  const parts = pathPart.split('/');
  if (parts.length < 2 || parts.length > 3 || parts.some((p) => p.length === 0)) throw new GraphError(`rbd filename '${s}' must name pool/image or pool/namespace/image`);
  const out: RbdArgs = { pool: parts[0]!, image: parts[parts.length - 1]! };
  if (parts.length === 3) out.namespace = parts[1]!;
  if (at >= 0) out.snapshot = spec.slice(at + 1);
  for (const o of opts) {
    const eq = o.indexOf('=');
    const k = o.slice(0, eq);
    const v = o.slice(eq + 1);
    if (eq <= 0 || v.length === 0) throw new GraphError(`rbd filename option '${o}' must be key=value`);
    if (k === 'conf') out.conf = v;
    else if (k === 'id') out.user = v;
    else if (k === 'keyring') out.keyring = v;
    else if (k === 'key') out.key = v;
    else throw new GraphError(`rbd filename option '${k}' is not supported (conf, id, keyring, key)`);
  }
  return out;
}

/**
 * Opens the image in the main thread (this blocks it while librados connects: up to
 * client_mount_timeout, 15 s unless the conf file says otherwise) and makes the node.
 * rbd_cache follows QEMU: on unless cache.direct (cache=none or directsync).
 */
export function openRbdNode(name: string, args: RbdArgs, readOnly: boolean, cache: CacheOptions, lib: Pick<typeof native, 'rbdAvailable' | 'RbdImage'> = native): RbdNodeDef {
  if (!lib.rbdAvailable) throw new GraphError(NO_LIBRBD);
  const ro = readOnly || args.snapshot !== undefined;
  const opts: RbdOpenOptions = { ...args, readOnly: ro, cache: !cache.direct };
  let handle: RbdImage;
  try {
    handle = new lib.RbdImage({ ...opts, shared: true }); // the workers' RbdQueues and the main thread's MainThreadRbdIo use it
  } catch (e) {
    throw new GraphError(`Could not open rbd image '${args.pool}/${args.namespace ? args.namespace + '/' : ''}${args.image}${args.snapshot ? '@' + args.snapshot : ''}': ${(e as Error).message}`);
  }
  try {
    const size = handle.size();
    if (size < 512) throw new GraphError(`rbd image '${args.pool}/${args.image}' is ${size} bytes; a disk needs at least one 512-byte sector`);
    return { driver: 'rbd', name, ...opts, readOnly: ro, cache: !cache.direct, noFlush: cache.noFlush, size: size - (size % 512), stats: newNodeStats(), handle };
  } catch (e) {
    handle.close();
    throw e;
  }
}

const watches = new Map<RbdImage, PollHandle>();

/**
 * Calls onSize(bytes) when another client changes the image's size (rbd update watch). The node's
 * graph entry is replaced on a resize but keeps its handle, so the watch stays with the handle.
 */
export function watchRbdSize(def: RbdNodeDef, onSize: (size: number) => void, onError: (e: Error) => void): void {
  const h = def.handle;
  const fd = h.watch();
  const p = native.poll(fd, READABLE, () => {
    native.eventfdRead(fd);
    try {
      const size = h.size();
      onSize(size - (size % 512));
    } catch (e) {
      onError(e as Error);
    }
  });
  p.unref(); // the daemon's life is not tied to a watch
  watches.set(h, p);
}

/**
 * Another client resized the image (rbd update watch): the node takes the new size like a
 * block_resize, so the exports above it tell their guests (CONFIG_CHANGE_MSG).
 */
export function followRbdResizes(graph: BlockGraph, def: RbdNodeDef): void {
  const name = def.name;
  watchRbdSize(
    def,
    (size) => {
      void graph
        .change((s) => {
          const cur = s.nodes.get(name);
          if (cur?.driver !== 'rbd' || cur.handle !== def.handle || cur.size === size) return s;
          log.info({ node: name, image: rbdName(def), from: cur.size, to: size }, 'rbd image resized by another client');
          return s.replaceNode(name, { ...cur, size });
        })
        .catch((e: Error) => log.error({ node: name, err: e.message }, 'could not apply the rbd image resize to the graph'));
    },
    (e) => log.error({ node: name, err: e.message }, 'rbd update watch: could not read the image size'),
  );
}

export function closeRbdNode(def: RbdNodeDef): void {
  const p = watches.get(def.handle);
  if (p) {
    p.stop();
    p.close();
    watches.delete(def.handle);
  }
  mainIo.get(def.handle)?.close();
  mainIo.delete(def.handle);
  def.handle.close(); // waits for a mirror write still in flight; the workers' handles are their own
}

/** Async I/O on the node's handle from the main thread (a mirror job copying into the image), completions on the event loop. */
class MainThreadRbdIo {
  private readonly pending = new Map<number, (res: number) => void>();
  private nextTag = 1;
  private poll: PollHandle | null = null;
  private readonly out = new Float64Array(2 * 64);
  private readonly iov = new Float64Array(2);
  private readonly h: RbdIo;
  constructor(image: RbdImage) {
    this.h = new native.RbdQueue(image.share());
  }

  private submit(start: (tag: number) => number): Promise<number> {
    if (this.poll === null) this.poll = native.poll(this.h.fd, READABLE, () => this.reap());
    const tag = this.nextTag++;
    return new Promise((resolve) => {
      const r = start(tag);
      if (r < 0) resolve(r);
      else this.pending.set(tag, resolve);
    });
  }
  private reap(): void {
    for (;;) {
      const n = this.h.poll(this.out);
      for (let i = 0; i < n; i++) {
        const tag = this.out[2 * i]!;
        const done = this.pending.get(tag);
        this.pending.delete(tag);
        done?.(this.out[2 * i + 1]!);
      }
      if (n < this.out.length / 2) return;
    }
  }
  /** writes length bytes of buf at offset; resolves with length or -errno */
  write(buf: ArrayBuffer, length: number, offset: number): Promise<number> {
    this.iov[0] = native.addressOf(buf);
    this.iov[1] = length;
    return this.submit((tag) => this.h.writev(this.iov, 1, offset, tag)).then((r) => (r < 0 ? r : length));
  }
  flush(): Promise<number> {
    return this.submit((tag) => this.h.flush(tag));
  }
  close(): void {
    this.poll?.stop();
    this.poll?.close();
    this.poll = null;
    this.h.close(); // a write still in flight keeps the image open until it completes
  }
}

const mainIo = new Map<RbdImage, MainThreadRbdIo>();

/** The main thread's async I/O on a node's own handle. */
export function rbdMainIo(def: RbdNodeDef): MainThreadRbdIo {
  let io = mainIo.get(def.handle);
  if (!io) mainIo.set(def.handle, (io = new MainThreadRbdIo(def.handle)));
  return io;
}
