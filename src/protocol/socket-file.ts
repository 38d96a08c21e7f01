// Creates a listening unix socket at a path with its final mode and owner from the first moment
// the path exists: bound inside a fresh 0700 directory next to the path, chmod/chown there, then
// rename()d into place (rename is atomic and replaces a stale socket without an unlink window).
// Used for both the vhost-user socket and the control socket.
import fs from 'node:fs';
import path from 'node:path';
import { native, isErrno } from '../native/index.js';

/** mode bits and owner for a socket file; uid/gid -1 leave them as created (our euid/egid) */
export interface SocketAccess {
  mode: number;
  uid: number;
  gid: number;
}

export const DEFAULT_SOCKET_ACCESS: SocketAccess = { mode: 0o600, uid: -1, gid: -1 };

/** Throws unless nothing or only a stale socket (no process listening) is at the path. */
export function checkSocketPath(socketPath: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch (e) {
    if (isErrno(e, 'ENOENT')) return;
    throw e;
  }
  if (st.isSymbolicLink()) throw new Error(`${socketPath} is a symbolic link; refusing to listen through it (remove it or pick another path)`);
  if (!st.isSocket()) throw new Error(`${socketPath} exists and is not a socket; refusing to replace it`);
  let live = false;
  try {
    native.close(native.connectUnix(socketPath));
    live = true;
  } catch (e) {
    if (!isErrno(e, 'ECONNREFUSED')) throw e;
  }
  if (live) throw new Error(`${socketPath} is in use by another process`);
}

/** Returns the listening fd (non-blocking, CLOEXEC) bound at socketPath with the given access. */
export function createSocketFile(socketPath: string, access: SocketAccess, backlog: number): number {
  checkSocketPath(socketPath);
  const dir = path.dirname(path.resolve(socketPath));
  const tmpDir = fs.mkdtempSync(path.join(dir, '.vubd-')); // mode 0700: no one else can connect in there
  const tmpPath = path.join(tmpDir, 's');
  let fd = -1;
  try {
    if (Buffer.byteLength(tmpPath) > 107) {
      throw new Error(`${socketPath}: the directory path is too long for a unix socket (the temporary path ${tmpPath} exceeds 107 bytes)`);
    }
    fd = native.listenUnix(tmpPath, backlog);
    fs.chmodSync(tmpPath, access.mode);
    if (access.uid !== -1 || access.gid !== -1) fs.chownSync(tmpPath, access.uid, access.gid);
    // Something may have appeared meanwhile: check again right before the rename replaces it.
    checkSocketPath(socketPath);
    fs.renameSync(tmpPath, socketPath);
    return fd;
  } catch (e) {
    if (fd >= 0) native.close(fd);
    throw e;
  } finally {
    fs.rmSync(tmpDir, { recursive: true, force: true });
  }
}
