// What /proc says about a daemon's open files.
import fs from 'node:fs';
import type { Daemon } from './daemon.js';

/** The open flags of every fd the daemon has on `file`. */
export function openFlags(d: Daemon, file: string): number[] {
  const pid = d.proc.pid!;
  const want = fs.realpathSync(file);
  return fs.readdirSync(`/proc/${pid}/fd`).flatMap((fd) => {
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      return [];
    }
    if (target !== want) return [];
    const m = /^flags:\s+([0-7]+)$/m.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
    return m ? [parseInt(m[1]!, 8)] : [];
  });
}
