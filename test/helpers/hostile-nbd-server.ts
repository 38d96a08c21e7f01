// A tiny NBD server (fixed newstyle, structured replies, memory-backed) that answers correctly
// except for reads of the poisoned sector, where it breaks the protocol the way MODE says.
// Run as a child process: node hostile-nbd-server.js SOCKET MODE SIZE_BYTES
import net from 'node:net';
import fs from 'node:fs';

export const POISON_SECTOR = 12000;
export const HOSTILE_MODES = ['garbage', 'short', 'unknown-handle', 'out-of-range', 'bad-length', 'coverage', 'error-chunk', 'simple-short'] as const;
export type HostileMode = (typeof HOSTILE_MODES)[number];

const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;

function serve(sockPath: string, mode: HostileMode, size: number): void {
  const disk = Buffer.alloc(size);
  fs.rmSync(sockPath, { force: true });
  const srv = net.createServer((c) => {
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'opts' | 'tx' = 'flags';
    let structured = false;
    c.on('error', () => {});
    const greet = Buffer.alloc(18);
    greet.write('NBDMAGIC', 0);
    greet.writeBigUInt64BE(IHAVEOPT, 8);
    greet.writeUInt16BE(3, 16);
    c.write(greet);
    const optReply = (opt: number, type: number, data: Buffer): void => {
      const h = Buffer.alloc(20);
      h.writeBigUInt64BE(REPLY_MAGIC, 0);
      h.writeUInt32BE(opt, 8);
      h.writeUInt32BE(type, 12);
      h.writeUInt32BE(data.length, 16);
      c.write(Buffer.concat([h, data]));
    };
    const chunk = (flags: number, type: number, handle: Buffer, payload: Buffer, lenOverride?: number): Buffer => {
      const h = Buffer.alloc(20);
      h.writeUInt32BE(0x668e33ef, 0);
      h.writeUInt16BE(flags, 4);
      h.writeUInt16BE(type, 6);
      handle.copy(h, 8);
      h.writeUInt32BE(lenOverride ?? payload.length, 16);
      return Buffer.concat([h, payload]);
    };
    const offsetData = (off: number, data: Buffer): Buffer => {
      const p = Buffer.alloc(8 + data.length);
      p.writeBigUInt64BE(BigInt(off), 0);
      data.copy(p, 8);
      return p;
    };
    const simple = (err: number, handle: Buffer): Buffer => {
      const h = Buffer.alloc(16);
      h.writeUInt32BE(0x67446698, 0);
      h.writeUInt32BE(err, 4);
      handle.copy(h, 8);
      return h;
    };
    const poisoned = (handle: Buffer, off: number, len: number): void => {
      const data = disk.subarray(off, off + len);
      switch (mode) {
        case 'garbage':
          c.write(Buffer.from('this is not an nbd reply at all!'));
          return;
        case 'short':
          c.end(chunk(1, 1, handle, offsetData(off, data)).subarray(0, 28 + len / 2));
          return;
        case 'simple-short':
          c.end(Buffer.concat([simple(0, handle), data.subarray(0, len / 2)]));
          return;
        case 'unknown-handle': {
          const h = Buffer.from(handle);
          h.writeUInt32BE((h.readUInt32BE(4) + 777) >>> 0, 4);
          c.write(chunk(1, 0, h, Buffer.alloc(0)));
          return;
        }
        case 'out-of-range':
          c.write(chunk(1, 1, handle, offsetData(off + len, data)));
          return;
        case 'bad-length': {
          const p = Buffer.alloc(8);
          p.writeBigUInt64BE(BigInt(off), 0);
          c.write(chunk(1, 2, handle, p)); // OFFSET_HOLE must be 12 bytes
          return;
        }
        case 'coverage':
          c.write(Buffer.concat([chunk(0, 1, handle, offsetData(off, data.subarray(0, len / 2))), chunk(1, 0, handle, Buffer.alloc(0))]));
          return;
        case 'error-chunk': {
          const msg = Buffer.from('injected');
          const p = Buffer.alloc(6 + msg.length);
          p.writeUInt32BE(5, 0);
          p.writeUInt16BE(msg.length, 4);
          msg.copy(p, 6);
          c.write(chunk(1, 0x8001, handle, p));
          return;
        }
      }
    };
    c.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'opts';
        } else if (phase === 'opts') {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          if (opt === 8) {
            structured = true;
            optReply(opt, 1, Buffer.alloc(0));
          } else if (opt === 7) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(0, 0);
            info.writeBigUInt64BE(BigInt(size), 2);
            info.writeUInt16BE(1 | 4 | 32 | 64 | 256, 10); // HAS_FLAGS SEND_FLUSH SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN
            optReply(opt, 3, info);
            optReply(opt, 1, Buffer.alloc(0));
            phase = 'tx';
          } else if (opt === 2) {
            c.end();
            return;
          } else optReply(opt, 0x80000001, Buffer.alloc(0));
        } else {
          if (buf.length < 28) return;
          const type = buf.readUInt16BE(6);
          const handle = Buffer.from(buf.subarray(8, 16));
          const off = Number(buf.readBigUInt64BE(16));
          const len = buf.readUInt32BE(24);
          if (type === 1 && buf.length < 28 + len) return;
          const payload = type === 1 ? buf.subarray(28, 28 + len) : null;
          buf = buf.subarray(28 + (payload?.length ?? 0));
          if (type === 2) {
            c.end();
            return;
          }
          if (type === 0) {
            if (off === POISON_SECTOR * 512) {
              poisoned(handle, off, len);
              continue;
            }
            const data = disk.subarray(off, off + len);
            c.write(structured ? chunk(1, 1, handle, offsetData(off, data)) : Buffer.concat([simple(0, handle), data]));
          } else {
            if (type === 1) payload!.copy(disk, off);
            if (type === 6 || type === 4) disk.fill(0, off, off + len);
            c.write(simple(0, handle));
          }
        }
      }
    });
  });
  srv.listen(sockPath, () => process.stdout.write('listening\n'));
}

const [sock, mode, size] = process.argv.slice(2);
if (sock !== undefined && mode !== undefined) serve(sock, mode as HostileMode, Number(size ?? 8 * 1024 * 1024));
