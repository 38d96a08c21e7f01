// Command-line options (vhost-user "backend program conventions" plus our own).
import net from 'node:net';
import os from 'node:os';
import { parseArgs } from 'node:util';
import type { SocketAccess } from '../protocol/socket-file.js';
import type { PeerPolicy } from '../protocol/peer-policy.js';
import type { ActivatedSockets } from './systemd.js';
import { ACCESS_OPTIONS, ACCESS_USAGE, AccessUsageError, peerPolicy, socketAccess } from './access-args.js';

export interface Options {
  socketPath: string | null;
  fd: number | null;
  blkFile: string | null;
  blkDriver: 'file' | 'null';
  size: number;
  readOnly: boolean;
  forceShare: boolean;
  incoming: boolean;
  printCapabilities: boolean;
  installDescriptor: boolean;
  prefix: string | null;
  numQueues: number;
  /** worker threads in the pool serving every export's queues */
  workers: number;
  /** false: start with no export (only --control; exports come by block-export-add) */
  initialExport: boolean;
  queueSize: number;
  aio: 'io_uring' | 'sync';
  pollUs: number;
  ringPacked: boolean;
  cache: CacheMode;
  logicalBlockSize: 512 | 4096;
  serial: string | null;
  control: string | null;
  /** --metrics: where the Prometheus endpoint listens, null when off */
  metrics: MetricsAddress | null;
  /** the QMP socket passed by systemd (LISTEN_FDNAMES 'control') */
  controlFd: number | null;
  socketAccess: SocketAccess;
  controlAccess: SocketAccess;
  /** --allow-uid/--allow-gid, null when neither is given */
  peers: PeerPolicy | null;
  logLevel: string;
  help: boolean;
  version: boolean;
  defaults: boolean;
  /** --config=FILE: the nodes and exports come from this JSON file (see config.ts) */
  config: string | null;
  /** the long names of the options given on the command line (with --config they override the file) */
  given: ReadonlySet<string>;
  /** --check-config: validate, print the resolved config as JSON, exit */
  checkConfig: boolean;
}

export class UsageError extends Error {}

export interface MetricsAddress {
  host: string;
  port: number;
}

/**
 * --metrics=[ADDR:]PORT: loopback unless an address is given; ADDR is an IPv4 address, an IPv6
 * address in brackets, or a host name. Port 0 (any free port) is refused: a scraper needs to know it.
 */
export function parseMetricsAddress(text: string): MetricsAddress {
  const m = /^(?:(\[[^\]]*\]|[^:[\]]*):)?([^:]*)$/.exec(text);
  const hint = "expected [ADDR:]PORT, e.g. 9400, 127.0.0.1:9400 or [::1]:9400";
  if (!m) throw new UsageError(`--metrics: cannot parse '${text}' (${hint})`);
  const [, addr, portText] = m;
  if (!/^\d+$/.test(portText!)) throw new UsageError(`--metrics: port must be a number, got '${portText}' (${hint})`);
  const port = Number(portText);
  if (port < 1 || port > 65535) throw new UsageError(`--metrics: port must be between 1 and 65535, got ${port}`);
  if (addr === undefined) return { host: '127.0.0.1', port };
  let host = addr;
  if (host.startsWith('[')) {
    host = host.slice(1, -1);
    if (net.isIPv6(host) === false) throw new UsageError(`--metrics: '${host}' in brackets is not an IPv6 address`);
  } else if (host === '') {
    throw new UsageError(`--metrics: empty address in '${text}' (${hint}; 0.0.0.0:PORT listens on every address)`);
  } else if (!net.isIPv4(host) && !/^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$/.test(host)) {
    throw new UsageError(`--metrics: '${host}' is neither an IPv4 address nor a host name (an IPv6 address goes in brackets: [::1]:${port})`);
  }
  return { host, port };
}

/** QEMU's -drive cache= names */
export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
export const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

/**
 * What a cache mode means, as in QEMU: the node's cache options (O_DIRECT, flushes ignored) and
 * the write-cache mode the guest sees (write-back: WCE=1, the guest flushes; else every write is
 * durable before it completes).
 */
export function cacheSemantics(mode: CacheMode): { direct: boolean; noFlush: boolean; writeback: boolean } {
  return {
    direct: mode === 'none' || mode === 'directsync',
    noFlush: mode === 'unsafe',
    writeback: mode !== 'writethrough' && mode !== 'directsync',
  };
}

