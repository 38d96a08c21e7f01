// Shared test helpers: deterministic data, images, and frontend sessions that wait for the
// daemon to log their start and end (a new session is only accepted after the last one ended).
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, type GuestRam } from './frontend.js';
import { sleep, type Daemon } from './daemon.js';

/** Deterministic pseudo-random bytes for a seed. */
export function pattern(seed: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** A sparse raw image `disk.img` of `size` bytes in dir. */
export function makeImage(dir: string, size = 16 * 2 ** 20): string {
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, size);
  return image;
}

/** Connects and waits until the daemon logged the connection; returns its conn id. */
export async function openSession(d: Daemon, ram?: GuestRam): Promise<{ fe: Frontend; conn: unknown }> {
  const before = d.logRecords().filter((r) => r.msg === 'frontend connected').length;
  const fe = Frontend.connect(d.socketPath, ram);
  const deadline = Date.now() + 5000;
  for (;;) {
    const recs = d.logRecords().filter((r) => r.msg === 'frontend connected');
    if (recs.length > before) return { fe, conn: recs[before]!.conn };
    if (Date.now() > deadline) throw new Error(`connection not accepted; logs:\n${d.logs.join('\n')}`);
    await sleep(10);
  }
}

/** Waits until the daemon finished tearing session `conn` down. */
export async function sessionEnded(d: Daemon, conn: unknown): Promise<void> {
  await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn === conn);
}

/** Closes a frontend whether or not the backend closed it first, and frees its guest RAM. */
export function dispose(fe: Frontend): void {
  try {
    fe.close();
  } catch {
    /* already closed */
  }
  fe.ram.close();
}

/** Closes the frontend and waits until the daemon finished tearing the session down. */
export async function closeSession(d: Daemon, fe: Frontend, conn: unknown): Promise<void> {
  fe.close();
  fe.ram.close();
  await sessionEnded(d, conn);
}

/** Waits until the daemon's fd count settles at `want` (closing is asynchronous); returns the last count. */
export async function fdsSettle(d: Daemon, want: number, timeoutMs = 2000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let n = d.fdCount();
  while (n !== want && Date.now() < deadline) {
    await sleep(10);
    n = d.fdCount();
  }
  return n;
}
