// The I/O counters every node keeps (query-stats, metrics): per thread, added to the node's shared
// stats block once per published batch. Its own module so that node classes in other files
// (rbd-node.ts) can extend it without an import cycle through nodes.ts at load time.
import { NodeStat, type NodeSpec } from './nodes.js';

/** Nodes of this thread with counts not yet in their shared stats block. */
const dirtyNodes: CountingNode[] = [];

/**
 * Adds the counts gathered since the last call to the nodes' shared stats blocks. The worker
 * calls it before each used-ring publish, so a completion the guest sees is already counted.
 */
export function flushNodeStats(): void {
  for (let i = 0; i < dirtyNodes.length; i++) dirtyNodes[i]!.flushCounts();
  dirtyNodes.length = 0;
}

export abstract class CountingNode {
  readonly name: string;
  readonly size: number;
  readonly readOnly: boolean;
  protected readonly stats: Int32Array;
  /** counts since the last flushNodeStats(): Atomics once per batch, not per request */
  private readonly pending = new Int32Array(NodeStat.COUNT);
  private dirty = false;
  constructor(spec: NodeSpec) {
    this.name = spec.name;
    this.size = spec.size;
    this.readOnly = spec.readOnly;
    this.stats = new Int32Array(spec.stats);
  }
  protected count(slot: NodeStat, kibSlot: NodeStat | -1, bytes: number): void {
    const p = this.pending;
    p[slot]!++;
    if (kibSlot >= 0) p[kibSlot]! += bytes >> 10;
    if (!this.dirty) {
      this.dirty = true;
      dirtyNodes.push(this);
    }
  }
  flushCounts(): void {
    const p = this.pending;
    for (let i = 0; i < NodeStat.COUNT; i++) {
      const v = p[i]!;
      if (v !== 0) {
        Atomics.add(this.stats, i, v);
        p[i] = 0;
      }
    }
    this.dirty = false;
  }
}