export const USAGE = `Usage: vubd (--socket-path=PATH | --fd=N) [--blk-file=PATH | --blk-driver=null --size=8G] [options]
       vubd --control=PATH [--workers=N] [options]   (no disk yet: add nodes and exports over QMP
                                                     with blockdev-add and block-export-add;
                                                     drivers file, host_device, null-co, nbd, throttle)
       vubd --config=FILE [--check-config] [--control=PATH] [--workers=N] [--log-level=LEVEL] [options]

vhost-user-blk backend: serves a QEMU guest's virtio-blk disk over a vhost-user unix socket.

Backend program conventions:
  -s, --socket-path=PATH   listen on this unix socket (QEMU connects with -chardev socket,path=PATH)
  -f, --fd=N               use the already listening socket passed as file descriptor N
                           (systemd socket activation, LISTEN_FDS/LISTEN_PID, needs neither;
                           a second fd named 'control' in LISTEN_FDNAMES is the QMP socket)
  -b, --blk-file=PATH      image file or block device to serve, or a Ceph RBD image in QEMU's form
                           rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]
                           (needs librbd; --cache=none turns rbd_cache off)
  -r, --read-only          offer the disk read-only (writes fail with IOERR)
  -c, --print-capabilities print the capabilities JSON and exit (other options are ignored)
      --install-descriptor [--prefix=DIR]
                           write QEMU's vhost-user backend descriptor 50-vubd.json to DIR, or
                           /usr/share/qemu/vhost-user (root), or $XDG_CONFIG_HOME/qemu/vhost-user
                           (default ~/.config/qemu/vhost-user), and its launcher (dist/bin/vubd)

vubd options:
      --config=FILE        serve the nodes and exports a JSON file describes (README "Config
                           file"); it replaces the disk options above and below (--socket-path,
                           --fd, --blk-file, --blk-driver, --size, --num-queues, --cache, ...);
                           --control*, --workers, --metrics, --log-level, --aio, --poll-us,
                           --incoming override the file's
      --check-config       validate --config (or the disk options) and print what would be served:
                           nodes and exports as blockdev-add/block-export-add arguments, defaults
                           filled in, relative paths made absolute, user and group names as ids;
                           exit 0, or 2 with one line per problem. Opens and listens on nothing
      --blk-driver=DRIVER  file (default) or null (reads return zeroes; for benchmarks)
      --size=SIZE          disk size for --blk-driver=null (default 8G; suffixes K M G T)
      --num-queues=N       queues offered (default: CPU count = ${os.availableParallelism()}; QEMU's default
                           num-queues is its vCPU count and it refuses a backend offering fewer)
      --queue-size=N       largest virtqueue size accepted, power of two (default 1024)
      --aio=MODE           io_uring (default; falls back to sync with a warning) or sync
      --poll-us=N          busy-poll this long before sleeping (default 0)
      --workers=N          worker threads serving the queues of every export (default: CPU
                           count = ${os.availableParallelism()}); each queue is served by one of them
      --ring-packed        offer packed virtqueues (QEMU packed=on); turns crash recovery off:
                           INFLIGHT_SHMFD is not offered then. Without it a packed=on guest
                           gets split rings, which survive a vubd restart
      --cache=MODE         as QEMU's cache=: writeback (default: host page cache, the guest's
                           flushes reach the disk), none (O_DIRECT, flushes honoured: use it for
                           shared or migrated storage), writethrough (page cache, every write
                           durable before it completes), directsync (O_DIRECT and write-through),
                           unsafe (flushes ignored: scratch disks only)
      --logical-block-size=N  512 (default) or 4096: the sector size the guest sees; requests
                           not aligned to it fail. A 4k-sector device with --cache=none needs 4096
      --serial=ID          serial reported by GET_ID (default: image file name, max 20 bytes)
      --control=PATH       QMP-compatible management socket
      --metrics=[ADDR:]PORT  serve Prometheus metrics over HTTP at /metrics (default off;
                           ADDR defaults to 127.0.0.1; 0.0.0.0 or [::] for every address)
      --force-share        take no image locks and ignore other processes' (QEMU's locking=off);
                           by default vubd takes QEMU's image locks and refuses an image another
                           writer (QEMU, qemu-io, another vubd) uses
      --incoming           live-migration destination: start although the source still writes
                           the image; the write lock is taken when the frontend starts the device
      --log-level=LEVEL    trace, debug, info (default), warn, error, fatal
      --default            serve ./vubd-disk.img (1 GiB, created sparse) on ./vubd.sock (npm start)
${ACCESS_USAGE.trimStart()}

  -h, --help               this text
  -V, --version            print the version

SIGTERM or SIGINT stops vubd after in-flight requests finish (within a second).`;

export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`invalid size '${text}' (examples: 1073741824, 512M, 8G)`);
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const v = Number(m[1]) * mult;
  if (!Number.isSafeInteger(v) || v <= 0) throw new UsageError(`size '${text}' is out of range`);
  return v;
}

