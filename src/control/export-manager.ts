// The daemon's exports: each has its own socket, its own frontend and its own drain state, and
// places its queues on the shared worker pool. Exports are added and deleted at run time
// (block-export-add/del) with qemu-storage-daemon's semantics; the command line's single disk is
// just the first one.
import type { Logger } from '../log.js';
import type { BlockGraph } from '../graph/graph.js';
import { GraphError } from '../graph/snapshot.js';
import { BlkExport } from '../worker/export.js';
import type { WorkerPool } from '../worker/pool.js';
import { VhostUserServer } from '../protocol/server.js';
import type { SocketAccess } from '../protocol/socket-file.js';
import type { PeerPolicy } from '../protocol/peer-policy.js';

export type ExportAddr = { type: 'unix'; path: string } | { type: 'fd'; fd: number };

export interface ExportSpec {
  id: string;
  nodeName: string;
  addr: ExportAddr;
  writable: boolean;
  /** write-through: every write is durable before it completes (the guest sees WCE=0) */
  writethrough: boolean;
  numQueues: number;
  queueSize: number;
  logicalBlockSize: 512 | 4096;
  serial: string;
  /** per queue, the worker serving it; default round robin */
  mapping?: number[];
  access?: SocketAccess;
  peers?: PeerPolicy | null;
  ringPacked?: boolean;
}

export class ExportError extends Error {}

interface Managed {
  spec: ExportSpec;
  exp: BlkExport;
  server: VhostUserServer;
  shuttingDown: boolean;
}

export interface ExportManagerOptions {
  graph: BlockGraph;
  pool: WorkerPool;
  aio: 'io_uring' | 'sync';
  log: Logger;
  /** a frontend's session on an export started or ended (systemd STATUS= lines) */
  onSessionChange?: (id: string, connected: boolean, conn: number) => void;
}

export class ExportManager {
  private readonly managed = new Map<string, Managed>();
  /** id -> export, live: what query-stats, metrics and the graph commands read */
  readonly exports = new Map<string, BlkExport>();

  constructor(private readonly o: ExportManagerOptions) {}

  get(id: string): Managed | undefined {
    return this.managed.get(id);
  }

  /** Checks what can be checked before anything is built; throws ExportError with the reason. */
  private check(spec: ExportSpec): void {
    if (this.managed.has(spec.id)) throw new ExportError(`Block export id '${spec.id}' is already in use`);
    const s = this.o.graph.snapshot;
    if (!s.nodes.has(spec.nodeName)) throw new ExportError(`Cannot find device='${spec.nodeName}' nor node-name='${spec.nodeName}'`);
    if (spec.writable && s.readOnly(spec.nodeName)) throw new ExportError(`Node '${spec.nodeName}' is read-only but export '${spec.id}' is writable`);
    for (const name of s.subtree(spec.nodeName)) {
      const n = s.node(name);
      if (n.driver === 'file' && n.alignment > spec.logicalBlockSize) {
        throw new ExportError(`'${n.filename}' needs ${n.alignment}-byte aligned O_DIRECT I/O; export it with logical-block-size=${n.alignment} (or open it without cache.direct)`);
      }
    }
    const size = s.size(spec.nodeName);
    if (size % spec.logicalBlockSize !== 0) throw new ExportError(`Node '${spec.nodeName}' is ${size} bytes, not a multiple of the logical block size ${spec.logicalBlockSize}`);
    if (spec.addr.type === 'unix') {
      for (const m of this.managed.values()) {
        if (m.spec.addr.type === 'unix' && m.spec.addr.path === spec.addr.path) throw new ExportError(`Export '${m.spec.id}' already listens on '${spec.addr.path}'`);
      }
    }
  }

