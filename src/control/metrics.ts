// --metrics: a Prometheus endpoint over HTTP. A scrape calls the query-stats and query-jobs
// handlers once (the same data as QMP: Atomics loads of the queues' shared stats blocks) and
// writes that one snapshot in the text format (metrics-text.ts says why not through prom-client's
// registry). prom-client provides the process metrics, refreshed at most once a second. Nothing is
// counted on the I/O path for this; between scrapes only prom-client's event-loop-delay monitor runs.
import http from 'node:http';
import net from 'node:net';
import type { Logger } from '../log.js';
import type { CommandHandler } from './qmp-server.js';
import type { MetricsAddress } from '../cli/args.js';
import { TextWriter } from './metrics-text.js';
import { writeVubdMetrics, type JobInfo, type Scrape, type StatsReply } from './metrics-vubd.js';

export interface MetricsServer {
  /** where it listens (the port the kernel gave when asked for one) */
  readonly address: MetricsAddress;
  close(): Promise<void>;
}

/** a scraper or two (Prometheus HA pairs) plus a person with curl; more only hold fds */
const MAX_CONNECTIONS = 16;
/**
 * prom-client's process metrics cost about 0.8 ms of CPU to collect here (most of it the event
 * loop delay histogram's statistics); scraped faster than this, the last ones are served again.
 */
const PROCESS_METRICS_MAX_AGE_MS = 1000;

export interface Exposition {
  contentType: string;
  /** the whole text: prom-client's process metrics, then vubd's; `families` gets vubd's family names and types */
  render(families?: Map<string, string>): Promise<string>;
}

/** The metrics of one snapshot source, all prefixed vubd_. */
export async function createExposition(snapshot: () => Scrape | Promise<Scrape>): Promise<Exposition> {
  // Loaded only when --metrics is given: the daemon without it does not carry prom-client.
  const prom = await import('prom-client');
  const registry = new prom.Registry();
  prom.collectDefaultMetrics({ register: registry, prefix: 'vubd_' });
  let processText = '';
  let processAt = -Infinity;
  let refreshing: Promise<string> | null = null;
  const processMetrics = (): Promise<string> => {
    if (performance.now() - processAt < PROCESS_METRICS_MAX_AGE_MS) return Promise.resolve(processText);
    refreshing ??= registry.metrics().then(
      (text) => {
        processText = text;
        processAt = performance.now();
        refreshing = null;
        return text;
      },
      (e: unknown) => {
        refreshing = null;
        throw e;
      },
    );
    return refreshing;
  };
  return {
    contentType: registry.contentType,
    async render(families) {
      const [head, snap] = await Promise.all([processMetrics(), snapshot()]);
      const w = new TextWriter();
      writeVubdMetrics(w, snap);
      if (families) for (const [name, type] of w.families) families.set(name, type);
      return head + w.text();
    },
  };
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
  const exposition = await createExposition(async () => ({
    stats: (await queryStats({})) as StatsReply,
    jobs: (await queryJobs({})) as JobInfo[],
  }));

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
    exposition.render().then(
      (body) => {
        // encoded once: Content-Length and the socket write then take the bytes as they are
        const bytes = Buffer.from(body, 'utf8');
        res.writeHead(200, { 'Content-Type': exposition.contentType, 'Content-Length': bytes.length });
        res.end(req.method === 'HEAD' ? undefined : bytes);
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