function int(name: string, text: string | undefined, def: number, min: number, max: number): number {
  if (text === undefined) return def;
  if (!/^\d+$/.test(text)) throw new UsageError(`--${name} must be a number, got '${text}'`);
  const v = Number(text);
  if (v < min || v > max) throw new UsageError(`--${name} must be between ${min} and ${max}, got ${v}`);
  return v;
}

/** activated: sockets passed by systemd (LISTEN_FDS), used where no --socket-path/--fd/--control says otherwise */
export function parseOptions(argv: string[], activated: ActivatedSockets | null = null): Options {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        'socket-path': { type: 'string', short: 's' },
        fd: { type: 'string', short: 'f' },
        'blk-file': { type: 'string', short: 'b' },
        'blk-driver': { type: 'string' },
        size: { type: 'string' },
        'read-only': { type: 'boolean', short: 'r' },
        'force-share': { type: 'boolean' },
        incoming: { type: 'boolean' },
        'print-capabilities': { type: 'boolean', short: 'c' },
        'num-queues': { type: 'string' },
        'queue-size': { type: 'string' },
        aio: { type: 'string' },
        'poll-us': { type: 'string' },
        workers: { type: 'string' },
        'ring-packed': { type: 'boolean' },
        cache: { type: 'string' },
        'logical-block-size': { type: 'string' },
        serial: { type: 'string' },
        control: { type: 'string' },
        metrics: { type: 'string' },
        'log-level': { type: 'string' },
        'install-descriptor': { type: 'boolean' },
        prefix: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'V' },
        default: { type: 'boolean' },
        config: { type: 'string' },
        'check-config': { type: 'boolean' },
        ...ACCESS_OPTIONS,
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values;
  const driver = v['blk-driver'] ?? 'file';
  if (driver !== 'file' && driver !== 'null') throw new UsageError(`--blk-driver must be file or null, got '${driver}'`);
  const aio = v.aio ?? 'io_uring';
  if (aio !== 'io_uring' && aio !== 'sync') throw new UsageError(`--aio must be io_uring or sync, got '${aio}'`);
  const queueSize = int('queue-size', v['queue-size'], 1024, 1, 32768);
  if ((queueSize & (queueSize - 1)) !== 0) throw new UsageError(`--queue-size must be a power of two, got ${queueSize}`);
  const cache = (v.cache ?? 'writeback') as CacheMode;
  if (!CACHE_MODES.includes(cache)) throw new UsageError(`--cache must be one of ${CACHE_MODES.join(', ')}, got '${v.cache}'`);
  const lbs = v['logical-block-size'] ?? '512';
  if (lbs !== '512' && lbs !== '4096') throw new UsageError(`--logical-block-size must be 512 or 4096, got '${lbs}'`);
  const levels = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];
  const logLevel = v['log-level'] ?? 'info';
  if (!levels.includes(logLevel)) throw new UsageError(`--log-level must be one of ${levels.join(', ')}`);
  let access: { socket: SocketAccess; control: SocketAccess; peers: PeerPolicy | null };
  try {
    access = { socket: socketAccess('socket', v), control: socketAccess('control', v), peers: peerPolicy(v) };
  } catch (e) {
    if (e instanceof AccessUsageError) throw new UsageError(e.message);
    throw e;
  }
  const opts: Options = {
    socketPath: v['socket-path'] ?? null,
    fd: v.fd === undefined ? null : int('fd', v.fd, 0, 0, 1 << 20),
    blkFile: v['blk-file'] ?? null,
    blkDriver: driver,
    size: v.size === undefined ? 8 * 2 ** 30 : parseSize(v.size),
    readOnly: v['read-only'] ?? false,
    forceShare: v['force-share'] ?? false,
    incoming: v.incoming ?? false,
    printCapabilities: v['print-capabilities'] ?? false,
    installDescriptor: v['install-descriptor'] ?? false,
    prefix: v.prefix ?? null,
    numQueues: int('num-queues', v['num-queues'], os.availableParallelism(), 1, 64),
    workers: int('workers', v.workers, os.availableParallelism(), 1, 256),
    initialExport: true,
    queueSize,
    aio,
    pollUs: int('poll-us', v['poll-us'], 0, 0, 1_000_000),
    ringPacked: v['ring-packed'] ?? false,
    cache,
    logicalBlockSize: lbs === '4096' ? 4096 : 512,
    serial: v.serial ?? null,
    control: v.control ?? null,
    metrics: v.metrics === undefined ? null : parseMetricsAddress(v.metrics),
    controlFd: null,
    socketAccess: access.socket,
    controlAccess: access.control,
    peers: access.peers,
    logLevel,
    help: v.help ?? false,
    version: v.version ?? false,
    defaults: v.default ?? false,
    config: v.config ?? null,
    given: new Set(Object.keys(v)),
    checkConfig: v['check-config'] ?? false,
  };
  if (opts.prefix !== null && !opts.installDescriptor) throw new UsageError('--prefix goes with --install-descriptor');
  if (opts.help || opts.version || opts.printCapabilities || opts.installDescriptor) return opts;
  if (opts.config !== null) return configOptions(opts, v, activated);
  if (opts.defaults) {
    opts.socketPath ??= 'vubd.sock';
    if (opts.blkDriver === 'file') opts.blkFile ??= 'vubd-disk.img';
  }
  if (activated?.vhost != null) {
    if (opts.socketPath !== null) throw new UsageError('systemd passed a listening socket (LISTEN_FDS): drop --socket-path, or use it without socket activation');
    opts.fd ??= activated.vhost;
  }
  if (activated?.control != null) {
    if (opts.control !== null) throw new UsageError("systemd passed a socket named 'control' (LISTEN_FDNAMES): drop --control, or do not pass that socket");
    opts.controlFd = activated.control;
  }
  if (opts.socketPath !== null && opts.fd !== null) throw new UsageError('--socket-path and --fd are mutually exclusive');
  const diskOptions = ['blk-file', 'blk-driver', 'size', 'read-only', 'num-queues', 'serial', 'ring-packed', 'incoming'];
  if (opts.socketPath === null && opts.fd === null && (opts.control !== null || opts.controlFd !== null) && !diskOptions.some((o) => v[o as keyof typeof v] !== undefined)) {
    // A daemon for many disks: nodes and exports are added over QMP (blockdev-add, block-export-add).
    opts.initialExport = false;
    return opts;
  }
  if (opts.socketPath === null && opts.fd === null) throw new UsageError('one of --socket-path or --fd is required (or a socket passed by systemd: LISTEN_FDS; or only --control, to add exports over QMP)');
  if (opts.fd !== null && ['socket-mode', 'socket-owner', 'socket-group'].some((o) => v[o as keyof typeof v] !== undefined)) {
    throw new UsageError('--socket-mode/--socket-owner/--socket-group need --socket-path (with --fd the socket already exists; its creator sets them)');
  }
  if (opts.control === null && ['control-mode', 'control-owner', 'control-group'].some((o) => v[o as keyof typeof v] !== undefined)) {
    throw new UsageError('--control-mode/--control-owner/--control-group need --control=PATH');
  }
  if (opts.blkDriver === 'file' && opts.blkFile === null) throw new UsageError('--blk-file is required (or --blk-driver=null)');
  if (opts.blkDriver === 'null' && opts.blkFile !== null) throw new UsageError('--blk-file cannot be used with --blk-driver=null');
  if (opts.size % opts.logicalBlockSize !== 0) throw new UsageError(`--size must be a multiple of the logical block size (${opts.logicalBlockSize})`);
  return opts;
}

