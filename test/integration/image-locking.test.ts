// Image locking against real processes: vubd takes QEMU's file-posix lock bytes, so qemu-io,
// qemu-img, QEMU and other vubd processes see its locks and it sees theirs; the write lock is
// held only while a frontend has the device started, which lets live migration hand it over.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BLK, type Frontend } from '../helpers/frontend.js';
import { startDaemon, sleep, tempDir, vubdMain, type Daemon } from '../helpers/daemon.js';
import { makeImage, openSession, closeSession, pattern } from '../helpers/sessions.js';
import { QmpClient, QmpCommandError } from '../../src/control/qmp-client.js';

const OK = 0;

function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** The lock byte ranges ("100-101") a process holds on a file, from /proc/PID/fdinfo. */
function locksOf(pid: number, file: string): string[] {
  const ino = String(fs.statSync(file).ino);
  const out: string[] = [];
  for (const fd of fs.readdirSync(`/proc/${pid}/fdinfo`)) {
    let info = '';
    try {
      info = fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    } catch {
      continue;
    }
    for (const m of info.matchAll(/^lock:\s+\d+:\s+OFDLCK\s+ADVISORY\s+READ\s+-1\s+[0-9a-f]+:[0-9a-f]+:(\d+)\s+(\d+)\s+(\d+)$/gm)) {
      if (m[1] === ino) out.push(`${m[2]}-${m[3]}`);
    }
  }
  return out.sort();
}

async function until(what: string, cond: () => boolean, timeoutMs = 10000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** An interactive qemu-io kept open through its stdin pipe, once it holds its locks. */
async function qemuIoHolding(image: string, extra: string[] = []): Promise<ChildProcess> {
  const p = spawn('qemu-io', ['-f', 'raw', ...extra, image], { stdio: ['pipe', 'ignore', 'pipe'] });
  await until('qemu-io to lock the image', () => p.pid !== undefined && locksOf(p.pid, image).length > 0);
  return p;
}

async function stopChild(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  await gone;
}

function qemuIo(image: string, cmd: string, extra: string[] = []): { status: number | null; out: string } {
  const r = spawnSync('qemu-io', ['-f', 'raw', ...extra, '-c', cmd, image], { encoding: 'utf8', timeout: 20000 });
  return { status: r.status, out: r.stdout + r.stderr };
}

/** Runs vubd to its start-up decision: exits 1 with a message, or listens (then it is stopped). */
function vubdStartup(dir: string, args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [vubdMain, `--socket-path=${path.join(dir, `s${Date.now()}.sock`)}`, ...args], { encoding: 'utf8', timeout: 3000, killSignal: 'SIGTERM' });
  return { status: r.status, stderr: r.stderr };
}

/** Negotiates and starts ring 0 (what QEMU does when the guest's driver starts the device). */
function startDevice(fe: Frontend): ReturnType<Frontend['setupRing']> {
  fe.negotiate();
  return fe.setupRing(0, 128);
}

function ringWorks(fe: Frontend, ring: ReturnType<Frontend['setupRing']>, seed: number): void {
  const data = pattern(seed, 4096);
  assert.equal(fe.statusOf(fe.run(ring, BLK.OUT, 8 * seed, data)), OK);
  const r = fe.run(ring, BLK.IN, 8 * seed, 4096, { region: 1 });
  assert.equal(fe.statusOf(r), OK);
  assert.deepEqual(fe.dataOf(r), data);
}

const tools = have('qemu-io') && have('qemu-img');

