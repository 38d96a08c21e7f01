// Property-based fuzzing of the vhost-user channel against a real vubd over its real socket:
// sequences of valid, mutated and out-of-order messages (with real eventfds, memfds, sockets and
// other fds attached) must never crash or hang the daemon, never leak an fd, and never leave it
// unable to serve the next frontend. Reproduce a failure with VUBD_FUZZ_SEED (and VUBD_FUZZ_RUNS).
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { Frontend, GuestRam, SplitRing, BLK } from '../helpers/frontend.js';
import { startDaemon, sleep, type Daemon } from '../helpers/daemon.js';
import { fdsSettle, pattern } from '../helpers/sessions.js';
import { native, POLLIN } from '../../src/native/index.js';
import { HEADER_SIZE, Request } from '../../src/protocol/constants.js';
import { INFLIGHT_QUEUE_BYTES, encodeOp, negotiateWires, repliesTo, sequence, startRingWires, type Op, type RunContext, type StepFd, type Wire } from '../helpers/fuzz-grammar.js';

const MiB = 2 ** 20;
const NUM_QUEUES = 2;
const SEED = Number(process.env.VUBD_FUZZ_SEED ?? 20240611);
const NUM_RUNS = Number(process.env.VUBD_FUZZ_RUNS ?? 1200);
/** stop generating new sequences after this long (the runs done so far count; a failure found is still reported) */
const TIME_LIMIT_MS = Number(process.env.VUBD_FUZZ_MS ?? 45_000);
/** a fresh frontend does a write + read-back after every this many sequences */
const E2E_EVERY = 25;
const RAM_REGION = 1 * MiB;
const HANG_MS = 5000;

type Rec = Record<string, unknown>;

/** Incremental view of the daemon's JSON log (the helpers re-parse everything on each poll). */
class LogIndex {
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
class FuzzRun {
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

/** The wires of one op (a valid step is several messages); 'io' returns null (done on the ring). */
function wiresOf(op: Op, run: FuzzRun): Wire[] | null {
  const ctx: RunContext = { ram: run.ramInfo, ring: (q) => run.ring(q) };
  switch (op.op) {
    case 'negotiate': return negotiateWires(op, ctx);
    case 'startRing': return startRingWires(op, ctx);
    case 'io': return null;
    default: return [encodeOp(op, ctx)];
  }
}

function describeOp(op: Op): string {
  if (op.op === 'msg') return `${Request[op.request] ?? op.request}${op.mut ? ` mut=${JSON.stringify(op.mut, (_, v) => (typeof v === 'bigint' ? v.toString() : v))}` : ''}`;
  return op.op;
}

describe('vhost-user protocol fuzz (real daemon, real socket)', () => {
  let d: Daemon;
  let logs: LogIndex;
  let baseline = 0;
  let dir = '';
  let roFile = '';
  let restartNeeded = false;
  let e2eSeed = 1000;
  const reached = new Map<string, number>();
  const stats = { runs: 0, closedByDaemon: 0, e2e: 0, restarts: 0, internalErrors: new Map<string, number>(), reasons: new Map<string, number>() };

  async function openFuzzSession(): Promise<{ run: FuzzRun; conn: unknown; from: number }> {
    const from = logs.records().length;
    const run = new FuzzRun(d.socketPath, roFile);
    const rec = await logs.waitFor((r) => r.msg === 'frontend connected', 'the connection to be accepted', from);
    return { run, conn: rec.conn, from };
  }

  /** A fresh frontend does the whole QEMU sequence and a write + read-back on both queues. */
  async function worksEndToEnd(): Promise<void> {
    const from = logs.records().length;
    const fe = Frontend.connect(d.socketPath);
    const conn = (await logs.waitFor((r) => r.msg === 'frontend connected', 'the e2e connection', from)).conn;
    try {
      fe.negotiate();
      for (let q = 0; q < NUM_QUEUES; q++) {
        const ring = fe.setupRing(q, 128);
        const seed = e2eSeed++;
        const data = pattern(seed, 4096);
        const sector = 64 + 8 * (seed % 1000);
        assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, sector, data)), 0, 'write status');
        const r = fe.run(ring, BLK.IN, sector, 4096, { region: 1 });
        assert.equal(fe.statusOf(r), 0, 'read status');
        assert.deepEqual(fe.dataOf(r), data, 'read back what was written');
      }
    } finally {
      fe.close();
      fe.ram.close();
    }
    await logs.waitFor((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn === conn, 'the e2e session to end', from);
    assert.equal(await fdsSettle(d, baseline), baseline, 'fd count back to baseline after a served session');
    stats.e2e++;
  }

