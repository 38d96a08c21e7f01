// systemd integration with the real systemd-socket-activate (Debian package systemd): vubd serves
// a socket it inherited, a NOTIFY_SOCKET listener of the test's own gets READY=1 (only once vubd
// serves), STATUS= lines and STOPPING=1; LISTEN_PID for another process is ignored; inherited fds
// that are not listening unix stream sockets are refused.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir, vubdMain, sleep } from '../helpers/daemon.js';
import { makeImage, pattern } from '../helpers/sessions.js';
import { Frontend, BLK } from '../helpers/frontend.js';
import { native } from '../../src/native/index.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { e2eSkip, findExecutable } from '../e2e/guest.js';

const activate = findExecutable('systemd-socket-activate');
const skip = e2eSkip(activate === null ? 'systemd-socket-activate not found (Debian package systemd)' : null);

/** the test's own NOTIFY_SOCKET: a bound unix datagram socket, read without blocking */
class NotifyListener {
  readonly fd: number;
  readonly messages: { text: string; at: number }[] = [];
  constructor(readonly path: string) {
    this.fd = native.bindDatagram(path);
  }
  drain(): void {
    const buf = new Uint8Array(4096);
    for (let r = native.recvMsg(this.fd, buf, 0, buf.length, 0); r !== null; r = native.recvMsg(this.fd, buf, 0, buf.length, 0)) {
      this.messages.push({ text: new TextDecoder().decode(buf.subarray(0, r.n)), at: Date.now() });
    }
  }
  async waitFor(match: (text: string) => boolean, timeoutMs = 20000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.drain();
      const hit = this.messages.find((m) => match(m.text));
      if (hit) return hit.text;
      if (Date.now() > deadline) throw new Error(`notification not received; got ${JSON.stringify(this.messages)}`);
      await sleep(10);
    }
  }
  close(): void {
    native.close(this.fd);
  }
}

function collect(p: ChildProcess): { text: () => string } {
  let out = '';
  p.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  p.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  return { text: () => out };
}

function exited(p: ChildProcess, timeoutMs = 10000): Promise<number | null> {
  if (p.exitCode !== null) return Promise.resolve(p.exitCode);
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      p.kill('SIGKILL');
      resolve(null);
    }, timeoutMs);
    p.on('exit', (code) => {
      clearTimeout(t);
      resolve(code);
    });
  });
}

async function waitOutput(out: { text: () => string }, re: RegExp, timeoutMs = 10000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(out.text())) {
    if (Date.now() > deadline) throw new Error(`not seen ${re}: ${out.text()}`);
    await sleep(20);
  }
}

function io(fe: Frontend, seed: number): void {
  const ring = fe.setupRing(0, 128);
  const data = pattern(seed, 16384);
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 128, data)), 0);
  const r = fe.run(ring, BLK.IN, 128, 16384, { region: 1 });
  assert.equal(fe.statusOf(r), 0);
  assert.deepEqual(fe.dataOf(r), data);
}

