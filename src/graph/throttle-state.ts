// Shared throttle state: one SharedArrayBuffer per throttle node, used by every queue worker and
// by the main thread (which changes the limits). Each class (iops/bps × total/read/write) is a
// virtual-scheduling token bucket (GCRA): a request reserves its cost and starts when the bucket
// allows, so all queues together honour the limit. Lock-free: Atomics on a BigInt64Array.

export const THROTTLE_CLASSES = ['iops_total', 'iops_rd', 'iops_wr', 'bps_total', 'bps_rd', 'bps_wr'] as const;
export type ThrottleClass = (typeof THROTTLE_CLASSES)[number];

/** Per class: units per second (0 = unlimited) and burst (units that may pass at once). */
export type ThrottleLimits = Partial<Record<ThrottleClass, number>> & Partial<Record<`${ThrottleClass}_max`, number>>;

// Layout per class: [rate, burst, tat(ns)]
const STRIDE = 3;

export function newThrottleState(): SharedArrayBuffer {
  return new SharedArrayBuffer(8 * STRIDE * THROTTLE_CLASSES.length);
}

export function setLimits(sab: SharedArrayBuffer, limits: ThrottleLimits): void {
  const a = new BigInt64Array(sab);
  THROTTLE_CLASSES.forEach((c, i) => {
    const rate = Math.max(0, Math.floor(limits[c] ?? 0));
    // Default burst: a tenth of a second's worth (QEMU's default bucket size), at least one unit.
    const burst = Math.max(1, Math.floor(limits[`${c}_max`] ?? rate / 10));
    Atomics.store(a, i * STRIDE, BigInt(rate));
    Atomics.store(a, i * STRIDE + 1, BigInt(burst));
  });
}

export function getLimits(sab: SharedArrayBuffer): ThrottleLimits {
  const a = new BigInt64Array(sab);
  const out: ThrottleLimits = {};
  THROTTLE_CLASSES.forEach((c, i) => {
    out[c] = Number(Atomics.load(a, i * STRIDE));
    out[`${c}_max`] = Number(Atomics.load(a, i * STRIDE + 1));
  });
  return out;
}

/**
 * Reserves a request of `bytes` (a read or a write) and returns how many nanoseconds from now it
 * may start (0 = now).
 */
export function reserve(sab: SharedArrayBuffer, write: boolean, bytes: number, nowNs: bigint): number {
  const a = new BigInt64Array(sab);
  let wait = 0n;
  for (let i = 0; i < THROTTLE_CLASSES.length; i++) {
    const c = THROTTLE_CLASSES[i]!;
    if ((write && c.endsWith('_rd')) || (!write && c.endsWith('_wr'))) continue;
    const rate = Atomics.load(a, i * STRIDE);
    if (rate <= 0n) continue;
    const cost = BigInt(c.startsWith('bps') ? bytes : 1);
    const burst = Atomics.load(a, i * STRIDE + 1);
    const interval = 1_000_000_000n; // per `rate` units
    for (;;) {
      const tat = Atomics.load(a, i * STRIDE + 2);
      const base = tat > nowNs ? tat : nowNs;
      const next = base + (cost * interval) / rate;
      if (Atomics.compareExchange(a, i * STRIDE + 2, tat, next) !== tat) continue;
      // A bucket of `burst` units lets the schedule run that far ahead of now.
      const tolerance = (burst * interval) / rate;
      const startAt = next - tolerance;
      if (startAt - nowNs > wait) wait = startAt - nowNs;
      break;
    }
  }
  return Number(wait);
}
