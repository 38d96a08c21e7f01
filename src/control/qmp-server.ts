// The QMP wire protocol on a unix socket (mode 0600 unless --control-mode), so that QMP clients (qmp-shell, python
// qemu.qmp, socat) work: greeting, capabilities negotiation, {"execute","arguments","id"} ->
// {"return"} or {"error":{"class","desc"}}, and timestamped events.
import fs from 'node:fs';
import net from 'node:net';
import type { Logger } from '../log.js';
import { createSocketFile, DEFAULT_SOCKET_ACCESS, type SocketAccess } from '../protocol/socket-file.js';

export class QmpError extends Error {
  constructor(
    readonly errorClass: 'GenericError' | 'CommandNotFound' | 'DeviceNotFound' | 'DeviceNotActive',
    desc: string,
  ) {
    super(desc);
  }
}

export type CommandHandler = (args: Record<string, unknown>) => unknown | Promise<unknown>;

const MAX_MESSAGE = 1 << 20;

/** Splits a byte stream into top-level JSON values (QMP does not require newlines). */
export class JsonSplitter {
  private buf = '';
  private depth = 0;
  private inString = false;
  private escaped = false;
  private start = -1;

  push(chunk: string): string[] {
    const out: string[] = [];
    const base = this.buf.length;
    this.buf += chunk;
    for (let i = base; i < this.buf.length; i++) {
      const ch = this.buf[i]!;
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (ch === '\\') this.escaped = true;
        else if (ch === '"') this.inString = false;
        continue;
      }
      if (ch === '"') this.inString = true;
      else if (ch === '{' || ch === '[') {
        if (this.depth++ === 0) this.start = i;
      } else if (ch === '}' || ch === ']') {
        if (this.depth > 0 && --this.depth === 0) {
          out.push(this.buf.slice(this.start, i + 1));
          this.start = -1;
        }
      } else if (this.depth === 0 && !/\s/.test(ch)) {
        out.push(ch); // a stray token: reported as a parse error by the caller
      }
    }
    if (this.depth === 0) this.buf = '';
    else if (this.start > 0) {
      this.buf = this.buf.slice(this.start);
      this.start = 0;
    }
    if (this.buf.length > MAX_MESSAGE) throw new Error('QMP message too large');
    return out;
  }
}

function timestamp(): { seconds: number; microseconds: number } {
  const now = Date.now() * 1000 + (Math.floor(performance.now() * 1000) % 1000);
  return { seconds: Math.floor(now / 1e6), microseconds: now % 1e6 };
}

export class QmpServer {
  private readonly server: net.Server;
  private readonly clients = new Set<{ socket: net.Socket; ready: boolean }>();

  constructor(
    /** null for a socket passed by systemd (the file is not ours to remove) */
    readonly socketPath: string | null,
    private readonly commands: ReadonlyMap<string, CommandHandler>,
    private readonly version: string,
    private readonly log: Logger,
  ) {
    this.server = net.createServer((s) => this.onConnection(s));
  }

  /** Creates the socket file with its mode and owner set before it appears (socket-file.ts). */
  listen(access: SocketAccess = DEFAULT_SOCKET_ACCESS): Promise<void> {
    if (this.socketPath === null) throw new Error('QmpServer.listen needs a socket path; use listenFd for an inherited socket');
    return this.listenFd(createSocketFile(this.socketPath, access, 16));
  }

  /** Serves an already listening unix socket (created by listen(), or passed by systemd). */
  listenFd(fd: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ fd }, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  emit(event: string, data: Record<string, unknown>): void {
    const line = JSON.stringify({ event, data, timestamp: timestamp() }) + '\r\n';
    for (const c of this.clients) if (c.ready) c.socket.write(line);
  }

  async close(): Promise<void> {
    for (const c of this.clients) c.socket.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    if (this.socketPath !== null) fs.rmSync(this.socketPath, { force: true });
  }

  private onConnection(socket: net.Socket): void {
    const client = { socket, ready: false };
    this.clients.add(client);
    const splitter = new JsonSplitter();
    let queue = Promise.resolve();
    const send = (v: unknown): void => {
      if (!socket.destroyed) socket.write(JSON.stringify(v) + '\r\n');
    };
    send({ QMP: { version: { qemu: { major: 0, minor: 0, micro: 0 }, package: `vubd ${this.version}` }, capabilities: [] } });
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      let messages: string[];
      try {
        messages = splitter.push(chunk);
      } catch (err) {
        this.log.warn({ err }, 'closing QMP client');
        socket.destroy();
        return;
      }
      for (const text of messages) queue = queue.then(() => this.handle(client, text, send));
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.clients.delete(client));
  }

  private async handle(client: { ready: boolean }, text: string, send: (v: unknown) => void): Promise<void> {
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      send({ error: { class: 'GenericError', desc: `JSON parse error, ${(e as Error).message}` } });
      return;
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      send({ error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } });
      return;
    }
    const m = msg as { execute?: unknown; arguments?: unknown; id?: unknown };
    const id = 'id' in m ? { id: m.id } : {};
    const fail = (cls: string, desc: string): void => send({ error: { class: cls, desc }, ...id });
    if (typeof m.execute !== 'string') return fail('GenericError', "QMP input lacks member 'execute'");
    if (m.arguments !== undefined && (typeof m.arguments !== 'object' || m.arguments === null || Array.isArray(m.arguments))) {
      return fail('GenericError', "QMP input member 'arguments' must be an object");
    }
    if (!client.ready) {
      if (m.execute !== 'qmp_capabilities') return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      client.ready = true;
      send({ return: {}, ...id });
      return;
    }
    if (m.execute === 'qmp_capabilities') return fail('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    const handler = this.commands.get(m.execute);
    if (!handler) return fail('CommandNotFound', `The command ${m.execute} has not been found`);
    try {
      const ret = await handler((m.arguments ?? {}) as Record<string, unknown>);
      send({ return: ret ?? {}, ...id });
      // Monitoring polls query-* all the time: only changes are worth an info line.
      const level = /^(x-)?query-/.test(m.execute) ? 'debug' : 'info';
      this.log[level]({ command: m.execute }, 'QMP command done');
    } catch (e) {
      const err = e as Error;
      const cls = e instanceof QmpError ? e.errorClass : 'GenericError';
      this.log.warn({ command: m.execute, error: err.message }, 'QMP command failed');
      fail(cls, err.message);
    }
  }
}
