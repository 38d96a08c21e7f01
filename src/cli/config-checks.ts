// Checks of a --config file that span fields, which JSON Schema cannot say: names that must be
// unique or must exist, the throttle chain, socket paths, and the queue-to-worker mapping.
// They run on data the schema accepted; each problem names the JSON path of the field at fault.
import os from 'node:os';
import path from 'node:path';
import { didYouMean, pointer, type Problem } from './config-errors.js';

export type Size = number | string;

export interface RawNode {
  'node-name': string;
  driver: 'file' | 'host_device' | 'null-co' | 'null' | 'nbd' | 'rbd' | 'throttle';
  filename?: string;
  server?: { type: 'inet'; host: string; port: string | number } | { type: 'unix'; path: string };
  export?: string;
  'reconnect-delay'?: number;
  'open-timeout'?: number;
  'read-only'?: boolean;
  cache?: { direct?: boolean; 'no-flush'?: boolean };
  locking?: 'auto' | 'on' | 'off';
  size?: Size;
  file?: string;
  limits?: Record<string, Size>;
  pool?: string;
  image?: string;
  conf?: string;
  user?: string;
  namespace?: string;
  snapshot?: string;
  key?: string;
  keyring?: string;
}

export interface RawSocketFile {
  mode?: string;
  owner?: string | number;
  group?: string | number;
}

export interface RawExport {
  type: 'vhost-user-blk';
  id: string;
  'node-name': string;
  addr: { type: 'unix'; path: string } | { type: 'fd'; str: string };
  writable?: boolean;
  writethrough?: boolean;
  'num-queues'?: number;
  'logical-block-size'?: 512 | 4096;
  'iothread-vq-mapping'?: { iothread: string; vqs?: number[] }[];
  'queue-size'?: number;
  serial?: string;
  'ring-packed'?: boolean;
  socket?: RawSocketFile;
  'allow-uid'?: (string | number)[];
  'allow-gid'?: (string | number)[];
}

export interface RawConfig {
  workers?: number;
  control?: RawSocketFile & { path: string };
  metrics?: string | number;
  'log-level'?: string;
  aio?: 'io_uring' | 'sync';
  'poll-us'?: number;
  incoming?: boolean;
  nodes?: RawNode[];
  exports?: RawExport[];
}

/** workers when the file does not say: one per CPU, as --workers defaults */
export function defaultWorkers(): number {
  return os.availableParallelism();
}

function checkUnique<T>(items: readonly T[], key: (t: T) => string | null, where: (i: number) => string, what: string, out: Problem[]): void {
  const first = new Map<string, number>();
  items.forEach((t, i) => {
    const k = key(t);
    if (k === null) return;
    const j = first.get(k);
    if (j === undefined) first.set(k, i);
    else out.push({ path: where(i), message: `duplicate ${what} '${k}' (first at ${where(j)})` });
  });
}

/** Nodes in an order where every throttle comes after the node below it; null when there is a cycle (reported). */
function throttleOrder(nodes: readonly RawNode[], byName: Map<string, number>, out: Problem[]): number[] | null {
  const state = new Map<number, 'visiting' | 'done'>();
  const order: number[] = [];
  let ok = true;
  const visit = (i: number, chain: number[]): void => {
    if (state.get(i) === 'done') return;
    if (state.get(i) === 'visiting') {
      const cycle = chain.slice(chain.indexOf(i)).concat(i).map((j) => nodes[j]!['node-name']);
      const at = Math.min(...chain.slice(chain.indexOf(i)));
      out.push({ path: pointer('nodes', at, 'file'), message: `throttle nodes form a cycle: ${cycle.join(' -> ')}` });
      ok = false;
      return;
    }
    state.set(i, 'visiting');
    const n = nodes[i]!;
    const child = n.driver === 'throttle' ? byName.get(n.file!) : undefined;
    if (child !== undefined) {
      chain.push(i);
      visit(child, chain);
      chain.pop();
    }
    state.set(i, 'done');
    order.push(i);
  };
  nodes.forEach((_, i) => visit(i, []));
  return ok ? order : null;
}

/** The node at the bottom of a throttle chain (a file or null node), or null if the chain is broken. */
function leafOf(nodes: readonly RawNode[], byName: Map<string, number>, name: string): RawNode | null {
  for (let hops = 0, i = byName.get(name); i !== undefined && hops <= nodes.length; hops++) {
    const n = nodes[i]!;
    if (n.driver !== 'throttle') return n;
    i = byName.get(n.file!);
  }
  return null;
}

export interface CheckResult {
  problems: Problem[];
  /** node indexes, children before the nodes above them */
  order: number[];
}

