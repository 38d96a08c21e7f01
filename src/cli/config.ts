// --config=FILE: a JSON file describing the daemon, its block nodes and its exports, validated
// with ajv against config-schema.ts (JSON Schema 2020-12) and the cross-field checks of
// config-checks.ts, then translated into a DaemonConfig: blockdev-add and block-export-add
// argument objects as QMP takes them. The single-disk command line is a DaemonConfig too
// (configFromOptions), so the daemon starts the same way from either.
import fs from 'node:fs';
import path from 'node:path';
import type { SocketAccess } from '../protocol/socket-file.js';
import type { PeerPolicy } from '../protocol/peer-policy.js';
import type { ExportSpec } from '../control/export-manager.js';
import { cacheSemantics, parseMetricsAddress, parseSize, type MetricsAddress, type Options } from './args.js';
import { AccessUsageError, resolveGroup, resolveUser } from './access-args.js';
import { CONFIG_SCHEMA, BPS_LIMITS, IOPS_LIMITS } from './config-schema.js';
import { configValidator } from './config-validate.js';
import { ConfigError, jsonSyntaxProblem, pointer, schemaProblems, type Problem } from './config-errors.js';
import { crossChecks, defaultWorkers, type RawConfig, type RawExport, type RawNode, type RawSocketFile, type Size } from './config-checks.js';

export { ConfigError } from './config-errors.js';

export interface FileNodeArgs {
  'node-name': string;
  driver: 'file' | 'host_device';
  /** absolute (a relative filename is taken from the config file's directory) */
  filename: string;
  'read-only': boolean;
  cache: { direct: boolean; 'no-flush': boolean };
  locking: 'auto' | 'on' | 'off';
}
export interface NullNodeArgs {
  'node-name': string;
  driver: 'null-co' | 'null';
  size: number;
  'read-only': boolean;
}
export interface ThrottleNodeArgs {
  'node-name': string;
  driver: 'throttle';
  file: string;
  /** throttle-group property names (iops-total, bps-read-max, ...), in bytes or ops per second */
  limits: Record<string, number>;
}
export interface RbdNodeArgs {
  'node-name': string;
  driver: 'rbd';
  pool: string;
  image: string;
  /** absolute (a relative path is taken from the config file's directory); conf and keyring */
  conf?: string;
  user?: string;
  namespace?: string;
  snapshot?: string;
  key?: string;
  keyring?: string;
  'read-only': boolean;
  cache: { direct: boolean; 'no-flush': boolean };
}
export interface NbdNodeArgs {
  'node-name': string;
  driver: 'nbd';
  server: { type: 'inet'; host: string; port: string } | { type: 'unix'; path: string };
  export: string;
  'reconnect-delay': number;
  'open-timeout': number;
  'read-only': boolean;
}
/** blockdev-add's arguments */
export type NodeArgs = FileNodeArgs | NullNodeArgs | NbdNodeArgs | RbdNodeArgs | ThrottleNodeArgs;

export type ExportAddr = { type: 'unix'; path: string } | { type: 'fd'; str: string };

/** block-export-add's arguments (qemu-storage-daemon's names), with vubd's extras after them */
export interface ExportArgs {
  type: 'vhost-user-blk';
  id: string;
  'node-name': string;
  addr: ExportAddr;
  writable: boolean;
  /** QEMU's writethrough: every write durable before it completes (the guest sees no write cache) */
  writethrough: boolean;
  'num-queues': number;
  'logical-block-size': 512 | 4096;
  /** null: round-robin over the pool. Otherwise every queue is in exactly one entry's vqs (filled in when the file left vqs out) */
  'iothread-vq-mapping': { iothread: string; vqs: number[] }[] | null;
  'queue-size': number;
  serial: string;
  'ring-packed': boolean;
}

export interface ExportConfig {
  args: ExportArgs;
  /** mode/owner/group of a unix socket file, names already resolved */
  socketAccess: SocketAccess;
  /** allow-uid/allow-gid resolved; null when neither is given */
  peers: PeerPolicy | null;
}

