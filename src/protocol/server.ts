// Listens on the vhost-user socket and runs one Session at a time. A frontend that connects while
// a session is still open or closing waits in line (its bytes stay unread in its socket) and is
// served as soon as that session has ended, like qemu-storage-daemon, which stops accepting while
// a client is connected. After a frontend disconnects the same socket serves the next one.
import fs from 'node:fs';
import { native, READABLE, DISCONNECT, type PollHandle } from '../native/index.js';
import { createSocketFile, DEFAULT_SOCKET_ACCESS, type SocketAccess } from './socket-file.js';
import { peerAllowed, type PeerPolicy } from './peer-policy.js';
import type { Logger } from '../log.js';
import type { VhostBackend } from './backend.js';
import { Session } from './session.js';

/** connections the kernel holds before accept(); beyond MAX_WAITING the kernel's queue is the line */
export const LISTEN_BACKLOG = 64;
/** accepted connections kept waiting for their turn; while full we stop accepting */
export const MAX_WAITING = 16;
/** pause before accepting again after accept() failed (EMFILE and the like): never a busy loop */
const ACCEPT_RETRY_MS = 100;

export interface ListenOptions {
  /** mode and owner of the socket file (listen only) */
  access?: SocketAccess;
  /** --allow-uid/--allow-gid; null or absent: every peer that can open the socket */
  peers?: PeerPolicy | null;
  /** a frontend's session started (true) or ended (false): systemd STATUS= lines */
  onSessionChange?: (connected: boolean, conn: number) => void;
}

/** Throws a clear error unless fd is a listening unix stream socket (an inherited --fd or LISTEN_FDS fd). */
export function assertListeningUnixStream(fd: number, what = `fd ${fd}`): void {
  let info;
  try {
    info = native.socketInfo(fd);
  } catch (e) {
    throw new Error(`${what} is not a usable socket: ${(e as Error).message}`);
  }
  if (!info.unix || !info.stream) throw new Error(`${what} is not a unix stream socket`);
  if (!info.listening) throw new Error(`${what} is a unix stream socket but not listening (pass a socket after listen(), not a connection)`);
}

interface WaitingPeer {
  fd: number;
  id: number;
  log: Logger;
  since: number;
  /** watches only for the peer hanging up, so its unread messages do not wake us */
  poll: PollHandle;
}

export class VhostUserServer {
  private poll: PollHandle | null = null;
  private accepting = false;
  private retryTimer: NodeJS.Timeout | null = null;
  private session: Session | null = null;
  private readonly waiting: WaitingPeer[] = [];
  private closing = false;
  private connections = 0;

  private constructor(
    readonly listenFd: number,
    readonly socketPath: string | null,
    private readonly backend: VhostBackend,
    private readonly log: Logger,
    private readonly peers: PeerPolicy | null,
    private readonly onSessionChange: ((connected: boolean, conn: number) => void) | null,
  ) {}

  /**
   * Binds the socket path with its mode and owner set before it appears (socket-file.ts); refuses
   * a symlink, a non-socket or a path a live process is serving, replaces a stale socket.
   */
  static listen(socketPath: string, backend: VhostBackend, log: Logger, opts: ListenOptions = {}): VhostUserServer {
    const fd = createSocketFile(socketPath, opts.access ?? DEFAULT_SOCKET_ACCESS, LISTEN_BACKLOG);
    return new VhostUserServer(fd, socketPath, backend, log, opts.peers ?? null, opts.onSessionChange ?? null);
  }

  /** Uses an already listening socket passed by the parent (--fd, systemd socket activation). */
  static fromFd(fd: number, backend: VhostBackend, log: Logger, opts: ListenOptions = {}): VhostUserServer {
    assertListeningUnixStream(fd);
    native.setBlocking(fd, false);
    return new VhostUserServer(fd, null, backend, log, opts.peers ?? null, opts.onSessionChange ?? null);
  }

  start(): void {
    this.poll = native.poll(this.listenFd, READABLE, () => this.onAcceptable());
    this.accepting = true;
  }

  get activeSession(): Session | null {
    return this.session;
  }

  /** frontends accepted and waiting for the current session to end */
  get waitingCount(): number {
    return this.waiting.length;
  }

  private setAccepting(on: boolean): void {
    if (this.closing || this.poll === null || on === this.accepting) return;
    this.accepting = on;
    if (on) this.poll.start(READABLE);
    else this.poll.stop();
  }

