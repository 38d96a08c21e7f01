// BackgroundIo (the main thread's storage I/O for jobs) on a real temp file: both variants give the
// same results, more operations than the ring has tags wait their turn, errors come back as -errno.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SyncBackgroundIo, UringBackgroundIo, type BackgroundIo } from '../../src/graph/background-io.js';

const KiB = 1024;

for (const make of [() => new UringBackgroundIo(), () => new SyncBackgroundIo()]) {
  const io: BackgroundIo = make();
  test(`${io.kind}: 100 concurrent writes and reads land where they say, fsync succeeds, a bad fd is -EBADF`, async (t) => {
    t.after(() => io.close());
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-bgio-'));
    const file = path.join(dir, 'f');
    fs.writeFileSync(file, '');
    const fd = fs.openSync(file, 'r+');
    t.after(() => {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    });
    const bufs = Array.from({ length: 100 }, (_, i) => {
      const b = new ArrayBuffer(4 * KiB);
      new Uint8Array(b).fill(i + 1);
      return b;
    });
    const written = await Promise.all(bufs.map((b, i) => io.write(fd, b, b.byteLength, i * 4 * KiB)));
    assert.deepEqual(written, bufs.map(() => 4 * KiB));
    assert.equal(await io.fsync(fd, true), 0);
    const back = bufs.map(() => new ArrayBuffer(4 * KiB));
    const read = await Promise.all(back.map((b, i) => io.read(fd, b, b.byteLength, i * 4 * KiB)));
    assert.deepEqual(read, bufs.map(() => 4 * KiB));
    back.forEach((b, i) => assert.ok(new Uint8Array(b).every((x) => x === i + 1), `block ${i}`));
    assert.equal(await io.read(fd, back[0]!, 4 * KiB, 100 * 4 * KiB), 0, 'end of file');
    const [closedFd] = [fs.openSync(file, 'r')];
    fs.closeSync(closedFd);
    assert.equal(await io.read(closedFd, back[0]!, 512, 0), -9, 'EBADF');
    assert.equal(await io.fsync(closedFd, false), -9, 'EBADF');
  });
}

test('io_uring: a closed BackgroundIo fails new operations at once', async () => {
  const io = new UringBackgroundIo();
  io.close();
  await assert.rejects(io.fsync(0, true), /closed/);
  io.close();
});
