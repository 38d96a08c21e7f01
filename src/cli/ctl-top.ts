// vubd-ctl top: a live view of a running daemon (query-stats every interval). On a terminal it
// takes the alternate screen, redraws in place, follows resizes and gives the terminal back on
// q, Ctrl-C and signals; on a pipe it prints one plain snapshot per interval.
import { performance } from 'node:perf_hooks';
import type { QmpClient } from '../control/qmp-client.js';
import { buildView, renderView, type ExportInfo, type ExportStats, type Sample, type TopView } from './top-model.js';

export interface TopOptions {
  intervalS: number;
  once: boolean;
}

export function parseTopArgs(args: string[]): TopOptions {
  const o: TopOptions = { intervalS: 1, once: false };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--once') {
      o.once = true;
      continue;
    }
    let v: string | undefined;
    if (a.startsWith('--interval=')) v = a.slice('--interval='.length);
    else if (a === '--interval') v = args[++i];
    else throw new Error(`top: unknown argument '${a}' (top [--interval=SECONDS] [--once])`);
    const n = Number(v);
    if (v === undefined || v.trim() === '' || !Number.isFinite(n) || n < 0.1 || n > 3600) {
      throw new Error(`top: --interval must be a number of seconds from 0.1 to 3600, got '${v ?? ''}'`);
    }
    o.intervalS = n;
  }
  return o;
}

const ENTER = '\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J';
const LEAVE = '\x1b[?25h\x1b[?1049l';

interface Outcome {
  code: number;
  message?: string;
}

/** Runs top until the user quits, a signal arrives or the daemon goes away; returns the exit code. */
export async function runTop(client: QmpClient, control: string, opts: TopOptions, out = process.stdout, input = process.stdin): Promise<number> {
  const tty = out.isTTY === true && !opts.once;
  const timeoutMs = Math.max(5000, 3000 * opts.intervalS);
  let outcome: Outcome | null = null;
  let wake: () => void = () => {};
  const stop = (o: Outcome): void => {
    outcome ??= o;
    wake();
  };
  const sleep = (ms: number): Promise<void> =>
    new Promise((r) => {
      const t = setTimeout(r, ms);
      wake = () => {
        clearTimeout(t);
        r();
      };
      if (outcome !== null) wake();
    });

  const sample = async (): Promise<Sample> => {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the daemon did not answer query-stats within ${timeoutMs / 1000} s`)), timeoutMs);
    });
    try {
      const [stats, info] = await Promise.race([
        Promise.all([client.execute<{ exports: ExportStats[] }>('query-stats'), client.execute<ExportInfo[]>('query-block-exports')]),
        late,
      ]);
      return { t: performance.now(), exports: stats.exports, info };
    } finally {
      clearTimeout(timer);
    }
  };
  const lost = (e: unknown): Outcome => ({ code: 1, message: `vubd-ctl top: lost the daemon at ${control}: ${(e as Error).message}` });
  client.onClose = (reason) => stop({ code: 1, message: `vubd-ctl top: lost the daemon at ${control}: ${reason}` });

  const signals: [NodeJS.Signals, number][] = [['SIGINT', 0], ['SIGTERM', 143], ['SIGHUP', 129]];
  const handlers = signals.map(([sig, code]) => {
    const h = (): void => stop({ code });
    process.on(sig, h);
    return [sig, h] as const;
  });
  // A reader that went away (top | head) ends top quietly.
  const onOutError = (): void => stop({ code: 0 });
  out.on('error', onOutError);

  const title = (): string => `vubd top - ${control} - every ${opts.intervalS} s - ${new Date().toTimeString().slice(0, 8)}${tty ? ' - q quits' : ''}`;
  let view: TopView | null = null;
  const draw = (): void => {
    if (!view) return;
    if (tty) {
      const width = out.columns ?? 80;
      const height = out.rows ?? 24;
      const lines = renderView(view, { width, height, title: title() });
      // Clear to end of line only when the line is shorter than the window: at the last column
      // the cursor waits to wrap and an erase there would eat the line's last character.
      const text = lines.map((l) => (l.length < width ? `${l}\x1b[K` : l)).join('\r\n');
      out.write(`\x1b[H${text}${lines.length < height ? '\x1b[J' : ''}`);
    } else {
      out.write(renderView(view, { width: null, height: null, title: title() }).join('\n') + '\n\n');
    }
  };

  let restoreTerminal = (): void => {};
  if (tty) {
    out.write(ENTER);
    const rawBefore = input.isTTY ? input.isRaw : false;
    const onKey = (d: Buffer): void => {
      const s = d.toString('latin1');
      if (s.includes('q') || s.includes('Q') || s.includes('\x03')) stop({ code: 0 });
    };
    if (input.isTTY) {
      input.setRawMode(true);
      input.on('data', onKey);
      input.resume();
    }
    const onResize = (): void => draw();
    out.on('resize', onResize);
    let restored = false;
    // Also on an unexpected exit: a terminal left in raw mode on the alternate screen is unusable.
    const onExit = (): void => restoreTerminal();
    process.on('exit', onExit);
    restoreTerminal = () => {
      if (restored) return;
      restored = true;
      out.off('resize', onResize);
      process.off('exit', onExit);
      if (input.isTTY) {
        input.off('data', onKey);
        input.setRawMode(rawBefore);
        input.pause();
      }
      out.write(LEAVE);
    };
  }

  try {
    let prev: Sample | null = null;
    try {
      prev = await sample();
    } catch (e) {
      stop(lost(e));
    }
    if (tty && prev) {
      view = buildView(null, prev);
      draw();
    }
    while (outcome === null) {
      await sleep(opts.intervalS * 1000);
      if (outcome !== null) break;
      let cur: Sample;
      try {
        cur = await sample();
      } catch (e) {
        stop(lost(e));
        break;
      }
      view = buildView(prev, cur);
      prev = cur;
      draw();
      if (opts.once) stop({ code: 0 });
    }
  } finally {
    restoreTerminal();
    client.onClose = null;
    out.off('error', onOutError);
    for (const [sig, h] of handlers) process.off(sig, h);
  }
  const o = outcome as Outcome | null;
  if (o?.message) process.stderr.write(`${o.message}\n`);
  return o?.code ?? 0;
}
