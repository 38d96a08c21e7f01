// Opening the data behind leaf nodes (the main thread owns the fds; workers use them by number).
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../native/index.js';
import { newNodeStats } from './nodes.js';
import { GraphError, type NodeDef } from './snapshot.js';
import { releaseFd, retainFd } from './fd-refs.js';
import { probeDirectAlignment } from './direct-io.js';
import { lockImage, type LockingMode } from './image-lock.js';
import { closeRbdNode } from './rbd-open.js';

/** QEMU's cache options of a node: direct = O_DIRECT (bypass the host page cache), noFlush = flushes complete at once. */
export interface CacheOptions {
  direct: boolean;
  noFlush: boolean;
}

export const DEFAULT_CACHE: CacheOptions = { direct: false, noFlush: false };

export interface FileLocking {
  /** QEMU's file driver option: 'off' takes no image locks (the caller warns) */
  mode: LockingMode;
  /** refuse the image now if another process holds it in a way a started device would conflict with */
  checkClaim: boolean;
}

export const DEFAULT_LOCKING: FileLocking = { mode: 'auto', checkClaim: true };

export function openFileNode(
  name: string,
  filename: string,
  readOnly: boolean,
  cache: CacheOptions = DEFAULT_CACHE,
  locking: FileLocking = DEFAULT_LOCKING,
): Extract<NodeDef, { driver: 'file' }> {
  const file = path.resolve(filename);
  let fd: number;
  const flags = (readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | (cache.direct ? fs.constants.O_DIRECT : 0);
  try {
    fd = fs.openSync(file, flags);
  } catch (e) {
    const hint = cache.direct && (e as NodeJS.ErrnoException).code === 'EINVAL' ? ' (the file system does not support O_DIRECT: use cache.direct=off, e.g. --cache=writeback)' : '';
    throw new GraphError(`Could not open '${file}': ${(e as Error).message}${hint}`);
  }
  try {
    let alignment = 1;
    if (cache.direct) {
      try {
        alignment = probeDirectAlignment(fd);
      } catch (e) {
        throw new GraphError(`Could not find a working O_DIRECT alignment for '${file}': ${(e as Error).message}`);
      }
    }
    const st = fs.fstatSync(fd);
    let size: number;
    if (st.isBlockDevice()) size = native.blockDeviceSize(fd);
    else if (st.isFile()) size = st.size;
    else throw new GraphError(`'${file}' is neither a regular file nor a block device`);
    if (size < 512) throw new GraphError(`'${file}' is ${size} bytes; a disk needs at least one 512-byte sector`);
    lockImage(fd, file, readOnly, locking.mode, locking.checkClaim);
    retainFd(fd); // the graph's reference
    return { driver: 'file', name, filename: file, fd, size: size - (size % 512), readOnly, direct: cache.direct, noFlush: cache.noFlush, alignment, stats: newNodeStats() };
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
}

export function nullNode(name: string, size: number, readOnly: boolean): Extract<NodeDef, { driver: 'null' }> {
  if (!Number.isSafeInteger(size) || size < 512 || size % 512 !== 0) throw new GraphError(`null node size ${size} must be a positive multiple of 512`);
  return { driver: 'null', name, size, readOnly, stats: newNodeStats() };
}

/** Drops the graph's hold on what a node owns once it left the graph (workers may still hold theirs). */
export function closeNode(def: NodeDef): void {
  if (def.driver === 'file') releaseFd(def.fd);
  else if (def.driver === 'rbd') closeRbdNode(def);
}
