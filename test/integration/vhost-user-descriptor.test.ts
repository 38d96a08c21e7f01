// QEMU's vhost-user backend conventions: the descriptor written by --install-descriptor parsed as
// docs/interop/vhost-user.json describes it (VhostUserBackend), its binary run by absolute path
// with a clean environment: --print-capabilities (VHostUserBackendCapabilities, block features),
// --socket-path and --fd.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir, vubdMain, repoRoot, sleep } from '../helpers/daemon.js';
import { Frontend } from '../helpers/frontend.js';
import { native } from '../../src/native/index.js';
import { descriptorDir } from '../../src/cli/descriptor.js';

// enum VHostUserBackendType and VHostUserBackendBlockFeature, from vhost-user.json
const BACKEND_TYPES = ['9p', 'balloon', 'block', 'caif', 'console', 'crypto', 'gpu', 'input', 'net', 'rng', 'rpmsg', 'rproc-serial', 'scsi', 'vsock', 'fs'];
const BLOCK_FEATURES = ['read-only', 'blk-file'];
/** QEMU/libvirt start backends with little or no environment */
const CLEAN_ENV = { PATH: '/nonexistent' };

/** struct VhostUserBackend: description, type and binary required, tags optional, nothing else */
function checkVhostUserBackend(v: unknown): { binary: string; type: string } {
  assert.ok(typeof v === 'object' && v !== null && !Array.isArray(v), 'a JSON object');
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) assert.ok(['description', 'type', 'binary', 'tags'].includes(k), `unknown member ${k}`);
  assert.equal(typeof o.description, 'string');
  assert.ok(typeof o.type === 'string' && BACKEND_TYPES.includes(o.type), `type ${String(o.type)} in VHostUserBackendType`);
  assert.equal(typeof o.binary, 'string');
  assert.ok(path.isAbsolute(o.binary as string), '@binary: absolute path');
  if (o.tags !== undefined) assert.ok(Array.isArray(o.tags) && o.tags.every((t) => typeof t === 'string'));
  return { binary: o.binary as string, type: o.type as string };
}

/** union VHostUserBackendCapabilities with VHostUserBackendCapabilitiesBlock for type block */
function checkBlockCapabilities(v: unknown): void {
  assert.ok(typeof v === 'object' && v !== null && !Array.isArray(v));
  const o = v as Record<string, unknown>;
  assert.equal(o.type, 'block');
  assert.ok(Array.isArray(o.features), 'features: a list');
  for (const f of o.features as unknown[]) assert.ok(typeof f === 'string' && BLOCK_FEATURES.includes(f), `feature ${String(f)} in VHostUserBackendBlockFeature`);
  assert.deepEqual([...(o.features as string[])].sort(), ['blk-file', 'read-only']);
  assert.deepEqual(Object.keys(o).sort(), ['features', 'type']);
}

async function served(socketPath: string, proc: ReturnType<typeof spawn>, out: () => string): Promise<void> {
  const deadline = Date.now() + 20000;
  while (!/vubd listening/.test(out())) {
    if (proc.exitCode !== null) throw new Error(`exited ${proc.exitCode}: ${out()}`);
    if (Date.now() > deadline) throw new Error(`not listening: ${out()}`);
    await sleep(20);
  }
  const fe = Frontend.connect(socketPath);
  try {
    fe.negotiate();
    assert.ok(fe.features !== 0n, 'GET_FEATURES answered');
  } finally {
    fe.close();
    fe.ram.close();
  }
}

function stop(p: ReturnType<typeof spawn>): Promise<number | null> {
  p.kill('SIGTERM');
  return new Promise((r) => (p.exitCode !== null ? r(p.exitCode) : p.on('exit', (c) => r(c))));
}

