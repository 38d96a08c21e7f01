// Progress of a long block job (vubd-ctl mirror --wait): a bar redrawn in place on a terminal,
// one line a second otherwise, until the job is ready or fails.
import type { QmpClient, QmpEvent } from '../control/qmp-client.js';

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${units[u]}`;
}

/** 0:06, 12:34, 1:02:03; '--:--' when unknown */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** Copy rate over the last few seconds (the job's speed may change while it runs). */
export class RateMeter {
  private samples: { t: number; offset: number }[] = [];
  constructor(private readonly windowMs = 5000) {}

  add(tMs: number, offset: number): void {
    this.samples.push({ t: tMs, offset });
    while (this.samples.length > 2 && tMs - this.samples[1]!.t >= this.windowMs) this.samples.shift();
  }

  /** bytes per second, or null before two samples a measurable time apart */
  rate(): number | null {
    const a = this.samples[0];
    const b = this.samples[this.samples.length - 1];
    if (!a || !b || b.t - a.t < 200) return null;
    return Math.max(0, ((b.offset - a.offset) * 1000) / (b.t - a.t));
  }
}

export interface Progress {
  offset: number;
  total: number;
  /** bytes per second, null while unknown */
  rate: number | null;
}

function parts(p: Progress): { percent: string; amounts: string; rate: string; eta: string } {
  const frac = p.total > 0 ? Math.min(1, p.offset / p.total) : 1;
  const eta = p.rate && p.rate > 0 ? (p.total - p.offset) / p.rate : p.offset >= p.total ? 0 : null;
  return {
    percent: `${(frac * 100).toFixed(1).padStart(5)}%`,
    amounts: `${formatBytes(p.offset)} / ${formatBytes(p.total)}`,
    rate: p.rate === null ? '--/s' : `${formatBytes(Math.round(p.rate))}/s`,
    eta: `ETA ${formatDuration(eta)}`,
  };
}

/** One line with a bar that fills what `width` leaves: "[#####.....]  45.2%  116.0 MiB / 256.0 MiB  24.1 MiB/s  ETA 0:06" */
export function progressBar(p: Progress, width: number): string {
  const x = parts(p);
  const text = `${x.percent}  ${x.amounts}  ${x.rate}  ${x.eta}`;
  const barWidth = Math.max(10, Math.min(50, width - text.length - 4));
  const frac = p.total > 0 ? Math.min(1, p.offset / p.total) : 1;
  const full = Math.floor(frac * barWidth);
  const bar = '#'.repeat(full) + '.'.repeat(barWidth - full);
  return `[${bar}] ${text}`.slice(0, Math.max(0, width));
}

/** The non-terminal form: "45.2% 116.0 MiB / 256.0 MiB 24.1 MiB/s ETA 0:06" */
export function progressText(p: Progress): string {
  const x = parts(p);
  return `${x.percent.trim()} ${x.amounts} ${x.rate} ${x.eta}`;
}

interface JobInfo {
  id: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

export interface WaitOptions {
  out: NodeJS.WriteStream;
  err: NodeJS.WriteStream;
  /** how often query-jobs is asked (and, off a terminal, a line printed) */
  intervalMs?: number;
}

/**
 * Waits until job `id` is READY (BLOCK_JOB_READY, or query-jobs says 'ready'), showing its progress.
 * Returns the exit code: 0 ready, 1 failed/cancelled/daemon gone, 130/143 interrupted (the job keeps running).
 */
export async function waitForJobReady(client: QmpClient, id: string, opts: WaitOptions): Promise<number> {
  const { out, err } = opts;
  const tty = out.isTTY === true;
  const intervalMs = opts.intervalMs ?? (tty ? 250 : 1000);
  const meter = new RateMeter();
  const started = Date.now();
  let last: Progress = { offset: 0, total: 0, rate: null };
  let drawn = false;
  let outcome: { code: number; message: string } | null = null;
  let wake: () => void = () => {};
  const finish = (code: number, message: string): void => {
    outcome ??= { code, message };
    wake();
  };
  const onEvent = (e: QmpEvent): void => {
    if (e.data.device !== id && e.data.id !== id) return;
    if (e.event === 'BLOCK_JOB_READY') finish(0, '');
    else if (e.event === 'BLOCK_JOB_CANCELLED') finish(1, `mirror ${id} was cancelled`);
    else if (e.event === 'BLOCK_JOB_COMPLETED') {
      if (e.data.error !== undefined) finish(1, `mirror ${id} failed: ${String(e.data.error)}`);
      else finish(1, `mirror ${id} completed (pivoted) before it was seen ready`);
    }
  };
  const prevOnEvent = client.onEvent;
  client.onEvent = (e) => {
    prevOnEvent?.(e);
    onEvent(e);
  };
  // Events that arrived between blockdev-mirror's reply and now
  for (const e of client.events) onEvent(e);
  const signals: [NodeJS.Signals, number][] = [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]];
  const handlers = signals.map(([sig, code]) => {
    const h = (): void => finish(code, `stopped waiting; job ${id} keeps running (vubd-ctl jobs, complete ${id}, cancel ${id})`);
    process.on(sig, h);
    return [sig, h] as const;
  });
  const draw = (final = false): void => {
    if (tty) {
      const width = Math.max(20, (out.columns ?? 80) - 1);
      out.write(`\r${progressBar(last, width)}\x1b[K${final ? '\n' : ''}`);
      drawn = !final;
    } else out.write(`mirror ${id}: ${progressText(last)}\n`);
  };
  try {
    while (outcome === null) {
      let jobs: JobInfo[];
      try {
        jobs = await client.execute<JobInfo[]>('query-jobs');
      } catch (e) {
        finish(1, `lost the daemon while waiting for ${id}: ${(e as Error).message}`);
        break;
      }
      const j = jobs.find((x) => x.id === id);
      if (!j) {
        finish(1, `job ${id} is gone (no longer in query-jobs)`);
        break;
      }
      meter.add(Date.now(), j['current-progress']);
      last = { offset: j['current-progress'], total: j['total-progress'], rate: meter.rate() };
      if (j.status === 'ready') finish(0, '');
      else if (j.status === 'concluded' || j.status === 'aborting') finish(1, j.error ? `mirror ${id} failed: ${j.error}` : `mirror ${id} was cancelled`);
      if (outcome !== null) break;
      draw();
      await new Promise<void>((r) => {
        const t = setTimeout(r, intervalMs);
        wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
  } finally {
    client.onEvent = prevOnEvent;
    for (const [sig, h] of handlers) process.off(sig, h);
  }
  const o = outcome!;
  if (o.code === 0) {
    // READY means one full pass was copied: the bar ends full whatever the last poll saw.
    last = { ...last, offset: last.total };
    const secs = (Date.now() - started) / 1000;
    if (tty) draw(true);
    out.write(
      `mirror ${id} ready: ${formatBytes(last.total)} copied in ${secs.toFixed(1)} s (${formatBytes(Math.round(last.total / Math.max(secs, 0.001)))}/s); ` +
        `next: vubd-ctl complete ${id} (pivot to the target) or cancel ${id}\n`,
    );
    return 0;
  }
  if (drawn) out.write('\n');
  err.write(`vubd-ctl: ${o.message}\n`);
  return o.code;
}