/** Command-line options that describe the one disk; with --config the file says this per node or export. */
const DISK_OPTIONS: Record<string, string> = {
  'socket-path': "an export's addr {\"type\": \"unix\", \"path\": ...}",
  fd: "an export's addr {\"type\": \"fd\", \"str\": ...}",
  'blk-file': 'a node {"driver": "file", "filename": ...}',
  'blk-driver': "a node's driver",
  size: 'a null-co node\'s size',
  'read-only': 'a node\'s read-only or an export\'s writable',
  'force-share': 'a file node\'s "locking": "off"',
  'num-queues': 'an export\'s num-queues',
  'queue-size': 'an export\'s queue-size',
  'ring-packed': 'an export\'s ring-packed',
  cache: 'a file node\'s cache {direct, no-flush} and an export\'s writethrough',
  'logical-block-size': 'an export\'s logical-block-size',
  serial: 'an export\'s serial',
  'socket-mode': 'an export\'s socket {mode, owner, group}',
  'socket-owner': 'an export\'s socket {mode, owner, group}',
  'socket-group': 'an export\'s socket {mode, owner, group}',
  'allow-uid': 'an export\'s allow-uid',
  'allow-gid': 'an export\'s allow-gid',
};

function configOptions(opts: Options, v: Readonly<Record<string, unknown>>, activated: ActivatedSockets | null): Options {
  // `npm start -- --config=FILE`: npm start's --default gives way to the file.
  opts.defaults = false;
  for (const [name, instead] of Object.entries(DISK_OPTIONS)) {
    if (v[name] !== undefined) throw new UsageError(`--${name} cannot be used with --config: the file describes every disk (use ${instead} there)`);
  }
  // A vhost-user socket passed by systemd must be named by an export's addr {"type": "fd"} (config.ts checks).
  if (activated?.vhost != null) opts.fd = activated.vhost;
  if (activated?.control != null) {
    if (opts.control !== null) throw new UsageError("systemd passed a socket named 'control' (LISTEN_FDNAMES): drop --control, or do not pass that socket");
    opts.controlFd = activated.control;
  }
  return opts;
}
