#!/usr/bin/env node
// vubd entry point: parse options, open the image, spawn the queue workers, listen. Any set-up
// failure exits non-zero with one line on stderr, before the socket exists.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { parseOptions, UsageError, USAGE, type Options } from './args.js';
import { logger, setLogLevel } from '../log.js';
import { native } from '../native/index.js';
import { BlkExport } from '../worker/export.js';
import { VhostUserServer } from '../protocol/server.js';
import type { NodeSpec } from '../graph/nodes.js';

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

function openNode(opts: Options): NodeSpec {
  if (opts.blkDriver === 'null') return { driver: 'null', name: 'null0', size: opts.size, readOnly: opts.readOnly };
  const file = path.resolve(opts.blkFile!);
  if (opts.defaults && !fs.existsSync(file)) {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, DEFAULT_IMAGE_SIZE);
    console.error(`vubd: created sparse image ${file} (${DEFAULT_IMAGE_SIZE / 2 ** 30} GiB)`);
  }
  let fd: number;
  try {
    fd = fs.openSync(file, opts.readOnly ? 'r' : 'r+');
  } catch (e) {
    throw new UsageError(`cannot open image ${file}: ${(e as Error).message}`);
  }
  const st = fs.fstatSync(fd);
  let size: number;
  if (st.isBlockDevice()) size = native.blockDeviceSize(fd);
  else if (st.isFile()) size = st.size;
  else throw new UsageError(`${file} is neither a regular file nor a block device`);
  if (size < 512) throw new UsageError(`${file} is ${size} bytes; a disk needs at least one 512-byte sector`);
  return { driver: 'file', name: 'file0', fd, path: file, size, readOnly: opts.readOnly };
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
  let opts: Options;
  try {
    opts = parseOptions(process.argv.slice(2));
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
  if (opts.printCapabilities) {
    console.log(JSON.stringify({ type: 'block', features: ['read-only', 'blk-file'] }));
    return 0;
  }
  setLogLevel(opts.logLevel);
  const log = logger('vubd');

  let node: NodeSpec;
  try {
    node = openNode(opts);
  } catch (e) {
    console.error(`vubd: ${(e as Error).message}`);
    return 1;
  }
  const serial = opts.serial ?? (node.driver === 'file' ? path.basename(node.path) : 'vubd-null');
  const exp = new BlkExport(
    {
      numQueues: opts.numQueues,
      maxQueueSize: opts.queueSize,
      node,
      readOnly: opts.readOnly,
      serial,
      aio: opts.aio,
      blockSize: 512,
      pollUs: opts.pollUs,
      logLevel: opts.logLevel,
    },
    logger('export'),
  );

  let server: VhostUserServer;
  try {
    server = opts.socketPath !== null ? VhostUserServer.listen(opts.socketPath, exp, logger('vhost')) : VhostUserServer.fromFd(opts.fd!, exp, logger('vhost'));
  } catch (e) {
    console.error(`vubd: cannot listen: ${(e as Error).message}`);
    await exp.close();
    return 1;
  }
  server.start();
  log.info(
    {
      socket: opts.socketPath ?? `fd ${opts.fd}`,
      image: node.driver === 'file' ? node.path : 'null',
      sizeBytes: node.size,
      queues: opts.numQueues,
      readOnly: opts.readOnly,
      aio: opts.aio,
    },
    'vubd listening',
  );
  if (opts.defaults && opts.socketPath) {
    const sock = path.resolve(opts.socketPath);
    console.log(`vubd is serving ${node.driver === 'file' ? node.path : 'a null disk'} on ${sock}\nAttach a QEMU guest with:\n\n${qemuCommand(sock, opts)}\n`);
  }

  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ signal }, 'shutting down');
      const hard = setTimeout(() => {
        log.warn('shutdown took too long; exiting now');
        resolve(0);
      }, 900);
      hard.unref();
      void (async () => {
        await Promise.race([server.close(), new Promise((r) => setTimeout(r, 500))]);
        await exp.close();
        if (node.driver === 'file') fs.closeSync(node.fd);
        clearTimeout(hard);
        resolve(0);
      })();
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`vubd: fatal: ${err instanceof Error ? err.stack : String(err)}`);
    process.exit(1);
  },
);
