// Request slots (a few KiB of segment arrays each) are made as the driver keeps more requests in
// flight, not one per ring entry when the ring starts: an idle 256-entry queue costs almost nothing,
// and a driver that fills the ring still gets every entry in flight at once (up to the ring size,
// never more).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { Frontend, BLK, type BlkRequest } from '../helpers/frontend.js';
import { QmpClient } from '../../src/control/qmp-client.js';

const MiB = 2 ** 20;

interface QueueStats {
  queue: number;
  inFlight: number;
  readOps: number;
}

test('a throttled 256-entry ring filled by the driver has all 256 requests in flight at once, and all complete', { timeout: 60000 }, async (t) => {
  const dir = tempDir('vubd-slots-');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 16 * MiB);
  const control = path.join(dir, 'qmp.sock');
  const d = await startDaemon([`--blk-file=${image}`, `--control=${control}`, '--log-level=warn', '--num-queues=1'], { dir });
  const qmp = await QmpClient.connect(control);
  const fe = Frontend.connect(d.socketPath);
  t.after(async () => {
    fe.close();
    qmp.close();
    assert.equal((await d.stop()).code, 0);
  });
  // 1 request per second: what the worker popped waits on the throttle schedule, holding its slot.
  await qmp.execute('blockdev-add', { driver: 'throttle', 'node-name': 'thr0', file: 'file0', limits: { 'iops-total': 1, 'iops-total-max': 1 } });
  await qmp.execute('block-export-set-node', { id: 'export0', 'node-name': 'thr0' });
  fe.negotiate();
  const ring = fe.setupRing(0, 256);
  const queue0 = async (): Promise<QueueStats> => {
    const s = await qmp.execute<{ exports: { queues: QueueStats[] }[] }>('query-stats');
    return s.exports[0]!.queues.find((q) => q.queue === 0)!;
  };
  assert.equal((await queue0()).inFlight, 0);

  const reqs: BlkRequest[] = [];
  for (let i = 0; i < 256; i++) reqs.push(fe.blk(ring, BLK.IN, 8 * i, 4096, { indirect: true }));
  ring.kick();
  let s = await queue0();
  for (const deadline = Date.now() + 10000; s.inFlight + ring.usedIdx() < 256 && Date.now() < deadline; s = await queue0()) {
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.ok(ring.usedIdx() < 16, `the throttle holds the backlog (${ring.usedIdx()} completed)`);
  assert.equal(s.inFlight + ring.usedIdx(), 256, `every request of the ring was taken in flight (in flight ${s.inFlight}, completed ${ring.usedIdx()})`);

  // GET_VRING_BASE drains the backlog at once (throttled requests start now): all complete, all OK.
  assert.equal(fe.getVringBase(0), 256);
  assert.equal(ring.collect().length, 256);
  reqs.forEach((r, i) => assert.equal(fe.statusOf(r), 0, `request ${i}`));
  assert.equal((await queue0()).inFlight, 0);
});
