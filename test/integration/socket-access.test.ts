// Socket access control against a real vubd: mode/owner/group of both sockets as stat sees them
// from the first moment the path exists, symlinks and non-sockets refused, stale sockets
// replaced, and the SO_PEERCRED allow lists with clients running as another uid.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, tempDir, vubdMain, repoRoot, type Daemon } from '../helpers/daemon.js';
import { makeImage, openSession, closeSession } from '../helpers/sessions.js';
import { native } from '../../src/native/index.js';

const NOBODY = 65534;
const NOGROUP = 65534;
const peerClient = path.join(repoRoot, 'dist/test/helpers/peer-client.js');
const isRoot = process.getuid!() === 0;
const rootOnly = isRoot ? {} : { skip: 'needs root (chown to nobody, clients as another uid)' };

/** a temp dir other users can traverse (mkdtemp makes 0700) */
function openDir(prefix: string): string {
  const dir = tempDir(prefix);
  fs.chmodSync(dir, 0o755);
  return dir;
}

function runVubd(args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [vubdMain, ...args], { encoding: 'utf8', timeout: 20000 });
  return { status: r.status, stderr: r.stderr };
}

function perm(p: string): { mode: number; uid: number; gid: number; socket: boolean } {
  const st = fs.lstatSync(p);
  return { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, socket: st.isSocket() };
}

/** runs peer-client.ts as uid/gid and returns its JSON line */
function clientAs(socketPath: string, uid: number, gid: number, seed: number): Promise<{ served: boolean; same?: boolean; error?: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [peerClient, socketPath, String(seed)], { uid, gid, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('error', reject);
    p.on('exit', () => {
      try {
        resolve(JSON.parse(out.trim().split('\n').pop()!));
      } catch {
        reject(new Error(`peer client printed no result: ${out} ${err}`));
      }
    });
  });
}

function refusals(d: Daemon): Record<string, unknown>[] {
  return d.logRecords().filter((r) => typeof r.msg === 'string' && r.msg.startsWith('frontend refused'));
}

