// blockdev-add driver=nbd on the main thread: QEMU's option names (server, export,
// reconnect-delay, open-timeout), one connection to check that the export exists and to learn its
// size and flags; the workers then open their own connections to the resolved address.
import net from 'node:net';
import dns from 'node:dns/promises';
import { newNodeStats } from './nodes.js';
import { GraphError, type NodeDef } from './snapshot.js';
import { discRequest, NbdHandshake, TxFlag, type ExportInfo } from './nbd-protocol.js';
import type { NbdServer } from './nbd-connection.js';

type Args = Record<string, unknown>;
const ATTEMPT_MS = 10_000;
const RETRY_MS = 250;

export type NbdNodeDef = Extract<NodeDef, { driver: 'nbd' }>;

function seconds(a: Args, key: string): number {
  const v = a[key];
  if (v === undefined) return 0;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 86400 * 365) throw new GraphError(`'${key}' must be a non-negative integer (seconds)`);
  return v;
}

/** QEMU's SocketAddress for nbd: {type: 'inet', host, port} (port a string or number) or {type: 'unix', path}. */
export function parseNbdServer(v: unknown): NbdServer {
  if (typeof v !== 'object' || v === null) throw new GraphError("driver 'nbd' needs 'server': {type: 'inet', host, port} or {type: 'unix', path}");
  const s = v as Args;
  if (s.type === 'unix') {
    if (typeof s.path !== 'string' || s.path === '') throw new GraphError("server.path must be a non-empty string");
    return { type: 'unix', path: s.path };
  }
  if (s.type === 'inet') {
    if (typeof s.host !== 'string' || s.host === '') throw new GraphError('server.host must be a non-empty string');
    const port = typeof s.port === 'string' ? Number(s.port) : s.port;
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) throw new GraphError(`server.port must be 1..65535 (got ${JSON.stringify(s.port)})`);
    return { type: 'inet', host: s.host, port };
  }
  throw new GraphError(`server.type must be 'inet' or 'unix' (got ${JSON.stringify(s.type)}; vsock and fd are not supported)`);
}

export function describeServer(s: NbdServer): string {
  return s.type === 'unix' ? `unix:${s.path}` : `${s.host.includes(':') ? `[${s.host}]` : s.host}:${s.port}`;
}

/** QEMU's filename for an nbd node: nbd://host:port/export or nbd+unix:///export?socket=path */
export function nbdUri(s: NbdServer, exportName: string): string {
  const e = encodeURIComponent(exportName);
  return s.type === 'unix' ? `nbd+unix:///${e}?socket=${s.path}` : `nbd://${describeServer(s)}/${e}`;
}

/** One handshake over node:net; rejects with the reason (unreachable, no such export, not NBD, ...). */
export function probeExport(server: NbdServer, exportName: string, timeoutMs = ATTEMPT_MS): Promise<ExportInfo> {
  return new Promise((resolve, reject) => {
    const hs = new NbdHandshake(exportName);
    const sock = server.type === 'unix' ? net.connect(server.path) : net.connect(server.port, server.host);
    let settled = false;
    const finish = (err: Error | null, info?: ExportInfo): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err === null) sock.end(discRequest());
      else sock.destroy();
      if (err !== null) reject(err);
      else resolve(info!);
    };
    const timer = setTimeout(() => finish(new Error(`no NBD handshake within ${timeoutMs / 1000} s`)), timeoutMs);
    sock.on('error', (e) => finish(e));
    sock.on('close', () => finish(new Error('the server closed the connection during negotiation')));
    sock.on('data', (d) => {
      try {
        hs.feed(d);
        const out = hs.takeOutput();
        if (out !== null) sock.write(out);
        const info = hs.done();
        if (info !== null) finish(null, info);
      } catch (e) {
        finish(e as Error);
      }
    });
  });
}

export async function openNbdNode(name: string, a: Args, readOnly: boolean): Promise<NbdNodeDef> {
  if (a['tls-creds'] !== undefined || a['tls-hostname'] !== undefined) {
    throw new GraphError(`node '${name}': NBD over TLS (tls-creds) is not supported by vubd; serve the export on a unix socket or a trusted network`);
  }
  for (const k of ['x-dirty-bitmap', 'alloc-depth', 'reconnect-on-open']) {
    if (a[k] !== undefined) throw new GraphError(`node '${name}': nbd option '${k}' is not supported`);
  }
  const server = parseNbdServer(a.server);
  const exportName = a.export === undefined ? '' : a.export;
  if (typeof exportName !== 'string') throw new GraphError("'export' must be a string");
  const reconnectDelay = seconds(a, 'reconnect-delay');
  const openTimeout = seconds(a, 'open-timeout');
  let resolved = server;
  if (server.type === 'inet' && net.isIP(server.host) === 0) {
    try {
      resolved = { ...server, host: (await dns.lookup(server.host)).address };
    } catch (e) {
      throw new GraphError(`node '${name}': cannot resolve NBD server host '${server.host}': ${(e as Error).message}`);
    }
  }
  const until = Date.now() + openTimeout * 1000;
  let info: ExportInfo;
  for (;;) {
    try {
      info = await probeExport(resolved, exportName);
      break;
    } catch (e) {
      if (Date.now() + RETRY_MS < until) {
        await new Promise((r) => setTimeout(r, RETRY_MS));
        continue;
      }
      throw new GraphError(`node '${name}': cannot open NBD export '${exportName}' on ${describeServer(server)}: ${(e as Error).message}`);
    }
  }
  if (info.size < 512) throw new GraphError(`node '${name}': NBD export '${exportName}' is ${info.size} bytes; a disk needs at least one 512-byte sector`);
  return {
    driver: 'nbd',
    name,
    server,
    address: resolved,
    export: exportName,
    size: info.size - (info.size % 512),
    exportSize: info.size,
    flags: info.flags,
    readOnly: readOnly || (info.flags & TxFlag.READ_ONLY) !== 0,
    reconnectDelayMs: reconnectDelay * 1000,
    structured: info.structured,
    stats: newNodeStats(),
  };
}