/** baseDir: relative paths are taken from here (the config file's directory); sizeOf: a size field's bytes, or null if it failed (already reported). */
export function crossChecks(c: RawConfig, baseDir: string, sizeOf: (s: Size) => number | null): CheckResult {
  const out: Problem[] = [];
  const nodes = c.nodes ?? [];
  const exports = c.exports ?? [];
  checkUnique(nodes, (n) => n['node-name'], (i) => pointer('nodes', i, 'node-name'), 'node-name', out);
  checkUnique(exports, (e) => e.id, (i) => pointer('exports', i, 'id'), 'export id', out);

  const byName = new Map<string, number>();
  nodes.forEach((n, i) => byName.has(n['node-name']) || byName.set(n['node-name'], i));
  const names = [...byName.keys()];
  const missing = (name: string): string => `no node named '${name}'${didYouMean(name, names)}${names.length === 0 ? ' (the file has no nodes)' : ''}`;
  nodes.forEach((n, i) => {
    if (n.driver === 'throttle' && !byName.has(n.file!)) out.push({ path: pointer('nodes', i, 'file'), message: missing(n.file!) });
  });
  const order = throttleOrder(nodes, byName, out) ?? nodes.map((_, i) => i);

  // Socket paths: each export's, and the control socket's, must differ (after resolving relative ones).
  const sockets: { path: string; at: string }[] = [];
  if (c.control) sockets.push({ path: path.resolve(baseDir, c.control.path), at: pointer('control', 'path') });
  exports.forEach((e, i) => {
    if (e.addr.type === 'unix') sockets.push({ path: path.resolve(baseDir, e.addr.path), at: pointer('exports', i, 'addr', 'path') });
  });
  checkUnique(sockets, (s) => s.path, (i) => sockets[i]!.at, 'socket path', out);
  checkUnique(exports, (e) => (e.addr.type === 'fd' ? String(Number(e.addr.str)) : null), (i) => pointer('exports', i, 'addr', 'str'), 'socket fd', out);

  const workers = c.workers ?? defaultWorkers();
  exports.forEach((e, i) => {
    const at = (...p: (string | number)[]): string => pointer('exports', i, ...p);
    const root = e['node-name'];
    if (!byName.has(root)) {
      out.push({ path: at('node-name'), message: missing(root) });
      return;
    }
    const leaf = leafOf(nodes, byName, root);
    if (leaf && e.writable === true && leaf['read-only'] === true) {
      out.push({ path: at('writable'), message: `node '${root}' is read-only (${pointer('nodes', byName.get(leaf['node-name'])!, 'read-only')}); make the export read-only or the node writable` });
    }
    const lbs = e['logical-block-size'] ?? 512;
    const bytes = leaf && leaf.size !== undefined ? sizeOf(leaf.size) : null;
    if (bytes !== null && bytes % lbs !== 0) {
      out.push({ path: at('logical-block-size'), message: `node '${leaf!['node-name']}' is ${bytes} bytes, not a multiple of ${lbs}` });
    }
    if (e.serial !== undefined && Buffer.byteLength(e.serial) > 20) out.push({ path: at('serial'), message: `must be at most 20 bytes (virtio-blk's ID), got ${Buffer.byteLength(e.serial)}` });
    if (e['iothread-vq-mapping']) checkVqMapping(e['iothread-vq-mapping'], e['num-queues'] ?? 1, workers, c.workers === undefined, at, out);
  });
  return { problems: out, order };
}

/** QEMU's iothread-vq-mapping rules: each iothread once; vqs on every entry or on none; every queue exactly once. */
function checkVqMapping(
  mapping: readonly { iothread: string; vqs?: number[] }[],
  numQueues: number,
  workers: number,
  workersDefaulted: boolean,
  at: (...p: (string | number)[]) => string,
  out: Problem[],
): void {
  const m = (...p: (string | number)[]): string => at('iothread-vq-mapping', ...p);
  checkUnique(mapping, (x) => x.iothread, (j) => m(j, 'iothread'), 'iothread', out);
  mapping.forEach((x, j) => {
    const n = Number(x.iothread.slice('worker'.length));
    if (n >= workers) {
      const why = workersDefaulted ? `workers is not set, so it is the CPU count, ${workers}` : `workers is ${workers}`;
      out.push({ path: m(j, 'iothread'), message: `no pool worker '${x.iothread}': ${why} (worker0 .. worker${workers - 1})` });
    }
  });
  const withVqs = mapping.filter((x) => x.vqs !== undefined).length;
  if (withVqs === 0) return;
  if (withVqs !== mapping.length) {
    const j = mapping.findIndex((x) => x.vqs === undefined);
    out.push({ path: m(j), message: "missing 'vqs': give vqs on every entry or on none (none: queues are spread round-robin over the listed workers)" });
    return;
  }
  const owner = new Map<number, string>();
  mapping.forEach((x, j) =>
    x.vqs!.forEach((q, k) => {
      if (q >= numQueues) out.push({ path: m(j, 'vqs', k), message: `no queue ${q}: num-queues is ${numQueues} (queues 0 .. ${numQueues - 1})` });
      else if (owner.has(q)) out.push({ path: m(j, 'vqs', k), message: `queue ${q} is mapped twice (also at ${owner.get(q)})` });
      else owner.set(q, m(j, 'vqs', k));
    }),
  );
  const unmapped = Array.from({ length: numQueues }, (_, q) => q).filter((q) => !owner.has(q));
  if (unmapped.length > 0) {
    out.push({ path: m(), message: `queue${unmapped.length > 1 ? 's' : ''} ${unmapped.join(', ')} not mapped: each of the ${numQueues} queues must be in exactly one entry's vqs` });
  }
}