export interface DaemonConfig {
  /** the config file as named on the command line, or 'the command line' */
  source: string;
  /** worker threads in the pool (the file's, --workers, or the CPU count) */
  workers: number;
  control: { path: string; access: SocketAccess } | null;
  /** the QMP socket passed by systemd */
  controlFd: number | null;
  /** the Prometheus endpoint, null when off */
  metrics: MetricsAddress | null;
  logLevel: string;
  aio: 'io_uring' | 'sync';
  pollUs: number;
  /** live-migration destination: images are not checked for another writer when opened */
  incoming: boolean;
  /** blockdev-add in this order: every throttle after the node below it */
  nodes: NodeArgs[];
  exports: ExportConfig[];
}

const DEFAULT_ACCESS: SocketAccess = { mode: 0o600, uid: -1, gid: -1 };

function validate(data: unknown): Problem[] {
  const { validate: v } = configValidator();
  return v(data) ? [] : schemaProblems(v.errors ?? [], data);
}

/** Reads, validates and translates a config file; throws ConfigError listing every problem. */
export function loadConfig(file: string): DaemonConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(file, [{ path: '', message: `cannot read the config file: ${(e as Error).message}` }]);
  }
  return parseConfig(text, file, path.dirname(path.resolve(file)));
}

/** text: the file's contents; baseDir: where relative paths in it are taken from. */
export function parseConfig(text: string, file: string, baseDir: string): DaemonConfig {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(file, [jsonSyntaxProblem(text, e as Error)]);
  }
  const schema = validate(data);
  if (schema.length > 0) throw new ConfigError(file, schema);
  const raw = data as RawConfig;
  const problems: Problem[] = [];
  const bytes = (s: Size, at: string): number | null => {
    try {
      return typeof s === 'number' ? s : parseSize(s);
    } catch (e) {
      problems.push({ path: at, message: (e as Error).message });
      return null;
    }
  };
  // A size that does not parse is reported once, by nodeArgs; the checks skip it.
  const checks = crossChecks(raw, baseDir, (s) => (typeof s === 'number' ? s : safeSize(s)));
  const nodes = (raw.nodes ?? []).map((n, i) => nodeArgs(n, pointer('nodes', i), baseDir, bytes, problems));
  const exports = (raw.exports ?? []).map((e, i) => exportConfig(e, pointer('exports', i), baseDir, problems));
  let metrics: MetricsAddress | null = null;
  if (raw.metrics !== undefined) {
    try {
      metrics = parseMetricsAddress(String(raw.metrics));
    } catch (e) {
      problems.push({ path: '/metrics', message: (e as Error).message.replace(/^--metrics: /, '') });
    }
  }
  const control = raw.control ? { path: path.resolve(baseDir, raw.control.path), access: access(raw.control, pointer('control'), problems) } : null;
  const all = [...checks.problems, ...problems].sort(byDocumentOrder);
  if (all.length > 0) throw new ConfigError(file, all);
  return {
    source: file,
    workers: raw.workers ?? defaultWorkers(),
    control,
    controlFd: null,
    metrics,
    logLevel: raw['log-level'] ?? 'info',
    aio: raw.aio ?? 'io_uring',
    pollUs: raw['poll-us'] ?? 0,
    incoming: raw.incoming ?? false,
    nodes: checks.order.map((i) => nodes[i]!),
    exports,
  };
}

const TOP_LEVEL = Object.keys(CONFIG_SCHEMA.properties);

/** Problems in the order of the fields in the file: top-level keys as the schema lists them, then indexes. */
function byDocumentOrder(a: Problem, b: Problem): number {
  const key = (p: Problem): [number, string] => {
    const top = p.path.split('/')[1] ?? '';
    return [TOP_LEVEL.indexOf(top), p.path];
  };
  const [ra, pa] = key(a);
  const [rb, pb] = key(b);
  return ra - rb || pa.localeCompare(pb, 'en', { numeric: true });
}

function safeSize(s: string): number | null {
  try {
    return parseSize(s);
  } catch {
    return null;
  }
}

