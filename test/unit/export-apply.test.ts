// A node-tree swap is all or nothing across an export's queue workers (real worker threads), and
// node fds are closed only when neither the graph nor any worker holds them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { BlkExport } from '../../src/worker/export.js';
import { WorkerPool } from '../../src/worker/pool.js';
import { openFileNode, closeNode } from '../../src/graph/open.js';
import { Snapshot } from '../../src/graph/snapshot.js';
import { fdRefs } from '../../src/graph/fd-refs.js';

function image(dir: string, name: string): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, '');
  fs.truncateSync(p, 1 << 20);
  return p;
}

test('a swap one worker refuses is rolled back on the others, and the new node fd closes once nobody holds it', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-apply-'));
  const a = openFileNode('a', image(dir, 'a.img'), false);
  const b = openFileNode('b', image(dir, 'b.img'), false);
  const s = Snapshot.empty().addNode(a).addNode(b).addExport({ id: 'e', root: 'a' });
  const pool = new WorkerPool({ workers: 2, pollUs: 0, logLevel: 'silent' }, pino({ level: 'silent' }));
  const exp = new BlkExport(
    { id: 'e', generation: s.generation, numQueues: 3, maxQueueSize: 128, node: s.spec('a'), readOnly: false, serial: 's', aio: 'sync', blockSize: 512, pool },
    pino({ level: 'silent' }),
  );
  try {
    await exp.ready();
    assert.equal(fdRefs(a.fd), 1 + 3, 'the graph and three workers hold node a');
    assert.equal(fdRefs(b.fd), 1, 'only the graph holds node b');
    // Queue 2's worker goes away; the swap to b cannot reach it.
    await exp.workers[2]!.remove();
    await assert.rejects(exp.apply(s.spec('b'), s.generation + 1), /exited|queue worker/);
    assert.equal(exp.nodeSpec.name, 'a', 'the export still serves a');
    assert.equal(fdRefs(b.fd), 1, 'no worker was left holding b after the rollback');
    assert.equal(fdRefs(a.fd), 1 + 3, 'the workers that had taken b are back on a');
    // Removing b from the graph now closes its fd; a stays open for its workers even after the graph lets go.
    closeNode(b);
    assert.throws(() => fs.fstatSync(b.fd), /EBADF/, 'b is closed');
    closeNode(a);
    assert.ok(fs.fstatSync(a.fd).isFile(), 'a stays open while workers still run it');
  } finally {
    await exp.close();
    await pool.close();
  }
  assert.throws(() => fs.fstatSync(a.fd), /EBADF/, 'a is closed once the last worker let go');
});