describe('image locking', { skip: tools ? false : 'needs qemu-io and qemu-img (Debian package qemu-utils)' }, () => {
  let dir: string;
  let image: string;
  let a: Daemon;
  let control: string;

  before(async () => {
    dir = tempDir('vubd-lock-');
    image = makeImage(dir);
    control = path.join(dir, 'qmp.sock');
    a = await startDaemon([`--blk-file=${image}`, '--num-queues=1', `--control=${control}`], { dir });
  });

  after(async () => {
    assert.equal((await a?.stop())?.code, 0);
  });

  test("an idle device holds a reader's lock, a started one QEMU's writer locks; qemu-io cannot write while started", async () => {
    assert.deepEqual(locksOf(a.proc.pid!, image), ['100-100']);
    // Idle: like QEMU's inactive image, nothing stops another writer yet.
    assert.equal(qemuIo(image, 'write 0 4k').status, 0);

    const { fe, conn } = await openSession(a);
    try {
      const ring = startDevice(fe);
      await a.waitForLog((r) => r.msg === 'device started: image write lock taken');
      // QEMU 7.2's virtio-blk on a writable raw file: consistent read + write held, write not shared.
      assert.deepEqual(locksOf(a.proc.pid!, image), ['100-101', '201-201']);
      ringWorks(fe, ring, 1);

      const w = qemuIo(image, 'write 0 4k');
      assert.notEqual(w.status, 0, w.out);
      assert.match(w.out, /Failed to get "write" lock/);
      // Readers that share write still work, as beside QEMU.
      const info = spawnSync('qemu-img', ['info', '-U', image], { encoding: 'utf8' });
      assert.equal(info.status, 0, info.stderr);
      assert.match(info.stdout, /virtual size: 16 MiB/);
      const plain = spawnSync('qemu-img', ['info', image], { encoding: 'utf8' });
      assert.equal(plain.status, 0, `qemu-img info works beside a QEMU 7.2 writer too: ${plain.stderr}`);
      assert.equal(qemuIo(image, 'read 0 4k', ['-r']).status, 0);

      fe.getVringBase(0);
      await a.waitForLog((r) => r.msg === 'device stopped: image write lock released');
      assert.deepEqual(locksOf(a.proc.pid!, image), ['100-100']);
      assert.equal(qemuIo(image, 'write 0 4k').status, 0, 'the lock goes with the stopped device');
    } finally {
      await closeSession(a, fe, conn);
    }
  });

  test('a second vubd is refused at start-up while the first serves a started device', async () => {
    const { fe, conn } = await openSession(a);
    try {
      const ring = startDevice(fe);
      const r = vubdStartup(dir, [`--blk-file=${image}`]);
      assert.equal(r.status, 1, r.stderr);
      // The first vubd does not share write (byte 201), which is the first thing QEMU's check tests.
      assert.match(r.stderr, /^vubd: Failed to get "write" lock: is another process using the image \[.*disk\.img\]\?/);
      assert.match(r.stderr, new RegExp(`locked by pid ${a.proc.pid} \\(.*main\\.js --socket-path=`));
      ringWorks(fe, ring, 2);
    } finally {
      await closeSession(a, fe, conn);
    }
    await a.waitForLog((r) => r.msg === 'device stopped: image write lock released');
  });

  test('vubd refuses an image a running qemu-io writes, or takes it with --force-share and a warning', async () => {
    const io = await qemuIoHolding(image);
    try {
      const r = vubdStartup(dir, [`--blk-file=${image}`]);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, /Failed to get shared "write" lock/);
      assert.match(r.stderr, new RegExp(`locked by pid ${io.pid} \\(qemu-io -f raw .*disk\\.img\\)`));
      // A read-only vubd does not share write either (a read-only QEMU disk does not).
      const ro = vubdStartup(dir, [`--blk-file=${image}`, '--read-only']);
      assert.equal(ro.status, 1, ro.stderr);

      // The running vubd's device cannot start either: the ring start closes the connection.
      const { fe, conn } = await openSession(a);
      try {
        assert.throws(() => startDevice(fe));
        const refused = await a.waitForLog((x) => x.msg === 'refusing to start the device: another process holds the image');
        assert.match(String(refused.err), new RegExp(`locked by pid ${io.pid} \\(qemu-io `));
      } finally {
        await closeSession(a, fe, conn);
      }
      assert.deepEqual(locksOf(a.proc.pid!, image), ['100-100']);

      const forced = await startDaemon([`--blk-file=${image}`, '--num-queues=1', '--force-share'], { dir: tempDir('vubd-lock-forced-') });
      try {
        await forced.waitForLog((x) => x.level === 40 && /image locking is off \(--force-share\)/.test(String(x.msg)));
        assert.deepEqual(locksOf(forced.proc.pid!, image), []);
        const s = await openSession(forced);
        try {
          ringWorks(s.fe, startDevice(s.fe), 3);
        } finally {
          await closeSession(forced, s.fe, s.conn);
        }
      } finally {
        assert.equal((await forced.stop()).code, 0);
      }
    } finally {
      await stopChild(io);
    }
  });

  test('blockdev-add refuses an image another writer holds (locking=off opts out); a swap on a started device moves the write lock', async () => {
    const other = path.join(dir, 'other.img');
    const third = path.join(dir, 'third.img');
    for (const f of [other, third]) {
      fs.writeFileSync(f, '');
      fs.truncateSync(f, 16 * 2 ** 20);
    }
    const qmp = await QmpClient.connect(control);
    const { fe, conn } = await openSession(a);
    const io = await qemuIoHolding(third);
    try {
      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'other', filename: other });
      const ring = startDevice(fe);
      await a.waitForLog((r) => r.msg === 'device started: image write lock taken');
      assert.deepEqual(locksOf(a.proc.pid!, other), ['100-100']);

      await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'other' });
      assert.deepEqual(locksOf(a.proc.pid!, other), ['100-101', '201-201'], 'the new root is claimed');
      assert.deepEqual(locksOf(a.proc.pid!, image), ['100-100'], 'the old one is released');
      ringWorks(fe, ring, 6);

      const refused = await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'third', filename: third }).catch((e: unknown) => e);
      assert.ok(refused instanceof QmpCommandError, String(refused));
      assert.equal(refused.errorClass, 'GenericError');
      assert.match(refused.message, new RegExp(`Failed to get shared "write" lock: is another process using the image \\[${third}\\]\\? It is locked by pid ${io.pid} \\(qemu-io `));
      const bad = await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'third', filename: third, locking: 'maybe' }).catch((e: unknown) => e);
      assert.match(String((bad as Error).message), /locking.*'maybe'/);

      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'third', filename: third, locking: 'off' });
      await a.waitForLog((r) => r.level === 40 && r.node === 'third' && /image locking is off \(locking=off\)/.test(String(r.msg)));
      await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'third' });
      assert.deepEqual(locksOf(a.proc.pid!, third), [], 'locking=off takes no locks');
      ringWorks(fe, ring, 7);

      // A writer that appears on an idle node makes the swap to it fail, and the device stays where it was.
      await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'file0' });
      const io2 = await qemuIoHolding(other);
      try {
        const swap = await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'other' }).catch((e: unknown) => e);
        assert.ok(swap instanceof QmpCommandError, String(swap));
        assert.match(swap.message, /Failed to get shared "write" lock/);
        assert.deepEqual(locksOf(a.proc.pid!, other), ['100-100']);
        assert.deepEqual(locksOf(a.proc.pid!, image), ['100-101', '201-201']);
        ringWorks(fe, ring, 8);
      } finally {
        await stopChild(io2);
      }
    } finally {
      await stopChild(io);
      await closeSession(a, fe, conn);
      for (const n of ['other', 'third']) await qmp.execute('blockdev-del', { 'node-name': n }).catch(() => undefined);
      qmp.close();
    }
  });

  test('QEMU and vubd refuse each other', { skip: have('qemu-system-x86_64') ? false : 'needs qemu-system-x86_64' }, async () => {
    const qemuArgs = ['-accel', 'tcg', '-S', '-nodefaults', '-display', 'none', '-monitor', 'none', '-serial', 'none', '-drive', `file=${image},format=raw,if=none,id=d0`, '-device', 'virtio-blk-pci,drive=d0'];
    const { fe, conn } = await openSession(a);
    try {
      startDevice(fe);
      const q = spawnSync('qemu-system-x86_64', qemuArgs, { encoding: 'utf8', timeout: 30000 });
      assert.equal(q.status, 1, q.stderr);
      assert.match(q.stderr, /Failed to get "write" lock/);
    } finally {
      await closeSession(a, fe, conn);
    }
    const qemu = spawn('qemu-system-x86_64', qemuArgs, { stdio: 'ignore' });
    try {
      // QEMU takes its locks in steps: wait until it holds the writer's set before racing it.
      await until('QEMU to lock the image for writing', () => qemu.pid !== undefined && locksOf(qemu.pid, image).join() === '100-101,201-201', 30000);
      const { fe: fe2, conn: conn2 } = await openSession(a);
      try {
        assert.throws(() => startDevice(fe2));
        const refused = await a.waitForLog((x) => x.msg === 'refusing to start the device: another process holds the image' && String(x.err).includes(`pid ${qemu.pid} `));
        assert.match(String(refused.err), /qemu-system-x86_64/);
      } finally {
        await closeSession(a, fe2, conn2);
      }
      assert.deepEqual(locksOf(qemu.pid!, image), ['100-101', '201-201'], 'QEMU 7.2 holds what a started vubd holds');
      const r = vubdStartup(dir, [`--blk-file=${image}`]);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, /Failed to get "write" lock.*locked by pid \d+ \(qemu-system-x86_64 /);
    } finally {
      await stopChild(qemu);
    }
  });

  test('live migration: the destination starts beside the source and takes the lock once the source stops', async () => {
    const src = await openSession(a);
    let b: Daemon | null = null;
    try {
      const ring = startDevice(src.fe);
      ringWorks(src.fe, ring, 4);
      // The destination vubd starts while the source still writes (--incoming: no start-up check).
      b = await startDaemon([`--blk-file=${image}`, '--num-queues=1', '--incoming'], { dir: tempDir('vubd-lock-dst-') });
      assert.deepEqual(locksOf(b.proc.pid!, image), ['100-100']);

      // Its device cannot start while the source's is started.
      const early = await openSession(b);
      try {
        assert.throws(() => startDevice(early.fe));
        await b.waitForLog((x) => x.msg === 'refusing to start the device: another process holds the image');
      } finally {
        await closeSession(b, early.fe, early.conn);
      }

      // The source stops every ring (QEMU does when migration completes); the destination starts.
      src.fe.getVringBase(0);
      await a.waitForLog((x) => x.msg === 'device stopped: image write lock released');
      const dst = await openSession(b);
      try {
        const dring = startDevice(dst.fe);
        const r = dst.fe.run(dring, BLK.IN, 8 * 4, 4096, { region: 1 });
        assert.equal(dst.fe.statusOf(r), OK);
        assert.deepEqual(dst.fe.dataOf(r), pattern(4, 4096), 'the destination reads what the source wrote');
        ringWorks(dst.fe, dring, 5);
        assert.deepEqual(locksOf(b.proc.pid!, image), ['100-101', '201-201']);

        // Now the source is the one that cannot start again (failing back first stops the destination).
        assert.throws(() => src.fe.restartRing(ring, src.fe.getVringBase(0), true));
        await a.waitForLog((x) => x.msg === 'refusing to start the device: another process holds the image');
      } finally {
        await closeSession(b, dst.fe, dst.conn);
      }
    } finally {
      await closeSession(a, src.fe, src.conn).catch(() => undefined);
      if (b) assert.equal((await b.stop()).code, 0);
    }
  });
});
