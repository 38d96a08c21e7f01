// Listens on the vhost-user socket and runs one Session at a time. After a frontend disconnects
// (QEMU restarts or reconnects), the same socket accepts the next one.
import fs from 'node:fs';
import { native, isErrno, READABLE, type PollHandle } from '../native/index.js';
import type { Logger } from '../log.js';
import type { VhostBackend } from './backend.js';
import { Session } from './session.js';

export class VhostUserServer {
  private poll: PollHandle | null = null;
  private session: Session | null = null;
  private closing = false;
  private connections = 0;

  private constructor(
    readonly listenFd: number,
    readonly socketPath: string | null,
    private readonly backend: VhostBackend,
    private readonly log: Logger,
  ) {}

  /** Binds the socket path; refuses a path a live process is serving, replaces a stale one. */
  static listen(socketPath: string, backend: VhostBackend, log: Logger): VhostUserServer {
    if (fs.existsSync(socketPath)) {
      const st = fs.lstatSync(socketPath);
      if (!st.isSocket()) throw new Error(`${socketPath} exists and is not a socket; refusing to replace it`);
      let live = false;
      try {
        native.close(native.connectUnix(socketPath));
        live = true;
      } catch (e) {
        if (!isErrno(e, 'ECONNREFUSED')) throw e;
      }
      if (live) throw new Error(`${socketPath} is in use by another process`);
      fs.unlinkSync(socketPath);
    }
    const fd = native.listenUnix(socketPath, 4);
    return new VhostUserServer(fd, socketPath, backend, log);
  }

  /** Uses an already listening socket passed by the parent (--fd). */
  static fromFd(fd: number, backend: VhostBackend, log: Logger): VhostUserServer {
    native.setBlocking(fd, false);
    return new VhostUserServer(fd, null, backend, log);
  }

  start(): void {
    this.poll = native.poll(this.listenFd, READABLE, () => this.onAcceptable());
  }

  get activeSession(): Session | null {
    return this.session;
  }

  private onAcceptable(): void {
    for (;;) {
      let fd: number;
      try {
        fd = native.accept(this.listenFd);
      } catch (err) {
        this.log.error({ err }, 'accept failed');
        return;
      }
      if (fd < 0) return;
      if (this.session !== null || this.closing) {
        this.log.warn('refusing a second vhost-user connection: only one frontend at a time is served');
        native.close(fd);
        continue;
      }
      const id = ++this.connections;
      const log = this.log.child({ conn: id });
      log.info('frontend connected');
      const s = new Session(fd, this.backend, log);
      this.session = s;
      void s.closed.then(() => {
        if (this.session === s) this.session = null;
        log.info('session ended; waiting for the next frontend');
      });
    }
  }

  async close(): Promise<void> {
    this.closing = true;
    this.poll?.close();
    this.poll = null;
    native.close(this.listenFd);
    if (this.socketPath) fs.rmSync(this.socketPath, { force: true });
    const s = this.session;
    if (s) {
      s.close();
      await s.closed;
    }
  }
}
