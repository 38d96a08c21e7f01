// Image locking with QEMU's own layout (block/file-posix.c, QEMU 7.2), so that QEMU, qemu-img,
// qemu-io and vubd see each other: a shared OFD lock on byte 100+bit for each permission held
// and on byte 200+bit for each permission not shared; a conflict is tested with F_OFD_GETLK for
// an exclusive lock on the other side's byte (raw_check_lock_bytes).
//
// A node holds what a reader holds (consistent read, everything shared) while idle, and what a
// QEMU disk device holds (plus write unless read-only, write not shared) while claimed: while
// a frontend has a device started that runs the node. Claims are counted per fd (the fd-refs
// scheme: the main thread owns the fds), so overlapping trees hand a node over without a gap.
import fs from 'node:fs';
import { native } from '../native/index.js';
import { GraphError } from './snapshot.js';

/** QEMU's BLK_PERM_* bits; 7.2 locks exactly these (BLK_PERM_ALL = 0x0f, GRAPH_MOD is gone). */
export const Perm = { CONSISTENT_READ: 0x1, WRITE: 0x2, WRITE_UNCHANGED: 0x4, RESIZE: 0x8 } as const;
const PERM_ALL = 0x0f;
const PERM_BITS = 4;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const LOCK_PERM_BASE = 100;
const LOCK_SHARED_BASE = 200;

export type LockingMode = 'on' | 'off' | 'auto';

export class ImageLockError extends GraphError {}

interface LockState {
  filename: string;
  /** st_dev:st_ino: two nodes on one file are one user of it (one process, one owner of both fds) */
  file: string;
  readOnly: boolean;
  /** bytes currently locked: permissions held, permissions not shared */
  perm: number;
  unshared: number;
  claims: number;
}

/** per fd of a file node with locking on (main thread only) */
const states = new Map<number, LockState>();

const IDLE = { perm: Perm.CONSISTENT_READ, unshared: 0 };

function claimed(readOnly: boolean): { perm: number; unshared: number } {
  return { perm: Perm.CONSISTENT_READ | (readOnly ? 0 : Perm.WRITE), unshared: Perm.WRITE };
}

export function parseLockingMode(v: unknown): LockingMode {
  if (v === undefined) return 'auto';
  if (v === 'on' || v === 'off' || v === 'auto') return v;
  throw new GraphError(`Parameter 'locking' does not accept value '${String(v)}' (on, off or auto)`);
}

/**
 * Takes the idle locks on a newly opened image. With checkClaim, also refuses (ImageLockError)
 * an image that another process already holds in a way a claim would conflict with, so that a
 * second writer fails when it starts instead of when its guest starts. Locking 'off' takes no
 * locks and is the caller's to warn about.
 */
export function lockImage(fd: number, filename: string, readOnly: boolean, mode: LockingMode, checkClaim: boolean): void {
  if (mode === 'off') return;
  const st = fs.fstatSync(fd);
  const s: LockState = { filename, file: `${st.dev}:${st.ino}`, readOnly, perm: 0, unshared: 0, claims: 0 };
  try {
    setBytes(fd, s, IDLE.perm, IDLE.unshared, false);
    if (checkClaim && !claimedElsewhere(fd, s)) {
      const want = claimed(readOnly);
      checkBytes(fd, s, want.perm, PERM_ALL & ~want.unshared);
    }
  } catch (e) {
    unlockAll(fd, s);
    throw e;
  }
  states.set(fd, s);
}

/**
 * Claims every image among fds (all or nothing): on the first claim of an fd it takes the
 * claimed permissions, after checking that no other holder forbids them (raw_handle_perm_lock).
 */
export function claimImages(fds: readonly number[]): void {
  const done: number[] = [];
  try {
    for (const fd of fds) {
      const s = states.get(fd);
      if (!s) continue;
      if (s.claims === 0) {
        const want = claimed(s.readOnly);
        const before = { perm: s.perm, unshared: s.unshared };
        try {
          setBytes(fd, s, s.perm | want.perm, s.unshared | want.unshared, false);
          if (!claimedElsewhere(fd, s)) checkBytes(fd, s, want.perm, PERM_ALL & ~want.unshared);
        } catch (e) {
          setBytes(fd, s, before.perm, before.unshared, true);
          throw e;
        }
        setBytes(fd, s, want.perm, want.unshared, true);
      }
      s.claims++;
      done.push(fd);
    }
  } catch (e) {
    releaseImages(done);
    throw e;
  }
}

/**
 * Another of our fds on the same file holds a claim: its check passed and nobody who checks can
 * have taken the file since, so this one needs no check (which would see our own lock and fail,
 * e.g. when a tree swap hands the device from one node on a file to another on the same file).
 */
function claimedElsewhere(fd: number, s: LockState): boolean {
  for (const [other, o] of states) if (other !== fd && o.file === s.file && o.claims > 0) return true;
  return false;
}

/** Drops one claim per fd; the last one returns the image to the idle locks. */
export function releaseImages(fds: readonly number[]): void {
  for (const fd of fds) {
    const s = states.get(fd);
    if (!s || s.claims === 0) continue;
    if (--s.claims > 0) continue;
    try {
      setBytes(fd, s, IDLE.perm, IDLE.unshared, true);
    } catch {
      // Unlocking a byte we hold does not fail on a local file; if it does, the bytes stay
      // locked until the fd closes, which errs on the safe side.
    }
  }
}

