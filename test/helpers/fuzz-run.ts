// The frontend side of one protocol-fuzz run (its connection, guest RAM, rings, fds and a reply
// reader) and an incremental index of the daemon's log. Used by test/integration/protocol-fuzz.
import fs from 'node:fs';
import path from 'node:path';
import { Frontend, GuestRam, SplitRing } from './frontend.js';
import { sleep, type Daemon } from './daemon.js';
import { native, POLLIN } from '../../src/native/index.js';
import { HEADER_SIZE } from '../../src/protocol/constants.js';
import { INFLIGHT_QUEUE_BYTES, type RunContext, type StepFd, type Wire } from './fuzz-grammar.js';

const MiB = 2 ** 20;
const RAM_REGION = 1 * MiB;
/** how long the daemon may take to do what a run waits for */
export const HANG_MS = 5000;

export type Rec = Record<string, unknown>;

/** Incremental view of the daemon's JSON log (the helpers re-parse everything on each poll). */
export class LogIndex {
  private parsed: Rec[] = [];
  private seen = 0;
  constructor(private readonly d: Daemon) {}
  records(): Rec[] {
    const lines = this.d.logs;
    for (; this.seen < lines.length; this.seen++) {
      try {
        this.parsed.push(JSON.parse(lines[this.seen]!) as Rec);
      } catch {
        /* not JSON */
      }
    }
    return this.parsed;
  }
  async waitFor(match: (r: Rec) => boolean, what: string, from = 0, timeoutMs = HANG_MS): Promise<Rec> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const recs = this.records();
      for (let i = from; i < recs.length; i++) if (match(recs[i]!)) return recs[i]!;
      if (this.d.proc.exitCode !== null || this.d.proc.signalCode !== null) {
        throw new Error(`daemon died (code ${this.d.proc.exitCode}, signal ${this.d.proc.signalCode}) waiting for ${what}; last logs:\n${this.d.logs.slice(-15).join('\n')}`);
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last logs:\n${this.d.logs.slice(-15).join('\n')}`);
      await sleep(5);
    }
  }
}

/** The frontend side of one fuzz run: its connection, guest RAM, rings and a reply reader. */
export class FuzzRun {
  readonly ram = new GuestRam(2, RAM_REGION);
  readonly fe: Frontend;
  readonly rings: SplitRing[];
  eof = false;
  /** request codes of the replies read so far */
  readonly replies: number[] = [];
  private inbuf = new Uint8Array(0);

  constructor(socketPath: string, private readonly roFile: string) {
    this.fe = Frontend.connect(socketPath, this.ram);
    this.rings = [0, 1].map((q) => new SplitRing(this.ram, q, 128, true));
    this.fe.rings = this.rings; // fe.close() closes their eventfds
  }

  get ramInfo(): RunContext['ram'] {
    return this.ram.regions.map((r) => ({ uva: r.uva, gpa: r.gpa, size: r.size }));
  }

  ring(q: number): { desc: number; avail: number; used: number } {
    const r = this.rings[q]!;
    return { desc: this.ram.uva(r.desc), avail: this.ram.uva(r.avail), used: this.ram.uva(r.used) };
  }

  /** Makes the fds for a message; returns them and the ones the test must close after sending. */
  private makeFds(kinds: readonly StepFd[]): { fds: number[]; temp: number[] } {
    const fds: number[] = [];
    const temp: number[] = [];
    const own = (fd: number): number => {
      temp.push(fd);
      return fd;
    };
    for (const k of kinds) {
      switch (k) {
        case 'eventfd': fds.push(own(native.eventfd(true))); break;
        case 'memfd0': fds.push(own(native.memfdCreate('fuzz', 0))); break;
        case 'memfd4k': fds.push(own(native.memfdCreate('fuzz', 4096))); break;
        case 'memfd1m': fds.push(own(native.memfdCreate('fuzz', MiB))); break;
        case 'inflight-exact': fds.push(own(native.memfdCreate('fuzz-inflight', 2 * INFLIGHT_QUEUE_BYTES))); break;
        case 'inflight-short': fds.push(own(native.memfdCreate('fuzz-inflight', 4096))); break;
        case 'ram0': fds.push(this.ram.regions[0]!.fd); break;
        case 'ram1': fds.push(this.ram.regions[1]!.fd); break;
        case 'socket': {
          const [a, b] = native.socketpair();
          own(b);
          fds.push(own(a));
          break;
        }
        case 'dir': fds.push(own(fs.openSync(path.dirname(this.roFile), 'r'))); break;
        case 'rofile': fds.push(own(fs.openSync(this.roFile, 'r'))); break;
        case 'kick0': fds.push(this.rings[0]!.kickFd); break;
        case 'kick1': fds.push(this.rings[1]!.kickFd); break;
        case 'call0': fds.push(this.rings[0]!.callFd); break;
        case 'call1': fds.push(this.rings[1]!.callFd); break;
      }
    }
    return { fds, temp };
  }

  /** Sends one wire message; false once the backend has closed the connection. */
  send(w: Wire): boolean {
    if (this.eof) return false;
    const { fds, temp } = this.makeFds(w.fds);
    try {
      let off = 0;
      if (w.splitAt !== undefined) {
        while (off < w.splitAt) {
          const n = native.sendMsg(this.fe.fd, w.bytes, off, w.splitAt - off, []);
          if (n < 0) this.pump(10);
          else off += n;
        }
      }
      const fdsAt = off;
      while (off < w.bytes.length) {
        const n = native.sendMsg(this.fe.fd, w.bytes, off, w.bytes.length - off, off === fdsAt ? fds : []);
        if (n < 0) {
          this.pump(10);
          continue;
        }
        off += n;
      }
    } catch {
      this.eof = true; // EPIPE / ECONNRESET: the backend closed it
    } finally {
      temp.forEach((fd) => native.close(fd));
    }
    this.pump(0);
    return !this.eof;
  }

  /** Reads whatever the backend sent (replies, fds, EOF) within timeoutMs; closes received fds. */
  pump(timeoutMs: number): void {
    const rev = new Int32Array(1);
    const fdArr = Int32Array.of(this.fe.fd);
    const buf = new Uint8Array(4096);
    const deadline = Date.now() + timeoutMs;
    while (!this.eof) {
      const left = Math.max(0, deadline - Date.now());
      if (native.pollWait(fdArr, 1, rev, left) === 0) return;
      let r;
      try {
        r = native.recvMsg(this.fe.fd, buf, 0, buf.length, 8);
      } catch {
        this.eof = true;
        return;
      }
      if (r === null) continue;
      r.fds.forEach((fd) => native.close(fd));
      if (r.n === 0) {
        this.eof = true;
        return;
      }
      const joined = new Uint8Array(this.inbuf.length + r.n);
      joined.set(this.inbuf);
      joined.set(buf.subarray(0, r.n), this.inbuf.length);
      let off = 0;
      for (;;) {
        if (joined.length - off < HEADER_SIZE) break;
        const dv = new DataView(joined.buffer, off);
        const size = dv.getUint32(8, true);
        if (joined.length - off < HEADER_SIZE + size) break;
        this.replies.push(dv.getUint32(0, true));
        off += HEADER_SIZE + size;
      }
      this.inbuf = joined.slice(off);
      if (!(rev[0]! & POLLIN)) return;
    }
  }

  close(): void {
    try {
      this.fe.close();
    } catch {
      /* already closed */
    }
    this.ram.close();
  }
}
