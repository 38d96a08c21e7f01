// QEMU's vhost-user backend discovery (docs/interop/vhost-user.json, "Backend program
// conventions" in vhost-user.rst): --print-capabilities and the 50-vubd.json descriptor that
// management software (libvirt) finds in /usr/share/qemu/vhost-user, /etc/qemu/vhost-user or
// $XDG_CONFIG_HOME/qemu/vhost-user.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** VHostUserBackendCapabilities for type block (VHostUserBackendCapabilitiesBlock) */
export const CAPABILITIES = { type: 'block', features: ['read-only', 'blk-file'] } as const;

export const DESCRIPTOR_NAME = '50-vubd.json';

/** where the descriptor goes: --prefix, else the distro directory for root, else the user's */
export function descriptorDir(euid: number, env: NodeJS.ProcessEnv, prefix: string | null): string {
  if (prefix !== null) return path.resolve(prefix);
  if (euid === 0) return '/usr/share/qemu/vhost-user';
  const config = env.XDG_CONFIG_HOME !== undefined && path.isAbsolute(env.XDG_CONFIG_HOME) ? env.XDG_CONFIG_HOME : path.join(os.homedir(), '.config');
  return path.join(config, 'qemu', 'vhost-user');
}

const mainScript = fileURLToPath(new URL('./main.js', import.meta.url));
/** dist/bin/vubd in this package: outside the descriptor directory, whose every file libvirt parses as JSON */
const launcherPath = path.resolve(path.dirname(mainScript), '../../bin/vubd');

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * An executable that runs this vubd with this node by absolute paths: QEMU and libvirt start
 * backends with a clean environment, where `#!/usr/bin/env node` may find no node.
 */
export function writeLauncher(): string {
  const text = `#!/bin/sh\n# written by vubd --install-descriptor\nexec ${shellQuote(process.execPath)} ${shellQuote(mainScript)} "$@"\n`;
  let current: string | null = null;
  try {
    current = fs.readFileSync(launcherPath, 'utf8');
  } catch {
    /* not written yet */
  }
  if (current !== text) {
    fs.mkdirSync(path.dirname(launcherPath), { recursive: true });
    const tmp = `${launcherPath}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, text, { mode: 0o755 });
    fs.renameSync(tmp, launcherPath);
  }
  fs.chmodSync(launcherPath, 0o755);
  return launcherPath;
}

export function descriptor(binary: string, version: string): Record<string, unknown> {
  return {
    description: `vubd ${version}: vhost-user-blk backend daemon (block graph, live changes, QMP control)`,
    type: CAPABILITIES.type,
    binary,
  };
}

/** Writes the launcher and DIR/50-vubd.json (atomically); returns both paths. */
export function installDescriptor(prefix: string | null, version: string): { file: string; binary: string } {
  const dir = descriptorDir(process.geteuid!(), process.env, prefix);
  const binary = writeLauncher();
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, DESCRIPTOR_NAME);
  const tmp = path.join(dir, `.${DESCRIPTOR_NAME}.${process.pid}.tmp`); // a dot file: libvirt skips it
  fs.writeFileSync(tmp, JSON.stringify(descriptor(binary, version), null, 2) + '\n', { mode: 0o644 });
  fs.renameSync(tmp, file);
  return { file, binary };
}
