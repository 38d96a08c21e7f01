// A small QMP client (used by vubd-ctl and the tests): connect, negotiate, execute, collect events.
import net from 'node:net';
import { JsonSplitter } from './qmp-server.js';

export class QmpCommandError extends Error {
  constructor(
    readonly errorClass: string,
    desc: string,
  ) {
    super(desc);
  }
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export class QmpClient {
  readonly events: QmpEvent[] = [];
  greeting: Record<string, unknown> | null = null;
  private readonly waiters = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private eventWaiters: { match: (e: QmpEvent) => boolean; resolve: (e: QmpEvent) => void; reject: (e: Error) => void }[] = [];
  private nextId = 1;
  /** called for every event as it arrives */
  onEvent: ((e: QmpEvent) => void) | null = null;
  /** set once the connection is gone (the daemon exited or closed it); later commands fail at once */
  closedReason: string | null = null;
  /** called once when the connection goes away */
  onClose: ((reason: string) => void) | null = null;

  private constructor(private readonly socket: net.Socket) {}

  static async connect(path: string): Promise<QmpClient> {
    const socket = net.createConnection(path);
    const c = new QmpClient(socket);
    const splitter = new JsonSplitter();
    const greeted = new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.setEncoding('utf8');
      socket.on('data', (chunk: string) => {
        for (const text of splitter.push(chunk)) {
          const msg = JSON.parse(text) as Record<string, unknown>;
          if ('QMP' in msg) {
            c.greeting = msg;
            resolve();
          } else c.onMessage(msg);
        }
      });
      let lastError: Error | null = null;
      // Kept after the greeting too: without a listener a reset connection is an uncaught error.
      socket.on('error', (e) => (lastError = e));
      socket.on('close', () => {
        const reason = lastError ? `QMP connection closed: ${lastError.message}` : 'QMP connection closed by the daemon';
        c.closedReason = reason;
        for (const w of c.waiters.values()) w.reject(new Error(reason));
        c.waiters.clear();
        for (const w of c.eventWaiters) w.reject(new Error(reason));
        c.eventWaiters = [];
        reject(new Error(reason)); // before the greeting; a no-op after it
        c.onClose?.(reason);
      });
    });
    await greeted;
    await c.execute('qmp_capabilities');
    return c;
  }

  private onMessage(msg: Record<string, unknown>): void {
    if ('event' in msg) {
      const ev = msg as unknown as QmpEvent;
      this.events.push(ev);
      this.onEvent?.(ev);
      this.eventWaiters = this.eventWaiters.filter((w) => {
        if (!w.match(ev)) return true;
        w.resolve(ev);
        return false;
      });
      return;
    }
    const id = msg.id as number;
    const w = this.waiters.get(id);
    if (!w) return;
    this.waiters.delete(id);
    if ('error' in msg) {
      const e = msg.error as { class: string; desc: string };
      w.reject(new QmpCommandError(e.class, e.desc));
    } else w.resolve(msg.return);
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    const id = this.nextId++;
    if (this.closedReason !== null) return Promise.reject(new Error(this.closedReason));
    return new Promise<T>((resolve, reject) => {
      this.waiters.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** Resolves with the first event (already received or future) that matches. */
  waitEvent(name: string, match: (e: QmpEvent) => boolean = () => true, timeoutMs = 30000): Promise<QmpEvent> {
    const seen = this.events.find((e) => e.event === name && match(e));
    if (seen) return Promise.resolve(seen);
    if (this.closedReason !== null) return Promise.reject(new Error(this.closedReason));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.eventWaiters = this.eventWaiters.filter((w) => w !== waiter);
        reject(new Error(`no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const waiter = {
        match: (e: QmpEvent) => e.event === name && match(e),
        resolve: (e: QmpEvent) => {
          clearTimeout(t);
          resolve(e);
        },
        reject: (e: Error) => {
          clearTimeout(t);
          reject(e);
        },
      };
      this.eventWaiters.push(waiter);
    });
  }

  close(): void {
    this.socket.end();
  }
}
