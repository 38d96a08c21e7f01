// QMP commands. Where QEMU has the same command, its name and argument names are used.
import fs from 'node:fs';
import type { BlockGraph } from '../graph/graph.js';
import type { BackgroundIo } from '../graph/background-io.js';
import { MirrorJob, type JobEvents } from '../graph/mirror-job.js';
import { nbdUri, openNbdNode } from '../graph/nbd-open.js';
import { closeNode, DEFAULT_CACHE, nullNode, openFileNode, type CacheOptions } from '../graph/open.js';
import { GraphError, type NodeDef } from '../graph/snapshot.js';
import { errnoName, flushErrno, NodeStat, newNodeStats } from '../graph/nodes.js';
import type { Logger } from '../log.js';
import { getLimits, newThrottleState, setLimits, type ThrottleLimits } from '../graph/throttle-state.js';
import type { BlkExport } from '../worker/export.js';
import { QmpError, type CommandHandler } from './qmp-server.js';
import { parseLockingMode } from '../graph/image-lock.js';
import { logger } from '../log.js';
import type { ExportManager } from './export-manager.js';
import { exportCommands, type AccessParser } from './export-commands.js';
import { followRbdResizes, openRbdNode, type RbdArgs } from '../graph/rbd-open.js';
import { rbdName } from '../graph/snapshot.js';

const log = logger('control');

export interface ControlContext {
  graph: BlockGraph;
  /** storage I/O of jobs (mirror copy and flush), off the main thread's synchronous path */
  io: BackgroundIo;
  /** live: exports come and go with block-export-add/del */
  exports: ReadonlyMap<string, BlkExport>;
  /** present in the daemon: block-export-add/del and the full query-block-exports */
  manager?: ExportManager;
  /** workers in the pool (iothread-vq-mapping names worker0..N-1) */
  poolSize?: number;
  parseAccess?: AccessParser;
  emit(event: string, data: Record<string, unknown>): void;
  quit(): void;
  version: string;
  log?: Logger;
}

type Args = Record<string, unknown>;

function str(a: Args, key: string): string {
  const v = a[key];
  if (typeof v !== 'string' || v.length === 0) throw new QmpError('GenericError', `Parameter '${key}' is missing or not a string`);
  return v;
}

function optStr(a: Args, key: string): string | undefined {
  return a[key] === undefined ? undefined : str(a, key);
}

