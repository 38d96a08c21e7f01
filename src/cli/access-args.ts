// Socket access options: --socket-mode/-owner/-group, --control-mode/-owner/-group and the
// --allow-uid/--allow-gid peer lists. Names go through NSS (getpwnam_r/getgrnam_r).
import { native } from '../native/index.js';
import type { SocketAccess } from '../protocol/socket-file.js';
import type { PeerPolicy } from '../protocol/peer-policy.js';

export class AccessUsageError extends Error {}

/** largest id; (uid_t)-1 means "unchanged" to chown and is no one's id */
const MAX_ID = 2 ** 32 - 2;

export function parseMode(option: string, text: string | undefined, def: number): number {
  if (text === undefined) return def;
  if (!/^0?[0-7]{3}$/.test(text)) throw new AccessUsageError(`--${option} must be an octal mode such as 0600 or 0660 (at most 0777), got '${text}'`);
  return parseInt(text, 8);
}

function numericId(text: string): number | null {
  if (!/^\d+$/.test(text)) return null;
  const v = Number(text);
  return v <= MAX_ID ? v : null;
}

export function resolveUser(option: string, text: string): number {
  const id = numericId(text);
  if (id !== null) return id;
  if (/^\d+$/.test(text)) throw new AccessUsageError(`--${option}: uid ${text} is out of range`);
  const u = text.length > 0 && text.length < 256 ? native.lookupUser(text) : null;
  if (u === null) throw new AccessUsageError(`--${option}: no user named '${text}' (checked with getpwnam: /etc/passwd and NSS)`);
  return u.uid;
}

export function resolveGroup(option: string, text: string): number {
  const id = numericId(text);
  if (id !== null) return id;
  if (/^\d+$/.test(text)) throw new AccessUsageError(`--${option}: gid ${text} is out of range`);
  const g = text.length > 0 && text.length < 256 ? native.lookupGroup(text) : null;
  if (g === null) throw new AccessUsageError(`--${option}: no group named '${text}' (checked with getgrnam: /etc/group and NSS)`);
  return g;
}

function str(x: string | boolean | undefined): string | undefined {
  return typeof x === 'string' ? x : undefined;
}

export function socketAccess(prefix: 'socket' | 'control', v: Readonly<Record<string, string | boolean | undefined>>): SocketAccess {
  const owner = str(v[`${prefix}-owner`]);
  const group = str(v[`${prefix}-group`]);
  return {
    mode: parseMode(`${prefix}-mode`, str(v[`${prefix}-mode`]), 0o600),
    uid: owner === undefined ? -1 : resolveUser(`${prefix}-owner`, owner),
    gid: group === undefined ? -1 : resolveGroup(`${prefix}-group`, group),
  };
}

function list(option: string, text: string | undefined, resolve: (option: string, t: string) => number): number[] | null {
  if (text === undefined) return null;
  const items = text.split(',').map((t) => t.trim());
  if (items.some((t) => t.length === 0)) throw new AccessUsageError(`--${option} must be a comma-separated list of names or numbers, got '${text}'`);
  return items.map((t) => resolve(option, t));
}

/** null when neither list is given: every peer that can open the socket is served */
export function peerPolicy(v: Readonly<Record<string, string | boolean | undefined>>): PeerPolicy | null {
  const uids = list('allow-uid', str(v['allow-uid']), resolveUser);
  const gids = list('allow-gid', str(v['allow-gid']), resolveGroup);
  if (uids === null && gids === null) return null;
  return { uids: uids ?? [], gids: gids ?? [] };
}

export const ACCESS_OPTIONS = {
  'socket-mode': { type: 'string' },
  'socket-owner': { type: 'string' },
  'socket-group': { type: 'string' },
  'control-mode': { type: 'string' },
  'control-owner': { type: 'string' },
  'control-group': { type: 'string' },
  'allow-uid': { type: 'string' },
  'allow-gid': { type: 'string' },
} as const;

export const ACCESS_USAGE = `
Socket access (the socket file's mode and owner are set before it appears, never wider):
      --socket-mode=OCTAL  mode of the vhost-user socket (default 0600); connecting needs write
                           permission, so 0660 with --socket-group lets that group's QEMU in
      --socket-owner=USER  owner (name or uid) of the vhost-user socket (default: vubd's user)
      --socket-group=GROUP group (name or gid) of the vhost-user socket (default: vubd's group)
      --control-mode=OCTAL, --control-owner=USER, --control-group=GROUP
                           the same for the --control socket (default 0600): whoever can open it
                           controls the daemon and every image it can open, as root if vubd is root
      --allow-uid=LIST     comma-separated users (names or uids) allowed on the vhost-user socket;
      --allow-gid=LIST     ... groups (names or gids; primary or supplementary group of the peer).
                           Checked with SO_PEERCRED on accept; anyone else is closed at once and
                           logged. uid 0 is not implicitly allowed: list it if root's QEMU connects.
                           The mode/owner options apply to --socket-path; with --fd only the
                           allow lists apply (the socket's creator set its mode)`;

/** block-export-add's socket-mode/-owner/-group and allow-uid/-gid (same strings as the options) */
export function exportAccess(v: Readonly<Record<string, string | undefined>>): { access: SocketAccess; peers: PeerPolicy | null } {
  return { access: socketAccess('socket', v), peers: peerPolicy(v) };
}
