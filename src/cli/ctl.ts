#!/usr/bin/env node
// vubd-ctl: a human front end for vubd's QMP control socket.
import { parseSize } from './args.js';
import { QmpClient, QmpCommandError } from '../control/qmp-client.js';
import { parseTopArgs, runTop } from './ctl-top.js';
import { waitForJobReady } from './progress.js';
import { describeAddedExport, exportAddArgs, exportDel, exportsTable } from './ctl-exports.js';

const USAGE = `Usage: vubd-ctl --control=PATH COMMAND [ARGS]

Commands (QMP command in brackets):
  graph [--dot]                      show the block graph as JSON or Graphviz  [x-query-block-graph]
  nodes                              list block nodes                           [query-named-block-nodes]
  exports [--json]                   list exports: node, queues, state, socket and which worker
                                     serves each queue (a table; --json: as QMP returns it)
                                                                                [query-block-exports]
  export-add ID NODE SOCKET [--writable] [--num-queues=N] [--logical-block-size=N]
                                     serve NODE as vhost-user-blk export ID on unix socket SOCKET
                                     (fd:N: an inherited listening socket); also --writethrough,
                                     --queue-size=N, --serial=S, --iothread=workerN, --socket-mode=,
                                     --socket-owner=, --socket-group=, --allow-uid=, --allow-gid=
                                                                                [block-export-add]
  export-del ID [--hard] [--timeout=SECONDS]
                                     delete export ID and wait (default 30 s) until it is gone;
                                     --hard disconnects its frontend           [block-export-del]
  stats                              per-queue and per-node counters, drains    [query-stats]
  top [--interval=SECONDS] [--once]  live view: IOPS, MB/s, p50/p99 latency, in flight, drain state
                                     per export and queue (q quits); on a pipe, or with --once, a
                                     plain snapshot per interval (default 1 s)  [query-stats]
  jobs                               list block jobs                            [query-jobs]
  add-file NODE FILE [--read-only]   open an image as a new node                [blockdev-add]
  add-null NODE SIZE                 add a null node (reads return zeroes)      [blockdev-add]
  add-throttle NODE CHILD [K=V...]   add a throttle filter above CHILD; K is a throttle-group
                                     limit such as iops-total=1000 bps-write=10M  [blockdev-add]
  del NODE                           remove an unused node                      [blockdev-del]
  swap EXPORT NODE                   serve EXPORT from NODE (drained)           [block-export-set-node]
  resize NODE SIZE                   grow NODE; the guest sees the new size     [block_resize]
  throttle NODE|EXPORT [K=V...]      set limits: iops, iops_rd, iops_wr, bps, bps_rd, bps_wr and
                                     their _max bursts; 0 = unlimited           [block_set_io_throttle]
  mirror JOB SOURCE TARGET [SPEED] [--wait]
                                     copy SOURCE (node or export) to node TARGET, at most
                                     SPEED bytes/s (e.g. 100M; default unlimited) [blockdev-mirror]
                                     --wait: show progress (percent, rate, ETA) until the job is
                                     ready; exit 1 if it fails or is cancelled
  speed JOB SPEED                    change a running mirror's copy rate (0 = unlimited)
                                                                                [block-job-set-speed]
  complete JOB                       pivot a ready mirror to its target         [job-complete]
  cancel JOB                         stop a job and keep the source             [job-cancel]
  watch                              print events until interrupted
  raw COMMAND [JSON-ARGUMENTS]       run any QMP command

Sizes accept K, M, G, T suffixes.`;

function kv(items: string[], sizeKeys: (k: string) => boolean): Record<string, number> {
  const out: Record<string, number> = {};
  for (const it of items) {
    const m = /^([a-z_-]+)=(.+)$/.exec(it);
    if (!m) throw new Error(`expected KEY=VALUE, got '${it}'`);
    out[m[1]!] = sizeKeys(m[1]!) ? parseSize(m[2]!) : Number(m[2]);
    if (!Number.isFinite(out[m[1]!])) throw new Error(`'${it}': not a number`);
  }
  return out;
}

