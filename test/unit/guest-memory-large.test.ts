// Guest memory over 4 GiB: regions are mapped in overlapping 1 GiB chunks, and buffers that do
// not fit one chunk are split by the chain walker. A sparse 5 GiB memfd costs nothing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../../src/native/index.js';
import { CHUNK_OVERLAP, CHUNK_SIZE } from '../../src/virtio/memory.js';
import { mapGuestMemory } from '../../src/virtio/memory-map.js';
import { ChainError, DescriptorChain } from '../../src/virtio/chain.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

test('a 5 GiB region: chunks, translation past 4 GiB, and buffers split at chunk ends', () => {
  const fd = native.memfdCreate('big-guest', 5 * GiB);
  // Region at GPA 4 GiB (like QEMU's high memory), starting 1 GiB into the file.
  const mem = mapGuestMemory([{ guestPhysAddr: 4 * GiB, size: 4 * GiB, userAddr: 0x7f00_0000_0000, mmapOffset: GiB, fd }]);
  assert.equal(mem.regions.length, 4);
  assert.equal(mem.regions[0]!.size, CHUNK_SIZE + CHUNK_OVERLAP);
  assert.equal(mem.regions[3]!.size, GiB, 'the last chunk stops at the region end');

  // A small object across a chunk boundary sits inside the first chunk's overlap.
  const boundary = 4 * GiB + 2 * GiB;
  assert.equal(mem.findGpa(boundary - 32, 64), 1);
  assert.equal(mem.findGpa(8 * GiB - 16, 32), -1, 'past the region end');

  // A 4 MiB buffer reaching past the overlap is split into two segments that cover it exactly.
  const chain = new DescriptorChain(16);
  chain.reset(0, mem);
  chain.add(boundary - MiB - 4096, 4 * MiB, true);
  assert.equal(chain.error, ChainError.NONE);
  assert.equal(chain.count, 2);
  assert.equal(chain.len[0]! + chain.len[1]!, 4 * MiB);
  const data = new Uint8Array(4 * MiB);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  assert.equal(chain.writeFrom(data, 0), data.length);
  // Read it back through an independent mapping of the file at the expected offset:
  // file offset = mmapOffset + (gpa - region gpa).
  const fileOff = GiB + (boundary - MiB - 4096 - 4 * GiB);
  const win = new Uint8Array(native.mmap(fd, 5 * MiB, fileOff - (fileOff % 4096), true)).subarray(fileOff % 4096, (fileOff % 4096) + 4 * MiB);
  assert.deepEqual(win, data);
  const back = new Uint8Array(16);
  // Device-readable view of the same bytes: a second chain reading across the boundary.
  const r = new DescriptorChain(16);
  r.reset(0, mem);
  r.add(boundary - 8, 16, false);
  assert.equal(r.readInto(back, 0, 16), 16);
  assert.deepEqual(back, data.subarray(MiB + 4096 - 8, MiB + 4096 + 8));

  // A buffer running off the region's end is refused as a whole.
  const bad = new DescriptorChain(16);
  bad.reset(0, mem);
  bad.add(8 * GiB - MiB, 2 * MiB, true);
  assert.equal(bad.error, ChainError.BAD_ADDRESS);
  assert.equal(bad.count, 0);
  native.close(fd);
});
