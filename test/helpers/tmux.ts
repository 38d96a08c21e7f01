// A real terminal for CLI tests: a private tmux server (its own socket, no user config) running
// one command in a detached session of a given size; the test reads the screen as a person would.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { findExecutable, isCI } from '../e2e/guest.js';

/** The skip reason when tmux is missing; under CI=true the test must run (and fail) instead. */
export function tmuxSkip(): string | false {
  if (findExecutable('tmux')) return false;
  return isCI() ? false : 'tmux is not installed (Debian package tmux)';
}

export class Tmux {
  private readonly socket: string;

  constructor(dir: string, name = 'tmux') {
    if (!findExecutable('tmux')) throw new Error('tmux is not installed (Debian package tmux); required under CI=true');
    this.socket = path.join(dir, `${name}.sock`);
  }

  private tmux(...args: string[]): string {
    return execFileSync('tmux', ['-S', this.socket, '-f', '/dev/null', ...args], {
      encoding: 'utf8',
      env: { ...process.env, TERM: process.env.TERM || 'xterm-256color' },
    });
  }

  /** Starts `shellCommand` (run by sh -c) in a width x height window. */
  start(shellCommand: string, width: number, height: number): void {
    this.tmux('new-session', '-d', '-s', 'test', '-x', String(width), '-y', String(height), shellCommand);
    // the window keeps the size we give it, not a client's (there is none)
    this.tmux('set-option', '-g', 'window-size', 'manual');
  }

  /** The visible screen, one string per row (trailing blanks trimmed by tmux). */
  capture(): string[] {
    return this.tmux('capture-pane', '-p', '-t', 'test').replace(/\n$/, '').split('\n');
  }

  /** tmux format variables of the pane, e.g. '#{alternate_on}' */
  display(format: string): string {
    return this.tmux('display-message', '-p', '-t', 'test', format).trim();
  }

  sendKeys(...keys: string[]): void {
    this.tmux('send-keys', '-t', 'test', ...keys);
  }

  resize(width: number, height: number): void {
    this.tmux('resize-window', '-t', 'test', '-x', String(width), '-y', String(height));
  }

  /** Polls the screen until `match` returns something truthy; fails with the last screen. */
  async waitFor<T>(what: string, match: (lines: string[]) => T | null | undefined | false, timeoutMs = 30000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    let lines: string[] = [];
    for (;;) {
      lines = this.capture();
      const hit = match(lines);
      if (hit) return hit;
      if (Date.now() > deadline) throw new Error(`${what}: not on the screen within ${timeoutMs / 1000} s; screen:\n${lines.join('\n')}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  kill(): void {
    try {
      this.tmux('kill-server');
    } catch {
      // already gone
    }
  }
}