/** The fd is being closed: its OFD locks go with it. */
export function forgetImage(fd: number): void {
  states.delete(fd);
}

/** What the node's fd holds now, for query output and tests. */
export function imageLockState(fd: number): { locking: boolean; claimed: boolean } {
  const s = states.get(fd);
  return { locking: s !== undefined, claimed: (s?.claims ?? 0) > 0 };
}

/** raw_apply_lock_bytes: lock the bytes of perm/unshared; with unlock, release the others. */
function setBytes(fd: number, s: LockState, perm: number, unshared: number, unlock: boolean): void {
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    for (const [base, want, key] of [
      [LOCK_PERM_BASE, perm, 'perm'],
      [LOCK_SHARED_BASE, unshared, 'unshared'],
    ] as const) {
      const have = (s[key] & bit) !== 0;
      if ((want & bit) !== 0 && !have) {
        if (!native.ofdSetLock(fd, native.F_RDLCK, base + i, 1)) {
          // Only exclusive locks conflict with a shared one, and QEMU never takes them.
          throw new ImageLockError(`Failed to lock byte ${base + i} of '${s.filename}'${holderText(fd, base + i)}`);
        }
        s[key] |= bit;
      } else if (unlock && have && (want & bit) === 0) {
        native.ofdSetLock(fd, native.F_UNLCK, base + i, 1);
        s[key] &= ~bit;
      }
    }
  }
}

function unlockAll(fd: number, s: LockState): void {
  try {
    setBytes(fd, s, 0, 0, true);
  } catch {
    /* the fd is about to be closed by the caller, which drops the locks anyway */
  }
}

/** raw_check_lock_bytes: nobody else may forbid what we hold, nor hold what we do not share. */
function checkBytes(fd: number, s: LockState, perm: number, shared: number): void {
  for (let i = 0; i < PERM_BITS; i++) {
    if ((perm & (1 << i)) !== 0 && native.ofdGetLock(fd, native.F_WRLCK, LOCK_SHARED_BASE + i, 1) !== null) {
      throw conflict(fd, s, `Failed to get "${PERM_NAMES[i]}" lock`, LOCK_SHARED_BASE + i);
    }
  }
  for (let i = 0; i < PERM_BITS; i++) {
    if ((shared & (1 << i)) === 0 && native.ofdGetLock(fd, native.F_WRLCK, LOCK_PERM_BASE + i, 1) !== null) {
      throw conflict(fd, s, `Failed to get shared "${PERM_NAMES[i]}" lock`, LOCK_PERM_BASE + i);
    }
  }
}

function conflict(fd: number, s: LockState, what: string, byte: number): ImageLockError {
  return new ImageLockError(`${what}: is another process using the image [${s.filename}]?${holderText(fd, byte)}`);
}

function holderText(fd: number, byte: number): string {
  const h = findLockHolder(fd, byte);
  return h ? ` It is locked by pid ${h.pid} (${h.command}).` : '';
}

/**
 * Who holds a lock on a byte of the file behind fd. OFD locks carry no pid (F_OFD_GETLK says
 * -1), but /proc/PID/fdinfo/FD lists the locks of each open file; this scans it, only after a
 * conflict. null when not visible (another user's process, another host on shared storage).
 */
export function findLockHolder(fd: number, byte: number): { pid: number; command: string } | null {
  let dev: string;
  try {
    const st = fs.fstatSync(fd, { bigint: true });
    const major = ((st.dev >> 8n) & 0xfffn) | ((st.dev >> 32n) & ~0xfffn);
    const minor = (st.dev & 0xffn) | ((st.dev >> 12n) & ~0xffn);
    dev = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
  } catch {
    return null;
  }
  let pids: string[];
  try {
    pids = fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p));
  } catch {
    return null;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fdinfo`);
    } catch {
      continue;
    }
    for (const f of fds) {
      if (Number(pid) === process.pid && Number(f) === fd) continue;
      let info: string;
      try {
        info = fs.readFileSync(`/proc/${pid}/fdinfo/${f}`, 'utf8');
      } catch {
        continue;
      }
      if (!info.includes(dev)) continue;
      for (const line of info.split('\n')) {
        const m = /^lock:\s+\d+:\s+OFDLCK\s+\S+\s+\S+\s+\S+\s+(\S+)\s+(\d+)\s+(\d+|EOF)/.exec(line);
        if (!m || m[1] !== dev) continue;
        if (Number(m[2]) <= byte && (m[3] === 'EOF' || byte <= Number(m[3]))) return { pid: Number(pid), command: command(pid) };
      }
    }
  }
  return null;
}

/** The holder's command line, shortened: "qemu-io -f raw disk.img", "node .../main.js --socket-path=...". */
function command(pid: string): string {
  try {
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a.length > 0);
    const text = argv.join(' ') || fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
    return text.length > 160 ? `${text.slice(0, 157)}...` : text;
  } catch {
    return '?';
  }
}
