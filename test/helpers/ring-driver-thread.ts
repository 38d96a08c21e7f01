// A virtio driver on its own thread, for the notification stress test: it maps the same memfd as
// the device, submits and reaps one-descriptor buffers on a split or packed ring, and follows
// Linux's suppression protocol (kick decision after publishing, enable_cb / enable_cb_delayed
// with a re-check before sleeping, disable_cb while busy). It never waits forever: a wait that
// times out while completions sit unnotified in the used ring is counted as a lost notification.
import { parentPort, workerData } from 'node:worker_threads';
import { native, POLLIN } from '../../src/native/index.js';

export interface DriverConfig {
  fd: number;
  bytes: number;
  packed: boolean;
  eventIdx: boolean;
  q: number;
  /** byte offsets in the mapping: descriptor table/ring, avail ring (driver area), used ring (device area), data */
  desc: number;
  avail: number;
  used: number;
  data: number;
  kickFd: number;
  callFd: number;
  /** Int32Array over a SharedArrayBuffer, indexed by Ctl */
  ctl: SharedArrayBuffer;
  total: number;
  /** stop submitting after this long (from the thread's start) */
  runMs: number;
  seed: number;
  /** how long a wait may last before it is looked at, and the grace before a miss is declared */
  waitMs: number;
}

export const enum Ctl {
  SUBMITTED = 0,
  DONE = 1,
  LOST_NOTIFY = 2,
  LOST_KICK = 3,
  ABORT = 4,
  COUNT = 5,
}

export interface DriverResult {
  submitted: number;
  completed: number;
  kicks: number;
  sleeps: number;
  wakeups: number;
  lostNotifications: number;
}

const AVAIL = 1 << 7;
const USED = 1 << 15;
const EV_ENABLE = 0;
const EV_DISABLE = 1;
const EV_DESC = 2;

/** The ring-specific half of a driver. */
interface Ring {
  /** writes one buffer and makes it available (not yet visible for split: see publish) */
  add(): boolean;
  /** makes what add() wrote visible; returns whether the device wants a kick */
  publish(): boolean;
  /** reaps used buffers; returns how many */
  collect(): number;
  enableCb(delayed: boolean): void;
  disableCb(): void;
  moreUsed(): boolean;
  outstanding: number;
}

function need(eventIdx: number, now: number, old: number): boolean {
  return ((now - eventIdx - 1) & 0xffff) < ((now - old) & 0xffff);
}

function splitRing(c: DriverConfig, buf: ArrayBuffer): Ring {
  const q = c.q;
  const dv = new DataView(buf);
  const av16 = new Uint16Array(buf, c.avail, 3 + q);
  const us16 = new Uint16Array(buf, c.used, 3 + 4 * q);
  const us32 = new Uint32Array(buf, c.used, 1 + 2 * q);
  const free: number[] = [];
  for (let h = q - 1; h >= 0; h--) free.push(h);
  let availIdx = 0;
  let published = 0;
  let lastUsed = 0;
  return {
    outstanding: 0,
    add() {
      const h = free.pop();
      if (h === undefined) return false;
      dv.setBigUint64(c.desc + 16 * h, BigInt(c.data), true);
      dv.setUint32(c.desc + 16 * h + 8, 16, true);
      dv.setUint32(c.desc + 16 * h + 12, 0, true);
      av16[2 + (availIdx & (q - 1))] = h;
      availIdx = (availIdx + 1) & 0xffff;
      this.outstanding++;
      return true;
    },
    publish() {
      const old = published;
      published = availIdx;
      Atomics.store(av16, 1, availIdx);
      if (c.eventIdx) return need(Atomics.load(us16, 2 + 4 * q), availIdx, old);
      return (Atomics.load(us16, 0) & 1) === 0; // VRING_USED_F_NO_NOTIFY
    },
    collect() {
      const idx = Atomics.load(us16, 1);
      let n = 0;
      while (lastUsed !== idx) {
        const slot = lastUsed & (q - 1);
        const id = us32[1 + 2 * slot]!;
        if (id >= q) throw new Error(`device used head ${id}`);
        free.push(id);
        lastUsed = (lastUsed + 1) & 0xffff;
        n++;
      }
      this.outstanding -= n;
      return n;
    },
    enableCb(delayed) {
      if (c.eventIdx) Atomics.store(av16, 2 + q, (lastUsed + (delayed ? Math.floor((3 * this.outstanding) / 4) : 0)) & 0xffff);
      else Atomics.store(av16, 0, 0);
    },
    disableCb() {
      if (!c.eventIdx) Atomics.store(av16, 0, 1); // VRING_AVAIL_F_NO_INTERRUPT
    },
    moreUsed() {
      return Atomics.load(us16, 1) !== lastUsed;
    },
  };
}

