// --allow-uid / --allow-gid: which peers (by SO_PEERCRED) may use a socket. uid 0 is not
// implicitly allowed: an allow list means exactly what it lists.
import type { PeerCred } from '../native/index.js';

export interface PeerPolicy {
  uids: readonly number[];
  gids: readonly number[];
}

/** allowed if the uid is listed, or the primary gid or a supplementary group is listed */
export function peerAllowed(policy: PeerPolicy, cred: PeerCred): boolean {
  if (policy.uids.includes(cred.uid)) return true;
  if (policy.gids.includes(cred.gid)) return true;
  return cred.groups.some((g) => policy.gids.includes(g));
}
