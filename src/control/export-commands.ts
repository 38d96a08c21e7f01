// block-export-add / block-export-del / query-block-exports, with qemu-storage-daemon's names
// (BlockExportOptions for type vhost-user-blk) plus a few of our own.
import { ExportError, type ExportManager, type ExportAddr, type ExportSpec } from './export-manager.js';
import { QmpError, type CommandHandler } from './qmp-server.js';
import type { SocketAccess } from '../protocol/socket-file.js';
import type { PeerPolicy } from '../protocol/peer-policy.js';

type Args = Record<string, unknown>;

/** turns socket-mode/-owner/-group and allow-uid/-gid strings into their policy (the CLI's parser) */
export type AccessParser = (args: Record<string, string | undefined>) => { access: SocketAccess; peers: PeerPolicy | null };

const ACCESS_KEYS = ['socket-mode', 'socket-owner', 'socket-group', 'allow-uid', 'allow-gid'] as const;
const KNOWN = new Set([
  'type', 'id', 'node-name', 'addr', 'writable', 'writethrough', 'num-queues', 'logical-block-size',
  'iothread', 'fixed-iothread', 'iothread-vq-mapping', 'queue-size', 'serial', ...ACCESS_KEYS,
]);

const bad = (msg: string): never => {
  throw new QmpError('GenericError', msg);
};

function int(a: Args, key: string, def: number, min: number, max: number): number {
  const v = a[key];
  if (v === undefined) return def;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) bad(`Parameter '${key}' expects an integer from ${min} to ${max}`);
  return v as number;
}

function bool(a: Args, key: string, def: boolean): boolean {
  const v = a[key];
  if (v === undefined) return def;
  if (typeof v !== 'boolean') bad(`Parameter '${key}' expects a boolean`);
  return v as boolean;
}

function str(a: Args, key: string): string {
  const v = a[key];
  if (typeof v !== 'string' || v.length === 0) bad(`Parameter '${key}' is missing or not a string`);
  return v as string;
}

function addr(a: Args): ExportAddr {
  const v = a.addr;
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return bad("Parameter 'addr' expects {type: 'unix', path} or {type: 'fd', str}");
  const o = v as Args;
  if (o.type === 'unix') return { type: 'unix', path: str(o, 'path') };
  if (o.type === 'fd') {
    const fd = Number(str(o, 'str'));
    if (!Number.isInteger(fd) || fd < 0) bad("Parameter 'addr.str' expects a file descriptor number");
    return { type: 'fd', fd };
  }
  return bad("Parameter 'addr.type' expects 'unix' or 'fd'");
}

/** `iothread-vq-mapping: [{iothread: 'workerN', vqs?: [...]}]` (QEMU's shape) -> worker per queue */
export function vqMapping(v: unknown, numQueues: number, poolSize: number): number[] {
  if (!Array.isArray(v) || v.length === 0) return bad("Parameter 'iothread-vq-mapping' expects a non-empty list of {iothread, vqs}");
  const workers = v.map((e, i) => {
    const name = (e as Args)?.iothread;
    const m = typeof name === 'string' ? /^worker(\d+)$/.exec(name) : null;
    if (m === null) bad(`iothread-vq-mapping[${i}].iothread: expected 'worker0'..'worker${poolSize - 1}'`);
    const w = Number(m![1]);
    if (w >= poolSize) bad(`iothread-vq-mapping[${i}].iothread: '${name}' does not exist (the pool has worker0..worker${poolSize - 1})`);
    return w;
  });
  const withVqs = v.filter((e) => (e as Args).vqs !== undefined).length;
  if (withVqs === 0) return Array.from({ length: numQueues }, (_, q) => workers[q % workers.length]!); // round robin over the listed ones
  if (withVqs !== v.length) bad("iothread-vq-mapping: give 'vqs' in every entry or in none");
  const out = new Array<number>(numQueues).fill(-1);
  v.forEach((e, i) => {
    const vqs = (e as Args).vqs;
    if (!Array.isArray(vqs)) bad(`iothread-vq-mapping[${i}].vqs: expected a list of queue numbers`);
    for (const q of vqs as unknown[]) {
      if (typeof q !== 'number' || !Number.isInteger(q) || q < 0 || q >= numQueues) bad(`iothread-vq-mapping[${i}].vqs: ${String(q)} is not a queue of this export (0..${numQueues - 1})`);
      if (out[q as number] !== -1) bad(`iothread-vq-mapping: queue ${String(q)} is mapped twice`);
      out[q as number] = workers[i]!;
    }
  });
  const missing = out.indexOf(-1);
  if (missing >= 0) bad(`iothread-vq-mapping: queue ${missing} is not mapped`);
  return out;
}