  async function start(): Promise<void> {
    dir = fs.mkdtempSync('/tmp/vubd-fuzz-');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 16 * MiB);
    roFile = path.join(dir, 'ro-file');
    fs.writeFileSync(roFile, new Uint8Array(2 * MiB));
    d = await startDaemon([`--blk-file=${image}`, `--num-queues=${NUM_QUEUES}`, '--aio=sync'], { dir });
    logs = new LogIndex(d);
    baseline = d.fdCount();
    // Warm up both workers, so the baseline is what a served session leaves behind.
    await worksEndToEnd();
  }

  before(start);

  after(async () => {
    if (!d) return;
    const r = await d.stop();
    assert.equal(r.code, 0, 'daemon exits 0 on SIGTERM after the fuzzing');
  });

  /** One property run: the sequence, then the daemon's state is checked. */
  async function runSequence(ops: Op[]): Promise<void> {
    if (restartNeeded || d.proc.exitCode !== null || d.proc.signalCode !== null) {
      // An earlier run failed: start clean so shrinking (and later runs) see a fresh daemon.
      await d.stop('SIGKILL');
      await start();
      restartNeeded = false;
      stats.restarts++;
    }
    try {
      await runOnce(ops);
    } catch (e) {
      restartNeeded = true;
      throw e;
    }
  }

