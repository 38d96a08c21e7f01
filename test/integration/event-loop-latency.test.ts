// The main thread answers QEMU and QMP; nothing a peer does may hold it up. A frontend that stops
// reading its replies and a reader of stderr that stops reading (a paused pipe, a throttled
// journal) used to block it for 500 ms per reply, or for good.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { BLK } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, type Daemon } from '../helpers/daemon.js';
import { native } from '../../src/native/index.js';
import { FLAG_VERSION, Request } from '../../src/protocol/constants.js';
import { configPayload, encodeMessage } from '../../src/protocol/codec.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { makeImage, openSession, closeSession, pattern, sessionEnded } from '../helpers/sessions.js';

/** the bound the issue states for vhost-user and QMP replies */
const REPLY_BOUND_MS = 50;
/**
 * This 2-core VM is shared with other jobs: a single reply may miss the bound by a scheduling
 * hiccup. 99% must meet it, and none may take HICCUP_MS (a blocked loop took 500 ms per reply).
 */
const HICCUP_MS = 200;

function assertPrompt(latencies: number[], what: string): void {
  const sorted = [...latencies].sort((a, b) => a - b);
  const p99 = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))]!;
  const worst = sorted[sorted.length - 1]!;
  assert.ok(p99 < REPLY_BOUND_MS, `${what}: 99th percentile ${p99.toFixed(1)} ms (of ${sorted.length})`);
  assert.ok(worst < HICCUP_MS, `${what}: worst ${worst.toFixed(1)} ms`);
}

function summary(latencies: number[]): string {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q: number): string => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))]!.toFixed(1);
  return `${sorted.length} replies, p50 ${at(0.5)} ms, p99 ${at(0.99)} ms, worst ${at(1)} ms`;
}

async function timedQmp(qmp: QmpClient): Promise<number> {
  const t0 = performance.now();
  await qmp.execute('query-stats');
  return performance.now() - t0;
}

async function daemonWithControl(extra: string[] = []): Promise<{ d: Daemon; control: string }> {
  const dir = tempDir('vubd-latency-');
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', `--control=${control}`, ...extra], { dir });
  return { d, control };
}

describe('replies are not held up by a stalled peer', () => {
  test('QMP answers within 50 ms while the frontend does not read its replies; that frontend is dropped', { timeout: 60000 }, async (t) => {
    const { d, control } = await daemonWithControl();
    const qmp = await QmpClient.connect(control);
    try {
      for (let i = 0; i < 5; i++) await timedQmp(qmp); // warm
      const { fe, conn } = await openSession(d);
      fe.negotiate();
      // Requests whose 268-byte replies it never reads, until neither socket takes more.
      native.setBlocking(fe.fd, false);
      const msg = encodeMessage(Request.GET_CONFIG, FLAG_VERSION, configPayload(0, 0, new Uint8Array(256)));
      const t0 = Date.now();
      let refusedInARow = 0;
      let sent = 0;
      while (refusedInARow < 5 && Date.now() - t0 < 3000) {
        if (native.sendMsg(fe.fd, msg, 0, msg.byteLength, []) === msg.byteLength) {
          sent++;
          refusedInARow = 0;
        } else {
          refusedInARow++;
          await sleep(2);
        }
      }
      assert.ok(sent > 100, `the frontend filled its socket (${sent} requests)`);
      // The daemon drops it after 500 ms without progress; QMP must be answered promptly all along.
      const latencies: number[] = [];
      const stallStart = Date.now();
      const dropped = d.waitForLog((r) => r.msg === 'vhost-user connection closed' && r.conn === conn, 5000);
      let gone = false;
      void dropped.then(() => (gone = true), () => {});
      while (!gone && Date.now() - stallStart < 5000) latencies.push(await timedQmp(qmp));
      const rec = await dropped;
      assert.match(rec.reason as string, /not reading its replies/);
      for (let i = 0; i < 5; i++) latencies.push(await timedQmp(qmp));
      t.diagnostic(`QMP query-stats while the frontend stalled (${Date.now() - stallStart} ms): ${summary(latencies)}`);
      assert.ok(latencies.length > 20, `QMP was answered while the frontend stalled (${latencies.length} replies)`);
      assertPrompt(latencies, 'QMP query-stats');
      fe.close();
      fe.ram.close();
      await sessionEnded(d, conn);
      const next = await openSession(d);
      next.fe.negotiate();
      const q = next.fe.setupRing(0, 64);
      assert.equal(next.fe.statusOf(next.fe.run(q, BLK.OUT, 8, pattern(1, 4096))), 0, 'the next frontend is served');
      await closeSession(d, next.fe, next.conn);
    } finally {
      qmp.close();
      assert.equal((await d.stop()).code, 0);
    }
  });

  test('vhost-user and QMP answer within 50 ms while nobody reads stderr; no log line is lost at exit', { timeout: 60000 }, async (t) => {
    // Debug level logs a line per vhost-user message: a few hundred fill a 64 KiB pipe.
    const { d, control } = await daemonWithControl(['--log-level=debug']);
    const closed = new Promise<void>((r) => d.proc.on('close', () => r()));
    const qmp = await QmpClient.connect(control);
    const { fe, conn } = await openSession(d);
    const CALLS = 3000;
    try {
      fe.negotiate();
      d.proc.stderr!.pause(); // the pipe fills; the daemon's log writes find no room
      await sleep(50);
      const vhost: number[] = [];
      const qmpTimes: number[] = [];
      for (let i = 0; i < CALLS; i++) {
        const t0 = performance.now();
        assert.ok(fe.callU64(Request.GET_FEATURES) > 0n);
        vhost.push(performance.now() - t0);
        if (i % 30 === 29) qmpTimes.push(await timedQmp(qmp));
      }
      t.diagnostic(`with stderr unread: GET_FEATURES ${summary(vhost)}; QMP ${summary(qmpTimes)}`);
      assertPrompt(vhost, 'GET_FEATURES round trip');
      assertPrompt(qmpTimes, 'QMP query-stats');
    } finally {
      d.proc.stderr!.resume();
      fe.close();
      fe.ram.close();
      qmp.close();
    }
    await d.waitForLog((r) => r.msg === 'session ended; waiting for the next frontend' && r.conn === conn, 10000);
    assert.equal((await d.stop()).code, 0);
    await closed; // every byte the daemon wrote to stderr has been read
    const recs = d.logRecords();
    const features = recs.filter((r) => r.msg === 'message' && r.request === 'GET_FEATURES').length;
    assert.equal(features, CALLS + 1, 'a debug line for every GET_FEATURES (negotiate sent one more)');
    assert.ok(recs.some((r) => r.msg === 'shutting down'), 'the lines logged during shutdown made it out');
    assert.equal(d.logs.length, recs.length, 'every stderr line is a whole JSON record (no torn writes)');
  });
});
