// Real-syscall tests of the C addon (native-bindings/) through its typed face.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import {
  native,
  isErrno,
  POLLIN,
  READABLE,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  type Ring,
} from '../../src/native/index.js';

const PAGE = 4096;
const enc = new TextEncoder();
const dec = new TextDecoder();

function tmpFile(name: string): { file: string; fd: number; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-native-'));
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w+');
  return {
    file,
    fd,
    cleanup: () => {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function assertErrno(fn: () => unknown, code: string, errno: number, msg?: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(isErrno(e, code), `expected ${code}, got ${String(e)}`);
    assert.equal(e.errno, errno);
    if (msg) assert.match(e.message, msg);
    return true;
  });
}

/** Fills [off, off+len) of a view with a recognisable pattern derived from seed. */
function fill(view: Uint8Array, off: number, len: number, seed: number): void {
  for (let i = 0; i < len; i++) view[off + i] = (i * 7 + seed) & 0xff;
}

test('export list matches the Native interface', () => {
  const expected = [
    'F_RDLCK', 'F_UNLCK', 'F_WRLCK', 'RbdImage', 'RbdQueue', 'Ring', 'accept', 'addressOf', 'bindDatagram', 'blockDeviceSize', 'close', 'connectUnix', 'dup', 'eventfd',
    'eventfdRead', 'eventfdWrite', 'fallocate', 'fsync', 'listenUnix', 'liveMappings', 'lookupGroup', 'lookupUser', 'mapShared',
    'memfdCreate', 'mmap', 'ofdGetLock', 'ofdSetLock', 'peerCred', 'poll', 'pollWait', 'preadv', 'pwritev', 'rbdAvailable',
    // rbdConnections only exists when the addon was built with librbd
    ...(native.rbdAvailable ? ['rbdConnections'] : []), 'recvMsg', 'recvv', 'releaseMapping',
    'retainMapping', 'sendDatagram', 'sendMsg', 'sendv', 'setBlocking', 'sigbusRescues', 'socketError', 'socketInfo', 'socketpair',
    'streamConnect', 'threadCpuMicros', 'unmap', 'viewMapping',
  ];
  assert.deepEqual(Object.keys(native).sort(), expected);
});

test('peerCred, socketInfo, NSS lookups and datagrams', () => {
  const [a, b] = native.socketpair();
  try {
    const c = native.peerCred(a);
    assert.deepEqual({ pid: c.pid, uid: c.uid, gid: c.gid }, { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    assert.ok(Array.isArray(c.groups));
    assert.deepEqual(native.socketInfo(a), { unix: true, stream: true, listening: false });
  } finally {
    native.close(a);
    native.close(b);
  }
  const t = tmpFile('not-a-socket');
  assertErrno(() => native.socketInfo(t.fd), 'ENOTSOCK', 88);
  assertErrno(() => native.peerCred(t.fd), 'ENOTSOCK', 88);
  assert.deepEqual(native.lookupUser('root'), { uid: 0, gid: 0 });
  assert.equal(native.lookupUser('no-such-user-vubd'), null);
  assert.equal(native.lookupGroup('root'), 0);
  assert.equal(native.lookupGroup('no-such-group-vubd'), null);
  for (const addr of ['@vubd-test-' + process.pid, path.join(path.dirname(t.file), 'dgram.sock')]) {
    const rx = native.bindDatagram(addr);
    try {
      assert.equal(native.recvMsg(rx, new Uint8Array(64), 0, 64, 0), null, 'nothing yet: null, not a throw');
      assert.equal(native.sendDatagram(addr, new TextEncoder().encode('READY=1')), 7);
      const buf = new Uint8Array(64);
      const r = native.recvMsg(rx, buf, 0, 64, 0);
      assert.equal(new TextDecoder().decode(buf.subarray(0, r!.n)), 'READY=1');
    } finally {
      native.close(rx);
    }
  }
  assertErrno(() => native.sendDatagram('@vubd-nobody-listens-' + process.pid, new Uint8Array(1)), 'ECONNREFUSED', 111);
  t.cleanup();
});

test('OFD locks: a conflict is false (not thrown), F_OFD_GETLK names it, the same open file never conflicts with itself', () => {
  const t = tmpFile('locks.img');
  const other = fs.openSync(t.file, 'r+');
  try {
    assert.equal(native.ofdSetLock(t.fd, native.F_RDLCK, 100, 1), true);
    assert.equal(native.ofdGetLock(t.fd, native.F_WRLCK, 100, 1), null, 'own lock');
    assert.deepEqual(native.ofdGetLock(other, native.F_WRLCK, 100, 1), { type: native.F_RDLCK, start: 100, len: 1, pid: -1 });
    assert.equal(native.ofdGetLock(other, native.F_WRLCK, 101, 1), null);
    assert.equal(native.ofdSetLock(other, native.F_RDLCK, 100, 1), true, 'shared locks coexist');
    assert.equal(native.ofdSetLock(other, native.F_WRLCK, 100, 1), false, 'EAGAIN is a return value');
    assert.equal(native.ofdSetLock(t.fd, native.F_UNLCK, 100, 1), true);
    assert.equal(native.ofdSetLock(other, native.F_WRLCK, 100, 1), true);
    assertErrno(() => native.ofdSetLock(-1, native.F_RDLCK, 0, 1), 'EBADF', 9, /^fcntl\(F_OFD_SETLK\): /);
    assert.throws(() => native.ofdSetLock(t.fd, 7, 0, 1), RangeError);
    assertErrno(() => native.ofdGetLock(t.fd, native.F_UNLCK, 0, 1), 'EINVAL', 22);
  } finally {
    fs.closeSync(other);
    t.cleanup();
  }
});

test('errors carry errno, code and a "syscall: strerror" message', () => {
  const [a, b] = native.socketpair();
  native.close(a);
  native.close(b);
  assertErrno(() => native.sendMsg(a, new Uint8Array(1), 0, 1, []), 'EBADF', 9, /^sendmsg: Bad file descriptor$/);
  assertErrno(() => native.close(a), 'EBADF', 9, /^close: /);
  assertErrno(() => native.recvMsg(b, new Uint8Array(4), 0, 4, 0), 'EBADF', 9, /^recvmsg: /);
  assert.throws(() => native.recvMsg(b, new Uint8Array(4), 2, 4, 0), RangeError);
  assert.throws(() => native.recvMsg(b, new Uint8Array(4), 0, 4, 65), RangeError);
});

test('SCM_RIGHTS: two eventfds cross a socketpair and still work', () => {
  const [a, b] = native.socketpair();
  const e1 = native.eventfd(true);
  const e2 = native.eventfd(true);
  try {
    const sent = native.sendMsg(a, enc.encode('xxhelloxx'), 2, 5, [e1, e2]);
    assert.equal(sent, 5);
    const buf = new Uint8Array(64);
    const r = native.recvMsg(b, buf, 3, 60, 8);
    assert.ok(r);
    assert.equal(r.n, 5);
    assert.equal(dec.decode(buf.subarray(3, 8)), 'hello');
    assert.equal(r.truncated, false);
    assert.equal(r.fds.length, 2);
    const [r1, r2] = r.fds as [number, number];
    assert.ok(r1 !== e1 && r2 !== e2 && r1 !== r2);
    // Received fd 0 is the same eventfd object as e1, fd 1 as e2.
    native.eventfdWrite(r1, 5);
    assert.equal(native.eventfdRead(e1), 5);
    native.eventfdWrite(e2, 7);
    assert.equal(native.eventfdRead(r2), 7);
    assert.equal(native.eventfdRead(r1), 0);
    native.close(r1);
    native.close(r2);

    // Non-blocking receive with nothing queued: null rather than an exception.
    native.setBlocking(b, false);
    assert.equal(native.recvMsg(b, buf, 0, 64, 4), null);
    // Peer closes: n = 0.
    native.close(a);
    const eof = native.recvMsg(b, buf, 0, 64, 4);
    assert.deepEqual(eof, { n: 0, fds: [], truncated: false });
  } finally {
    for (const fd of [b, e1, e2]) native.close(fd);
    try {
      native.close(a);
    } catch {
      /* already closed above */
    }
  }
});

test('SCM_RIGHTS: more fds than maxFds reports truncation', () => {
  const [a, b] = native.socketpair();
  const efds = [native.eventfd(true), native.eventfd(true), native.eventfd(true), native.eventfd(true)];
  try {
    assert.equal(native.sendMsg(a, enc.encode('m'), 0, 1, efds), 1);
    const r = native.recvMsg(b, new Uint8Array(8), 0, 8, 2);
    assert.ok(r);
    assert.equal(r.n, 1);
    assert.equal(r.truncated, true);
    assert.ok(r.fds.length <= 2);
    for (const fd of r.fds) native.close(fd); // must be real, owned fds

    // maxFds = 0 and an fd arrives: truncated as well, no fds.
    assert.equal(native.sendMsg(a, enc.encode('n'), 0, 1, [efds[0]!]), 1);
    const r0 = native.recvMsg(b, new Uint8Array(8), 0, 8, 0);
    assert.deepEqual(r0, { n: 1, fds: [], truncated: true });
  } finally {
    for (const fd of [a, b, ...efds]) native.close(fd);
  }
});

test('listenUnix / accept / connectUnix / dup', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-sock-'));
  const sock = path.join(dir, 's');
  const l = native.listenUnix(sock, 4);
  try {
    assert.equal(native.accept(l), -1);
    assertErrno(() => native.listenUnix(sock, 4), 'EADDRINUSE', 98, /^bind: /);
    const c = native.connectUnix(sock);
    const s = native.accept(l);
    assert.ok(s >= 0);
    const d = native.dup(c);
    assert.notEqual(d, c);
    assert.equal(native.sendMsg(d, enc.encode('ping'), 0, 4, []), 4);
    const buf = new Uint8Array(16);
    // accepted sockets are non-blocking, but the data is already there
    const r = native.recvMsg(s, buf, 0, 16, 0);
    assert.equal(r?.n, 4);
    assert.equal(dec.decode(buf.subarray(0, 4)), 'ping');
    assert.equal(native.recvMsg(s, buf, 0, 16, 0), null);
    for (const fd of [c, s, d]) native.close(fd);
    assertErrno(() => native.connectUnix(path.join(dir, 'missing')), 'ENOENT', 2, /^connect: /);
  } finally {
    native.close(l);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('unmap: unmaps now and detaches; twice or a foreign buffer is false; SIGBUS past a truncated end is patched', () => {
  const fd = native.memfdCreate('vubd-unmap', 8192);
  try {
    const buf = native.mmap(fd, 8192, 0, true);
    const view = new Uint8Array(buf);
    view[0] = 7;
    const before = native.sigbusRescues();
    fs.ftruncateSync(fd, 4096); // the second page is now past the end of the file
    assert.equal(view[4096], 0, 'the faulting read sees a zero page instead of killing the process');
    assert.equal(native.sigbusRescues(), before + 1);
    assert.equal(view[0], 7, 'the first page is still the shared one');
    assert.equal(native.unmap(buf), true);
    assert.equal(buf.byteLength, 0, 'detached');
    assert.equal(view[0], undefined, 'views of it see nothing');
    assert.equal(native.unmap(buf), false, 'already unmapped');
    assert.equal(native.unmap(new ArrayBuffer(16)), false, 'not ours');
  } finally {
    native.close(fd);
  }
});

test('a SIGBUS that is not a fault in our mappings still kills the process', () => {
  const addon = createRequire(import.meta.url).resolve('../../../native-bindings/build/Release/vubd_native.node');
  // The addon installs its handler on load; a sent SIGBUS must not be swallowed by it.
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(addon)}); process.kill(process.pid, 'SIGBUS'); setTimeout(() => {}, 2000)`], { timeout: 10000 });
  assert.equal(r.signal, 'SIGBUS', `exit ${r.status} ${r.signal}: ${r.stderr}`);
});

test('memfd: two shared mappings see each other; offsets map the right page', () => {
  const size = 256 * 1024;
  const fd = native.memfdCreate('vubd-test', size);
  try {
    const a = native.mmap(fd, size, 0, true);
    const b = native.mmap(fd, size, 0, true);
    assert.equal(a.byteLength, size);
    assert.notEqual(native.addressOf(a), native.addressOf(b));
    assert.equal(native.addressOf(a) % PAGE, 0);
    const va = new Uint8Array(a);
    const vb = new Uint8Array(b);
    va[100] = 0xab;
    assert.equal(vb[100], 0xab);
    vb[size - 1] = 0x5a;
    assert.equal(va[size - 1], 0x5a);
    // A mapping at page offset 2 aliases byte 2*PAGE of the others; read-only mapping reads.
    fill(va, 2 * PAGE, 64, 3);
    const c = new Uint8Array(native.mmap(fd, PAGE, 2 * PAGE, false));
    assert.deepEqual(c.subarray(0, 64), va.subarray(2 * PAGE, 2 * PAGE + 64));
    // addressOf a view is the address of its first byte
    assert.equal(native.addressOf(va.subarray(10) as unknown as ArrayBuffer), native.addressOf(a) + 10);
  } finally {
    native.close(fd);
  }
});

test('mmap argument errors: unaligned offset EINVAL, length bounds ERANGE', () => {
  const fd = native.memfdCreate('vubd-test', 2 * PAGE);
  try {
    assertErrno(() => native.mmap(fd, PAGE, 100, true), 'EINVAL', 22, /^mmap: Invalid argument$/);
    assertErrno(() => native.mmap(fd, 0, 0, true), 'ERANGE', 34, /4 GiB/);
    assertErrno(() => native.mmap(fd, 4 * 2 ** 30 + PAGE, 0, true), 'ERANGE', 34, /chunks/);
    assertErrno(() => native.mmap(-1, PAGE, 0, true), 'EBADF', 9);
  } finally {
    native.close(fd);
  }
});

test('eventfd counter semantics', () => {
  const e = native.eventfd(true);
  const blocking = native.eventfd(false);
  try {
    assert.equal(native.eventfdRead(e), 0); // EAGAIN -> 0
    native.eventfdWrite(e, 3);
    native.eventfdWrite(e, 4);
    assert.equal(native.eventfdRead(e), 7); // writes accumulate, a read drains
    assert.equal(native.eventfdRead(e), 0);
    native.eventfdWrite(e, 2 ** 40);
    assert.equal(native.eventfdRead(e), 2 ** 40);
    native.eventfdWrite(blocking, 1);
    assert.equal(native.eventfdRead(blocking), 1);
    assertErrno(() => native.eventfdRead(-1), 'EBADF', 9, /^read: /);
  } finally {
    native.close(e);
    native.close(blocking);
  }
});

test('pollWait: timeout 0 gives 0, an eventfd write makes it ready', () => {
  const e = native.eventfd(true);
  const idle = native.eventfd(true);
  try {
    const fds = Int32Array.of(idle, e);
    const rev = new Int32Array(2).fill(-1);
    assert.equal(native.pollWait(fds, 2, rev, 0), 0);
    assert.deepEqual([...rev], [0, 0]);
    native.eventfdWrite(e, 1);
    assert.equal(native.pollWait(fds, 2, rev, 0), 1);
    assert.equal(rev[0], 0);
    assert.ok((rev[1]! & POLLIN) !== 0);
    // waits with a timeout, too
    const t0 = Date.now();
    native.eventfdRead(e);
    assert.equal(native.pollWait(fds, 2, rev, 30), 0);
    assert.ok(Date.now() - t0 >= 25);
    assert.throws(() => native.pollWait(fds, 3, rev, 0), RangeError);
  } finally {
    native.close(e);
    native.close(idle);
  }
});

test('uv poll handle fires when a socket becomes readable; close twice is safe', async () => {
  const [a, b] = native.socketpair();
  let calls = 0;
  try {
    const got = new Promise<[number, number]>((resolve) => {
      const h = native.poll(b, READABLE, (status, events) => {
        calls++;
        h.close(); // level-triggered: the byte stays unread, so stop it from firing again
        resolve([status, events]);
      });
      setTimeout(() => native.sendMsg(a, enc.encode('k'), 0, 1, []), 10);
    });
    const [status, events] = await got;
    assert.equal(status, 0);
    assert.ok((events & READABLE) !== 0);
    assert.equal(calls, 1);

    // A second handle on the same fd: close from inside the callback, then twice more.
    const h2Calls: number[] = [];
    const h2 = native.poll(b, READABLE, (_s, ev) => {
      h2Calls.push(ev);
      h2.close();
      h2.close();
    });
    await new Promise((r) => setTimeout(r, 50)); // the byte is still unread: fires at once
    assert.equal(h2Calls.length, 1);
    h2.close();
    h2.stop();
    h2.unref();
    assert.throws(() => h2.start(READABLE), (e: unknown) => isErrno(e, 'EBADF'));

    // After close no more callbacks, and the fd can be polled again (handle was released).
    native.sendMsg(a, enc.encode('more'), 0, 4, []);
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(h2Calls.length, 1);
    let fired = false;
    const h3 = native.poll(b, READABLE, () => {
      fired = true;
      h3.close();
    });
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(fired, true);
  } finally {
    native.close(a);
    native.close(b);
  }
});

test('uv poll handle: a throwing callback reaches uncaughtException', async () => {
  const [a, b] = native.socketpair();
  const original = process.listeners('uncaughtException');
  process.removeAllListeners('uncaughtException');
  try {
    const caught = new Promise<unknown>((resolve) => process.once('uncaughtException', resolve));
    const h = native.poll(b, READABLE, () => {
      h.close();
      throw new Error('boom');
    });
    native.sendMsg(a, enc.encode('x'), 0, 1, []);
    const e = await caught;
    assert.equal((e as Error).message, 'boom');
  } finally {
    for (const l of original) process.on('uncaughtException', l);
    native.close(a);
    native.close(b);
  }
});

test('addon loads in a worker; open handles are cleaned up at worker exit', async () => {
  const req = createRequire(import.meta.url);
  const addon = req.resolve('../../../native-bindings/build/Release/vubd_native.node');
  const code = `
    const { parentPort } = require('node:worker_threads');
    const n = require(${JSON.stringify(addon)});
    const e = n.eventfd(true);
    const h = n.poll(e, 1, () => {});
    h.unref();                    // started but unref'd: the worker may exit with it open
    const ring = new n.Ring(4, 2, 2);
    parentPort.postMessage({ fd: e, ring: ring.fd, cpu: n.threadCpuMicros() });
  `;
  const w = new Worker(code, { eval: true });
  const msg = await new Promise<{ fd: number; ring: number; cpu: number }>((res, rej) => {
    w.once('message', res);
    w.once('error', rej);
  });
  const exitCode = await new Promise<number>((res) => w.once('exit', res));
  assert.equal(exitCode, 0);
  assert.ok(msg.fd > 0 && msg.cpu >= 0);
  native.close(msg.fd);
});

/** Waits for n completions, returning tag -> res. */
function complete(ring: Ring, n: number): Map<number, number> {
  const out = new Float64Array(16);
  const res = new Map<number, number>();
  ring.submit();
  while (res.size < n) {
    ring.submitAndWait(1);
    const k = ring.reap(out);
    for (let i = 0; i < k; i++) res.set(out[2 * i]!, out[2 * i + 1]!);
  }
  return res;
}

function makeRing(t: { skip: (msg: string) => void }, entries: number, tags: number, segs: number): Ring | null {
  try {
    return new native.Ring(entries, tags, segs);
  } catch (e) {
    // Under CI io_uring must work: a machine without it would otherwise pass these tests untested.
    if ((isErrno(e, 'ENOSYS') || isErrno(e, 'EPERM')) && process.env.CI !== 'true') {
      t.skip(`io_uring unavailable: ${(e as Error).message}`);
      return null;
    }
    throw e;
  }
}

test('Ring: writev/readv zero-copy through an mmapped memfd, fsync, fallocate punch hole', (t) => {
  const ring = makeRing(t, 8, 4, 4);
  if (!ring) return;
  const mem = native.memfdCreate('guest', 64 * 1024);
  const f = tmpFile('disk.img');
  try {
    assert.equal(ring.entries, 8);
    assert.ok(ring.fd > 0);
    const ab = native.mmap(mem, 64 * 1024, 0, true);
    const guest = new Uint8Array(ab);
    const base = native.addressOf(ab);
    fill(guest, 0, PAGE, 11);
    fill(guest, 8192, PAGE, 99);

    // writev: guest[0..4K) + guest[8K..12K) -> file[0..8K)
    const iov = Float64Array.of(base, PAGE, base + 8192, PAGE);
    assert.equal(ring.prepWritev(f.fd, iov, 2, 0, 1), true);
    iov.fill(0); // the ring copied the iovecs: reusing the array at once is allowed
    assert.deepEqual(complete(ring, 1), new Map([[1, 8192]]));
    const onDisk = fs.readFileSync(f.file);
    assert.equal(onDisk.length, 8192);
    assert.deepEqual(new Uint8Array(onDisk.subarray(0, PAGE)), guest.subarray(0, PAGE));
    assert.deepEqual(new Uint8Array(onDisk.subarray(PAGE)), guest.subarray(8192, 8192 + PAGE));

    // readv: file[0..8K) -> guest[32K..+1K) + guest[40K..+7K): lands directly in the mapping
    const riov = Float64Array.of(base + 32768, 1024, base + 40960, 7168);
    assert.equal(ring.prepReadv(f.fd, riov, 2, 0, 2), true);
    assert.deepEqual(complete(ring, 1), new Map([[2, 8192]]));
    assert.deepEqual(guest.subarray(32768, 32768 + 1024), new Uint8Array(onDisk.subarray(0, 1024)));
    assert.deepEqual(guest.subarray(40960, 40960 + 7168), new Uint8Array(onDisk.subarray(1024)));

    // fsync (both flavours) and fallocate punch hole
    assert.equal(ring.prepFsync(f.fd, 0, false), true);
    assert.equal(ring.prepFsync(f.fd, 1, true), true);
    assert.deepEqual(complete(ring, 2), new Map([[0, 0], [1, 0]]));
    assert.equal(ring.prepFallocate(f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE, 3), true);
    assert.deepEqual(complete(ring, 1), new Map([[3, 0]]));
    const after = fs.readFileSync(f.file);
    assert.equal(after.length, 8192); // KEEP_SIZE
    assert.ok(after.subarray(0, PAGE).every((x) => x === 0));
    assert.deepEqual(after.subarray(PAGE), onDisk.subarray(PAGE));

    // readv past EOF is short; errors come back as -errno in res
    assert.equal(ring.prepReadv(f.fd, Float64Array.of(base, 16384), 1, 0, 0), true);
    assert.equal(ring.prepReadv(-1, Float64Array.of(base, 16), 1, 0, 1), true);
    assert.deepEqual(complete(ring, 2), new Map([[0, 8192], [1, -9]]));
    assert.ok(guest.subarray(0, PAGE).every((x) => x === 0)); // the punched hole read back as zeros
  } finally {
    ring.close();
    native.close(mem);
    f.cleanup();
  }
});

test('Ring: SQ full, argument checks, reap limits, close idempotent', (t) => {
  const ring = makeRing(t, 4, 8, 2);
  if (!ring) return;
  const f = tmpFile('x');
  try {
    assert.equal(ring.entries, 4);
    for (let tag = 0; tag < 4; tag++) assert.equal(ring.prepFsync(f.fd, tag, true), true);
    assert.equal(ring.prepFsync(f.fd, 4, true), false); // SQ full
    assert.equal(ring.submit(), 4);
    assert.equal(ring.submit(), 0); // nothing left
    assert.equal(ring.prepFsync(f.fd, 5, true), true); // room again after submission
    assert.equal(ring.submitAndWait(5), 1);
    const out = new Float64Array(4); // room for 2 completions
    assert.equal(ring.reap(out), 2);
    const tags = [out[0], out[2]];
    assert.equal(ring.reap(out), 2);
    tags.push(out[0], out[2]);
    assert.equal(ring.reap(out), 1);
    tags.push(out[0]);
    assert.deepEqual(tags.sort(), [0, 1, 2, 3, 5]);
    assert.equal(ring.reap(out), 0);

    const iov = Float64Array.of(0, 0, 0, 0, 0, 0);
    assert.throws(() => ring.prepReadv(f.fd, iov, 3, 0, 0), RangeError); // > maxSegs
    assert.throws(() => ring.prepReadv(f.fd, iov, 1, 0, 8), RangeError); // tag out of range
    assert.throws(() => ring.prepFsync(f.fd, -1, false), RangeError);
    assert.throws(() => ring.prepReadv(f.fd, new Float64Array(2), 2, 0, 0), RangeError); // past iov

    const fd = ring.fd;
    ring.close();
    ring.close();
    assert.equal(ring.fd, -1);
    assertErrno(() => native.close(fd), 'EBADF', 9); // the ring fd really was closed
    assert.throws(() => ring.submit(), (e: unknown) => isErrno(e, 'EBADF'));
  } finally {
    ring.close();
    f.cleanup();
  }
});

test('sync preadv/pwritev, fsync, fallocate', () => {
  const mem = native.memfdCreate('guest', 64 * 1024);
  const f = tmpFile('sync.img');
  try {
    const ab = native.mmap(mem, 64 * 1024, 0, true);
    const guest = new Uint8Array(ab);
    const base = native.addressOf(ab);
    fill(guest, 0, 3000, 5);
    fill(guest, 10000, 5192, 77);
    assert.equal(native.pwritev(f.fd, Float64Array.of(base, 3000, base + 10000, 5192), 2, PAGE), 8192);
    const onDisk = fs.readFileSync(f.file);
    assert.equal(onDisk.length, PAGE + 8192);
    assert.deepEqual(new Uint8Array(onDisk.subarray(PAGE, PAGE + 3000)), guest.subarray(0, 3000));
    assert.deepEqual(new Uint8Array(onDisk.subarray(PAGE + 3000)), guest.subarray(10000, 15192));

    // preadv across three iovecs, one empty; ends at EOF: returns the short count
    const iov = Float64Array.of(base + 32768, 100, base + 40000, 0, base + 49152, 16384);
    assert.equal(native.preadv(f.fd, iov, 3, PAGE), 8192);
    assert.deepEqual(guest.subarray(32768, 32868), new Uint8Array(onDisk.subarray(PAGE, PAGE + 100)));
    assert.deepEqual(guest.subarray(49152, 49152 + 8092), new Uint8Array(onDisk.subarray(PAGE + 100)));

    assert.equal(native.fsync(f.fd, false), 0);
    assert.equal(native.fsync(f.fd, true), 0);
    assert.equal(native.fallocate(f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, PAGE, PAGE), 0);
    assert.equal(native.preadv(f.fd, Float64Array.of(base, PAGE * 3), 1, 0), PAGE * 3);
    assert.ok(guest.subarray(0, 2 * PAGE).every((x) => x === 0));
    assert.deepEqual(guest.subarray(2 * PAGE, 3 * PAGE), new Uint8Array(onDisk.subarray(2 * PAGE)));

    // errors as -errno, never thrown
    assert.equal(native.preadv(-1, Float64Array.of(base, 1), 1, 0), -9);
    assert.equal(native.pwritev(f.fd, new Float64Array(2050), 1025, 0), -22);
    assert.equal(native.preadv(f.fd, new Float64Array(2), 2, 0), -22);
    assert.equal(native.fsync(-1, true), -9);
    assert.equal(native.fallocate(-1, 0, 0, PAGE), -9);
    assert.equal(native.preadv(f.fd, Float64Array.of(base, 16), 1, 1 << 20), 0); // past EOF
  } finally {
    native.close(mem);
    f.cleanup();
  }
});

test('blockDeviceSize rejects a regular file; threadCpuMicros advances', () => {
  const f = tmpFile('notablock');
  try {
    assertErrno(() => native.blockDeviceSize(f.fd), 'ENOTTY', 25, /^ioctl\(BLKGETSIZE64\): /);
  } finally {
    f.cleanup();
  }
  const t0 = native.threadCpuMicros();
  let x = 0;
  const end = Date.now() + 50;
  while (Date.now() < end) x += Math.sqrt(x + 1);
  assert.ok(x > 0);
  const t1 = native.threadCpuMicros();
  assert.ok(t1 - t0 >= 1000, `cpu time advanced only ${t1 - t0} us while spinning`);
  // Sleeping costs no CPU time: a wall clock would advance by the full 100 ms here.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
  const t2 = native.threadCpuMicros();
  assert.ok(t2 - t1 < 50_000, `cpu time advanced ${t2 - t1} us while sleeping`);
});
