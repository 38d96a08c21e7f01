// Test-only fault injection, read once from VUBD_TEST_FAULT ("throw:Q" or "die:Q", or with an
// export id, "die:EXPORT:Q"; without one, queue Q of every export): after queue Q
// saw its first kick, its worker throws a plain Error inside the I/O loop ("throw": must mark only
// that queue broken) or outside it ("die": the thread really ends, as an uncaught bug would end
// it). Every exception the worker can foresee is caught, so a real thread death cannot be
// provoked from outside; this is how the tests reach the daemon's answer to one.
import { StatIndex } from './messages.js';

type Kind = 'throw' | 'die';

function parse(spec: string | undefined): { kind: Kind; exportId: string | null; queue: number } | null {
  const m = /^(throw|die):(?:([^:]+):)?(\d+)$/.exec(spec ?? '');
  return m === null ? null : { kind: m[1] as Kind, exportId: m[2] ?? null, queue: Number(m[3]) };
}

const planned = parse(process.env.VUBD_TEST_FAULT);

/**
 * Fires once per queue, across the workers that replace one another (the flag lives in the shared
 * stats block), before the queue's first request is served: once it was kicked, or once a busy
 * poll saw requests without reading the kick.
 */
function due(kind: Kind, exportId: string, queue: number, stats: Int32Array, pending: () => boolean): boolean {
  if (planned === null || planned.kind !== kind || planned.queue !== queue) return false;
  if (planned.exportId !== null && planned.exportId !== exportId) return false;
  if (Atomics.load(stats, StatIndex.KICKS) === 0 && !pending()) return false;
  return Atomics.compareExchange(stats, StatIndex.FAULT_FIRED, 0, 1) === 0;
}

export const faultInjection = {
  /** false unless VUBD_TEST_FAULT is set: the worker loop calls nothing else then */
  armed: planned !== null,
  maybeThrow(exportId: string, queue: number, stats: Int32Array, pending: () => boolean): void {
    if (due('throw', exportId, queue, stats, pending)) throw new Error('injected fault (VUBD_TEST_FAULT)');
  },
  maybeDie(exportId: string, queue: number, stats: Int32Array, pending: () => boolean): void {
    if (due('die', exportId, queue, stats, pending)) throw new Error('injected worker death (VUBD_TEST_FAULT)');
  },
};
