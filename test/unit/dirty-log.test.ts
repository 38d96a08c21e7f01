// The dirty bitmap's marking arithmetic: 1 bit per 4 KiB page, LSB first, clamped to the bitmap.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyLog } from '../../src/virtio/dirty-log.js';

const PAGE = 4096;

function pages(bits: Uint8Array): number[] {
  const out: number[] = [];
  bits.forEach((b, i) => {
    for (let k = 0; k < 8; k++) if (b & (1 << k)) out.push(8 * i + k);
  });
  return out;
}

test('one byte, a page boundary, a long run with whole bytes and ragged ends', () => {
  const log = new DirtyLog(new Uint8Array(16));
  log.mark(5 * PAGE + 100, 1);
  assert.deepEqual(pages(log.bitmap), [5]);
  log.bitmap.fill(0);
  log.mark(3 * PAGE - 1, 2);
  assert.deepEqual(pages(log.bitmap), [2, 3]);
  log.bitmap.fill(0);
  log.mark(6 * PAGE + 1, 30 * PAGE);
  assert.deepEqual(pages(log.bitmap), Array.from({ length: 31 }, (_, i) => 6 + i));
  assert.equal(log.outside, 0);
  log.bitmap.fill(0);
  log.mark(0, 0);
  assert.deepEqual(pages(log.bitmap), [], 'an empty range marks nothing');
});

test('a range running past the bitmap marks what lies inside and counts the rest', () => {
  const log = new DirtyLog(new Uint8Array(2)); // pages 0..15
  log.mark(12 * PAGE, 8 * PAGE);
  assert.deepEqual(pages(log.bitmap), [12, 13, 14, 15]);
  assert.equal(log.outside, 4);
  log.mark(100 * PAGE, PAGE);
  assert.equal(log.outside, 5, 'wholly outside: counted, nothing written');
  assert.deepEqual(pages(log.bitmap), [12, 13, 14, 15]);
});