/** block-export-add's arguments -> an ExportSpec (errors name the parameter) */
export function exportSpecFromArgs(a: Args, poolSize: number, parseAccess?: AccessParser): ExportSpec {
  const unknown = Object.keys(a).find((k) => !KNOWN.has(k));
  if (unknown !== undefined) bad(`Parameter '${unknown}' is unexpected`);
  const type = str(a, 'type');
  if (type !== 'vhost-user-blk') bad(`Export type '${type}' is not supported (vubd serves 'vhost-user-blk')`);
  const id = str(a, 'id');
  const numQueues = int(a, 'num-queues', 1, 1, 64);
  const lbs = int(a, 'logical-block-size', 512, 512, 4096);
  if (lbs !== 512 && lbs !== 4096) bad("Parameter 'logical-block-size' expects 512 or 4096");
  const queueSize = int(a, 'queue-size', 1024, 1, 32768);
  if ((queueSize & (queueSize - 1)) !== 0) bad("Parameter 'queue-size' expects a power of two");
  let mapping: number[] | undefined;
  if (a['iothread-vq-mapping'] !== undefined) {
    if (a.iothread !== undefined) bad("Parameters 'iothread' and 'iothread-vq-mapping' are mutually exclusive");
    mapping = vqMapping(a['iothread-vq-mapping'], numQueues, poolSize);
  } else if (a.iothread !== undefined) {
    mapping = vqMapping([{ iothread: a.iothread }], numQueues, poolSize);
  }
  if (a['fixed-iothread'] !== undefined) bool(a, 'fixed-iothread', false); // accepted: queues never move between workers anyway
  const access: Record<string, string | undefined> = {};
  for (const k of ACCESS_KEYS) if (a[k] !== undefined) access[k] = str(a, k);
  let policy: { access?: SocketAccess; peers?: PeerPolicy | null } = {};
  if (Object.keys(access).length > 0) {
    if (!parseAccess) bad('socket access parameters are not available here');
    try {
      policy = parseAccess!(access);
    } catch (e) {
      bad((e as Error).message);
    }
  }
  const serial = a.serial === undefined ? id : str(a, 'serial');
  return {
    id,
    nodeName: str(a, 'node-name'),
    addr: addr(a),
    writable: bool(a, 'writable', false),
    writethrough: bool(a, 'writethrough', false),
    numQueues,
    queueSize,
    logicalBlockSize: lbs as 512 | 4096,
    serial,
    mapping,
    ...policy,
  };
}

async function guard<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof ExportError) throw new QmpError('GenericError', e.message);
    throw e;
  }
}

export function exportCommands(
  manager: ExportManager,
  poolSize: number,
  emit: (event: string, data: Record<string, unknown>) => void,
  parseAccess?: AccessParser,
): [string, CommandHandler][] {
  return [
    ['block-export-add', (a) => guard(async () => (await manager.add(exportSpecFromArgs(a, poolSize, parseAccess)), {}))],
    [
      'block-export-del',
      (a) =>
        guard(async () => {
          const id = str(a, 'id');
          const mode = a.mode ?? 'safe';
          if (mode !== 'safe' && mode !== 'hard') bad("Parameter 'mode' expects 'safe' or 'hard'");
          await manager.del(id, mode as 'safe' | 'hard');
          emit('BLOCK_EXPORT_DELETED', { id });
          return {};
        }),
    ],
    ['query-block-exports', () => manager.list()],
  ];
}
