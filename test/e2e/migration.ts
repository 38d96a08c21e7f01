/**
 * Helpers for the live-migration e2e test (test/e2e/guest-migrate.test.ts):
 * a guest console that can be waited on, QMP sockets of QEMU, query-migrate
 * polling, and the host's view of the disk layout of scripts/guest/tests/migrate.sh.
 */
import { statSync } from "node:fs";
import * as fsp from "node:fs/promises";
import { QmpClient } from "../../src/control/qmp-client.js";

export const MIB = 1024 * 1024;
const BLOCK = 4096;
const FIO_HDR_MAGIC = 0xacca;

/** migrate.sh's layout: the live fio region and the flag blocks the host writes. */
export const LIVE_REGION = { offset: 0, bytes: 16 * MIB };
const FLAGS = {
  /** the host's part is over: the guest finishes */
  done: { offset: 96 * MIB, text: "VUBD-MIG-HOST-DONE" },
};

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Guest console as it streams in: wait for a line matching a regex. */
export class Console {
  private text = "";
  private ended = false;
  private waiters: Array<{ re: RegExp; resolve: (m: RegExpExecArray) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }> = [];

  constructor(readonly name: string) {}

  push = (chunk: string): void => {
    this.text += chunk;
    this.waiters = this.waiters.filter((w) => {
      const m = w.re.exec(this.text);
      if (!m) return true;
      clearTimeout(w.timer);
      w.resolve(m);
      return false;
    });
  };

  end(): void {
    this.ended = true;
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(new Error(`${this.name} console ended without ${w.re}`));
    }
    this.waiters = [];
  }

  get output(): string {
    return this.text;
  }

  /** Lines so far matching `re` (which needs the g and m flags). */
  count(re: RegExp): number {
    return [...this.text.matchAll(re)].length;
  }

  waitFor(re: RegExp, timeoutMs: number): Promise<RegExpExecArray> {
    const m = re.exec(this.text);
    if (m) return Promise.resolve(m);
    if (this.ended) return Promise.reject(new Error(`${this.name} console ended without ${re}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.timer !== timer);
        reject(new Error(`no ${re} on the ${this.name} console within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push({ re, resolve, reject, timer });
    });
  }
}

/** QEMU arguments for a QMP monitor on a unix socket (QEMU creates it at start-up). */
export function qmpQemuArgs(socketPath: string): string[] {
  return ["-qmp", `unix:${socketPath},server=on,wait=off`];
}

/** Connect to a QEMU's QMP socket once it exists (QEMU creates it while it starts). */
export async function connectQmp(socketPath: string, timeoutMs = 30_000): Promise<QmpClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (statSync(socketPath).isSocket()) return await QmpClient.connect(socketPath);
    } catch (e) {
      if (Date.now() > deadline) throw new Error(`QMP socket ${socketPath}: ${(e as Error).message}`);
    }
    if (Date.now() > deadline) throw new Error(`QMP socket ${socketPath} did not appear within ${timeoutMs} ms`);
    await sleep(100);
  }
}

export interface MigrationInfo {
  status: string;
  "total-time"?: number;
  downtime?: number;
  "setup-time"?: number;
  "expected-downtime"?: number;
  ram?: { transferred: number; total: number; remaining: number; "dirty-sync-count": number; mbps: number; "dirty-pages-rate"?: number };
  "error-desc"?: string;
}

/** Poll query-migrate until `until` holds for it (or the timeout); returns the last answer. */
export async function pollMigration(
  qmp: QmpClient,
  until: (info: MigrationInfo) => boolean,
  timeoutMs: number,
): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<MigrationInfo>("query-migrate");
    if (until(info)) return info;
    if (Date.now() > deadline) throw new Error(`migration still ${JSON.stringify(info)} after ${timeoutMs} ms`);
    await sleep(200);
  }
}

export async function vmStatus(qmp: QmpClient): Promise<string> {
  return (await qmp.execute<{ status: string }>("query-status")).status;
}

/** The host signals the guest through the image: flag blocks migrate.sh polls with O_DIRECT reads. */
export async function writeHostFlag(imagePath: string, flag: keyof typeof FLAGS): Promise<void> {
  const block = Buffer.alloc(BLOCK, 0);
  block.write(`${FLAGS[flag].text}\n`, "ascii");
  const fh = await fsp.open(imagePath, "r+");
  try {
    await fh.write(block, 0, BLOCK, FLAGS[flag].offset);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

export async function readRegion(file: string, offset: number, bytes: number): Promise<Buffer> {
  const fh = await fsp.open(file, "r");
  try {
    const buf = Buffer.alloc(bytes);
    const { bytesRead } = await fh.read(buf, 0, bytes, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/**
 * Problems with fio's data in `buf` (read from `offset` of an image): every
 * 4 KiB block must carry fio's verify header (magic 0xacca, its own offset at
 * byte 16) and, when `pattern` is given, end with that 4-byte verify_pattern.
 */
export function fioBlockProblems(buf: Buffer, offset: number, bytes: number, pattern?: Buffer): string[] {
  const problems: string[] = [];
  if (buf.length !== bytes) return [`short read: ${buf.length} of ${bytes} bytes at ${offset}`];
  for (let at = 0; at < bytes && problems.length < 5; at += BLOCK) {
    const where = offset + at;
    const magic = buf.readUInt16LE(at);
    const hdrOffset = Number(buf.readBigUInt64LE(at + 16));
    if (magic !== FIO_HDR_MAGIC) problems.push(`block at ${where}: magic 0x${magic.toString(16)}`);
    else if (hdrOffset !== where) problems.push(`block at ${where}: header says offset ${hdrOffset}`);
    else if (pattern && !buf.subarray(at + BLOCK - 4, at + BLOCK).equals(pattern)) {
      problems.push(`block at ${where}: ends with ${buf.subarray(at + BLOCK - 4, at + BLOCK).toString("hex")}, want ${pattern.toString("hex")}`);
    }
  }
  return problems;
}

/** fio's verify_pattern 0xNNNNNNNN as the bytes it writes (big-endian as written in the option). */
export function patternBytes(pattern: string): Buffer {
  return Buffer.from(pattern.replace(/^0x/, ""), "hex");
}
