#!/usr/bin/env node
// vubd entry point: parse options, open the image, spawn the queue workers, listen. Any set-up
// failure exits non-zero with one line on stderr, before the socket exists.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { cacheSemantics, parseOptions, UsageError, USAGE, type Options } from './args.js';
import { flushLogs, logger, setLogLevel } from '../log.js';
import { WorkerPool } from '../worker/pool.js';
import { assertListeningUnixStream } from '../protocol/server.js';
import { ExportManager } from '../control/export-manager.js';
import { exportAccess } from './access-args.js';
import { openFileNode, nullNode, closeNode } from '../graph/open.js';
import { followRbdResizes, openRbdNode, parseRbdFilename } from '../graph/rbd-open.js';
import { rbdName } from '../graph/snapshot.js';
import type { NodeDef } from '../graph/snapshot.js';
import { BlockGraph } from '../graph/graph.js';
import { QmpServer } from '../control/qmp-server.js';
import { buildCommands } from '../control/commands.js';
import { startMetrics, type MetricsServer } from '../control/metrics.js';
import { createBackgroundIo, type BackgroundIo } from '../graph/background-io.js';
import { CAPABILITIES, installDescriptor } from './descriptor.js';
import { exportSpec, startupConfig } from './config.js';
import { performance } from 'node:perf_hooks';
import { Notifier, takeListenFds, type ActivatedSockets } from './systemd.js';

const DEFAULT_IMAGE_SIZE = 2 ** 30;

function version(): string {
  const require = createRequire(import.meta.url);
  for (const up of ['../../../package.json', '../../package.json']) {
    try {
      return (require(up) as { version: string }).version;
    } catch {
      /* next */
    }
  }
  return 'unknown';
}

const EXPORT_ID = 'export0';

function openRootNode(opts: Options): NodeDef {
  if (opts.blkDriver === 'null') return nullNode('null0', opts.size, opts.readOnly);
  if (opts.blkFile!.startsWith('rbd:')) {
    const node = openRbdNode('rbd0', parseRbdFilename(opts.blkFile!), opts.readOnly, cacheSemantics(opts.cache));
    if (node.size % opts.logicalBlockSize !== 0) {
      closeNode(node);
      throw new Error(`${rbdName(node)} is ${node.size} bytes, not a multiple of the logical block size ${opts.logicalBlockSize}`);
    }
    return node;
  }
  const file = path.resolve(opts.blkFile!);
  if (opts.defaults && !fs.existsSync(file)) {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, DEFAULT_IMAGE_SIZE);
    console.error(`vubd: created sparse image ${file} (${DEFAULT_IMAGE_SIZE / 2 ** 30} GiB)`);
  }
  const { direct, noFlush } = cacheSemantics(opts.cache);
  // Without --incoming, a writer already on the image (QEMU, qemu-io, a started vubd) is refused now,
  // not when the guest starts; a migration destination starts beside its source.
  const node = openFileNode('file0', file, opts.readOnly, { direct, noFlush }, { mode: opts.forceShare ? 'off' : 'auto', checkClaim: !opts.incoming });
  const fail = (msg: string): never => {
    closeNode(node);
    throw new Error(msg);
  };
  if (node.alignment > opts.logicalBlockSize) {
    fail(`'${file}' needs ${node.alignment}-byte aligned O_DIRECT I/O; serve it with --logical-block-size=${node.alignment} (or a --cache mode without O_DIRECT)`);
  }
  if (node.size % opts.logicalBlockSize !== 0) fail(`'${file}' is ${node.size} bytes, not a multiple of the logical block size ${opts.logicalBlockSize}`);
  return node;
}

/** The test guest built by scripts/guest/build.sh, when present (a kernel and a busybox initramfs). */
function guestImage(): { kernel: string; initrd: string } | null {
  const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../..');
  const kernel = path.join(root, 'scripts/guest/out/vmlinuz');
  const initrd = path.join(root, 'scripts/guest/out/initramfs.cpio.gz');
  return fs.existsSync(kernel) && fs.existsSync(initrd) ? { kernel, initrd } : null;
}

function qemuCommand(socketPath: string, opts: Options): string {
  const guest = guestImage();
  const boot = guest
    ? `  -kernel ${guest.kernel} -initrd ${guest.initrd} -append console=ttyS0`
    : '  -kernel BZIMAGE -initrd INITRD -append console=ttyS0   # or your own disk image';
  const cmd = [
    `qemu-system-x86_64 -accel tcg -m 512M -smp ${opts.numQueues} -nographic`,
    '  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem',
    `  -chardev socket,id=vubd0,path=${socketPath},reconnect=1`,
    `  -device vhost-user-blk-pci,chardev=vubd0,num-queues=${opts.numQueues}`,
    boot,
  ].join(' \\\n');
  const notes = [
    '(-accel kvm is faster where KVM works; the guest must use shared memory as above.)',
    guest
      ? 'The guest drops to a busybox shell where the disk is /dev/vda; quit QEMU with Ctrl-A X.'
      : 'A small test guest (kernel + busybox initramfs) is built by scripts/guest/build.sh.',
  ];
  return `${cmd}\n\n${notes.join('\n')}`;
}

