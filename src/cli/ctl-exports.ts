// vubd-ctl export-add, export-del and exports: qemu-storage-daemon's block-export-add/-del
// arguments from a short command line, and a table of the exports with their queue->worker mapping.
import { QmpCommandError, type QmpClient } from '../control/qmp-client.js';

function intFlag(name: string, v: string): number {
  if (!/^\d+$/.test(v)) throw new Error(`--${name} must be a whole number, got '${v}'`);
  return Number(v);
}

// --FLAG=VALUE options of export-add, passed on under the same name
const STRING_FLAGS = ['serial', 'iothread', 'socket-mode', 'socket-owner', 'socket-group', 'allow-uid', 'allow-gid'];
const INT_FLAGS = ['num-queues', 'logical-block-size', 'queue-size'];
const BOOL_FLAGS = ['writable', 'writethrough'];

/** export-add ID NODE SOCKET [--writable] [--num-queues=N] ...; SOCKET 'fd:NAME' passes a monitor fd */
export function exportAddArgs(args: string[]): Record<string, unknown> {
  const pos: string[] = [];
  const out: Record<string, unknown> = { type: 'vhost-user-blk', writable: false };
  for (const a of args) {
    const m = /^--([a-z-]+)(?:=(.*))?$/s.exec(a);
    if (!m) {
      pos.push(a);
      continue;
    }
    const [, name, value] = m as unknown as [string, string, string | undefined];
    if (BOOL_FLAGS.includes(name) && value === undefined) out[name] = true;
    else if (INT_FLAGS.includes(name) && value !== undefined) out[name] = intFlag(name, value);
    else if (STRING_FLAGS.includes(name) && value !== undefined && value !== '') out[name] = value;
    else throw new Error(`export-add: unknown option '${a}' (see vubd-ctl --help)`);
  }
  if (pos.length !== 3) throw new Error(`export-add needs ID NODE SOCKET, got ${pos.length} argument(s); see vubd-ctl --help`);
  const [id, node, socket] = pos as [string, string, string];
  const addr = socket.startsWith('fd:') ? { type: 'fd', str: socket.slice(3) } : { type: 'unix', path: socket };
  return { ...out, id, 'node-name': node, addr };
}

/** "export e0 serving node n0 on /run/e0.sock (2 queues, rw)" */
export function describeAddedExport(a: Record<string, unknown>): string {
  const addr = a.addr as { type: string; path?: string; str?: string };
  const where = addr.type === 'unix' ? addr.path : `fd ${addr.str}`;
  const queues = (a['num-queues'] as number | undefined) ?? 1;
  return `export ${String(a.id)} serving node ${String(a['node-name'])} on ${where} (${queues} queue${queues === 1 ? '' : 's'}, ${a.writable ? 'rw' : 'ro'})`;
}

/**
 * block-export-del, then waits for BLOCK_EXPORT_DELETED: the command returns once deletion has
 * started, the export is gone only when its frontend has let go.
 */
export async function exportDel(client: QmpClient, args: string[]): Promise<string> {
  const pos = args.filter((a) => !a.startsWith('--'));
  const bad = args.find((a) => a.startsWith('--') && a !== '--hard' && !a.startsWith('--timeout='));
  if (bad) throw new Error(`export-del: unknown option '${bad}'`);
  if (pos.length !== 1) throw new Error('export-del needs ID; see vubd-ctl --help');
  const id = pos[0]!;
  const mode = args.includes('--hard') ? 'hard' : 'safe';
  const t = args.find((a) => a.startsWith('--timeout='))?.slice('--timeout='.length);
  const timeoutS = t === undefined ? 30 : Number(t);
  if (!Number.isFinite(timeoutS) || timeoutS <= 0 || t?.trim() === '') throw new Error(`export-del: --timeout must be a positive number of seconds, got '${t}'`);
  const timeoutMs = timeoutS * 1000;
  const since = client.events.length;
  try {
    await client.execute('block-export-del', { id, mode });
  } catch (e) {
    if (e instanceof QmpCommandError && mode === 'safe' && /still in use/.test(e.message)) {
      throw new QmpCommandError(e.errorClass, `${e.message} (vubd-ctl export-del ${id} --hard)`);
    }
    throw e;
  }
  try {
    // only events after the command: an export of the same id deleted earlier does not count
    await client.waitEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === id && client.events.indexOf(e) >= since, timeoutMs);
  } catch {
    if (client.closedReason !== null) throw new Error(`export ${id}: lost the daemon before BLOCK_EXPORT_DELETED: ${client.closedReason}`);
    throw new Error(
      `export ${id}: deletion (${mode}) started but BLOCK_EXPORT_DELETED did not arrive within ${timeoutMs / 1000} s; ` +
        `its frontend may still hold it ('vubd-ctl exports' shows it shutting down${mode === 'safe' ? "; 'export-del --hard' disconnects it" : ''})`,
    );
  }
  return `export ${id} deleted (${mode})`;
}

interface ExportEntry {
  id: string;
  type?: string;
  'node-name': string;
  'shutting-down'?: boolean;
  writable?: boolean;
  'frontend-connected'?: boolean;
  'num-queues'?: number;
  'iothread-vq-mapping'?: { iothread: string; vqs: number[] }[];
  addr?: { type: string; path?: string; str?: string };
}

/** "0->worker0 1->worker1" */
export function queueMapping(e: ExportEntry): string {
  const m = e['iothread-vq-mapping'];
  if (!m) return '';
  const pairs = m.flatMap((x) => x.vqs.map((q) => [q, x.iothread] as const)).sort((a, b) => a[0] - b[0]);
  return pairs.map(([q, w]) => `${q}->${w}`).join(' ');
}

/** One line per export; a QUEUE->WORKER column when the daemon reports iothread-vq-mapping. */
export function exportsTable(list: ExportEntry[]): string {
  if (list.length === 0) return '(no exports)';
  const withMap = list.some((e) => e['iothread-vq-mapping'] !== undefined);
  const yesNo = (v: boolean | undefined, yes: string, no: string): string => (v === undefined ? '-' : v ? yes : no);
  const head = ['ID', 'NODE', 'QUEUES', 'MODE', 'STATE', 'FRONTEND', 'ADDRESS', ...(withMap ? ['QUEUE->WORKER'] : [])];
  const rows = list.map((e) => [
    e.id,
    e['node-name'],
    e['num-queues'] === undefined ? '-' : String(e['num-queues']),
    yesNo(e.writable, 'rw', 'ro'),
    e['shutting-down'] ? 'deleting' : 'serving',
    yesNo(e['frontend-connected'], 'connected', 'none'),
    e.addr ? (e.addr.type === 'unix' ? (e.addr.path ?? '-') : `${e.addr.type}:${e.addr.str ?? ''}`) : '-',
    ...(withMap ? [queueMapping(e) || '-'] : []),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [head, ...rows].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}
