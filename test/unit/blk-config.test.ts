// Feature sets and options: packed rings and crash recovery (INFLIGHT_SHMFD) are never offered together.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { blkFeatures, blkProtocolFeatures } from '../../src/blk/config.js';
import { parseOptions, USAGE } from '../../src/cli/args.js';
import { F, PF, hasBit } from '../../src/protocol/constants.js';

const base = ['--socket-path=/tmp/x.sock', '--blk-file=/tmp/x.img'];

test('by default: INFLIGHT_SHMFD offered, RING_PACKED not (a packed=on QEMU negotiates a split ring)', () => {
  assert.equal(parseOptions(base).ringPacked, false);
  for (const ro of [false, true]) {
    assert.equal(hasBit(blkFeatures(ro), F.RING_PACKED), false);
    assert.equal(hasBit(blkFeatures(ro), F.RING_INDIRECT_DESC), true);
    assert.equal(hasBit(blkFeatures(ro), F.BLK_RO), ro);
  }
  assert.equal(hasBit(blkProtocolFeatures(), PF.INFLIGHT_SHMFD), true);
});

test('--ring-packed: RING_PACKED offered, INFLIGHT_SHMFD not; the rest unchanged', () => {
  assert.equal(parseOptions([...base, '--ring-packed']).ringPacked, true);
  assert.equal(hasBit(blkFeatures(false, true), F.RING_PACKED), true);
  assert.equal(hasBit(blkProtocolFeatures(true), PF.INFLIGHT_SHMFD), false);
  assert.equal(blkFeatures(false, true) & ~(1n << BigInt(F.RING_PACKED)), blkFeatures(false));
  assert.equal(blkProtocolFeatures(true) | (1n << BigInt(PF.INFLIGHT_SHMFD)), blkProtocolFeatures());
  assert.match(USAGE, /--ring-packed\s.*crash recovery/s);
});
