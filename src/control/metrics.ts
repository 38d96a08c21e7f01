// --metrics: a Prometheus endpoint over HTTP. A scrape calls the query-stats and query-jobs
// handlers once (the same data as QMP: Atomics loads of the queues' shared stats blocks), and
// prom-client turns that one snapshot into the text format. Nothing is counted on the I/O path
// for it, and nothing runs between scrapes except prom-client's event-loop-delay monitor.
import http from 'node:http';
import net from 'node:net';
import type { Registry } from 'prom-client';
import type { Logger } from '../log.js';
import type { CommandHandler } from './qmp-server.js';
import type { MetricsAddress } from '../cli/args.js';
import { registerVubdMetrics, type JobInfo, type Scrape, type StatsReply } from './metrics-registry.js';

export interface MetricsServer {
  /** where it listens (the port the kernel gave when asked for one) */
  readonly address: MetricsAddress;
  close(): Promise<void>;
}

/** a scraper or two (Prometheus HA pairs) plus a person with curl; more only hold fds */
const MAX_CONNECTIONS = 16;

/** The registry with vubd's metrics and prom-client's process metrics, all prefixed vubd_. */
export async function createMetricsRegistry(current: () => Scrape): Promise<Registry> {
  // Loaded only when --metrics is given: the daemon without it does not carry prom-client.
  const prom = await import('prom-client');
  const registry = new prom.Registry();
  prom.collectDefaultMetrics({ register: registry, prefix: 'vubd_' });
  registerVubdMetrics(prom, registry, current);
  return registry;
}

function listenError(addr: MetricsAddress, e: NodeJS.ErrnoException): Error {
  const where = `${net.isIPv6(addr.host) ? `[${addr.host}]` : addr.host}:${addr.port}`;
  switch (e.code) {
    case 'EADDRINUSE':
      return new Error(`${where} is in use (another process listens on port ${addr.port}); pick another port with --metrics=[ADDR:]PORT`);
    case 'EACCES':
      return new Error(`not allowed to listen on ${where} (ports below 1024 need privileges)`);
    case 'EADDRNOTAVAIL':
      return new Error(`${addr.host} is not an address of this machine`);
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new Error(`cannot resolve the host name '${addr.host}'`);
    default:
      return new Error(`cannot listen on ${where}: ${e.message}`);
  }
}

export async function startMetrics(addr: MetricsAddress, commands: ReadonlyMap<string, CommandHandler>, log: Logger): Promise<MetricsServer> {
  const queryStats = commands.get('query-stats');
  const queryJobs = commands.get('query-jobs');
  if (!queryStats || !queryJobs) throw new Error('the query-stats and query-jobs commands are missing');
  let snapshot: Scrape | null = null;
  const registry = await createMetricsRegistry(() => {
    if (snapshot === null) throw new Error('metrics collected outside a scrape');
    return snapshot;
  });

  // One scrape at a time: each metric's collect() reads the snapshot its scrape took.
  let queue: Promise<unknown> = Promise.resolve();
  const scrape = (): Promise<string> => {
    const run = async (): Promise<string> => {
      snapshot = { stats: (await queryStats({})) as StatsReply, jobs: (await queryJobs({})) as JobInfo[] };
      try {
        return await registry.metrics();
      } finally {
        snapshot = null;
      }
    };
    const p = queue.then(run, run);
    queue = p.catch(() => {});
    return p;
  };

  const server = http.createServer({ requestTimeout: 10_000, headersTimeout: 5_000 }, (req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain' }).end('only GET and HEAD\n');
      return;
    }
    if (path === '/') {
      res.writeHead(200, { 'Content-Type': 'text/plain' }).end('vubd: Prometheus metrics at /metrics\n');
      return;
    }
    if (path !== '/metrics') {
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found: the metrics are at /metrics\n');
      return;
    }
    scrape().then(
      (body) => {
        res.writeHead(200, { 'Content-Type': registry.contentType, 'Content-Length': Buffer.byteLength(body) });
        res.end(req.method === 'HEAD' ? undefined : body);
      },
      (e: unknown) => {
        log.error({ err: e }, `metrics scrape failed: ${(e as Error).message}`);
        res.writeHead(500, { 'Content-Type': 'text/plain' }).end(`scrape failed: ${(e as Error).message}\n`);
      },
    );
  });
  server.maxConnections = MAX_CONNECTIONS;
  server.on('clientError', (_e, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    else socket.destroy();
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(listenError(addr, e)));
    server.listen({ host: addr.host, port: addr.port, exclusive: true }, () => resolve());
  });
  server.on('error', (e) => log.error({ err: e }, `metrics endpoint: ${e.message}`));
  const bound = server.address() as net.AddressInfo;
  const address = { host: addr.host, port: bound.port };
  const url = `http://${net.isIPv6(bound.address) ? `[${bound.address}]` : bound.address}:${bound.port}/metrics`;
  log.info({ url }, 'metrics endpoint listening');
  if (!isLoopback(bound.address)) {
    log.warn({ url }, 'the metrics endpoint listens beyond loopback: whoever reaches it reads the daemon\'s export, node and job names and counters (no authentication)');
  }
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function isLoopback(ip: string): boolean {
  return ip === '::1' || ip.startsWith('127.') || ip.startsWith('::ffff:127.');
}
