// The main thread's block graph: the current immutable Snapshot plus the exports that run parts
// of it. Every change that touches a node an export uses goes through that export's drained
// barrier; changes are serialized.
import type { NodeSpec } from './nodes.js';
import { DrainBarrier } from './drain.js';
import { GraphError, Snapshot } from './snapshot.js';

export interface GraphConsumer {
  readonly id: string;
  readonly barrier: DrainBarrier;
  /** runs the new tree; called only while drained */
  apply(spec: NodeSpec, generation: number): Promise<void>;
}

export class BlockGraph {
  private current = Snapshot.empty();
  private readonly consumers = new Map<string, GraphConsumer>();
  private chain: Promise<unknown> = Promise.resolve();
  drainTimeoutMs = 5000;

  get snapshot(): Snapshot {
    return this.current;
  }

  /** Registers an export whose root already is in the snapshot (start-up, nothing running yet). */
  attach(consumer: GraphConsumer): void {
    this.consumers.set(consumer.id, consumer);
  }

  /**
   * Adds an export serving `root`, in line with other changes: `make` builds its consumer from
   * the tree as it is at that moment, so no change can slip between the two.
   */
  addExport<C extends GraphConsumer>(id: string, root: string, make: (spec: NodeSpec, generation: number) => C): Promise<C> {
    const run = this.chain.then(() => {
      if (this.consumers.has(id) || this.current.exports.has(id)) throw new GraphError(`Export '${id}' already exists`);
      const next = this.current.addExport({ id, root });
      const c = make(next.spec(root), next.generation);
      this.current = next;
      this.consumers.set(id, c);
      return c;
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Removes an export (its consumer no longer runs any of the tree); the nodes stay. */
  removeExport(id: string): Promise<void> {
    const run = this.chain.then(() => {
      this.consumers.delete(id);
      if (this.current.exports.has(id)) this.current = this.current.removeExport(id);
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Start-up only: installs a snapshot before any export runs I/O. */
  init(fn: (s: Snapshot) => Snapshot): void {
    this.current = fn(this.current);
  }

  /**
   * Applies fn to the current snapshot. Validation errors from fn are thrown before anything is
   * drained. Exports whose tree changes are drained, switched, and resumed.
   */
  change(fn: (s: Snapshot) => Snapshot): Promise<Snapshot> {
    const run = this.chain.then(() => this.doChange(fn));
    this.chain = run.catch(() => undefined);
    return run;
  }

  private affected(prev: Snapshot, next: Snapshot): GraphConsumer[] {
    const out: GraphConsumer[] = [];
    for (const c of this.consumers.values()) {
      const a = prev.exports.get(c.id);
      const b = next.exports.get(c.id);
      if (!a || !b) continue;
      if (a.root !== b.root) {
        out.push(c);
        continue;
      }
      const names = new Set([...prev.subtree(a.root), ...next.subtree(b.root)]);
      const changed = [...names].some((n) => prev.nodes.get(n) !== next.nodes.get(n)) || prev.size(a.root) !== next.size(b.root);
      if (changed) out.push(c);
    }
    return out;
  }

  private async doChange(fn: (s: Snapshot) => Snapshot): Promise<Snapshot> {
    const prev = this.current;
    const next = fn(prev);
    const hit = this.affected(prev, next);
    const drained: GraphConsumer[] = [];
    try {
      for (const c of hit) {
        await c.barrier.drain(this.drainTimeoutMs);
        drained.push(c);
      }
      for (const c of hit) await c.apply(next.spec(next.exports.get(c.id)!.root), next.generation);
      this.current = next;
      return next;
    } finally {
      for (const c of drained) await c.barrier.undrain();
    }
  }
}
