// The rbd node as a worker runs it: an RbdQueue on the image handle the main thread opened (one
// handle per node for the whole process), requests submitted with aio straight from the guest's
// iovecs, completions collected from the queue's own eventfd by the worker's poll.
import { native, type RbdIo } from '../native/index.js';
import { CountingNode } from './counting-node.js';
import { NodeStat, type BlockNode, type DataIo, type IoContext, type NodeSpec, type SourceRegistry } from './nodes.js';

type RbdSpec = Extract<NodeSpec, { driver: 'rbd' }>;

/** measurement only (scripts/bench): VUBD_RBD_HANDLES=own opens an image handle per queue context instead */
const ownHandles = process.env.VUBD_RBD_HANDLES === 'own';

/** the librbd open options of a spec (what the worker and the main thread both pass to RbdImage) */
export function rbdOpenOptions(spec: Omit<RbdSpec, 'driver' | 'name' | 'size' | 'stats' | 'noFlush' | 'shareId'>): ConstructorParameters<typeof native.RbdImage>[0] {
  const { pool, image, conf, user, key, keyring, namespace, snapshot, readOnly, cache } = spec;
  return { pool, image, conf, user, key, keyring, namespace, snapshot, readOnly, cache };
}

export class RbdNode extends CountingNode implements BlockNode {
  private readonly img: RbdIo;
  private readonly noFlush: boolean;
  /** the context of the requests in flight (one per queue context, which owns this node) */
  private ctx: IoContext | null = null;
  private readonly events = new Float64Array(2 * 256);

  constructor(spec: RbdSpec, sources: SourceRegistry) {
    super(spec);
    this.noFlush = spec.noFlush;
    this.img = ownHandles ? new native.RbdImage(rbdOpenOptions(spec)) : new native.RbdQueue(spec.shareId);
    const img = this.img;
    sources.addSource({
      pollFd: img.fd,
      service: () => this.service(),
      msToNextWake: () => -1,
      close: () => img.close(),
    });
  }

  private service(): void {
    const ctx = this.ctx;
    if (ctx === null) return;
    const ev = this.events;
    for (;;) {
      const n = this.img.poll(ev);
      for (let i = 0; i < n; i++) ctx.engine.done(ev[2 * i]!, ev[2 * i + 1]!);
      if (n < ev.length / 2) return;
    }
  }

  /** a submit that failed completes at once with its -errno */
  private submitted(ctx: IoContext, tag: number, r: number): void {
    if (r < 0) ctx.engine.done(tag, r);
  }

  read(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.READ_OPS, NodeStat.READ_KIB, io.length);
    this.ctx = ctx;
    this.submitted(ctx, io.tag, this.img.readv(io.iov, io.iovCount, io.offset, io.tag));
  }
  write(ctx: IoContext, io: DataIo): void {
    this.count(NodeStat.WRITE_OPS, NodeStat.WRITE_KIB, io.length);
    this.ctx = ctx;
    this.submitted(ctx, io.tag, this.img.writev(io.iov, io.iovCount, io.offset, io.tag));
  }
  flush(ctx: IoContext, tag: number): void {
    this.count(NodeStat.FLUSH_OPS, -1, 0);
    if (this.noFlush) {
      ctx.engine.done(tag, 0); // cache=unsafe
      return;
    }
    this.ctx = ctx;
    this.submitted(ctx, tag, this.img.flush(tag));
  }
  discard(ctx: IoContext, tag: number, offset: number, length: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    this.ctx = ctx;
    this.submitted(ctx, tag, this.img.discard(offset, length, tag));
  }
  writeZeroes(ctx: IoContext, tag: number, offset: number, length: number): void {
    this.count(NodeStat.OTHER_OPS, -1, 0);
    this.ctx = ctx;
    this.submitted(ctx, tag, this.img.writeZeroes(offset, length, tag));
  }
}