function nodeArgs(n: RawNode, at: string, baseDir: string, bytes: (s: Size, at: string) => number | null, problems: Problem[]): NodeArgs {
  const name = n['node-name'];
  switch (n.driver) {
    case 'file':
    case 'host_device':
      return {
        'node-name': name,
        driver: n.driver,
        filename: path.resolve(baseDir, n.filename!),
        'read-only': n['read-only'] ?? false,
        cache: { direct: n.cache?.direct ?? false, 'no-flush': n.cache?.['no-flush'] ?? false },
        locking: n.locking ?? 'auto',
      };
    case 'null-co':
    case 'null': {
      const size = bytes(n.size!, `${at}/size`) ?? 0;
      if (size % 512 !== 0) problems.push({ path: `${at}/size`, message: `must be a multiple of 512, got ${size}` });
      return { 'node-name': name, driver: n.driver, size, 'read-only': n['read-only'] ?? false };
    }
    case 'rbd': {
      const out: RbdNodeArgs = {
        'node-name': name,
        driver: 'rbd',
        pool: n.pool!,
        image: n.image!,
        'read-only': n['read-only'] ?? false,
        cache: { direct: n.cache?.direct ?? false, 'no-flush': n.cache?.['no-flush'] ?? false },
      };
      for (const k of ['user', 'namespace', 'snapshot', 'key'] as const) if (n[k] !== undefined) out[k] = n[k];
      for (const k of ['conf', 'keyring'] as const) if (n[k] !== undefined) out[k] = path.resolve(baseDir, n[k]);
      return out;
    }
    case 'nbd': {
      const srv = n.server!;
      return {
        'node-name': name,
        driver: 'nbd',
        server: srv.type === 'unix' ? { type: 'unix', path: path.resolve(baseDir, srv.path) } : { type: 'inet', host: srv.host, port: String(srv.port) },
        export: n.export ?? '',
        'reconnect-delay': n['reconnect-delay'] ?? 0,
        'open-timeout': n['open-timeout'] ?? 0,
        'read-only': n['read-only'] ?? false,
      };
    }
    case 'throttle': {
      const limits: Record<string, number> = {};
      for (const k of [...IOPS_LIMITS, ...BPS_LIMITS]) {
        const v = n.limits?.[k];
        if (v !== undefined) limits[k] = typeof v === 'number' ? v : (bytes(v, `${at}/limits/${k}`) ?? 0);
      }
      return { 'node-name': name, driver: 'throttle', file: n.file!, limits };
    }
  }
}

function ids(list: (string | number)[] | undefined, at: string, resolve: (o: string, t: string) => number, problems: Problem[]): number[] | null {
  if (list === undefined) return null;
  return list.map((x, k) => resolveAt(String(x), `${at}/${k}`, resolve, problems));
}

function resolveAt(text: string, at: string, resolve: (o: string, t: string) => number, problems: Problem[]): number {
  try {
    return resolve('x', text);
  } catch (e) {
    if (!(e instanceof AccessUsageError)) throw e;
    problems.push({ path: at, message: e.message.replace(/^--x: /, '') });
    return -1;
  }
}

function access(s: RawSocketFile | undefined, at: string, problems: Problem[]): SocketAccess {
  return {
    mode: s?.mode === undefined ? DEFAULT_ACCESS.mode : parseInt(s.mode, 8),
    uid: s?.owner === undefined ? -1 : resolveAt(String(s.owner), `${at}/owner`, resolveUser, problems),
    gid: s?.group === undefined ? -1 : resolveAt(String(s.group), `${at}/group`, resolveGroup, problems),
  };
}