function num(a: Args, key: string): number {
  const v = a[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new QmpError('GenericError', `Parameter '${key}' expects a non-negative integer`);
  return v;
}

function bool(a: Args, key: string, def: boolean): boolean {
  const v = a[key];
  if (v === undefined) return def;
  if (typeof v !== 'boolean') throw new QmpError('GenericError', `Parameter '${key}' expects a boolean`);
  return v;
}

/** blockdev-add's `cache: {direct, no-flush}` (BlockdevCacheOptions; both default off, as in QEMU) */
function cacheOptions(a: Args): CacheOptions {
  const c = a.cache;
  if (c === undefined) return DEFAULT_CACHE;
  if (typeof c !== 'object' || c === null || Array.isArray(c)) throw new QmpError('GenericError', "Parameter 'cache' expects an object {direct, no-flush}");
  const known = new Set(['direct', 'no-flush']);
  const unknown = Object.keys(c).filter((k) => !known.has(k));
  if (unknown.length > 0) throw new QmpError('GenericError', `Parameter 'cache.${unknown[0]}' is unexpected`);
  return { direct: bool(c as Args, 'direct', false), noFlush: bool(c as Args, 'no-flush', false) };
}

// QEMU's throttle-group property names and block_set_io_throttle's names -> our classes.
const THROTTLE_GROUP_KEYS: Record<string, keyof ThrottleLimits> = {
  'iops-total': 'iops_total',
  'iops-total-max': 'iops_total_max',
  'iops-read': 'iops_rd',
  'iops-read-max': 'iops_rd_max',
  'iops-write': 'iops_wr',
  'iops-write-max': 'iops_wr_max',
  'bps-total': 'bps_total',
  'bps-total-max': 'bps_total_max',
  'bps-read': 'bps_rd',
  'bps-read-max': 'bps_rd_max',
  'bps-write': 'bps_wr',
  'bps-write-max': 'bps_wr_max',
};
const IO_THROTTLE_KEYS: Record<string, keyof ThrottleLimits> = {
  iops: 'iops_total',
  iops_max: 'iops_total_max',
  iops_rd: 'iops_rd',
  iops_rd_max: 'iops_rd_max',
  iops_wr: 'iops_wr',
  iops_wr_max: 'iops_wr_max',
  bps: 'bps_total',
  bps_max: 'bps_total_max',
  bps_rd: 'bps_rd',
  bps_rd_max: 'bps_rd_max',
  bps_wr: 'bps_wr',
  bps_wr_max: 'bps_wr_max',
};

function limitsFrom(a: Args, keys: Record<string, keyof ThrottleLimits>): ThrottleLimits {
  const out: ThrottleLimits = {};
  for (const k of Object.keys(a)) {
    const ours = keys[k];
    if (!ours) continue;
    out[ours] = num(a, k);
  }
  return out;
}

/** blockdev-add driver=rbd: QEMU's option names, plus our key/keyring for the cephx secret. */
function rbdArgs(a: Args): RbdArgs {
  if (a['key-secret'] !== undefined) {
    throw new QmpError('GenericError', "Parameter 'key-secret' names a QEMU secret object, which vubd does not have: give the cephx key with 'key' or a keyring file with 'keyring'");
  }
  if (a.server !== undefined) throw new QmpError('GenericError', "Parameter 'server' is not supported: name the monitors in the conf file ('conf')");
  const out: RbdArgs = { pool: str(a, 'pool'), image: str(a, 'image') };
  for (const k of ['conf', 'user', 'namespace', 'snapshot', 'key', 'keyring'] as const) {
    const v = optStr(a, k);
    if (v !== undefined) out[k] = v;
  }
  return out;
}

async function guard<T>(fn: () => T | Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof GraphError) throw new QmpError('GenericError', e.message);
    throw e;
  }
}

