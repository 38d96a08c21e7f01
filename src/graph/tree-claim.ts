// The image claims of one device: while a frontend has it started, every image of the node tree
// it runs is claimed (image-lock.ts), and during a tree swap the incoming tree too, because some
// queues may already run it while others still run the old one.
import type { NodeSpec } from './nodes.js';
import { specFds } from './fd-refs.js';
import { claimImages, releaseImages } from './image-lock.js';

export class TreeClaim {
  private active = false;
  private incoming: NodeSpec | null = null;

  /** current: the tree the device runs now (read at each step, so a swap in progress is seen) */
  constructor(private readonly current: () => NodeSpec) {}

  get isActive(): boolean {
    return this.active;
  }

  private fds(): number[] {
    return [...specFds(this.current()), ...(this.incoming ? specFds(this.incoming) : [])];
  }

  /** The device starts: claim its images (throws ImageLockError, claiming nothing, on a conflict). */
  activate(): void {
    if (this.active) return;
    claimImages(this.fds());
    this.active = true;
  }

  /** The device stopped: its images go back to the idle locks. */
  deactivate(): void {
    if (!this.active) return;
    releaseImages(this.fds());
    this.active = false;
  }

  /** Before the device switches to spec (throws ImageLockError if started and spec's images are taken). */
  beginSwap(spec: NodeSpec): void {
    if (this.active) claimImages(specFds(spec));
    this.incoming = spec;
  }

  /** After the switch: ok means current() is now the incoming tree and old is what it replaced. */
  endSwap(ok: boolean, old: NodeSpec): void {
    const incoming = this.incoming!;
    this.incoming = null;
    if (this.active) releaseImages(specFds(ok ? old : incoming));
  }
}
