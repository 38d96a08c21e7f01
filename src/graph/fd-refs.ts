// Reference counts for the fds block nodes hold (DESIGN: owned fds). The graph holds one
// reference for as long as a node is in it; every queue worker holds one for each fd of the node
// tree it runs. The fd is closed when the last reference goes, so a node removed from the graph
// stays open while any worker that could not leave it (a failed swap, a dying thread) still runs it.
import fs from 'node:fs';
import type { NodeSpec } from './nodes.js';
import { forgetImage } from './image-lock.js';

const counts = new Map<number, number>();

export function retainFd(fd: number): void {
  counts.set(fd, (counts.get(fd) ?? 0) + 1);
}

export function releaseFd(fd: number): void {
  const n = counts.get(fd);
  if (n === undefined) throw new Error(`fd ${fd} released more often than retained`);
  if (n > 1) {
    counts.set(fd, n - 1);
    return;
  }
  counts.delete(fd);
  forgetImage(fd); // closing drops the fd's OFD locks
  fs.closeSync(fd);
}

/** References currently held on fd (0: not ours, or closed). */
export function fdRefs(fd: number): number {
  return counts.get(fd) ?? 0;
}

/** Every fd a node tree uses. */
export function specFds(spec: NodeSpec, out: number[] = []): number[] {
  switch (spec.driver) {
    case 'file':
      out.push(spec.fd);
      break;
    case 'null':
      break;
    case 'throttle':
      specFds(spec.child, out);
      break;
    case 'mirror':
      specFds(spec.source, out);
      specFds(spec.target, out);
      break;
  }
  return out;
}

export function retainSpec(spec: NodeSpec): void {
  for (const fd of specFds(spec)) retainFd(fd);
}

export function releaseSpec(spec: NodeSpec): void {
  for (const fd of specFds(spec)) releaseFd(fd);
}
