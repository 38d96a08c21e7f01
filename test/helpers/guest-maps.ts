// Guest memory as /proc/PID/maps shows it: the test frontend's memfds are named guest-ram-N, so
// every line naming one is a guest mapping of that process. Beside the fd count, the leak check.
import fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { sleep } from './daemon.js';

export interface GuestMapping {
  /** memfd name, e.g. guest-ram-1 */
  file: string;
  /** file offset of the mapping's first byte */
  offset: number;
  size: number;
}

/** Guest memory mappings of process pid (every /proc/PID/maps line naming a guest-ram memfd). */
export function guestMappings(pid: number): GuestMapping[] {
  const out: GuestMapping[] = [];
  for (const line of fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \S+\s+\/memfd:(guest-ram-[^ ]*)/.exec(line);
    if (m === null) continue;
    out.push({ file: m[4]!, offset: parseInt(m[3]!, 16), size: parseInt(m[2]!, 16) - parseInt(m[1]!, 16) });
  }
  return out;
}

/** Shared mappings of process pid (guest memory, inflight regions, io_uring rings: whatever a frontend could make it keep). */
export function sharedMappingCount(pid: number): number {
  return fs
    .readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.split(' ')[1]?.[3] === 's').length;
}

/**
 * Waits until `count(pid)` (default: the guest mappings) settles at `want`: a session's memory
 * goes when its queues have stopped, a little after the session ended. Returns the last count.
 */
export async function mappingsSettle(pid: number, want: number, count = (p: number) => guestMappings(p).length, timeoutMs = 2000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let n = count(pid);
  while (n !== want && Date.now() < deadline) {
    await sleep(10);
    n = count(pid);
  }
  return n;
}

/** Adds F_SEAL_WRITE to a memfd of this process (no shared writable mapping of it may exist). */
export function sealWrite(fd: number): void {
  // Node has no fcntl: python opens the same file through /proc and seals it (seals belong to the file).
  const py = `import os, fcntl\nfd = os.open('/proc/${process.pid}/fd/${fd}', os.O_RDWR)\nfcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)`;
  const r = spawnSync('python3', ['-c', py], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`could not seal fd ${fd}: ${r.stderr}`);
}