  /**
   * Sends GET_FEATURES and waits for its answer: then every message before it was handled (they
   * are handled strictly in order). Neither an answer nor a close within HANG_MS is a hang.
   * Returns false if the daemon closed the connection.
   */
  async function sentinel(run: FuzzRun, answered: number[], ops: Op[]): Promise<boolean> {
    if (run.eof) return false;
    answered.push(Request.GET_FEATURES);
    const want = answered.filter((r) => r === Request.GET_FEATURES).length;
    run.send({ bytes: new Uint8Array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]), fds: [], framed: true, request: Request.GET_FEATURES, flags: 1 });
    const deadline = Date.now() + HANG_MS;
    while (!run.eof && run.replies.filter((r) => r === Request.GET_FEATURES).length < want) {
      if (Date.now() > deadline) {
        throw new Error(`daemon neither answered nor closed within ${HANG_MS} ms after: ${ops.map(describeOp).join(', ')}; last logs:\n${d.logs.slice(-10).join('\n')}`);
      }
      run.pump(20);
      await sleep(0);
    }
    return !run.eof;
  }

  async function runOnce(ops: Op[]): Promise<void> {
    const { run, conn, from } = await openFuzzSession();
    let framed = true;
    let sent = 0;
    const answered: number[] = []; // codes of sent messages the daemon replies to (own replies)
    try {
      for (const op of ops) {
        if (run.eof) break;
        if (op.op === 'io') {
          // Only meaningful on a ring this run started; harmless otherwise (nobody reads it).
          const ring = run.rings[op.q]!;
          if (ring.free >= 3) {
            try {
              run.fe.blk(ring, BLK.OUT, op.sector, pattern(op.sector & 0xffff, 512));
              ring.kick();
            } catch {
              /* guest RAM exhausted: skip */
            }
          }
          continue;
        }
        for (const w of wiresOf(op, run)!) {
          if (!framed) break; // the daemon is reading our bytes out of step: nothing after this is a message
          if (!w.framed || op.op === 'truncated') {
            // Let the daemon finish (and answer) what came before, so its replies do not race our close.
            if (!(await sentinel(run, answered, ops))) break;
          }
          if (!run.send(w)) break;
          sent++;
          if (!w.framed || op.op === 'truncated') framed = false;
          else if ((w.flags & 0x3) === 0x1 && repliesTo(w.request)) answered.push(w.request);
        }
      }
      if (framed) await sentinel(run, answered, ops);
      else run.pump(20); // out of step or truncated: the daemon may close at once, or wait for more bytes

    } finally {
      run.close();
    }
    const closedByDaemon = run.eof;
    stats.runs++;
    // The session must end (teardown must not hang) and the daemon must live.
    await logs.waitFor((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn === conn, `session ${String(conn)} to end`, from);
    assert.equal(d.proc.exitCode, null, 'daemon alive');
    assert.equal(d.proc.signalCode, null, 'daemon not killed by a signal');
    const mine = logs.records().slice(from).filter((r) => r.conn === conn);
    const closedRec = mine.find((r) => r.msg === 'vhost-user connection closed');
    if (closedByDaemon && sent > 0) {
      // The daemon closed it: it must say why.
      assert.ok(closedRec || mine.some((r) => r.msg === 'frontend disconnected'), 'a close log line for the session');
    }
    if (closedRec) {
      assert.equal(typeof closedRec.reason, 'string', 'the close log line carries a reason');
      assert.ok((closedRec.reason as string).length > 0, 'the reason is not empty');
      const key = (closedRec.reason as string).replace(/0x[0-9a-f]+|\d+/g, 'N').slice(0, 70);
      stats.reasons.set(key, (stats.reasons.get(key) ?? 0) + 1);
      stats.closedByDaemon++;
    }
    for (const msg of new Set(logs.records().slice(from).map((r) => String(r.msg).replace(/\d+/g, "N").slice(0, 60)))) reached.set(msg, (reached.get(msg) ?? 0) + 1);
    for (const r of mine) {
      if (r.msg === 'internal error while handling a message') {
        const m = String((r.err as { message?: string } | undefined)?.message ?? '?').replace(/0x[0-9a-f]+|\d+/g, 'N');
        stats.internalErrors.set(m, (stats.internalErrors.get(m) ?? 0) + 1);
      }
    }
    const bad = logs.records().slice(from).filter((r) => r.msg === 'queue worker crashed' || r.msg === 'queue worker exited' || r.msg === 'error while resetting the device after disconnect');
    assert.deepEqual(bad, [], 'no worker died and the teardown did not fail');
    const n = await fdsSettle(d, baseline);
    assert.equal(n, baseline, `fd count ${n} settles back to ${baseline} after: ${ops.map(describeOp).join(', ')}`);
    if (stats.runs % E2E_EVERY === 0) await worksEndToEnd();
  }

  test('random valid, mutated and out-of-order message sequences', async (t) => {
    t.diagnostic(`fast-check seed ${SEED}, ${NUM_RUNS} runs, at most ${TIME_LIMIT_MS} ms (VUBD_FUZZ_SEED / VUBD_FUZZ_RUNS / VUBD_FUZZ_MS to change)`);
    const t0 = Date.now();
    await fc.assert(fc.asyncProperty(sequence, runSequence), {
      seed: SEED,
      numRuns: NUM_RUNS,
      interruptAfterTimeLimit: TIME_LIMIT_MS,
      markInterruptAsFailure: false,
      includeErrorInReport: true,
    });
    await worksEndToEnd();
    t.diagnostic(`${stats.runs} sequences in ${Date.now() - t0} ms; ${stats.closedByDaemon} closed by the daemon; ${stats.e2e} end-to-end checks; ${stats.restarts} restarts`);
    t.diagnostic(`close reasons: ${JSON.stringify([...stats.reasons.entries()].sort((a, b) => b[1] - a[1]))}`);
    t.diagnostic(`sequences whose session logged: ${JSON.stringify([...reached.entries()].filter(([m]) => !/connected|session ended/.test(m)))}`);
    if (stats.internalErrors.size > 0) t.diagnostic(`internal errors: ${JSON.stringify([...stats.internalErrors.entries()])}`);
    assert.equal(d.proc.exitCode, null);
    assert.equal(await fdsSettle(d, baseline), baseline, 'fd count at the end equals the baseline');
  });
});
