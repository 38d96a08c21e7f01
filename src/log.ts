// One pino logger for the process: JSON lines on stderr, written asynchronously so that a slow or
// stalled reader of stderr (a paused pipe, a throttled journal) never blocks the event loop that
// answers QEMU and QMP. Exit paths await flushLogs(); pino's own exit hook writes what is left.
// Workers post their log records to the main thread, which logs them here.
import { pino, type Logger, type DestinationStream } from 'pino';

export type { Logger };

/** bytes of log lines held while stderr is not taking them; beyond this, lines are dropped, never the daemon */
const MAX_BUFFERED_LOG = 16 * 2 ** 20;

interface AsyncDestination extends DestinationStream {
  /** internals of pino's SonicBoom: a write is in the thread pool / bytes not yet written */
  _writing?: boolean;
  _len?: number;
  once(event: 'drain', cb: () => void): void;
  removeListener(event: 'drain', cb: () => void): void;
}

// minLength 0: a line goes out as soon as no write is in flight (operators and tests tail the log);
// lines that arrive while one is in flight are written together.
const destination = pino.destination({ fd: 2, sync: false, minLength: 0, maxLength: MAX_BUFFERED_LOG }) as unknown as AsyncDestination;

let root: Logger = pino({ level: process.env.VUBD_LOG_LEVEL ?? 'info', base: { pid: process.pid } }, destination);

function idle(): boolean {
  return !destination._writing && (destination._len ?? 0) === 0;
}

/** Resolves once every line logged so far has been written to stderr, or after timeoutMs. */
export function flushLogs(timeoutMs = 100): Promise<void> {
  if (idle()) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      destination.removeListener('drain', onDrain);
      resolve();
    };
    const onDrain = (): void => {
      if (idle()) done();
      else destination.once('drain', onDrain);
    };
    const timer = setTimeout(done, timeoutMs);
    destination.once('drain', onDrain);
  });
}

export function setLogLevel(level: string): void {
  root.level = level;
}

export function logger(name: string): Logger {
  return root.child({ mod: name });
}

export function rootLogger(): Logger {
  return root;
}

export function replaceRootLogger(l: Logger): void {
  root = l;
}
