// Immutable block graph snapshots (the RCU idea): a change builds a new snapshot with the next
// generation number; workers run a NodeSpec tree built from one snapshot and never see a
// half-made change.
import { newNodeStats, type NodeSpec } from './nodes.js';
import type { RbdImage, RbdOpenOptions } from '../native/index.js';
import { rbdSpecOptions } from './rbd-open.js';
import type { NbdServer } from './nbd-connection.js';

export type NodeDef =
  | {
      driver: 'file';
      name: string;
      filename: string;
      fd: number;
      size: number;
      readOnly: boolean;
      /** opened O_DIRECT (cache.direct) */
      direct: boolean;
      /** flushes complete at once (cache.no-flush: QEMU's cache=unsafe) */
      noFlush: boolean;
      /** O_DIRECT alignment of offsets, lengths and memory (1 without O_DIRECT) */
      alignment: number;
      stats: SharedArrayBuffer;
    }
  | { driver: 'null'; name: string; size: number; readOnly: boolean; stats: SharedArrayBuffer }
  | ({
      driver: 'rbd';
      name: string;
      size: number;
      readOnly: boolean;
      /** flushes complete at once (cache.no-flush) */
      noFlush: boolean;
      stats: SharedArrayBuffer;
      /** the main thread's own image handle: size, resize, update watch (workers open their own) */
      handle: RbdImage;
    } & RbdOpenOptions)
  | { driver: 'throttle'; name: string; child: string; state: SharedArrayBuffer; stats: SharedArrayBuffer }
  | { driver: 'mirror'; name: string; source: string; target: string; chunks: SharedArrayBuffer; chunkSize: number; stats: SharedArrayBuffer; job: string }
  | {
      driver: 'nbd';
      name: string;
      /** as given (a host name stays a name) */
      server: NbdServer;
      /** resolved at blockdev-add: what the workers connect to */
      address: NbdServer;
      export: string;
      /** the node's size (the export's, rounded down to 512) */
      size: number;
      exportSize: number;
      /** NBD transmission flags */
      flags: number;
      readOnly: boolean;
      reconnectDelayMs: number;
      structured: boolean;
      stats: SharedArrayBuffer;
    };

export interface ExportDef {
  id: string;
  root: string;
}

export class GraphError extends Error {}

/** rbd:pool/[namespace/]image[@snap], QEMU's filename form */
export function rbdName(n: RbdOpenOptions): string {
  return `rbd:${n.pool}/${n.namespace ? n.namespace + '/' : ''}${n.image}${n.snapshot ? '@' + n.snapshot : ''}`;
}

export class Snapshot {
  private constructor(
    readonly generation: number,
    readonly nodes: ReadonlyMap<string, NodeDef>,
    readonly exports: ReadonlyMap<string, ExportDef>,
  ) {}

  static empty(): Snapshot {
    return new Snapshot(0, new Map(), new Map());
  }

  private next(nodes: Map<string, NodeDef>, exports: Map<string, ExportDef> = new Map(this.exports)): Snapshot {
    return new Snapshot(this.generation + 1, nodes, exports);
  }

  node(name: string): NodeDef {
    const n = this.nodes.get(name);
    if (!n) throw new GraphError(`Cannot find node '${name}'`);
    return n;
  }

  children(n: NodeDef): string[] {
    switch (n.driver) {
      case 'throttle':
        return [n.child];
      case 'mirror':
        return [n.source, n.target];
      default:
        return [];
    }
  }

  /** Every node reachable from name, including itself. */
  subtree(name: string): Set<string> {
    const out = new Set<string>();
    const walk = (x: string): void => {
      if (out.has(x)) return;
      out.add(x);
      for (const c of this.children(this.node(x))) walk(c);
    };
    walk(name);
    return out;
  }

  /** Node names and export ids that reference name directly. */
  users(name: string): { nodes: string[]; exports: string[] } {
    const nodes = [...this.nodes.values()].filter((n) => this.children(n).includes(name)).map((n) => n.name);
    const exports = [...this.exports.values()].filter((e) => e.root === name).map((e) => e.id);
    return { nodes, exports };
  }

  size(name: string): number {
    const n = this.node(name);
    switch (n.driver) {
      case 'file':
      case 'null':
      case 'rbd':
      case 'nbd':
        return n.size;
      case 'throttle':
        return this.size(n.child);
      case 'mirror':
        return this.size(n.source);
    }
  }

  readOnly(name: string): boolean {
    const n = this.node(name);
    switch (n.driver) {
      case 'file':
      case 'null':
      case 'rbd':
      case 'nbd':
        return n.readOnly;
      case 'throttle':
        return this.readOnly(n.child);
      case 'mirror':
        return this.readOnly(n.source);
    }
  }

  addNode(def: NodeDef): Snapshot {
    if (this.nodes.has(def.name)) throw new GraphError(`Duplicate nodes with node-name='${def.name}'`);
    for (const c of this.children(def)) this.node(c);
    const nodes = new Map(this.nodes);
    nodes.set(def.name, def);
    return this.next(nodes);
  }

  removeNode(name: string): Snapshot {
    this.node(name);
    const u = this.users(name);
    if (u.nodes.length + u.exports.length > 0) {
      throw new GraphError(`Node '${name}' is busy: in use by ${[...u.nodes.map((n) => `node '${n}'`), ...u.exports.map((e) => `export '${e}'`)].join(', ')}`);
    }
    const nodes = new Map(this.nodes);
    nodes.delete(name);
    return this.next(nodes);
  }