describe('vhost-user backend descriptor', () => {
  const dir = tempDir('vubd-descriptor-');
  const prefix = path.join(dir, 'qemu', 'vhost-user');

  test('--install-descriptor --prefix writes 50-vubd.json as the schema describes', () => {
    const r = spawnSync(process.execPath, [vubdMain, '--install-descriptor', `--prefix=${prefix}`], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const file = path.join(prefix, '50-vubd.json');
    assert.match(r.stdout, new RegExp(`wrote ${file}`));
    assert.deepEqual(fs.readdirSync(prefix), ['50-vubd.json'], 'nothing else in the directory: libvirt parses every file there');
    const d = checkVhostUserBackend(JSON.parse(fs.readFileSync(file, 'utf8')));
    assert.equal(d.type, 'block');
    assert.ok((fs.statSync(d.binary).mode & 0o111) !== 0, 'binary is executable');
  });

  test('the shipped example descriptor follows the schema too', () => {
    const d = checkVhostUserBackend(JSON.parse(fs.readFileSync(path.join(repoRoot, 'contrib/vhost-user/50-vubd.json'), 'utf8')));
    assert.equal(d.type, 'block');
  });

  test('binary --print-capabilities, with a clean environment and other options ignored', () => {
    const { binary } = checkVhostUserBackend(JSON.parse(fs.readFileSync(path.join(prefix, '50-vubd.json'), 'utf8')));
    for (const args of [['--print-capabilities'], ['--print-capabilities', '--no-such-option', 'stray'], ['-c']]) {
      const r = spawnSync(binary, args, { encoding: 'utf8', env: CLEAN_ENV });
      assert.equal(r.status, 0, r.stderr);
      checkBlockCapabilities(JSON.parse(r.stdout));
    }
  });

  test('binary serves --socket-path and --fd (a listening socket as fd 3)', async () => {
    const { binary } = checkVhostUserBackend(JSON.parse(fs.readFileSync(path.join(prefix, '50-vubd.json'), 'utf8')));
    const sock = path.join(dir, 'p.sock');
    const p1 = spawn(binary, [`--socket-path=${sock}`, '--blk-driver=null', '--size=16M', '--num-queues=1'], { env: CLEAN_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let o1 = '';
    p1.stderr!.on('data', (d: Buffer) => (o1 += d.toString()));
    try {
      await served(sock, p1, () => o1);
    } finally {
      assert.equal(await stop(p1), 0, o1);
    }
    const fdSock = path.join(dir, 'fd.sock');
    const lfd = native.listenUnix(fdSock, 4);
    const p2 = spawn(binary, ['--fd=3', '--blk-driver=null', '--size=16M', '--num-queues=1'], { env: CLEAN_ENV, stdio: ['ignore', 'pipe', 'pipe', lfd] });
    native.close(lfd);
    let o2 = '';
    p2.stderr!.on('data', (d: Buffer) => (o2 += d.toString()));
    try {
      await served(fdSock, p2, () => o2);
    } finally {
      assert.equal(await stop(p2), 0, o2);
    }
  });

  test('descriptor directory: --prefix, root, $XDG_CONFIG_HOME, ~/.config', () => {
    assert.equal(descriptorDir(0, {}, '/x/y'), '/x/y');
    assert.equal(descriptorDir(1000, { XDG_CONFIG_HOME: '/x' }, '/p'), '/p');
    assert.equal(descriptorDir(0, { XDG_CONFIG_HOME: '/x' }, null), '/usr/share/qemu/vhost-user');
    assert.equal(descriptorDir(1000, { XDG_CONFIG_HOME: '/home/u/cfg' }, null), '/home/u/cfg/qemu/vhost-user');
    assert.match(descriptorDir(1000, {}, null), /\/\.config\/qemu\/vhost-user$/);
    assert.match(descriptorDir(1000, { XDG_CONFIG_HOME: 'relative' }, null), /\/\.config\/qemu\/vhost-user$/, 'a relative XDG_CONFIG_HOME is ignored (XDG spec)');
  });

  test('--prefix without --install-descriptor is a usage error', () => {
    const r = spawnSync(process.execPath, [vubdMain, '--prefix=/tmp/x', '--blk-driver=null', '--socket-path=/tmp/x.sock'], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--prefix goes with --install-descriptor/);
  });
});