function exportConfig(e: RawExport, at: string, baseDir: string, problems: Problem[]): ExportConfig {
  const numQueues = e['num-queues'] ?? 1;
  const mapping = e['iothread-vq-mapping'];
  // QEMU: without vqs, queues go round-robin over the listed iothreads.
  const vqMapping = mapping?.map((m, j) => ({ iothread: m.iothread, vqs: m.vqs ?? Array.from({ length: numQueues }, (_, q) => q).filter((q) => q % mapping.length === j) })) ?? null;
  const uids = ids(e['allow-uid'], `${at}/allow-uid`, resolveUser, problems);
  const gids = ids(e['allow-gid'], `${at}/allow-gid`, resolveGroup, problems);
  return {
    args: {
      type: 'vhost-user-blk',
      id: e.id,
      'node-name': e['node-name'],
      addr: e.addr.type === 'unix' ? { type: 'unix', path: path.resolve(baseDir, e.addr.path) } : { type: 'fd', str: e.addr.str },
      writable: e.writable ?? false,
      writethrough: e.writethrough ?? false,
      'num-queues': numQueues,
      'logical-block-size': e['logical-block-size'] ?? 512,
      'iothread-vq-mapping': vqMapping,
      'queue-size': e['queue-size'] ?? 1024,
      serial: e.serial ?? e.id.slice(0, 20),
      'ring-packed': e['ring-packed'] ?? false,
    },
    socketAccess: e.addr.type === 'unix' ? access(e.socket, `${at}/socket`, problems) : DEFAULT_ACCESS,
    peers: uids === null && gids === null ? null : { uids: uids ?? [], gids: gids ?? [] },
  };
}

/**
 * The single-disk command line as a DaemonConfig: node 'file0' (or 'null0') and export 'export0',
 * as vubd has always named them; no node and no export for the exportless form (only --control).
 */
export function configFromOptions(opts: Options): DaemonConfig {
  const daemon = {
    source: 'the command line',
    workers: opts.workers,
    control: opts.control !== null ? { path: path.resolve(opts.control), access: opts.controlAccess } : null,
    controlFd: opts.controlFd,
    metrics: opts.metrics,
    logLevel: opts.logLevel,
    aio: opts.aio,
    pollUs: opts.pollUs,
    incoming: opts.incoming,
  };
  if (!opts.initialExport) return { ...daemon, nodes: [], exports: [] };
  const { direct, noFlush, writeback } = cacheSemantics(opts.cache);
  const node: NodeArgs =
    opts.blkDriver === 'null'
      ? { 'node-name': 'null0', driver: 'null-co', size: opts.size, 'read-only': opts.readOnly }
      : {
          'node-name': 'file0',
          driver: 'file',
          filename: path.resolve(opts.blkFile!),
          'read-only': opts.readOnly,
          cache: { direct, 'no-flush': noFlush },
          locking: opts.forceShare ? 'off' : 'auto',
        };
  const addr: ExportAddr = opts.socketPath !== null ? { type: 'unix', path: path.resolve(opts.socketPath) } : { type: 'fd', str: String(opts.fd) };
  return {
    ...daemon,
    nodes: [node],
    exports: [
      {
        args: {
          type: 'vhost-user-blk',
          id: 'export0',
          'node-name': node['node-name'],
          addr,
          writable: !opts.readOnly,
          writethrough: !writeback,
          'num-queues': opts.numQueues,
          'logical-block-size': opts.logicalBlockSize,
          'iothread-vq-mapping': null,
          'queue-size': opts.queueSize,
          serial: opts.serial ?? (node.driver === 'file' ? path.basename(node.filename) : 'vubd-null'),
          'ring-packed': opts.ringPacked,
        },
        socketAccess: opts.socketPath !== null ? opts.socketAccess : DEFAULT_ACCESS,
        peers: opts.peers,
      },
    ],
  };
}

/**
 * What main.ts serves: the --config file with the daemon options given on the command line
 * over the file's, or the single-disk command line. Throws ConfigError (exit 2).
 */