describe('socket access control', () => {
  test('defaults: both sockets 0600, owned by vubd user', async () => {
    const dir = tempDir('vubd-access-');
    const control = path.join(dir, 'ctl.sock');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', `--control=${control}`], { dir });
    try {
      assert.deepEqual(perm(d.socketPath), { mode: 0o600, uid: process.getuid!(), gid: process.getgid!(), socket: true });
      assert.deepEqual(perm(control), { mode: 0o600, uid: process.getuid!(), gid: process.getgid!(), socket: true });
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
    assert.equal(fs.existsSync(d.socketPath), false, 'the socket is removed on exit');
  });

  test('mode, owner and group as stat sees them, from the first moment the path exists', rootOnly, async () => {
    const dir = openDir('vubd-access-');
    const image = makeImage(dir);
    const sock = path.join(dir, 'vubd.sock');
    const control = path.join(dir, 'ctl.sock');
    const proc = spawn(
      process.execPath,
      [vubdMain, `--socket-path=${sock}`, `--blk-file=${image}`, '--num-queues=1', '--socket-mode=0660', '--socket-owner=nobody', `--socket-group=${NOGROUP}`,
        `--control=${control}`, '--control-mode=0640', '--control-group=nogroup'],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    // A tight lstat loop on this thread (the daemon runs in its own process): the first sighting of
    // each path must already have the final mode and owner; a temporary directory is only 0700.
    const first = new Map<string, ReturnType<typeof perm>>();
    const tmpModes = new Set<number>();
    const deadline = Date.now() + 15000;
    while ((!first.has(sock) || !first.has(control)) && Date.now() < deadline && proc.exitCode === null) {
      for (const p of [sock, control]) {
        if (first.has(p)) continue;
        try {
          first.set(p, perm(p));
        } catch {
          /* not there yet */
        }
      }
      for (const e of fs.readdirSync(dir)) {
        if (!e.startsWith('.vubd-')) continue;
        try {
          tmpModes.add(fs.lstatSync(path.join(dir, e)).mode & 0o7777);
        } catch {
          /* gone meanwhile */
        }
      }
    }
    try {
      assert.deepEqual(first.get(sock), { mode: 0o660, uid: NOBODY, gid: NOGROUP, socket: true });
      assert.deepEqual(first.get(control), { mode: 0o640, uid: 0, gid: NOGROUP, socket: true });
      for (const m of tmpModes) assert.equal(m, 0o700, 'the temporary directory is private');
      assert.deepEqual(fs.readdirSync(dir).filter((e) => e.startsWith('.vubd-')), [], 'no temporary directory left');
      assert.deepEqual(perm(sock), { mode: 0o660, uid: NOBODY, gid: NOGROUP, socket: true });
    } finally {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.on('exit', r));
    }
  });

  test('a symlink or a regular file at either path is refused with exit 1 and left alone', async () => {
    const dir = tempDir('vubd-access-');
    const image = makeImage(dir);
    const target = path.join(dir, 'target');
    const link = path.join(dir, 'link.sock');
    fs.symlinkSync(target, link);
    const plain = path.join(dir, 'plain.sock');
    fs.writeFileSync(plain, 'keep me');
    const free = path.join(dir, 'free.sock');
    for (const [args, what] of [
      [[`--socket-path=${link}`], 'is a symbolic link'],
      [[`--socket-path=${plain}`], 'exists and is not a socket'],
      [[`--socket-path=${free}`, `--control=${link}`], 'is a symbolic link'],
      [[`--socket-path=${free}`, `--control=${plain}`], 'exists and is not a socket'],
    ] as const) {
      const r = runVubd([...args, `--blk-file=${image}`, '--num-queues=1']);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, new RegExp(what), r.stderr);
      assert.equal(fs.readlinkSync(link), target);
      assert.equal(fs.existsSync(target), false, 'nothing created through the symlink');
      assert.equal(fs.readFileSync(plain, 'utf8'), 'keep me');
      assert.equal(fs.existsSync(free), false, 'no socket left behind after the failure');
      assert.deepEqual(fs.readdirSync(dir).filter((e) => e.startsWith('.vubd-')), []);
    }
  });

  test('a stale socket is replaced; a live one is refused', async () => {
    const dir = tempDir('vubd-access-');
    const sock = path.join(dir, 'vubd.sock');
    native.close(native.listenUnix(sock, 1)); // the file stays, nobody listens: stale
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', '--socket-mode=0640'], { dir });
    try {
      assert.equal(perm(sock).mode, 0o640);
      const { fe, conn } = await openSession(d);
      fe.negotiate();
      await closeSession(d, fe, conn);
      const r = runVubd([`--socket-path=${sock}`, '--blk-driver=null', '--num-queues=1']);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /in use by another process/);
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });

  test('--allow-uid: another uid is served, a refused peer is closed at once and logged, the next one is served', rootOnly, async () => {
    const dir = openDir('vubd-access-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', '--socket-mode=0666', '--allow-uid=nobody'], { dir });
    try {
      const ok1 = await clientAs(d.socketPath, NOBODY, NOGROUP, 1);
      assert.deepEqual({ served: ok1.served, same: ok1.same }, { served: true, same: true }, JSON.stringify(ok1));

      const fds0 = d.fdCount();
      for (let i = 0; i < 10; i++) {
        const fd = native.connectUnix(d.socketPath); // this process is root: not listed
        const t0 = Date.now();
        const rev = new Int32Array(1);
        assert.equal(native.pollWait(Int32Array.of(fd), 1, rev, 5000), 1, 'the refused peer sees the close');
        assert.equal(native.recvMsg(fd, new Uint8Array(16), 0, 16, 0)?.n, 0, 'EOF without any message');
        assert.ok(Date.now() - t0 < 5000);
        native.close(fd);
      }
      await d.waitForLog(() => refusals(d).length >= 10);
      const r = refusals(d)[0]!;
      assert.equal(r.level, 40, 'a warn line');
      assert.deepEqual({ ...(r.peer as object), groups: undefined }, { uid: 0, gid: 0, pid: process.pid, groups: undefined });
      assert.match(String(r.msg), /uid 0 gid 0 \(pid \d+\)/);
      assert.equal(d.fdCount(), fds0, 'refused connections leave no fd behind');

      const ok2 = await clientAs(d.socketPath, NOBODY, NOGROUP, 2);
      assert.equal(ok2.served, true, JSON.stringify(ok2));
      assert.equal(ok2.same, true);
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });

  test('--allow-gid: a peer in the group is served, one outside it is refused', rootOnly, async () => {
    const dir = openDir('vubd-access-');
    const d = await startDaemon([`--blk-file=${makeImage(dir)}`, '--num-queues=1', '--socket-mode=0666', '--allow-gid=nogroup,1234'], { dir });
    try {
      const bad = await clientAs(d.socketPath, NOBODY, 1, 3); // uid nobody, gid daemon(1)
      assert.equal(bad.served, false, JSON.stringify(bad));
      const rec = await d.waitForLog((x) => typeof x.msg === 'string' && x.msg.startsWith('frontend refused'));
      assert.equal((rec.peer as { uid: number }).uid, NOBODY);
      assert.equal((rec.peer as { gid: number }).gid, 1);
      const good = await clientAs(d.socketPath, 1, NOGROUP, 4); // uid daemon(1), gid nogroup
      assert.equal(good.served, true, JSON.stringify(good));
      assert.equal(good.same, true);
    } finally {
      assert.equal((await d.stop()).code, 0);
    }
  });

  test('bad access options are usage errors (exit 2) with a clear message', () => {
    const dir = tempDir('vubd-access-');
    const base = [`--socket-path=${path.join(dir, 's')}`, '--blk-driver=null', '--num-queues=1'];
    for (const [args, msg] of [
      [['--socket-owner=no-such-user-x'], /no user named 'no-such-user-x'/],
      [['--socket-group=no-such-group-x'], /no group named 'no-such-group-x'/],
      [['--socket-mode=0999'], /--socket-mode must be an octal mode/],
      [['--socket-mode=4755'], /--socket-mode must be an octal mode/],
      [['--allow-uid=0,,1'], /comma-separated list/],
      [['--allow-gid=no-such-group-x'], /--allow-gid: no group named/],
      [['--control-mode=0660'], /need --control=PATH/],
    ] as const) {
      const r = runVubd([...base, ...args]);
      assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, msg);
    }
    const r = runVubd(['--fd=3', '--blk-driver=null', '--socket-mode=0660']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /need --socket-path/);
    assert.equal(fs.readdirSync(dir).length, 0, 'nothing created');
  });
});
