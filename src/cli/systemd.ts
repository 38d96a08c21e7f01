// systemd integration without libsystemd: socket activation (sd_listen_fds: LISTEN_FDS,
// LISTEN_PID, LISTEN_FDNAMES, fds from 3) and readiness (sd_notify over NOTIFY_SOCKET).
import { native } from '../native/index.js';
import type { Logger } from '../log.js';

const SD_LISTEN_FDS_START = 3;

export interface ActivatedSockets {
  /** the vhost-user listening socket */
  vhost: number | null;
  /** the fd named `control` in LISTEN_FDNAMES: the QMP socket */
  control: number | null;
}

/**
 * Takes the sockets systemd passed, and removes the variables so that no child inherits them.
 * null when none were passed to this process (no LISTEN_FDS, or LISTEN_PID names another process).
 */
export function takeListenFds(env: NodeJS.ProcessEnv, pid: number): ActivatedSockets | null {
  const pidText = env.LISTEN_PID;
  const fdsText = env.LISTEN_FDS;
  const namesText = env.LISTEN_FDNAMES;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (fdsText === undefined || pidText === undefined) return null;
  if (!/^\d+$/.test(pidText) || Number(pidText) !== pid) return null; // meant for another process
  if (!/^\d+$/.test(fdsText)) throw new Error(`LISTEN_FDS must be a number, got '${fdsText}'`);
  const n = Number(fdsText);
  if (n === 0) return null;
  if (n > 2) throw new Error(`systemd passed ${n} sockets; vubd takes one (vhost-user) or two (plus one named 'control')`);
  const names = namesText === undefined ? [] : namesText.split(':');
  const out: ActivatedSockets = { vhost: null, control: null };
  for (let i = 0; i < n; i++) {
    const fd = SD_LISTEN_FDS_START + i;
    if (names[i] === 'control') {
      if (out.control !== null) throw new Error("systemd passed two sockets named 'control'");
      out.control = fd;
    } else {
      if (out.vhost !== null) throw new Error(`systemd passed two vhost-user sockets; name the QMP one 'control' (FileDescriptorName=control), names: '${namesText ?? ''}'`);
      out.vhost = fd;
    }
  }
  return out;
}

/** sd_notify: READY=1, STATUS=..., STOPPING=1 to $NOTIFY_SOCKET (a path or @abstract). */
export class Notifier {
  private readonly socket: string | null;
  private failed = false;

  constructor(
    env: NodeJS.ProcessEnv,
    private readonly log: Logger,
  ) {
    this.socket = env.NOTIFY_SOCKET ?? null;
    delete env.NOTIFY_SOCKET;
    if (this.socket === '') this.socket = null;
  }

  get enabled(): boolean {
    return this.socket !== null;
  }

  ready(status: string): void {
    this.send(`READY=1\nMAINPID=${process.pid}\nSTATUS=${status}`);
  }

  status(status: string): void {
    this.send(`STATUS=${status}`);
  }

  stopping(): void {
    this.send('STOPPING=1\nSTATUS=stopping');
  }

  private send(text: string): void {
    if (this.socket === null) return;
    try {
      native.sendDatagram(this.socket, new TextEncoder().encode(text));
    } catch (err) {
      // Readiness is advisory for vubd itself: keep serving, say it once.
      if (!this.failed) this.log.warn({ err, notifySocket: this.socket }, 'cannot notify systemd (NOTIFY_SOCKET); further notifications may be lost');
      this.failed = true;
    }
  }
}