describe('systemd', { skip }, () => {
  test('socket activation with systemd-socket-activate: READY=1 once served, I/O, STATUS= lines, STOPPING=1 on SIGTERM', async () => {
    const dir = tempDir('vubd-systemd-');
    const sock = path.join(dir, 'vhost.sock');
    const notify = new NotifyListener(path.join(dir, 'notify'));
    const p = spawn(activate!, ['-l', sock, '--fdname=vhost', '-E', `NOTIFY_SOCKET=${notify.path}`, process.execPath, vubdMain, `--blk-file=${makeImage(dir)}`, '--num-queues=1'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const out = collect(p);
    try {
      await waitOutput(out, /Listening on .* as 3/);
      assert.equal(notify.messages.length, 0);
      // systemd-socket-activate starts vubd on the first connection, as systemd does for a unit
      const fe = Frontend.connect(sock);
      const ready = await notify.waitFor((t) => t.includes('READY=1'));
      assert.match(ready, new RegExp(`MAINPID=${p.pid}\\b`), 'exec: vubd has the pid LISTEN_PID named');
      assert.match(ready, /STATUS=serving .*disk\.img on socket fd 3 from systemd/);
      fe.negotiate();
      io(fe, 1);
      await notify.waitFor((t) => /STATUS=serving .* to frontend 1/.test(t));
      fe.close();
      fe.ram.close();
      await notify.waitFor((t) => /STATUS=.*waiting for a frontend/.test(t) && !t.includes('READY=1'));
      const fe2 = Frontend.connect(sock);
      fe2.negotiate();
      io(fe2, 2);
      fe2.close();
      fe2.ram.close();
      assert.equal(notify.messages.filter((m) => m.text.includes('READY=1')).length, 1, 'READY=1 once');
      p.kill('SIGTERM');
      assert.equal(await exited(p), 0, out.text());
      notify.drain();
      assert.ok(notify.messages.some((m) => m.text.includes('STOPPING=1')), JSON.stringify(notify.messages));
      assert.match(out.text(), /"socket":"socket fd 3 from systemd"/);
    } finally {
      p.kill('SIGKILL');
      notify.close();
    }
  });

  test("two sockets: the one named 'control' in LISTEN_FDNAMES is the QMP socket", async () => {
    const dir = tempDir('vubd-systemd-');
    const sock = path.join(dir, 'vhost.sock');
    const ctl = path.join(dir, 'ctl.sock');
    const notify = new NotifyListener('@vubd-test-notify-' + process.pid);
    // the control socket first: the order is LISTEN_FDNAMES's, not a convention
    const p = spawn(activate!, ['-l', ctl, '-l', sock, '--fdname=control:vhost', '-E', `NOTIFY_SOCKET=${notify.path}`, process.execPath, vubdMain, `--blk-file=${makeImage(dir)}`, '--num-queues=1'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const out = collect(p);
    try {
      await waitOutput(out, /Listening on .*vhost\.sock as 4/);
      native.close(native.connectUnix(sock)); // starts vubd
      await notify.waitFor((t) => t.includes('READY=1'));
      const qmp = await QmpClient.connect(ctl);
      const nodes = await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
      assert.ok(nodes.some((n) => n['node-name'] === 'file0'), JSON.stringify(nodes));
      qmp.close();
      const fe = Frontend.connect(sock);
      fe.negotiate();
      io(fe, 3);
      fe.close();
      fe.ram.close();
      p.kill('SIGTERM');
      assert.equal(await exited(p), 0, out.text());
      assert.ok(fs.existsSync(ctl), 'a passed socket is not vubd\'s to remove');
    } finally {
      p.kill('SIGKILL');
      notify.close();
    }
  });
});

describe('systemd conventions without systemd', () => {
  test('LISTEN_FDS for another pid (LISTEN_PID) is ignored', async () => {
    const dir = tempDir('vubd-systemd-');
    const image = makeImage(dir);
    const env = { ...process.env, LISTEN_FDS: '1', LISTEN_PID: '1', LISTEN_FDNAMES: 'vhost' };
    // without a socket of its own vubd has nothing to serve: a usage error, fd 3 untouched
    const p1 = spawn(process.execPath, [vubdMain, `--blk-file=${image}`], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const o1 = collect(p1);
    assert.equal(await exited(p1), 2, o1.text());
    assert.match(o1.text(), /one of --socket-path or --fd is required/);
    // with --socket-path it serves that path as usual
    const sock = path.join(dir, 'v.sock');
    const p2 = spawn(process.execPath, [vubdMain, `--blk-file=${image}`, `--socket-path=${sock}`, '--num-queues=1'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const o2 = collect(p2);
    try {
      await waitOutput(o2, /vubd listening/, 20000);
      const fe = Frontend.connect(sock);
      fe.negotiate();
      io(fe, 4);
      fe.close();
      fe.ram.close();
    } finally {
      p2.kill('SIGTERM');
      assert.equal(await exited(p2), 0, o2.text());
    }
  });

  test('an inherited fd that is not a listening unix stream socket is refused with a clear message', async () => {
    const dir = tempDir('vubd-systemd-');
    const image = makeImage(dir);
    const file = fs.openSync(path.join(dir, 'plain'), 'w');
    const cases: [unknown, RegExp][] = [
      [file, /fd 3 is not a usable socket: getsockopt: Socket operation on non-socket/],
      ['pipe', /fd 3 is a unix stream socket but not listening/], // node's 'pipe' is a socketpair
    ];
    for (const [fd3, msg] of cases) {
      const p = spawn(process.execPath, [vubdMain, `--blk-file=${image}`, '--fd=3', '--num-queues=1'], { stdio: ['ignore', 'pipe', 'pipe', fd3 as 'pipe'] });
      const o = collect(p);
      assert.equal(await exited(p), 1, o.text());
      assert.match(o.text(), msg);
    }
    fs.closeSync(file);
    // the same check for socket activation, with a NOTIFY_SOCKET that must not hear READY=1
    const notify = new NotifyListener(path.join(dir, 'notify'));
    try {
      // LISTEN_PID must be the child's own pid: a shell sets it to $$ and execs node
      const sh = spawn('/bin/sh', ['-c', `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`, process.execPath, vubdMain, `--blk-file=${image}`, '--num-queues=1'], {
        stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
        env: { ...process.env, NOTIFY_SOCKET: notify.path },
      });
      const o = collect(sh);
      assert.equal(await exited(sh), 1, o.text());
      assert.match(o.text(), /fd 3 is a unix stream socket but not listening/);
      notify.drain();
      assert.deepEqual(notify.messages, [], 'no READY=1 for a vubd that did not start');
    } finally {
      notify.close();
    }
  });

  test('no READY=1 when start-up fails', async () => {
    const dir = tempDir('vubd-systemd-');
    const notify = new NotifyListener(path.join(dir, 'notify'));
    try {
      const p = spawn(process.execPath, [vubdMain, `--blk-file=${path.join(dir, 'missing.img')}`, `--socket-path=${path.join(dir, 's')}`], {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: { ...process.env, NOTIFY_SOCKET: notify.path },
      });
      assert.equal(await exited(p), 1);
      notify.drain();
      assert.deepEqual(notify.messages, []);
    } finally {
      notify.close();
    }
  });
});