export function buildCommands(ctx: ControlContext): Map<string, CommandHandler> {
  const { graph } = ctx;
  const jobs = new Map<string, MirrorJob>();
  // The copy covers the source's size at the start and the target was checked against it, so a
  // resize of either while the job runs would leave blocks uncopied or a target too small to pivot.
  function refuseResizeUnderJob(name: string): void {
    const s = graph.snapshot;
    for (const j of jobs.values()) {
      if (j.status === 'concluded') continue;
      for (const [role, root] of [['source', j.source], ['target', j.target]] as const) {
        if (s.nodes.has(root) && s.subtree(root).has(name)) {
          const what = name === root ? `the ${role}` : `below '${root}', the ${role}`;
          throw new QmpError('GenericError', `Cannot resize node '${name}': it is ${what} of running mirror job '${j.id}'; complete or cancel the job first`);
        }
      }
    }
  }
  const events: JobEvents = {
    statusChanged: (j) => ctx.emit('JOB_STATUS_CHANGE', { id: j.id, status: j.status }),
    ready: (j) => ctx.emit('BLOCK_JOB_READY', { type: 'mirror', device: j.id, len: j.total, offset: j.offset, speed: j.speed }),
    completed: (j, error) => {
      const data = { type: 'mirror', device: j.id, len: j.total, offset: j.offset, speed: j.speed };
      if (error === 'cancelled') ctx.emit('BLOCK_JOB_CANCELLED', data);
      else ctx.emit('BLOCK_JOB_COMPLETED', error ? { ...data, error } : data);
    },
    flushFailed: (node, errno) =>
      ctx.log?.error({ node, errno }, `flush failed on node '${node}': ${errnoName(errno)}; every later flush of this node fails until it is reopened`),
  };

  /** errno of a node's sticky flush error; a filter reports the first one below it (its flushes fail with it). */
  const flushErrorOf = (name: string): number => {
    const s = graph.snapshot;
    const n = s.node(name);
    if (n.driver === 'file') return flushErrno(n.stats);
    for (const c of s.children(n)) {
      const e = flushErrorOf(c);
      if (e !== 0) return e;
    }
    return 0;
  };
  const flushErrorFields = (name: string): Record<string, boolean | number> => {
    const e = flushErrorOf(name);
    return e === 0 ? { 'flush-error': false } : { 'flush-error': true, 'flush-errno': e };
  };

  /** The node a 'device' argument names: a node-name, or an export id meaning its root. */
  const resolveDevice = (name: string): string => {
    const s = graph.snapshot;
    if (s.nodes.has(name)) return name;
    const e = s.exports.get(name);
    if (e) return e.root;
    throw new QmpError('DeviceNotFound', `Cannot find device='${name}' nor node-name='${name}'`);
  };

  const job = (a: Args): MirrorJob => {
    const id = str(a, 'id');
    const j = jobs.get(id);
    if (!j) throw new QmpError('GenericError', `Job ID '${id}' not found`);
    return j;
  };

  const nodeStats = (def: NodeDef): Record<string, number | string | boolean> => {
    const s = new Int32Array(def.stats);
    return {
      'node-name': def.name,
      driver: def.driver,
      'read-ops': Atomics.load(s, NodeStat.READ_OPS),
      'write-ops': Atomics.load(s, NodeStat.WRITE_OPS),
      'flush-ops': Atomics.load(s, NodeStat.FLUSH_OPS),
      'other-ops': Atomics.load(s, NodeStat.OTHER_OPS),
      'read-kib': Atomics.load(s, NodeStat.READ_KIB),
      'write-kib': Atomics.load(s, NodeStat.WRITE_KIB),
      ...flushErrorFields(def.name),
    };
  };

  const cmds: [string, CommandHandler][] = [
    ['query-version', () => ({ qemu: { major: 0, minor: 0, micro: 0 }, package: `vubd ${ctx.version}` })],
    ['query-commands', () => [...cmdMap.keys(), 'qmp_capabilities'].map((name) => ({ name }))],
    ['quit', () => void setImmediate(() => ctx.quit())],
    [
      'blockdev-add',
      (a) =>
        guard(async () => {
          const name = str(a, 'node-name');
          const driver = str(a, 'driver');
          let def: NodeDef;
          if (driver === 'file' || driver === 'host_device') {
            const mode = parseLockingMode(a.locking);
            def = openFileNode(name, str(a, 'filename'), bool(a, 'read-only', false), cacheOptions(a), { mode, checkClaim: true });
            if (mode === 'off') log.warn({ node: name, image: def.filename }, 'image locking is off (locking=off): another writer may use the image at the same time');
          } else if (driver === 'rbd') {
            def = openRbdNode(name, rbdArgs(a), bool(a, 'read-only', false), cacheOptions(a));
          } else if (driver === 'null-co' || driver === 'null') def = nullNode(name, num(a, 'size'), bool(a, 'read-only', false));
          else if (driver === 'nbd') def = await openNbdNode(name, a, bool(a, 'read-only', false));
          else if (driver === 'throttle') {
            const state = newThrottleState();
            const limits = typeof a.limits === 'object' && a.limits !== null ? limitsFrom(a.limits as Args, THROTTLE_GROUP_KEYS) : {};
            setLimits(state, limits);
            def = { driver: 'throttle', name, child: str(a, 'file'), state, stats: newNodeStats() };
          } else throw new QmpError('GenericError', `Unknown driver '${driver}' (supported: file, host_device, null-co, nbd, rbd, throttle)`);
          try {
            await graph.change((s) => s.addNode(def));
          } catch (e) {
            closeNode(def);
            throw e;
          }
          if (def.driver === 'rbd') followRbdResizes(graph, def);
          return {};
        }),
    ],
    [
      'blockdev-del',
      (a) =>
        guard(async () => {
          const name = str(a, 'node-name');
          const def = graph.snapshot.node(name);
          await graph.change((s) => s.removeNode(name));
          closeNode(def);
          return {};
        }),
    ],
    [
      'block_resize',
      (a) =>
        guard(async () => {
          const name = a['node-name'] !== undefined ? str(a, 'node-name') : resolveDevice(str(a, 'device'));
          const size = num(a, 'size');
          const def = graph.snapshot.node(name);
          if (def.driver !== 'file' && def.driver !== 'null' && def.driver !== 'rbd') throw new QmpError('GenericError', `Node '${name}' (${def.driver}) cannot be resized; resize the node below it`);
          refuseResizeUnderJob(name);
          if (size % 512 !== 0) throw new QmpError('GenericError', 'The new size must be a multiple of 512');
          if (size < def.size) throw new QmpError('GenericError', `Shrinking '${name}' from ${def.size} to ${size} bytes is not supported`);
          if (def.driver === 'file') {
            if (def.readOnly) throw new QmpError('GenericError', `Node '${name}' is read-only`);
            if (fs.fstatSync(def.fd).isFile()) fs.ftruncateSync(def.fd, size);
            else if (size !== def.size) throw new QmpError('GenericError', 'A block device cannot be grown from here');
          }
          if (def.driver === 'rbd') {
            if (def.readOnly) throw new QmpError('GenericError', `Node '${name}' is read-only`);
            try {
              def.handle.resize(size);
            } catch (e) {
              throw new QmpError('GenericError', `Could not resize rbd image ${rbdName(def)}: ${(e as Error).message}`);
            }
          }
          await graph.change((s) => s.replaceNode(name, { ...s.node(name), size } as NodeDef));
          return {};
        }),
    ],
    [
      'block-export-set-node',
      (a) =>
        guard(async () => {
          const id = str(a, 'id');
          const node = str(a, 'node-name');
          const exp = ctx.exports.get(id);
          if (!exp) throw new QmpError('GenericError', `Export '${id}' not found`);
          const s = graph.snapshot;
          if (!exp.readOnly && s.readOnly(node)) throw new QmpError('GenericError', `Node '${node}' is read-only but export '${id}' is writable`);
          await graph.change((snap) => snap.setExportRoot(id, node));
          return {};
        }),
    ],
    [
      'block_set_io_throttle',
      (a) =>
        guard(async () => {
          const target = a['id'] !== undefined ? resolveDevice(str(a, 'id')) : resolveDevice(str(a, 'device'));
          const limits = limitsFrom(a, IO_THROTTLE_KEYS);
          const def = graph.snapshot.node(target);
          if (def.driver === 'throttle') {
            setLimits(def.state, limits);
            return {};
          }
          // Not a throttle node: put one above it (drained), like libvirt's iotune on a disk.
          const name = `${target}-throttle`;
          const state = newThrottleState();
          setLimits(state, limits);
          await graph.change((s) => s.addNode({ driver: 'throttle', name, child: target, state, stats: newNodeStats() }).replaceUses(target, name));
          return {};
        }),
    ],
    [
      'blockdev-mirror',
      (a) =>
        guard(async () => {
          const id = a['job-id'] !== undefined ? str(a, 'job-id') : str(a, 'device');
          if (jobs.has(id) && jobs.get(id)!.status !== 'concluded') throw new QmpError('GenericError', `Job ID '${id}' already in use`);
          const sync = str(a, 'sync');
          if (sync !== 'full') throw new QmpError('GenericError', `sync mode '${sync}' is not supported (use 'full')`);
          const source = resolveDevice(str(a, 'device'));
          const target = str(a, 'target');
          const speed = a['speed'] === undefined ? 0 : num(a, 'speed');
          const j = new MirrorJob(id, source, target, graph, events, ctx.io);
          j.speed = speed;
          jobs.set(id, j);
          try {
            await j.start();
          } catch (e) {
            jobs.delete(id);
            throw e;
          }
          return {};
        }),
    ],
    [
      'query-jobs',
      () =>
        [...jobs.values()].map((j) => ({
          id: j.id,
          type: 'mirror',
          status: j.status,
          'current-progress': j.offset,
          'total-progress': j.total,
          speed: j.speed,
          ...(j.error ? { error: j.error } : {}),
        })),
    ],
    [
      'block-job-set-speed',
      (a) =>
        guard(() => {
          const j = job({ id: a['device'] });
          j.speed = num(a, 'speed');
          return {};
        }),
    ],
    ['job-complete', (a) => guard(async () => (await job(a).complete(), {}))],
    ['job-cancel', (a) => guard(async () => (await job(a).cancel(), {}))],
    ['job-dismiss', (a) => guard(() => {
      const j = job(a);
      if (j.status !== 'concluded') throw new QmpError('GenericError', `Job '${j.id}' is not concluded`);
      jobs.delete(j.id);
      return {};
    })],
    ['block-job-complete', (a) => guard(async () => (await job({ id: a.device }).complete(), {}))],
    ['block-job-cancel', (a) => guard(async () => (await job({ id: a.device }).cancel(), {}))],
    [
      'query-named-block-nodes',
      () => {
        const s = graph.snapshot;
        return [...s.nodes.values()].map((n) => ({
          'node-name': n.name,
          drv: n.driver === 'null' ? 'null-co' : n.driver,
          ro: s.readOnly(n.name),
          file: n.driver === 'file' ? n.filename : n.driver === 'rbd' ? rbdName(n) : n.driver === 'nbd' ? nbdUri(n.server, n.export) : s.children(n)[0] ?? '',
          image: { filename: n.driver === 'file' ? n.filename : n.driver === 'rbd' ? rbdName(n) : n.driver === 'nbd' ? nbdUri(n.server, n.export) : n.name, format: n.driver === 'null' ? 'null-co' : n.driver, 'virtual-size': s.size(n.name) },
          ...(n.driver === 'file' ? { cache: { writeback: true, direct: n.direct, 'no-flush': n.noFlush } } : {}),
          ...(n.driver === 'rbd' ? { cache: { writeback: true, direct: n.cache !== true, 'no-flush': n.noFlush } } : {}),
          ...(n.driver === 'throttle' ? { limits: getLimits(n.state) } : {}),
          ...flushErrorFields(n.name),
        }));
      },
    ],
    [
      'query-block-exports',
      () =>
        [...graph.snapshot.exports.values()].map((e) => ({
          id: e.id,
          type: 'vhost-user-blk',
          'node-name': e.root,
          'shutting-down': false,
        })),
    ],
    [
      'x-query-block-graph',
      (a) => {
        const format = optStr(a, 'format') ?? 'json';
        if (format === 'dot') return { dot: graph.snapshot.toDot() };
        if (format === 'json') return graph.snapshot.toJSON();
        throw new QmpError('GenericError', `format must be 'json' or 'dot'`);
      },
    ],
    [
      'query-stats',
      () => {
        const s = graph.snapshot;
        return {
          generation: s.generation,
          exports: [...ctx.exports.values()].map((e) => ({
            id: e.id,
            'node-name': s.exports.get(e.id)?.root,
            queues: e.stats(),
            drain: { state: e.barrier.state, nesting: e.barrier.nesting, timeouts: e.barrier.timeouts, 'latency-ms': e.barrier.latency() },
          })),
          nodes: [...s.nodes.values()].map(nodeStats),
        };
      },
    ],
  ];
  if (ctx.manager) cmds.push(...exportCommands(ctx.manager, ctx.poolSize ?? 1, ctx.emit, ctx.parseAccess));
  const cmdMap = new Map(cmds);
  return cmdMap;
}