  replaceNode(name: string, def: NodeDef): Snapshot {
    this.node(name);
    if (def.name !== name) throw new GraphError('replaceNode keeps the name');
    const nodes = new Map(this.nodes);
    nodes.set(name, def);
    return this.next(nodes);
  }

  addExport(e: ExportDef): Snapshot {
    this.node(e.root);
    const exports = new Map(this.exports);
    exports.set(e.id, e);
    return this.next(new Map(this.nodes), exports);
  }

  removeExport(id: string): Snapshot {
    if (!this.exports.has(id)) throw new GraphError(`Export '${id}' not found`);
    const exports = new Map(this.exports);
    exports.delete(id);
    return this.next(new Map(this.nodes), exports);
  }

  setExportRoot(id: string, root: string): Snapshot {
    const e = this.exports.get(id);
    if (!e) throw new GraphError(`Export '${id}' not found`);
    this.node(root);
    const exports = new Map(this.exports);
    exports.set(id, { ...e, root });
    return this.next(new Map(this.nodes), exports);
  }

  /**
   * Points every user of `from` at `to` (QEMU's bdrv_replace_node), except users inside `to`'s
   * own subtree, which keeps a filter above `from` from pointing at itself.
   */
  replaceUses(from: string, to: string): Snapshot {
    this.node(from);
    this.node(to);
    const skip = this.subtree(to);
    const nodes = new Map<string, NodeDef>();
    for (const [k, n] of this.nodes) {
      if (skip.has(k)) {
        nodes.set(k, n);
        continue;
      }
      const sw = (x: string): string => (x === from ? to : x);
      if (n.driver === 'throttle') nodes.set(k, { ...n, child: sw(n.child) });
      else if (n.driver === 'mirror') nodes.set(k, { ...n, source: sw(n.source), target: sw(n.target) });
      else nodes.set(k, n);
    }
    const exports = new Map<string, ExportDef>();
    for (const [k, e] of this.exports) exports.set(k, e.root === from ? { ...e, root: to } : e);
    return this.next(nodes, exports);
  }

  /** The tree a worker runs for the node `name`. */
  spec(name: string): NodeSpec {
    const n = this.node(name);
    const size = this.size(name);
    const readOnly = this.readOnly(name);
    switch (n.driver) {
      case 'file':
        return { driver: 'file', name, fd: n.fd, path: n.filename, size, readOnly, direct: n.direct, noFlush: n.noFlush, alignment: n.alignment, stats: n.stats };
      case 'null':
        return { driver: 'null', name, size, readOnly, stats: n.stats };
      case 'rbd':
        return { driver: 'rbd', name, size, stats: n.stats, ...rbdSpecOptions(n), shareId: n.handle.share(), readOnly };
      case 'nbd':
        return { driver: 'nbd', name, size, readOnly, stats: n.stats, server: n.address, export: n.export, exportSize: n.exportSize, flags: n.flags, reconnectDelayMs: n.reconnectDelayMs };
      case 'throttle':
        return { driver: 'throttle', name, size, readOnly, stats: n.stats, state: n.state, child: this.spec(n.child) };
      case 'mirror':
        return {
          driver: 'mirror',
          name,
          size,
          readOnly,
          stats: n.stats,
          source: this.spec(n.source),
          target: this.spec(n.target),
          chunks: n.chunks,
          chunkSize: n.chunkSize,
        };
    }
  }

  toJSON(): { generation: number; nodes: unknown[]; exports: ExportDef[] } {
    return {
      generation: this.generation,
      nodes: [...this.nodes.values()].map((n) => ({
        'node-name': n.name,
        driver: n.driver,
        children: this.children(n),
        size: this.size(n.name),
        'read-only': this.readOnly(n.name),
        ...(n.driver === 'file' ? { filename: n.filename, cache: { direct: n.direct, 'no-flush': n.noFlush }, 'request-alignment': n.alignment } : {}),
        ...(n.driver === 'rbd' ? { filename: rbdName(n), cache: { direct: n.cache !== true, 'no-flush': n.noFlush } } : {}),
        ...(n.driver === 'nbd' ? { server: n.server, export: n.export, 'reconnect-delay': n.reconnectDelayMs / 1000 } : {}),
      })),
      exports: [...this.exports.values()],
    };
  }

  toDot(): string {
    const q = (s: string): string => JSON.stringify(s);
    const lines = [`digraph vubd {`, `  label=${q(`generation ${this.generation}`)};`, '  node [shape=box];'];
    for (const e of this.exports.values()) {
      lines.push(`  ${q('export:' + e.id)} [shape=ellipse,label=${q(`export ${e.id}\nvhost-user-blk`)}];`);
      lines.push(`  ${q('export:' + e.id)} -> ${q(e.root)};`);
    }
    for (const n of this.nodes.values()) {
      const extra = n.driver === 'file' ? `\n${n.filename}` : n.driver === 'rbd' ? `\n${rbdName(n)}` : n.driver === 'nbd' ? `\n${n.server.type === 'unix' ? n.server.path : `${n.server.host}:${n.server.port}`} ${n.export}` : '';
      lines.push(`  ${q(n.name)} [label=${q(`${n.name}\n${n.driver}${extra}`)}];`);
      if (n.driver === 'throttle') lines.push(`  ${q(n.name)} -> ${q(n.child)} [label="file"];`);
      if (n.driver === 'mirror') {
        lines.push(`  ${q(n.name)} -> ${q(n.source)} [label="source"];`);
        lines.push(`  ${q(n.name)} -> ${q(n.target)} [label="target"];`);
      }
    }
    lines.push('}');
    return lines.join('\n');
  }
}

export { newNodeStats };
