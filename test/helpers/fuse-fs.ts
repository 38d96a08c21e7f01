// A real FUSE file system that misbehaves on purpose (test/helpers/fuse-fs.py): slow reads, an
// fsync that fails while a trigger file exists, short writes, no fallocate. Files put
// in `backing` appear under `mountpoint`. Unmount in cleanup: unmount() waits for the python
// process to exit.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { repoRoot } from './daemon.js';

export interface FuseFsOptions {
  /** every read() sleeps this long */
  slowReadMs?: number;
  /** reads are slow only while this file exists */
  slowWhile?: string;
  /** fsync() fails with EIO while this file exists */
  failFsyncWhile?: string;
  /** every fsync() that reaches the file system appends a byte to this file (see fsyncCount) */
  countFsyncs?: string;
  /** every write moves at most this many bytes: callers see short writes (reads: see fuse-fs.py) */
  maxWrite?: number;
  /** an all-zero write punches a hole in the backing file (a 1 GiB zeroing costs no disk) */
  punchZeroWrites?: boolean;
}

export interface FuseFs {
  /** where files live; write images here directly, bypassing FUSE */
  backing: string;
  mountpoint: string;
  proc: ChildProcess;
  unmount(): Promise<void>;
}

/** fsync() calls the file system got so far, with FuseFsOptions.countFsyncs = file */
export function fsyncCount(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

const script = path.join(repoRoot, 'test/helpers/fuse-fs.py');

function isMounted(mountpoint: string): boolean {
  const want = path.resolve(mountpoint);
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === want);
}

/** Mounts a FUSE file system over `dir/backing` on `dir/mnt`; resolves once it is mounted. */
export async function mountFuseFs(dir: string, opts: FuseFsOptions = {}): Promise<FuseFs> {
  const backing = path.join(dir, 'backing');
  const mountpoint = path.join(dir, 'mnt');
  fs.mkdirSync(backing, { recursive: true });
  fs.mkdirSync(mountpoint, { recursive: true });
  const args = [script, backing, mountpoint];
  if (opts.slowReadMs !== undefined) args.push('--slow-read-ms', String(opts.slowReadMs));
  if (opts.slowWhile !== undefined) args.push('--slow-while', opts.slowWhile);
  if (opts.failFsyncWhile !== undefined) args.push('--fail-fsync-while', opts.failFsyncWhile);
  if (opts.countFsyncs !== undefined) args.push('--count-fsyncs', opts.countFsyncs);
  if (opts.maxWrite !== undefined) args.push('--max-write', String(opts.maxWrite));
  if (opts.punchZeroWrites) args.push('--punch-zero-writes');
  // Debian's python3-fusepy lives in the system interpreter's dist-packages.
  const proc = spawn('/usr/bin/python3', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const deadline = Date.now() + 10000;
  while (!isMounted(mountpoint)) {
    if (proc.exitCode !== null) throw new Error(`fuse-fs.py exited with ${proc.exitCode}: ${stderr}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`fuse-fs.py did not mount ${mountpoint}: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    backing,
    mountpoint,
    proc,
    async unmount() {
      if (isMounted(mountpoint)) {
        const r = spawnSync('fusermount3', ['-u', mountpoint]);
        if (r.status !== 0) spawnSync('umount', ['-l', mountpoint]);
      }
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      if (proc.exitCode === null && proc.signalCode === null) await exited;
      clearTimeout(t);
    },
  };
}