async function main(argv: string[]): Promise<number> {
  let control = process.env.VUBD_CONTROL ?? '';
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-h' || a === '--help') {
      console.log(USAGE);
      return 0;
    }
    if (a.startsWith('--control=')) control = a.slice('--control='.length);
    else if (a === '--control' || a === '-c') control = argv[++i] ?? '';
    else rest.push(a);
  }
  const [cmd, ...args] = rest;
  if (!control || !cmd) {
    console.error(`vubd-ctl: ${!control ? '--control=PATH is required' : 'no command given'}\n\n${USAGE}`);
    return 2;
  }
  // positional arguments; options (--x) are read by each command
  const pos = args.filter((a) => !a.startsWith('--'));
  const need = (n: number): void => {
    if (pos.length < n) throw new Error(`'${cmd}' needs ${n} argument(s); see vubd-ctl --help`);
  };
  let client: QmpClient;
  try {
    client = await QmpClient.connect(control);
  } catch (e) {
    console.error(`vubd-ctl: cannot connect to ${control}: ${(e as Error).message}`);
    return 1;
  }
  const run = async (command: string, a?: Record<string, unknown>): Promise<unknown> => client.execute(command, a);
  const isBps = (k: string): boolean => k.startsWith('bps');
  try {
    let out: unknown;
    switch (cmd) {
      case 'graph': {
        const dot = args.includes('--dot');
        const r = (await run('x-query-block-graph', { format: dot ? 'dot' : 'json' })) as { dot?: string };
        out = dot ? r.dot : r;
        break;
      }
      case 'nodes':
        out = await run('query-named-block-nodes');
        break;
      case 'exports': {
        const list = await run('query-block-exports');
        out = args.includes('--json') ? list : exportsTable(list as Parameters<typeof exportsTable>[0]);
        break;
      }
      case 'export-add': {
        const a = exportAddArgs(args);
        await run('block-export-add', a);
        out = describeAddedExport(a);
        break;
      }
      case 'export-del':
        out = await exportDel(client, args);
        break;
      case 'top':
        return await runTop(client, control, parseTopArgs(args));
      case 'stats':
        out = await run('query-stats');
        break;
      case 'jobs':
        out = await run('query-jobs');
        break;
      case 'add-file':
        need(2);
        out = await run('blockdev-add', { driver: 'file', 'node-name': pos[0], filename: pos[1], 'read-only': args.includes('--read-only') });
        break;
      case 'add-null':
        need(2);
        out = await run('blockdev-add', { driver: 'null-co', 'node-name': pos[0], size: parseSize(pos[1]!) });
        break;
      case 'add-throttle':
        need(2);
        out = await run('blockdev-add', { driver: 'throttle', 'node-name': pos[0], file: pos[1], limits: kv(pos.slice(2), isBps) });
        break;
      case 'del':
        need(1);
        out = await run('blockdev-del', { 'node-name': pos[0] });
        break;
      case 'swap':
        need(2);
        out = await run('block-export-set-node', { id: pos[0], 'node-name': pos[1] });
        break;
      case 'resize':
        need(2);
        out = await run('block_resize', { 'node-name': pos[0], size: parseSize(pos[1]!) });
        break;
      case 'throttle':
        need(1);
        out = await run('block_set_io_throttle', { id: pos[0], ...kv(pos.slice(1), isBps) });
        break;
      case 'mirror':
        need(3);
        out = await run('blockdev-mirror', {
          'job-id': pos[0],
          device: pos[1],
          target: pos[2],
          sync: 'full',
          ...(pos[3] !== undefined ? { speed: parseSize(pos[3]) } : {}),
        });
        if (args.includes('--wait')) return await waitForJobReady(client, pos[0]!, { out: process.stdout, err: process.stderr });
        break;
      case 'speed':
        need(2);
        out = await run('block-job-set-speed', { device: pos[0], speed: pos[1] === '0' ? 0 : parseSize(pos[1]!) });
        break;
      case 'complete':
        need(1);
        out = await run('job-complete', { id: pos[0] });
        break;
      case 'cancel':
        need(1);
        out = await run('job-cancel', { id: pos[0] });
        break;
      case 'raw':
        need(1);
        out = await run(pos[0]!, pos[1] ? (JSON.parse(pos[1]) as Record<string, unknown>) : undefined);
        break;
      case 'watch':
        client.onEvent = (e) => console.log(JSON.stringify(e));
        await new Promise(() => {}); // until interrupted
        break;
      default:
        throw new Error(`unknown command '${cmd}'; see vubd-ctl --help`);
    }
    if (typeof out === 'string') console.log(out);
    else console.log(JSON.stringify(out, null, 2));
    return 0;
  } catch (e) {
    if (e instanceof QmpCommandError) console.error(`vubd-ctl: ${cmd} failed: ${e.message} (${e.errorClass})`);
    else console.error(`vubd-ctl: ${(e as Error).message}`);
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((code) => process.exit(code));
