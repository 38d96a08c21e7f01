/**
 * libvirt for the e2e tests: a private libvirtd (system instance, so QEMU runs
 * as libvirt's unprivileged user, but on its own unix socket in the test's
 * directory) plus virtlogd, started here because systemd is not PID 1; virsh
 * against that socket; the domain and disk XML the README shows.
 *
 * Debian 12 (libvirt 9.0) ships the monolithic libvirtd; the QEMU driver
 * needs virtlogd for the domain log (stdio_handler = "logd"), not virtlockd
 * (lock_manager is off by default).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as net from "node:net";
import * as path from "node:path";
import { findExecutable } from "./guest.js";

/** libvirt's default QEMU user and group on Debian (qemu.conf user/group). */
export const QEMU_USER = "libvirt-qemu";
export const QEMU_GROUP = "libvirt-qemu";

const SBIN = ["/usr/sbin", "/sbin"];

function sbinExecutable(name: string): string | null {
  return findExecutable(name) ?? SBIN.map((d) => path.join(d, name)).find((p) => findExecutable(p) !== null) ?? null;
}

export const LIBVIRT_PACKAGES = "libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu";

/** Why libvirt cannot be driven here, or null. */
export function libvirtPrerequisiteProblem(): string | null {
  const missing = ["libvirtd", "virtlogd", "virsh"].filter((b) => sbinExecutable(b) === null);
  if (missing.length > 0) {
    return `${missing.join(", ")} not found: install the Debian packages ${LIBVIRT_PACKAGES}`;
  }
  if (!existsSync("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")) {
    return "libvirt's QEMU driver not found: install the Debian package libvirt-daemon-driver-qemu";
  }
  if (spawnSync("getent", ["passwd", QEMU_USER]).status !== 0) {
    return `no user ${QEMU_USER}: install the Debian package libvirt-daemon-system`;
  }
  if (process.getuid?.() !== 0) return "the libvirt test runs libvirtd's system instance: run it as root";
  return null;
}

function canConnect(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

async function waitForSocket(p: string, child: ChildProcess, logs: () => string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await canConnect(p))) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${child.spawnfile} exited (${child.exitCode ?? child.signalCode}) before serving ${p}:\n${logs()}`);
    }
    if (Date.now() > deadline) throw new Error(`${child.spawnfile} did not serve ${p} in time:\n${logs()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function startChild(bin: string, args: string[]): { child: ChildProcess; logs: () => string } {
  const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] });
  let logs = "";
  child.stdout?.setEncoding("utf8").on("data", (d: string) => (logs += d));
  child.stderr?.setEncoding("utf8").on("data", (d: string) => (logs += d));
  child.on("error", (err) => (logs += `spawn error: ${err.message}\n`));
  return { child, logs: () => logs };
}

async function stopChild(child: ChildProcess, timeoutMs = 10_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  await exited;
  clearTimeout(timer);
}

export interface Libvirt {
  /** virsh connection URI (the private socket, or the running system instance's). */
  readonly uri: string;
  /** libvirtd's (and virtlogd's, when ours) output: errors are logged to stderr. */
  logs(): string;
  virsh(...args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }>;
  /** Stop what we started and remove the run directory libvirtd created, if it was not there before. */
  stop(): Promise<void>;
}

/**
 * Start virtlogd (unless one already serves /run/libvirt/virtlogd-sock) and a
 * libvirtd on `dir`/libvirt-sock. A system libvirtd already running here is
 * used instead: two privileged libvirtds would share /run/libvirt/qemu.
 */
export async function startLibvirt(dir: string): Promise<Libvirt> {
  const runDirExisted = existsSync("/run/libvirt");
  const children: ChildProcess[] = [];
  const logSources: Array<() => string> = [];
  const stop = async () => {
    for (const c of children.reverse()) await stopChild(c);
    if (!runDirExisted) await fsp.rm("/run/libvirt", { recursive: true, force: true });
  };
  try {
    let uri = "qemu:///system";
    if (!(await canConnect("/run/libvirt/libvirt-sock"))) {
      if (!(await canConnect("/run/libvirt/virtlogd-sock"))) {
        const vl = startChild(sbinExecutable("virtlogd")!, ["--pid-file", path.join(dir, "virtlogd.pid")]);
        children.push(vl.child);
        logSources.push(vl.logs);
        await waitForSocket("/run/libvirt/virtlogd-sock", vl.child, vl.logs, 15_000);
      }
      const conf = path.join(dir, "libvirtd.conf");
      await fsp.writeFile(
        conf,
        [
          `unix_sock_dir = "${dir}"`,
          `unix_sock_rw_perms = "0700"`,
          `unix_sock_ro_perms = "0700"`,
          `auth_unix_rw = "none"`,
          `auth_unix_ro = "none"`,
          // warnings and errors to stderr (the test shows them on failure)
          `log_outputs = "3:stderr"`,
          "",
        ].join("\n"),
      );
      const lv = startChild(sbinExecutable("libvirtd")!, ["--config", conf, "--pid-file", path.join(dir, "libvirtd.pid")]);
      children.push(lv.child);
      logSources.push(lv.logs);
      const sock = path.join(dir, "libvirt-sock");
      await waitForSocket(sock, lv.child, lv.logs, 30_000);
      uri = `qemu:///system?socket=${sock}`;
    }
    const virshBin = sbinExecutable("virsh")!;
    return {
      uri,
      logs: () => logSources.map((l) => l()).join(""),
      virsh: (...args: string[]) => run(virshBin, ["-c", uri, ...args]),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

function run(bin: string, args: string[], timeoutMs = 120_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** A vhostuser disk as the README shows it: only the socket and the target; the rest is vubd's. */
export function vhostUserDiskXml(socketPath: string, target: string, opts: { reconnect?: boolean } = {}): string {
  const source =
    opts.reconnect === false
      ? `<source type='unix' path='${socketPath}'/>`
      : `<source type='unix' path='${socketPath}'>
    <reconnect enabled='yes' timeout='10'/>
  </source>`;
  return `<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw'/>
  ${source}
  <target dev='${target}' bus='virtio'/>
</disk>
`;
}

/** The README's domain: TCG, direct kernel boot, memfd shared memory, a vhostuser disk, serial to a file. */
export function domainXml(opts: {
  name: string;
  kernel: string;
  initrd: string;
  cmdline: string;
  diskXml: string;
  consoleLog: string;
  memMiB?: number;
}): string {
  const indent = (s: string, n: number) => s.trimEnd().split("\n").map((l) => " ".repeat(n) + l).join("\n");
  return `<domain type='qemu'>
  <name>${opts.name}</name>
  <memory unit='MiB'>${opts.memMiB ?? 512}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${opts.kernel}</kernel>
    <initrd>${opts.initrd}</initrd>
    <cmdline>${opts.cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
${indent(opts.diskXml, 4)}
    <serial type='file'>
      <source path='${opts.consoleLog}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}