  private onAcceptable(): void {
    while (this.accepting && !this.closing) {
      let fd: number;
      try {
        fd = native.accept(this.listenFd);
      } catch (err) {
        this.log.error({ err }, `accept failed; retrying in ${ACCEPT_RETRY_MS} ms`);
        this.setAccepting(false);
        this.retryTimer = setTimeout(() => {
          this.retryTimer = null;
          if (this.waiting.length < MAX_WAITING) this.setAccepting(true);
        }, ACCEPT_RETRY_MS);
        return;
      }
      if (fd < 0) return;
      const id = ++this.connections;
      const log = this.log.child({ conn: id });
      if (this.peers !== null && !this.admit(fd, log)) continue;
      if (this.session === null) this.serve(fd, id, log);
      else this.wait(fd, id, log);
    }
  }

  /** --allow-uid/--allow-gid: a refused peer is closed at once, before any message is read */
  private admit(fd: number, log: Logger): boolean {
    let cred;
    try {
      cred = native.peerCred(fd);
    } catch (err) {
      log.warn({ err }, 'frontend refused: cannot read its credentials (SO_PEERCRED)');
      native.close(fd);
      return false;
    }
    if (peerAllowed(this.peers!, cred)) {
      log.debug({ peer: cred }, 'frontend allowed by --allow-uid/--allow-gid');
      return true;
    }
    native.close(fd);
    log.warn(
      { peer: { uid: cred.uid, gid: cred.gid, pid: cred.pid, groups: cred.groups } },
      `frontend refused: uid ${cred.uid} gid ${cred.gid} (pid ${cred.pid}) is not allowed by --allow-uid/--allow-gid`,
    );
    return false;
  }

  private wait(fd: number, id: number, log: Logger): void {
    let poll: PollHandle;
    try {
      poll = native.poll(fd, DISCONNECT, () => this.onWaitingHangup(id));
    } catch (err) {
      log.error({ err }, 'cannot watch a waiting frontend; closing it');
      native.close(fd);
      return;
    }
    this.waiting.push({ fd, id, log, since: Date.now(), poll });
    log.info({ waiting: this.waiting.length }, 'frontend waiting: another frontend is being served');
    // A full line stops accept(): further frontends wait in the kernel's listen queue.
    if (this.waiting.length >= MAX_WAITING) this.setAccepting(false);
  }

  private onWaitingHangup(id: number): void {
    const i = this.waiting.findIndex((w) => w.id === id);
    if (i < 0) return;
    const [w] = this.waiting.splice(i, 1);
    w!.poll.close();
    native.close(w!.fd);
    w!.log.info({ waitedMs: Date.now() - w!.since }, 'waiting frontend disconnected before its turn');
    this.setAccepting(true);
  }

  private serve(fd: number, id: number, log: Logger, waitedMs?: number): void {
    log.info(waitedMs === undefined ? {} : { waitedMs }, 'frontend connected');
    const s = new Session(fd, this.backend, log);
    this.session = s;
    this.onSessionChange?.(true, id);
    void s.closed.then(() => {
      if (this.session === s) this.session = null;
      log.info('session ended; waiting for the next frontend');
      if (!this.closing) {
        this.onSessionChange?.(false, id);
        this.serveNext();
      }
    });
  }

  /** Serves the longest-waiting frontend, then lets the kernel's queue in again. */
  private serveNext(): void {
    const w = this.waiting.shift();
    if (w !== undefined) {
      w.poll.close(); // before the Session polls the same fd: one uv_poll per fd
      this.serve(w.fd, w.id, w.log, Date.now() - w.since);
    }
    if (this.retryTimer === null) this.setAccepting(true);
    // A frontend still in the kernel's queue is picked up by the listen poll (level-triggered).
  }

  /** a frontend is being served or waits for its turn */
  get hasFrontend(): boolean {
    return this.session !== null || this.waiting.length > 0;
  }

  async close(): Promise<void> {
    this.closing = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.poll?.close();
    this.poll = null;
    native.close(this.listenFd);
    if (this.socketPath) fs.rmSync(this.socketPath, { force: true });
    for (const w of this.waiting.splice(0)) {
      w.poll.close();
      native.close(w.fd);
    }
    const s = this.session;
    if (s) {
      s.close();
      await s.closed;
    }
  }
}
