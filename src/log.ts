// One pino logger for the process: JSON lines on stderr. Workers get child loggers by name.
import { pino, type Logger } from 'pino';

export type { Logger };

let root: Logger = pino({ level: process.env.VUBD_LOG_LEVEL ?? 'info', base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));

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