  /** Builds the export, places its queues, listens on its socket. All or nothing. */
  async add(spec: ExportSpec): Promise<BlkExport> {
    this.check(spec);
    const log = this.o.log.child({ export: spec.id });
    let exp: BlkExport;
    try {
      exp = await this.o.graph.addExport(
        spec.id,
        spec.nodeName,
        (node, generation) =>
          new BlkExport(
            {
              id: spec.id,
              generation,
              numQueues: spec.numQueues,
              maxQueueSize: spec.queueSize,
              node,
              readOnly: !spec.writable,
              serial: spec.serial,
              aio: this.o.aio,
              blockSize: spec.logicalBlockSize,
              writeback: !spec.writethrough,
              pool: this.o.pool,
              mapping: spec.mapping,
              ringPacked: spec.ringPacked,
            },
            log,
          ),
      );
    } catch (e) {
      if (e instanceof GraphError || (e instanceof Error && /worker|mapping/.test(e.message))) throw new ExportError(e.message);
      throw e;
    }
    let server: VhostUserServer | null = null;
    try {
      await exp.ready();
      const opts = { access: spec.access, peers: spec.peers ?? null, onSessionChange: (c: boolean, n: number) => this.o.onSessionChange?.(spec.id, c, n) };
      server = spec.addr.type === 'unix' ? VhostUserServer.listen(spec.addr.path, exp, log, opts) : VhostUserServer.fromFd(spec.addr.fd, exp, log, opts);
    } catch (e) {
      await exp.close();
      await this.o.graph.removeExport(spec.id);
      throw new ExportError(`cannot start export '${spec.id}': ${(e as Error).message}`);
    }
    this.managed.set(spec.id, { spec, exp, server, shuttingDown: false });
    this.exports.set(spec.id, exp);
    server.start();
    log.info(
      {
        node: spec.nodeName,
        socket: spec.addr.type === 'unix' ? spec.addr.path : `fd ${spec.addr.fd}`,
        queues: spec.numQueues,
        workers: exp.placement,
        writable: spec.writable,
      },
      'export added',
    );
    return exp;
  }

  /**
   * block-export-del: `safe` refuses while a frontend is connected (or waiting); `hard` ends its
   * session first (the queues stop after their in-flight requests, as on GET_VRING_BASE). The
   * export is gone, its socket removed and its queues off their workers when this resolves.
   */
  async del(id: string, mode: 'safe' | 'hard'): Promise<void> {
    const m = this.managed.get(id);
    if (!m) throw new ExportError(`Export '${id}' is not found`);
    if (m.shuttingDown) throw new ExportError(`Export '${id}' is already being deleted`);
    if (mode === 'safe' && m.server.hasFrontend) throw new ExportError(`export '${id}' still in use (a frontend is connected); use mode 'hard' to disconnect it`);
    m.shuttingDown = true;
    const log = this.o.log.child({ export: id });
    log.info({ mode }, 'deleting export');
    try {
      await m.server.close();
      await m.exp.close();
    } finally {
      await this.o.graph.removeExport(id);
      this.managed.delete(id);
      this.exports.delete(id);
    }
    log.info('export deleted');
  }

  /** query-block-exports */
  list(): Record<string, unknown>[] {
    return [...this.managed.values()].map((m) => {
      const byWorker = new Map<number, number[]>();
      m.exp.workers.forEach((w, q) => {
        const list = byWorker.get(w.workerIndex) ?? [];
        list.push(q);
        byWorker.set(w.workerIndex, list);
      });
      return {
        id: m.spec.id,
        type: 'vhost-user-blk',
        'node-name': this.o.graph.snapshot.exports.get(m.spec.id)?.root ?? m.spec.nodeName,
        'shutting-down': m.shuttingDown,
        writable: m.spec.writable,
        'num-queues': m.spec.numQueues,
        addr: m.spec.addr.type === 'unix' ? { type: 'unix', path: m.spec.addr.path } : { type: 'fd', str: String(m.spec.addr.fd) },
        'frontend-connected': m.server.hasFrontend,
        'iothread-vq-mapping': [...byWorker.entries()].sort((a, b) => a[0] - b[0]).map(([w, vqs]) => ({ iothread: `worker${w}`, vqs })),
      };
    });
  }

  /** Shutdown: every export goes (hard), then nothing is left on the pool. */
  async closeAll(): Promise<void> {
    await Promise.all([...this.managed.keys()].map((id) => this.del(id, 'hard').catch(() => undefined)));
  }
}