function packedRing(c: DriverConfig, buf: ArrayBuffer): Ring {
  const q = c.q;
  const dv = new DataView(buf);
  const flags16 = new Uint16Array(buf, c.desc, 8 * q);
  const drv16 = new Uint16Array(buf, c.avail, 2);
  const dev32 = new Uint32Array(buf, c.used, 1);
  const free: number[] = [];
  for (let id = q - 1; id >= 0; id--) free.push(id);
  let next = 0;
  let wrap = true;
  let added = 0;
  let usedNext = 0;
  let usedWrap = true;
  return {
    outstanding: 0,
    add() {
      const id = free.pop();
      if (id === undefined) return false;
      const o = c.desc + 16 * next;
      dv.setBigUint64(o, BigInt(c.data), true);
      dv.setUint32(o + 8, 16, true);
      dv.setUint16(o + 12, id, true);
      Atomics.store(flags16, 8 * next + 7, wrap ? AVAIL : USED);
      if (++next === q) {
        next = 0;
        wrap = !wrap;
      }
      added++;
      this.outstanding++;
      return true;
    },
    publish() {
      const n = added;
      added = 0;
      // One 32-bit snapshot of the device area, like Linux's virtqueue_kick_prepare_packed.
      const snap = Atomics.load(dev32, 0);
      const offWrap = snap & 0xffff;
      const flags = snap >>> 16;
      if (flags !== EV_DESC || !c.eventIdx) return flags !== EV_DISABLE;
      let event = offWrap & 0x7fff;
      if (offWrap >> 15 !== (wrap ? 1 : 0)) event -= q;
      return ((next - event - 1) & 0xffff) < n;
    },
    collect() {
      let n = 0;
      for (;;) {
        const f = Atomics.load(flags16, 8 * usedNext + 7);
        if (((f & AVAIL) !== 0) !== usedWrap || ((f & USED) !== 0) !== usedWrap) break;
        const id = dv.getUint16(c.desc + 16 * usedNext + 12, true);
        if (id >= q) throw new Error(`device used id ${id}`);
        free.push(id);
        if (++usedNext === q) {
          usedNext = 0;
          usedWrap = !usedWrap;
        }
        n++;
      }
      this.outstanding -= n;
      return n;
    },
    enableCb(delayed) {
      if (c.eventIdx) {
        let off = usedNext + (delayed ? Math.floor((3 * this.outstanding) / 4) : 0);
        let w = usedWrap;
        if (off >= q) {
          off -= q;
          w = !w;
        }
        Atomics.store(drv16, 0, off | (w ? 0x8000 : 0));
        Atomics.store(drv16, 1, EV_DESC);
      } else Atomics.store(drv16, 1, EV_ENABLE);
    },
    disableCb() {
      Atomics.store(drv16, 1, EV_DISABLE);
    },
    moreUsed() {
      const f = Atomics.load(flags16, 8 * usedNext + 7);
      return ((f & AVAIL) !== 0) === usedWrap && ((f & USED) !== 0) === usedWrap;
    },
  };
}

function run(c: DriverConfig): DriverResult {
  const ctl = new Int32Array(c.ctl);
  const buf = native.mmap(c.fd, c.bytes, 0, true);
  const ring = c.packed ? packedRing(c, buf) : splitRing(c, buf);
  const fds = Int32Array.of(c.callFd);
  const rev = new Int32Array(1);
  let x = c.seed >>> 0 || 1;
  const rnd = (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  const r: DriverResult = { submitted: 0, completed: 0, kicks: 0, sleeps: 0, wakeups: 0, lostNotifications: 0 };
  const wait = (ms: number): boolean => native.pollWait(fds, 1, rev, ms) > 0 && (rev[0]! & POLLIN) !== 0;
  const deadline = performance.now() + c.runMs;
  while (Atomics.load(ctl, Ctl.ABORT) === 0) {
    const canSubmit = r.submitted < c.total && performance.now() < deadline;
    if (!canSubmit && ring.outstanding === 0) break;
    // Submit a batch of 1..8 (or hold off, to make the device run dry and sleep).
    if (canSubmit && rnd(4) !== 0) {
      let n = 0;
      const want = 1 + rnd(8);
      while (n < want && r.submitted < c.total && ring.add()) {
        n++;
        r.submitted++;
      }
      Atomics.store(ctl, Ctl.SUBMITTED, r.submitted);
      if (n > 0 && ring.publish()) {
        native.eventfdWrite(c.kickFd, 1);
        r.kicks++;
      }
    }
    const got = ring.collect();
    r.completed += got;
    if (got > 0 || ring.outstanding === 0) continue;
    if (canSubmit && ring.outstanding < c.q && rnd(4) === 0) continue; // keep submitting instead of waiting
    // Going to sleep: ask for a notification, then look again (the device may have published meanwhile).
    ring.enableCb(rnd(3) === 0);
    if (ring.moreUsed()) {
      ring.disableCb();
      continue;
    }
    // Like a guest at its queue depth, submit nothing more until a completion arrives: a kick the
    // device missed is not papered over by the next one.
    r.sleeps++;
    let woken = wait(c.waitMs);
    while (!woken && !ring.moreUsed() && Atomics.load(ctl, Ctl.ABORT) === 0) woken = wait(c.waitMs); // the device is slow, or missed a kick (it counts that)
    if (!woken && ring.moreUsed() && !(woken = wait(c.waitMs))) {
      // Published, never notified: the driver would sleep here forever.
      r.lostNotifications++;
      Atomics.add(ctl, Ctl.LOST_NOTIFY, 1);
      Atomics.store(ctl, Ctl.ABORT, 1);
      break;
    }
    if (!woken) continue; // aborted
    native.eventfdRead(c.callFd);
    r.wakeups++;
    ring.disableCb();
  }
  Atomics.store(ctl, Ctl.SUBMITTED, r.submitted);
  Atomics.store(ctl, Ctl.DONE, 1);
  native.eventfdWrite(c.kickFd, 1); // wake the device so it sees DONE
  native.unmap(buf);
  return r;
}

if (parentPort !== null && workerData !== null && typeof workerData === 'object') parentPort.postMessage(run(workerData as DriverConfig));