async function main(): Promise<number> {
  // vhost-user.rst: with --print-capabilities "other options and arguments should be ignored"
  if (process.argv.slice(2).some((a) => a === '--print-capabilities' || a === '-c')) {
    console.log(JSON.stringify(CAPABILITIES));
    return 0;
  }
  let opts: Options;
  let activated: ActivatedSockets | null;
  try {
    activated = takeListenFds(process.env, process.pid);
  } catch (e) {
    console.error(`vubd: socket activation: ${(e as Error).message}`);
    return 2;
  }
  try {
    opts = parseOptions(process.argv.slice(2), activated);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`vubd: ${e.message}\n(run vubd --help for usage)`);
      return 2;
    }
    throw e;
  }
  if (opts.help) {
    console.log(USAGE);
    return 0;
  }
  if (opts.version) {
    console.log(`vubd ${version()}`);
    return 0;
  }
  if (opts.installDescriptor) {
    try {
      const { file, binary } = installDescriptor(opts.prefix, version());
      console.log(`vubd: wrote ${file} (binary ${binary})`);
      return 0;
    } catch (e) {
      console.error(`vubd: cannot install the vhost-user descriptor: ${(e as Error).message}`);
      return 1;
    }
  }
  const startup = startupConfig(opts);
  if ('exit' in startup) return startup.exit;
  const fileConfig = opts.config !== null ? startup.config : null;
  if (fileConfig !== null) {
    // The file's daemon settings (the command line's --control, --workers, ... already override them).
    opts.initialExport = false;
    opts.workers = fileConfig.workers;
    opts.control = fileConfig.control?.path ?? null;
    if (fileConfig.control) opts.controlAccess = fileConfig.control.access;
    opts.controlFd = fileConfig.controlFd;
    opts.metrics = fileConfig.metrics;
    opts.logLevel = fileConfig.logLevel;
    opts.aio = fileConfig.aio;
    opts.pollUs = fileConfig.pollUs;
    opts.incoming = fileConfig.incoming;
  }
  setLogLevel(opts.logLevel);
  const log = logger('vubd');
  const notifier = new Notifier(process.env, logger('systemd'));

  let root: NodeDef | null = null;
  if (opts.initialExport) {
    try {
      root = openRootNode(opts);
    } catch (e) {
      console.error(`vubd: ${(e as Error).message}`);
      return 1;
    }
    if (opts.forceShare && root.driver === 'file') {
      log.warn({ image: root.filename }, 'image locking is off (--force-share): vubd takes no locks and another writer may use the image at the same time');
    }
  }
  const closeRoot = (): void => {
    if (root !== null) closeNode(root);
  };
  const pool = new WorkerPool({ workers: opts.workers, pollUs: opts.pollUs, logLevel: opts.logLevel }, logger('pool'));
  try {
    await pool.ready();
  } catch (e) {
    console.error(`vubd: cannot start the worker threads: ${(e as Error).message}`);
    await pool.close();
    closeRoot();
    return 1;
  }
  const graph = new BlockGraph();
  if (root !== null) graph.init((s) => s.addNode(root!));
  if (root?.driver === 'rbd') followRbdResizes(graph, root);

  const where = opts.socketPath ?? (activated?.vhost != null ? `socket fd ${opts.fd} from systemd` : `fd ${opts.fd}`);
  const image = root === null ? '' : root.driver === 'file' ? root.filename : root.driver === 'rbd' ? rbdName(root) : 'a null disk';
  const manager = new ExportManager({
    graph,
    pool,
    aio: opts.aio,
    log: logger('export'),
    onSessionChange: (id, connected, conn) => {
      if (id === EXPORT_ID && root !== null) notifier.status(connected ? `serving ${image} to frontend ${conn}` : `serving ${image} on ${where}; waiting for a frontend`);
      else notifier.status(`export ${id}: ${connected ? `serving frontend ${conn}` : 'waiting for a frontend'}`);
    },
  });

  let qmp: QmpServer | null = null;
  let metrics: MetricsServer | null = null;
  let stop: (signal: string) => void = () => {};
  const io: BackgroundIo = createBackgroundIo(opts.aio, (m) => log.warn(m));
  const commands = buildCommands({
    graph,
    io,
    exports: manager.exports,
    manager,
    poolSize: pool.size,
    parseAccess: exportAccess,
    emit: (event, data) => qmp?.emit(event, data),
    quit: () => stop('quit'),
    version: version(),
    log: logger('control'),
  });
  const shutdown = async (): Promise<void> => {
    await Promise.race([Promise.all([manager.closeAll(), qmp?.close(), metrics?.close()]), new Promise((r) => setTimeout(r, 500))]);
    await pool.close();
    for (const n of graph.snapshot.nodes.values()) closeNode(n);
    io.close();
  };
  if (opts.metrics !== null) {
    try {
      metrics = await startMetrics(opts.metrics, commands, logger('metrics'));
    } catch (e) {
      console.error(`vubd: cannot serve --metrics: ${(e as Error).message}`);
      await shutdown();
      return 1;
    }
  }
  if (opts.control !== null || opts.controlFd !== null) {
    qmp = new QmpServer(opts.control, commands, version(), logger('qmp'));
    try {
      if (opts.controlFd !== null) {
        assertListeningUnixStream(opts.controlFd, `the control socket passed by systemd (fd ${opts.controlFd})`);
        await qmp.listenFd(opts.controlFd);
      } else await qmp.listen(opts.controlAccess);
    } catch (e) {
      console.error(`vubd: cannot listen on the control socket ${opts.control ?? `fd ${opts.controlFd}`}: ${(e as Error).message}`);
      qmp = null;
      await shutdown();
      return 1;
    }
  }

  if (fileConfig !== null) {
    // The same commands an operator would send: blockdev-add for each node (children first), then the exports.
    const t0 = performance.now();
    try {
      for (const n of fileConfig.nodes) {
        try {
          await commands.get('blockdev-add')!(n as unknown as Record<string, unknown>);
        } catch (e) {
          throw new Error(`node '${n['node-name']}': ${(e as Error).message}`);
        }
      }
      for (const e of fileConfig.exports) {
        try {
          await manager.add(exportSpec(e));
        } catch (err) {
          throw new Error(`export '${e.args.id}': ${(err as Error).message}`);
        }
      }
    } catch (e) {
      console.error(`vubd: ${opts.config}: ${(e as Error).message}`);
      await shutdown();
      return 1;
    }
    log.info(
      { config: opts.config, nodes: fileConfig.nodes.length, exports: fileConfig.exports.length, workers: pool.size, control: opts.control ?? undefined, ms: Math.round(performance.now() - t0) },
      'vubd listening',
    );
    notifier.ready(`serving ${fileConfig.exports.length} exports from ${opts.config}`);
  } else if (root !== null) {
    const serial = opts.serial ?? (root.driver === 'file' ? path.basename(root.filename) : root.driver === 'rbd' ? root.image.slice(0, 20) : 'vubd-null');
    try {
      await manager.add({
        id: EXPORT_ID,
        nodeName: root.name,
        addr: opts.socketPath !== null ? { type: 'unix', path: opts.socketPath } : { type: 'fd', fd: opts.fd! },
        writable: !opts.readOnly,
        writethrough: !cacheSemantics(opts.cache).writeback,
        numQueues: opts.numQueues,
        queueSize: opts.queueSize,
        logicalBlockSize: opts.logicalBlockSize,
        serial,
        access: opts.socketAccess,
        peers: opts.peers,
        ringPacked: opts.ringPacked,
      });
    } catch (e) {
      console.error(`vubd: ${(e as Error).message}`);
      await shutdown();
      return 1;
    }
    log.info(
      {
        socket: where,
        image: root.driver === 'file' ? root.filename : root.driver === 'rbd' ? rbdName(root) : 'null',
        sizeBytes: graph.snapshot.size(root.name),
        control: opts.control ?? undefined,
        queues: opts.numQueues,
        workers: pool.size,
        readOnly: opts.readOnly,
        aio: opts.aio,
        cache: opts.cache,
        logicalBlockSize: opts.logicalBlockSize,
        socketMode: opts.socketPath !== null ? '0' + opts.socketAccess.mode.toString(8) : undefined,
        allowUids: opts.peers?.uids,
        allowGids: opts.peers?.gids,
      },
      'vubd listening',
    );
    // After the export listens: the socket is served, so systemd may start the VM that connects to it.
    notifier.ready(`serving ${image} on ${where}; waiting for a frontend`);
  } else {
    log.info({ control: opts.control ?? `fd ${opts.controlFd}`, workers: pool.size, aio: opts.aio }, 'vubd running with no export; add them with blockdev-add and block-export-add');
    notifier.ready('no exports yet; add them over the control socket');
  }
  if (opts.ringPacked) log.info('--ring-packed: packed rings offered, INFLIGHT_SHMFD not: crash recovery is off (a vubd restart hangs a packed-ring guest)');
  if (opts.defaults && opts.socketPath && root !== null) {
    const sock = path.resolve(opts.socketPath);
    console.log(`vubd is serving ${image} on ${sock}\nAttach a QEMU guest with:\n\n${qemuCommand(sock, opts)}\n`);
  }

  return new Promise<number>((resolve) => {
    let stopping = false;
    stop = (signal: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ signal }, 'shutting down');
      notifier.stopping();
      const hard = setTimeout(() => {
        log.warn('shutdown took too long; exiting now');
        resolve(0);
      }, 1500);
      hard.unref();
      void shutdown().then(() => {
        clearTimeout(hard);
        resolve(0);
      });
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });
}

// Log lines are written asynchronously: every exit waits (briefly) until they are out.
main().then(
  async (code) => {
    await flushLogs();
    process.exit(code);
  },
  async (err) => {
    await flushLogs();
    console.error(`vubd: fatal: ${err instanceof Error ? err.stack : String(err)}`);
    process.exit(1);
  },
);
