// Guest memory as the main thread owns it: every chunk of every region mapped once for the whole
// process and named by a mapping id. Workers get the ids and take their own views (GuestMemory).
// A chunk is unmapped when this table and every view have let go of it, so replaced memory goes
// as soon as the last request that used it is done, in whichever worker that request ran.
import fs from 'node:fs';
import { native } from '../native/index.js';
import { CHUNK_OVERLAP, CHUNK_SIZE, GuestMemory, type ChunkSpec, type RegionSpec } from './memory.js';

const PAGE_SIZE = 4096;

/** A region of the table cannot be mapped (the message says which one and why). */
export class GuestMemoryMapError extends Error {}

interface MappedSpec {
  spec: RegionSpec;
  chunks: ChunkSpec[];
}

export class GuestMemoryMap {
  /** every chunk of every region, in region order: what the workers view */
  readonly chunks: readonly ChunkSpec[];
  private released = false;

  private constructor(private readonly mapped: readonly MappedSpec[]) {
    this.chunks = mapped.flatMap((m) => m.chunks);
  }

  /**
   * Maps every region. A region that `previous` has too (same fd, same layout: ADD/REM_MEM_REG
   * leave the other regions alone) keeps its mappings. All or nothing: if any chunk fails, every
   * chunk this call mapped or kept is released again before the error is thrown.
   */
  static map(specs: readonly RegionSpec[], previous: GuestMemoryMap | null = null): GuestMemoryMap {
    specs.forEach(checkAligned); // before anything is mapped
    const fresh = specs.filter((s) => previous?.find(s) === undefined).reduce((n, s) => n + Math.ceil(s.size / CHUNK_SIZE), 0);
    if (native.liveMappings() + fresh > mappingBudget()) {
      throw new GuestMemoryMapError(
        `the table needs ${fresh} more mappings of 1 GiB; ${native.liveMappings()} are in use and at most ${mappingBudget()} may be (half of vm.max_map_count)`,
      );
    }
    const owned: number[] = [];
    try {
      const mapped = specs.map((spec, i): MappedSpec => {
        const kept = previous?.find(spec);
        if (kept !== undefined) {
          for (const c of kept.chunks) {
            if (!native.retainMapping(c.mapping)) throw new Error(`mapping ${c.mapping} of region ${i} is gone`);
            owned.push(c.mapping);
          }
          return { spec, chunks: kept.chunks };
        }
        const chunks: ChunkSpec[] = [];
        for (let off = 0; off < spec.size; off += CHUNK_SIZE) {
          const size = Math.min(CHUNK_SIZE + CHUNK_OVERLAP, spec.size - off);
          let mapping: number;
          try {
            mapping = native.mapShared(spec.fd, size, spec.mmapOffset + off, true);
          } catch (e) {
            throw new GuestMemoryMapError(`${describe(spec, i)}: ${(e as Error).message} (chunk at +${off})`);
          }
          owned.push(mapping);
          chunks.push({ gpa: spec.guestPhysAddr + off, uva: spec.userAddr + off, size, mapping });
        }
        return { spec, chunks };
      });
      return new GuestMemoryMap(mapped);
    } catch (e) {
      for (const id of owned) native.releaseMapping(id);
      throw e;
    }
  }

  /** Drops this table's references; a chunk no worker views any more is unmapped now. Idempotent. */
  release(): void {
    if (this.released) return;
    this.released = true;
    for (const c of this.chunks) native.releaseMapping(c.mapping);
  }

  private find(s: RegionSpec): MappedSpec | undefined {
    if (this.released) return undefined;
    // The same fd number means the same file: the Session keeps a region's fd open as long as the
    // region is in its table, and this table is the one it replaces.
    return this.mapped.find(
      (m) =>
        m.spec.fd === s.fd &&
        m.spec.guestPhysAddr === s.guestPhysAddr &&
        m.spec.userAddr === s.userAddr &&
        m.spec.size === s.size &&
        m.spec.mmapOffset === s.mmapOffset,
    );
  }
}

/** A worker-style view of regions that owns its mappings alone (tests and tools on one thread). */
export function mapGuestMemory(specs: readonly RegionSpec[]): GuestMemory {
  const map = GuestMemoryMap.map(specs);
  try {
    return new GuestMemory(map.chunks);
  } finally {
    map.release(); // the views keep the chunks mapped
  }
}

let budget = 0;

/**
 * Guest memory may use at most half of the process's mappings (vm.max_map_count): Node needs its
 * own, and a replaced table stays mapped beside the new one until its requests are done. Past the
 * limit every mmap fails, V8's included, and the daemon would die.
 */
function mappingBudget(): number {
  if (budget === 0) {
    let max = 65530;
    try {
      max = parseInt(fs.readFileSync('/proc/sys/vm/max_map_count', 'utf8'), 10) || max;
    } catch {
      /* the kernel's default */
    }
    budget = Math.floor(max / 2);
  }
  return budget;
}

function checkAligned(s: RegionSpec, i: number): void {
  if (s.mmapOffset % PAGE_SIZE !== 0) throw new GuestMemoryMapError(`${describe(s, i)}: mmap offset is not page aligned`);
}

function describe(s: RegionSpec, i: number): string {
  return `region ${i} (gpa 0x${s.guestPhysAddr.toString(16)}, ${s.size} bytes at file offset ${s.mmapOffset})`;
}
