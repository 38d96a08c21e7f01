#!/usr/bin/env node
// vubd-ctl: a human front end for vubd's QMP control socket.
import { parseSize } from './args.js';
import { QmpClient, QmpCommandError } from '../control/qmp-client.js';

const USAGE = `Usage: vubd-ctl --control=PATH COMMAND [ARGS]

Commands (QMP command in brackets):
  graph [--dot]                      show the block graph as JSON or Graphviz  [x-query-block-graph]
  nodes                              list block nodes                           [query-named-block-nodes]
  exports                            list exports and the node each one serves  [query-block-exports]
  stats                              per-queue and per-node counters, drains    [query-stats]
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
  mirror JOB SOURCE TARGET [SPEED]   copy SOURCE (node or export) to node TARGET, at most
                                     SPEED bytes/s (e.g. 100M; default unlimited) [blockdev-mirror]
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
  const need = (n: number): void => {
    if (args.filter((a) => !a.startsWith('--')).length < n) throw new Error(`'${cmd}' needs ${n} argument(s); see vubd-ctl --help`);
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
      case 'exports':
        out = await run('query-block-exports');
        break;
      case 'stats':
        out = await run('query-stats');
        break;
      case 'jobs':
        out = await run('query-jobs');
        break;
      case 'add-file':
        need(2);
        out = await run('blockdev-add', { driver: 'file', 'node-name': args[0], filename: args[1], 'read-only': args.includes('--read-only') });
        break;
      case 'add-null':
        need(2);
        out = await run('blockdev-add', { driver: 'null-co', 'node-name': args[0], size: parseSize(args[1]!) });
        break;
      case 'add-throttle':
        need(2);
        out = await run('blockdev-add', { driver: 'throttle', 'node-name': args[0], file: args[1], limits: kv(args.slice(2), isBps) });
        break;
      case 'del':
        need(1);
        out = await run('blockdev-del', { 'node-name': args[0] });
        break;
      case 'swap':
        need(2);
        out = await run('block-export-set-node', { id: args[0], 'node-name': args[1] });
        break;
      case 'resize':
        need(2);
        out = await run('block_resize', { 'node-name': args[0], size: parseSize(args[1]!) });
        break;
      case 'throttle':
        need(1);
        out = await run('block_set_io_throttle', { id: args[0], ...kv(args.slice(1), isBps) });
        break;
      case 'mirror':
        need(3);
        out = await run('blockdev-mirror', {
          'job-id': args[0],
          device: args[1],
          target: args[2],
          sync: 'full',
          ...(args[3] !== undefined ? { speed: parseSize(args[3]) } : {}),
        });
        break;
      case 'speed':
        need(2);
        out = await run('block-job-set-speed', { device: args[0], speed: args[1] === '0' ? 0 : parseSize(args[1]!) });
        break;
      case 'complete':
        need(1);
        out = await run('job-complete', { id: args[0] });
        break;
      case 'cancel':
        need(1);
        out = await run('job-cancel', { id: args[0] });
        break;
      case 'raw':
        need(1);
        out = await run(args[0]!, args[1] ? (JSON.parse(args[1]) as Record<string, unknown>) : undefined);
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