export function resolveConfig(opts: Options): DaemonConfig {
  if (opts.config === null) return configFromOptions(opts);
  const c = loadConfig(opts.config);
  const given = (o: string): boolean => opts.given.has(o);
  if (given('log-level')) c.logLevel = opts.logLevel;
  if (given('aio')) c.aio = opts.aio;
  if (given('poll-us')) c.pollUs = opts.pollUs;
  if (given('incoming')) c.incoming = opts.incoming;
  if (given('metrics')) c.metrics = opts.metrics;
  if (given('workers')) {
    c.workers = opts.workers;
    const problems: Problem[] = [];
    c.exports.forEach((e, i) =>
      e.args['iothread-vq-mapping']?.forEach((m, j) => {
        if (Number(m.iothread.slice('worker'.length)) >= c.workers) {
          problems.push({ path: pointer('exports', i, 'iothread-vq-mapping', j, 'iothread'), message: `no pool worker '${m.iothread}': --workers is ${c.workers} (worker0 .. worker${c.workers - 1})` });
        }
      }),
    );
    if (problems.length > 0) throw new ConfigError(opts.config, problems);
  }
  if (opts.control !== null) c.control = { path: path.resolve(opts.control), access: opts.controlAccess };
  else if (['control-mode', 'control-owner', 'control-group'].some(given)) {
    if (c.control === null) throw new ConfigError(opts.config, [{ path: '/control', message: "--control-mode/--control-owner/--control-group need a control socket: --control=PATH or the file's 'control'" }]);
    const a = opts.controlAccess;
    c.control.access = { mode: given('control-mode') ? a.mode : c.control.access.mode, uid: given('control-owner') ? a.uid : c.control.access.uid, gid: given('control-group') ? a.gid : c.control.access.gid };
  }
  if (opts.controlFd !== null) {
    if (c.control !== null) throw new ConfigError(opts.config, [{ path: '/control', message: "systemd passed a socket named 'control' (LISTEN_FDNAMES): drop 'control' from the file, or do not pass that socket" }]);
    c.controlFd = opts.controlFd;
  }
  if (opts.fd !== null && !c.exports.some((e) => e.args.addr.type === 'fd' && Number(e.args.addr.str) === opts.fd)) {
    throw new ConfigError(opts.config, [{ path: '/exports', message: `systemd passed a listening socket as fd ${opts.fd} (LISTEN_FDS), but no export's addr is {"type": "fd", "str": "${opts.fd}"}` }]);
  }
  return c;
}

/** The resolved config as --check-config prints it: modes in octal, as written in the file. */
export function describeConfig(c: DaemonConfig): string {
  const octal = (a: SocketAccess): Record<string, unknown> => ({ mode: '0' + a.mode.toString(8), uid: a.uid, gid: a.gid });
  return JSON.stringify(
    {
      source: c.source,
      workers: c.workers,
      control: c.control ? { path: c.control.path, ...octal(c.control.access) } : c.controlFd !== null ? { fd: c.controlFd } : null,
      metrics: c.metrics,
      'log-level': c.logLevel,
      aio: c.aio,
      'poll-us': c.pollUs,
      incoming: c.incoming,
      'blockdev-add': c.nodes,
      'block-export-add': c.exports.map((e) => ({ ...e.args, ...(e.args.addr.type === 'unix' ? { socket: octal(e.socketAccess) } : {}), ...(e.peers ? { 'allow-uid': e.peers.uids, 'allow-gid': e.peers.gids } : {}) })),
    },
    null,
    2,
  );
}

/**
 * main.ts' one call: the config to serve, or the exit code when there is nothing to serve
 * (2 for a bad config, printed before anything is opened; 0 after --check-config).
 */
export function startupConfig(opts: Options): { config: DaemonConfig } | { exit: number } {
  let config: DaemonConfig;
  try {
    config = resolveConfig(opts);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    console.error(e.message);
    return { exit: 2 };
  }
  if (opts.checkConfig) {
    console.log(describeConfig(config));
    return { exit: 0 };
  }
  return { config };
}

/** What ExportManager.add takes for an export of the file (the same as block-export-add would make of it). */
export function exportSpec(e: ExportConfig): ExportSpec {
  const a = e.args;
  let mapping: number[] | undefined;
  if (a['iothread-vq-mapping'] !== null) {
    mapping = new Array<number>(a['num-queues']);
    for (const m of a['iothread-vq-mapping']) for (const q of m.vqs) mapping[q] = Number(m.iothread.slice('worker'.length));
  }
  return {
    id: a.id,
    nodeName: a['node-name'],
    addr: a.addr.type === 'unix' ? { type: 'unix', path: a.addr.path } : { type: 'fd', fd: Number(a.addr.str) },
    writable: a.writable,
    writethrough: a.writethrough,
    numQueues: a['num-queues'],
    queueSize: a['queue-size'],
    logicalBlockSize: a['logical-block-size'],
    serial: a.serial,
    ...(mapping ? { mapping } : {}),
    access: e.socketAccess,
    peers: e.peers,
    ringPacked: a['ring-packed'],
  };
}
