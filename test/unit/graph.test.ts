// Graph snapshots and the drained barrier's bookkeeping (the workers' side is covered by the
// integration tests; here the drain target is a small recorder standing in for the queues).
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { DrainBarrier, DrainTimeoutError, type Drainable } from '../../src/graph/drain.js';
import { GraphError, Snapshot } from '../../src/graph/snapshot.js';
import { nullNode } from '../../src/graph/open.js';
import { newNodeStats } from '../../src/graph/nodes.js';
import { newThrottleState } from '../../src/graph/throttle-state.js';

class Recorder implements Drainable {
  calls: string[] = [];
  release: (() => void) | null = null;
  hang = false;
  drainQueues(): Promise<void> {
    this.calls.push('drain');
    if (this.hang) return new Promise(() => {});
    return new Promise((r) => (this.release = r));
  }
  async undrainQueues(): Promise<void> {
    this.calls.push('undrain');
  }
}

describe('DrainBarrier', () => {
  test('nested drains drain once and resume only when the last one ends', async () => {
    const r = new Recorder();
    const b = new DrainBarrier(r);
    assert.equal(b.state, 'running');
    const outer = b.drain(1000);
    assert.equal(b.state, 'draining');
    const inner = b.drain(1000);
    r.release!();
    await Promise.all([outer, inner]);
    assert.equal(b.state, 'drained');
    assert.equal(b.nesting, 2);
    await b.undrain();
    assert.equal(b.state, 'drained', 'still held by the outer drain');
    await b.undrain();
    assert.equal(b.state, 'running');
    assert.deepEqual(r.calls, ['drain', 'undrain']);
    assert.equal(b.latency().count, 1);
  });

  test('a drain that times out fails, resumes the queues and leaves the barrier usable', async () => {
    const r = new Recorder();
    r.hang = true;
    const b = new DrainBarrier(r);
    await assert.rejects(b.drain(50), DrainTimeoutError);
    assert.equal(b.state, 'running');
    assert.equal(b.timeouts, 1);
    assert.deepEqual(r.calls, ['drain', 'undrain']);
    r.hang = false;
    const p = b.drain(1000);
    r.release!();
    await p;
    assert.equal(b.state, 'drained');
    await b.undrain();
    assert.deepEqual(r.calls, ['drain', 'undrain', 'drain', 'undrain']);
  });
});

describe('Snapshot', () => {
  const base = (): Snapshot =>
    Snapshot.empty()
      .addNode(nullNode('a', 1 << 20, false))
      .addNode(nullNode('b', 2 << 20, false))
      .addExport({ id: 'e0', root: 'a' });

  test('every change makes a new snapshot with a higher generation; the old one is untouched', () => {
    const s1 = base();
    const s2 = s1.setExportRoot('e0', 'b');
    assert.ok(s2.generation > s1.generation);
    assert.equal(s1.exports.get('e0')!.root, 'a');
    assert.equal(s2.exports.get('e0')!.root, 'b');
    assert.equal(s2.size('b'), 2 << 20);
  });

  test('replaceUses moves parents and exports but not the replacement itself', () => {
    const thr = { driver: 'throttle' as const, name: 't', child: 'a', state: newThrottleState(), stats: newNodeStats() };
    const s = base().addNode(thr).replaceUses('a', 't');
    assert.equal(s.exports.get('e0')!.root, 't');
    const t = s.node('t');
    assert.equal(t.driver === 'throttle' && t.child, 'a', 'the filter still points at its child');
    assert.equal(s.size('t'), 1 << 20);
    assert.deepEqual([...s.subtree('t')].sort(), ['a', 't']);
    const spec = s.spec('t');
    assert.equal(spec.driver, 'throttle');
    assert.equal(spec.driver === 'throttle' && spec.child.name, 'a');
  });

  test('refuses duplicates, unknown children, and removing a node in use', () => {
    assert.throws(() => base().addNode(nullNode('a', 512, false)), GraphError);
    assert.throws(() => base().addNode({ driver: 'throttle', name: 't', child: 'zz', state: newThrottleState(), stats: newNodeStats() }), /Cannot find node 'zz'/);
    assert.throws(() => base().removeNode('a'), /busy.*export 'e0'/);
    const s = base().removeNode('b');
    assert.equal(s.nodes.has('b'), false);
    assert.throws(() => base().setExportRoot('e0', 'nope'), GraphError);
  });

  test('the Graphviz dump names every node and edge', () => {
    const dot = base().toDot();
    assert.match(dot, /^digraph vubd \{/);
    assert.match(dot, /"export:e0" -> "a";/);
    assert.match(dot, /"b" \[label=/);
  });
});
