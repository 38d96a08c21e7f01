import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdHandshake, NbdProtocolError, TxFlag } from '../../src/graph/nbd-protocol.js';
import { advanceIov, nbdErrno, sliceIov } from '../../src/graph/nbd-iov.js';

function greeting(flags = 3, magic2 = 0x49484156454f5054n): Buffer {
  const b = Buffer.alloc(18);
  b.write('NBDMAGIC', 0);
  b.writeBigUInt64BE(magic2, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

function reply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(0x3e889045565a9n, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

function infoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(0, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return reply(7, 3, b);
}

test('handshake: flags, STRUCTURED_REPLY, GO with the export name and INFO_BLOCK_SIZE; fed a byte at a time', () => {
  const hs = new NbdHandshake('disk');
  const blockSize = Buffer.alloc(14);
  blockSize.writeUInt16BE(3, 0);
  blockSize.writeUInt32BE(512, 2);
  blockSize.writeUInt32BE(4096, 6);
  blockSize.writeUInt32BE(1 << 25, 10);
  const server = [greeting(), reply(8, 1), infoExport(1 << 30, TxFlag.HAS_FLAGS | TxFlag.CAN_MULTI_CONN), reply(7, 3, blockSize), reply(7, 1)];
  const sent: Buffer[] = [];
  for (const msg of server) {
    for (const byte of msg) hs.feed(Uint8Array.of(byte));
    const out = hs.takeOutput();
    if (out) sent.push(Buffer.from(out));
  }
  const info = hs.done();
  assert.deepEqual(info, { size: 1 << 30, flags: TxFlag.HAS_FLAGS | TxFlag.CAN_MULTI_CONN, structured: true, minBlock: 512, preferredBlock: 4096, maxBlock: 1 << 25 });
  const all = Buffer.concat(sent);
  assert.equal(all.readUInt32BE(0), 3, 'client flags: FIXED_NEWSTYLE | NO_ZEROES');
  assert.equal(all.readBigUInt64BE(4), 0x49484156454f5054n);
  assert.equal(all.readUInt32BE(12), 8, 'NBD_OPT_STRUCTURED_REPLY');
  assert.equal(all.readUInt32BE(16), 0);
  assert.equal(all.readUInt32BE(28), 7, 'NBD_OPT_GO');
  assert.equal(all.readUInt32BE(32), 4 + 4 + 2 + 2);
  assert.equal(all.readUInt32BE(36), 4);
  assert.equal(all.toString('utf8', 40, 44), 'disk');
  assert.deepEqual([all.readUInt16BE(44), all.readUInt16BE(46)], [1, 3], 'asks for NBD_INFO_BLOCK_SIZE');
});

test('handshake: a server without structured replies still works (simple replies)', () => {
  const hs = new NbdHandshake('');
  hs.feed(greeting(1));
  assert.equal(Buffer.from(hs.takeOutput()!).readUInt32BE(0), 1, 'no NO_ZEROES when the server does not offer it');
  hs.feed(reply(8, 0x80000001));
  hs.feed(Buffer.concat([infoExport(4096, 1), reply(7, 1)]));
  assert.equal(hs.done()!.structured, false);
});

test('handshake refusals name the reason', () => {
  const run = (msgs: Buffer[]): void => {
    const hs = new NbdHandshake('disk');
    for (const m of msgs) hs.feed(m);
  };
  assert.throws(() => run([Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n')]), /not an NBD server/);
  assert.throws(() => run([greeting(3, 0x00420281861253n)]), /oldstyle/);
  assert.throws(() => run([greeting(0)]), /fixed newstyle/);
  const msg = Buffer.from('export not present');
  assert.throws(() => run([greeting(), reply(8, 1), reply(7, 0x80000006, msg)]), /export 'disk': no such export \(NBD_REP_ERR_UNKNOWN\): export not present/);
  assert.throws(() => run([greeting(), reply(8, 1), reply(7, 0x80000005)]), /requires TLS/);
  assert.throws(() => run([greeting(), reply(8, 1), reply(7, 1)]), /without NBD_INFO_EXPORT/);
  assert.throws(() => run([greeting(), reply(8, 1), reply(3, 1)]), /option reply for option 3, expected 7/);
  const bad = reply(8, 1);
  bad.writeUInt32BE(1 << 20, 16);
  assert.throws(() => run([greeting(), bad]), /too long/);
  assert.throws(() => run([greeting(), reply(8, 1), Buffer.concat([infoExport(4096, 1), reply(7, 1), Buffer.from('x')])]), NbdProtocolError);
});

test('iov slicing and advancing', () => {
  const iov = Float64Array.from([1000, 100, 5000, 50, 9000, 200]);
  const out = new Float64Array(6);
  assert.equal(sliceIov(iov, 3, 90, 60, out), 2);
  assert.deepEqual([...out.subarray(0, 4)], [1090, 10, 5000, 50]);
  assert.equal(sliceIov(iov, 3, 150, 10, out), 1);
  assert.deepEqual([...out.subarray(0, 2)], [9000, 10]);
  assert.equal(sliceIov(iov, 3, 0, 350, out), 3);
  const a = Float64Array.from(iov);
  assert.equal(advanceIov(a, 0, 3, 120), 1);
  assert.deepEqual([...a.subarray(2, 4)], [5020, 30]);
  assert.equal(advanceIov(a, 1, 3, 30), 2);
  assert.equal(advanceIov(a, 2, 3, 200), 3);
  assert.deepEqual([nbdErrno(5), nbdErrno(28), nbdErrno(108), nbdErrno(1234)], [5, 28, 5, 5]);
});
