/**
 * End-to-end guest harness: boots a tiny Linux guest (Debian 12 kernel +
 * busybox/fio initramfs built by scripts/guest/build.sh) under QEMU/TCG whose
 * disk is a vhost-user-blk device served by a backend daemon (vubd, or
 * qemu-storage-daemon as the reference), and collects the guest's console.
 *
 * The guest runs /tests/<testName>.sh (from scripts/guest/tests/) and prints
 * `VUBD-E2E-RESULT rc=<n>` before powering off.
 *
 * Always TCG: the nested /dev/kvm of our machines hangs stock guests.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync, statSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

// ---------------------------------------------------------------------------
// Paths

/** Repository root: the nearest ancestor holding package.json (works from dist/test/e2e and test/e2e). */
export const REPO_ROOT: string = (() => {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(path.join(dir, "package.json"))) return dir;
    dir = path.dirname(dir);
  }
  // Compiled layout: dist/test/e2e/guest.js -> ../../..
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
})();

export const GUEST_SCRIPTS_DIR = path.join(REPO_ROOT, "scripts", "guest");
export const GUEST_BUILD_SCRIPT = path.join(GUEST_SCRIPTS_DIR, "build.sh");
/** Where build.sh puts vmlinuz + initramfs.cpio.gz (override: VUBD_GUEST_OUT). */
export const DEFAULT_GUEST_OUT = process.env["VUBD_GUEST_OUT"] ?? path.join(GUEST_SCRIPTS_DIR, "out");
/** Compiled daemon entry point. */
export const VUBD_MAIN = path.join(REPO_ROOT, "dist", "src", "cli", "main.js");

/** The fio-verify guest test writes this 4 KiB block at MARKER_OFFSET. */
export const MARKER_OFFSET = 64 * 1024 * 1024;
export const MARKER_LENGTH = 4096;
export const RESULT_MARKER = "VUBD-E2E-RESULT";

/** True when $CI is set to something truthy (CI runs must not skip). */
export function isCI(): boolean {
  const v = process.env["CI"];
  return v !== undefined && v !== "" && v !== "0" && v.toLowerCase() !== "false";
}

/** Absolute path of an executable found on $PATH, or null. */
export function findExecutable(name: string): string | null {
  if (name.includes("/")) return isExecutable(name) ? name : null;
  for (const dir of (process.env["PATH"] ?? "").split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, name);
    if (isExecutable(p)) return p;
  }
  return null;
}

function isExecutable(p: string): boolean {
  try {
    const st = statSync(p);
    return st.isFile() && (st.mode & 0o111) !== 0;
  } catch {
    return false;
  }
}

/** qemu-system-x86_64 (override: VUBD_QEMU), or null when not installed (Debian package: qemu-system-x86). */
export function qemuBinary(): string | null {
  return findExecutable(process.env["VUBD_QEMU"] ?? "qemu-system-x86_64");
}

/** qemu-storage-daemon (Debian package: qemu-system-common), or null. */
export function qsdBinary(): string | null {
  return findExecutable(process.env["VUBD_QSD"] ?? "qemu-storage-daemon");
}

/** Host tools build.sh needs, each with the Debian package providing it; returns the missing ones. */
export function missingGuestBuildTools(): string[] {
  const needs: Array<[string, string]> = [
    ["busybox", "busybox-static"],
    ["fio", "fio"],
    ["apt-get", "apt"],
    ["dpkg-deb", "dpkg"],
  ];
  return needs.filter(([bin]) => findExecutable(bin) === null).map(([bin, pkg]) => `${bin} (${pkg})`);
}

/** Why a QEMU guest cannot run here (QEMU or the guest image's build tools missing), or null. */
export function guestPrerequisiteProblem(): string | null {
  if (qemuBinary() === null) {
    return "qemu-system-x86_64 not found: install the Debian package qemu-system-x86 (apt-get install qemu-system-x86)";
  }
  const missing = missingGuestBuildTools();
  if (missing.length > 0) {
    return `guest image build tools missing: ${missing.join(", ")} (apt-get install busybox-static fio)`;
  }
  return null;
}

/** The skip reason for an e2e test: a missing prerequisite skips it, except under CI=true, where it must run (and fail). */
export function e2eSkip(problem: string | null): string | false {
  return problem !== null && !isCI() ? problem : false;
}

// ---------------------------------------------------------------------------
// Guest image

export interface GuestImage {
  kernel: string;
  initrd: string;
  outDir: string;
}

function imagePaths(outDir: string): GuestImage {
  return {
    kernel: path.join(outDir, "vmlinuz"),
    initrd: path.join(outDir, "initramfs.cpio.gz"),
    outDir,
  };
}

/** True when vmlinuz and initramfs.cpio.gz exist in outDir (does not check they are up to date). */
export function guestImageAvailable(outDir: string = DEFAULT_GUEST_OUT): boolean {
  const img = imagePaths(outDir);
  return existsSync(img.kernel) && existsSync(img.initrd);
}

/**
 * Run scripts/guest/build.sh (cached: ~0.1 s when up to date, ~10-20 s cold)
 * and return the image paths. Throws with build.sh's output on failure.
 */
export async function ensureGuestImage(
  opts: { outDir?: string; timeoutMs?: number } = {},
): Promise<GuestImage> {
  const outDir = opts.outDir ?? DEFAULT_GUEST_OUT;
  const timeoutMs = opts.timeoutMs ?? 300_000;
  const { code, signal, stdout, stderr } = await runCommand("bash", [GUEST_BUILD_SCRIPT, outDir], timeoutMs);
  if (code !== 0 || !guestImageAvailable(outDir)) {
    throw new Error(
      `scripts/guest/build.sh failed (code=${code} signal=${signal}):\n${stdout}\n${stderr}`.trimEnd(),
    );
  }
  return imagePaths(outDir);
}

function runCommand(
  cmd: string,
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

// ---------------------------------------------------------------------------
// Booting the guest

export interface BootGuestOptions {
  /** vhost-user socket served by the backend daemon. Exactly one of socketPath / disk. */
  socketPath?: string;
  /**
   * Plain QEMU virtio-blk disk instead of vhost-user (validates the guest image
   * and test scripts without any backend daemon).
   */
  disk?: { path: string; format?: "raw" | "qcow2" };
  /** num-queues of the virtio-blk device. */
  numQueues: number;
  /** vhost-user only: ask QEMU for packed virtqueues (VIRTIO_F_RING_PACKED) */
  packed?: boolean;
  /** vhost-user only: QEMU reconnects to a restarted backend after this many seconds (chardev reconnect=) */
  reconnectS?: number;
  /** Guest test to run: /tests/<testName>.sh; undefined = interactive shell (never resolves before timeout). */
  testName?: string;
  memMiB?: number;
  /** Guest vCPUs; >= numQueues, or the guest maps several virtqueues to one hw queue. Default max(2, numQueues). */
  smp?: number;
  /** Kill QEMU after this long (default 300 s). */
  timeoutMs?: number;
  /** After the result marker, wait this long for QEMU to exit by itself (poweroff) before killing it. */
  exitGraceMs?: number;
  /** Image directory (default scripts/guest/out); build it first with ensureGuestImage(). */
  outDir?: string;
  /** Extra kernel command-line words and extra QEMU arguments. */
  extraAppend?: string;
  extraQemuArgs?: readonly string[];
  /** Streamed console output (stdout of QEMU = guest serial). */
  onOutput?: (chunk: string) => void;
  /** Abort = kill QEMU now. */
  signal?: AbortSignal;
}

export interface GuestResult {
  /** rc from the `VUBD-E2E-RESULT rc=<n>` line, or null if the guest never printed it. */
  rc: number | null;
  /** Guest console output (serial), \r\n normalised to \n. */
  output: string;
  /** QEMU's own stderr (vhost-user errors land here). */
  qemuStderr: string;
  exitCode: number | null;
  exitSignal: NodeJS.Signals | null;
  timedOut: boolean;
  /** QEMU had to be killed after the marker (it did not power off within exitGraceMs). */
  killedAfterResult: boolean;
  durationMs: number;
  qemuArgs: string[];
}

/** QEMU command line for a guest boot (exported for the developer scripts / debugging). */
export function guestQemuArgs(opts: BootGuestOptions, image: GuestImage): string[] {
  const memMiB = opts.memMiB ?? 512;
  const smp = opts.smp ?? Math.max(2, opts.numQueues);
  const append = ["console=ttyS0", "quiet", "panic=-1"];
  if (opts.testName !== undefined) append.push(`vubd.test=${opts.testName}`);
  if (opts.extraAppend) append.push(opts.extraAppend);
  const args = [
    "-accel", "tcg",
    "-machine", "pc",
    "-m", `${memMiB}M`,
    "-smp", String(smp),
    "-nodefaults",
    "-no-user-config",
    "-display", "none",
    "-serial", "stdio",
    "-no-reboot",
    "-kernel", image.kernel,
    "-initrd", image.initrd,
    "-append", append.join(" "),
  ];
  if ((opts.socketPath === undefined) === (opts.disk === undefined)) {
    throw new Error("bootGuest: give exactly one of socketPath (vhost-user) or disk (plain virtio-blk)");
  }
  if (opts.socketPath !== undefined) {
    // vhost-user needs the guest RAM in a shareable fd the backend can mmap.
    args.push(
      "-object", `memory-backend-memfd,id=mem,size=${memMiB}M,share=on`,
      "-numa", "node,memdev=mem",
      "-chardev", `socket,id=vub0,path=${opts.socketPath}${opts.reconnectS ? `,reconnect=${opts.reconnectS}` : ""}`,
      "-device", `vhost-user-blk-pci,chardev=vub0,num-queues=${opts.numQueues}${opts.packed ? ",packed=on" : ""}`,
    );
  } else if (opts.disk !== undefined) {
    args.push(
      "-drive", `file=${opts.disk.path},if=none,id=d0,format=${opts.disk.format ?? "raw"},discard=unmap`,
      "-device", `virtio-blk-pci,drive=d0,num-queues=${opts.numQueues}`,
    );
  }
  args.push(...(opts.extraQemuArgs ?? []));
  return args;
}

/**
 * Boot the guest and wait for its result line (or QEMU's exit, or the timeout).
 * Resolves once QEMU is gone: it powers off by itself after the marker; it is
 * killed after exitGraceMs if not, and on timeout/abort.
 */
export function bootGuest(opts: BootGuestOptions): Promise<GuestResult> {
  const qemu = qemuBinary();
  if (qemu === null) {
    return Promise.reject(new Error("qemu-system-x86_64 not found (Debian package: qemu-system-x86)"));
  }
  const image = imagePaths(opts.outDir ?? DEFAULT_GUEST_OUT);
  if (!guestImageAvailable(image.outDir)) {
    return Promise.reject(new Error(`guest image missing in ${image.outDir}: run scripts/guest/build.sh`));
  }
  let args: string[];
  try {
    args = guestQemuArgs(opts, image);
  } catch (err) {
    return Promise.reject(err);
  }
  const timeoutMs = opts.timeoutMs ?? 300_000;
  const exitGraceMs = opts.exitGraceMs ?? 10_000;
  const started = Date.now();

  return new Promise<GuestResult>((resolve, reject) => {
    const child = spawn(qemu, args, { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    let qemuStderr = "";
    let rc: number | null = null;
    let timedOut = false;
    let killedAfterResult = false;
    let graceTimer: NodeJS.Timeout | undefined;

    const kill = () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    };
    const timer = setTimeout(() => {
      timedOut = true;
      kill();
    }, timeoutMs);
    const onAbort = () => kill();
    opts.signal?.addEventListener("abort", onAbort, { once: true });

    child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
      const text = chunk.replace(/\r/g, "");
      output += text;
      opts.onOutput?.(text);
      if (rc === null) {
        const m = /^VUBD-E2E-RESULT rc=(\d+)\s*$/m.exec(output);
        if (m) {
          rc = Number(m[1]);
          graceTimer = setTimeout(() => {
            killedAfterResult = true;
            kill();
          }, exitGraceMs);
        }
      }
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => (qemuStderr += d));
    child.on("error", (err) => {
      clearTimeout(timer);
      if (graceTimer) clearTimeout(graceTimer);
      reject(err);
    });
    child.on("close", (exitCode, exitSignal) => {
      clearTimeout(timer);
      if (graceTimer) clearTimeout(graceTimer);
      opts.signal?.removeEventListener("abort", onAbort);
      resolve({
        rc,
        output,
        qemuStderr,
        exitCode,
        exitSignal,
        timedOut,
        killedAfterResult,
        durationMs: Date.now() - started,
        qemuArgs: [qemu, ...args],
      });
    });
  });
}

// ---------------------------------------------------------------------------
// Backend daemons

export interface DaemonSpec {
  socketPath: string;
  imagePath: string;
  numQueues: number;
  /** more vubd options (ignored for qemu-storage-daemon) */
  extraArgs?: readonly string[];
}

/** `node dist/src/cli/main.js --socket-path=… --blk-file=… --num-queues=N --log-level=info` */
export function vubdDaemonCommand(spec: DaemonSpec & { logLevel?: string }): string[] {
  return [
    process.execPath,
    VUBD_MAIN,
    `--socket-path=${spec.socketPath}`,
    `--blk-file=${spec.imagePath}`,
    `--num-queues=${spec.numQueues}`,
    `--log-level=${spec.logLevel ?? "info"}`,
    ...(spec.extraArgs ?? []),
  ];
}

/**
 * qemu-storage-daemon exporting the image as vhost-user-blk: the reference
 * backend. QSD refuses a front-end num-queues above its own, so it gets the same N.
 */
export function qsdDaemonCommand(spec: DaemonSpec): string[] {
  return [
    qsdBinary() ?? "qemu-storage-daemon",
    "--blockdev", `driver=file,node-name=f0,filename=${spec.imagePath}`,
    "--export",
    `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${spec.socketPath},writable=on,num-queues=${spec.numQueues}`,
  ];
}

export type BackendName = "vubd" | "qsd";

/** Backend selected by VUBD_E2E_BACKEND (vubd | qsd), default vubd. */
export function selectedBackend(): BackendName {
  const v = (process.env["VUBD_E2E_BACKEND"] ?? "vubd").toLowerCase();
  if (v !== "vubd" && v !== "qsd") throw new Error(`VUBD_E2E_BACKEND must be vubd or qsd, not ${v}`);
  return v;
}

export function backendCommand(backend: BackendName, spec: DaemonSpec): string[] {
  return backend === "qsd" ? qsdDaemonCommand(spec) : vubdDaemonCommand(spec);
}

export interface DaemonExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** ms from the stop signal to exit (0 if it had already exited). */
  elapsedMs: number;
  /** It did not exit within the timeout and was SIGKILLed. */
  killed: boolean;
}

export interface DaemonHandle {
  readonly proc: ChildProcess;
  readonly command: readonly string[];
  /** stdout+stderr so far (vubd logs JSON lines to stderr). */
  logs(): string;
  /** Exit status if it has exited, else null. */
  exited(): { code: number | null; signal: NodeJS.Signals | null } | null;
  /** Send `signal` (default SIGTERM), wait up to timeoutMs (default 2000), then SIGKILL. */
  stop(opts?: { signal?: NodeJS.Signals; timeoutMs?: number }): Promise<DaemonExit>;
}

/**
 * Spawn a backend daemon and wait until it listens: the socket file exists
 * (polling). Rejects (with its logs) if it exits first or readyTimeoutMs passes.
 */
export async function startDaemon(opts: {
  command: readonly string[];
  socketPath: string;
  readyTimeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}): Promise<DaemonHandle> {
  const [cmd, ...args] = opts.command;
  if (cmd === undefined) throw new Error("startDaemon: empty command");
  const proc = spawn(cmd, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: opts.env ?? process.env,
    cwd: opts.cwd ?? REPO_ROOT,
  });
  let logs = "";
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => (logs += d));
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => (logs += d));
  let exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  let spawnError: Error | null = null;
  const exitPromise = new Promise<void>((resolve) => {
    proc.on("error", (err) => {
      spawnError = err;
      resolve();
    });
    proc.on("exit", (code, signal) => {
      exit = { code, signal };
      resolve();
    });
  });

  const handle: DaemonHandle = {
    proc,
    command: opts.command,
    logs: () => logs,
    exited: () => exit,
    async stop({ signal = "SIGTERM", timeoutMs = 2000 } = {}) {
      if (exit !== null || spawnError !== null) {
        return { code: exit?.code ?? null, signal: exit?.signal ?? null, elapsedMs: 0, killed: false };
      }
      const t0 = Date.now();
      proc.kill(signal);
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        exitPromise.then(() => false),
        new Promise<boolean>((r) => (timer = setTimeout(() => r(true), timeoutMs))),
      ]);
      clearTimeout(timer);
      const elapsedMs = Date.now() - t0;
      if (timedOut) {
        proc.kill("SIGKILL");
        await exitPromise;
      }
      const final = exit as { code: number | null; signal: NodeJS.Signals | null } | null;
      return { code: final?.code ?? null, signal: final?.signal ?? null, elapsedMs, killed: timedOut };
    },
  };

  const deadline = Date.now() + (opts.readyTimeoutMs ?? 15_000);
  for (;;) {
    if (spawnError !== null) throw new Error(`cannot start ${cmd}: ${(spawnError as Error).message}`);
    if (exit !== null) {
      const e = exit as { code: number | null; signal: NodeJS.Signals | null };
      throw new Error(`daemon exited before listening (code=${e.code} signal=${e.signal}):\n${logs}`);
    }
    if (isSocket(opts.socketPath)) return handle;
    if (Date.now() > deadline) {
      await handle.stop({ signal: "SIGKILL" });
      throw new Error(`daemon did not create ${opts.socketPath} in time:\n${logs}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

function isSocket(p: string): boolean {
  try {
    return statSync(p).isSocket();
  } catch {
    return false;
  }
}

export interface GuestWithDaemonResult {
  guest: GuestResult;
  daemonExit: DaemonExit;
  /** The daemon had exited on its own before we stopped it. */
  daemonDiedEarly: boolean;
  daemonLogs: string;
}

/**
 * Start `daemonCommand` (vubd, QSD, …), boot the guest against its socket,
 * then stop the daemon with SIGTERM (daemonStopTimeoutMs, default 2 s).
 */
export async function runGuestWithDaemon(
  opts: Omit<BootGuestOptions, "disk" | "socketPath"> & {
    socketPath: string;
    daemonCommand: readonly string[];
    daemonReadyTimeoutMs?: number;
    daemonStopTimeoutMs?: number;
  },
): Promise<GuestWithDaemonResult> {
  const daemon = await startDaemon({
    command: opts.daemonCommand,
    socketPath: opts.socketPath,
    ...(opts.daemonReadyTimeoutMs !== undefined ? { readyTimeoutMs: opts.daemonReadyTimeoutMs } : {}),
  });
  let guest: GuestResult;
  try {
    const { daemonCommand: _c, daemonReadyTimeoutMs: _r, daemonStopTimeoutMs: _s, ...bootOpts } = opts;
    guest = await bootGuest(bootOpts);
  } catch (err) {
    await daemon.stop({ signal: "SIGKILL" });
    throw err;
  }
  const daemonDiedEarly = daemon.exited() !== null;
  const daemonExit = await daemon.stop({ timeoutMs: opts.daemonStopTimeoutMs ?? 2000 });
  return { guest, daemonExit, daemonDiedEarly, daemonLogs: daemon.logs() };
}

// ---------------------------------------------------------------------------
// Reading the guest's report

export interface FioReport {
  /** `VUBD-HWQUEUES n=` : entries in /sys/block/vda/mq. */
  hwQueues: number | null;
  sectors: number | null;
  discardMaxBytes: number | null;
  discard: string | null;
  flush: string | null;
  writeCache: string | null;
  markerOk: boolean;
  /** fio summary lines: phase (write|readback|flush) + the `read:`/`write:` IOPS line. */
  fioLines: Array<{ phase: string; line: string }>;
  /** Lines that look like verify or I/O errors, and VUBD-STEP-FAIL lines. */
  errors: string[];
}

export function parseFioReport(output: string): FioReport {
  const num = (re: RegExp): number | null => {
    const m = re.exec(output);
    return m ? Number(m[1]) : null;
  };
  const str = (re: RegExp): string | null => re.exec(output)?.[1] ?? null;
  const fioLines: FioReport["fioLines"] = [];
  for (const m of output.matchAll(/^VUBD-FIO (\S+) (.*)$/gm)) fioLines.push({ phase: m[1]!, line: m[2]!.trim() });
  const errors = output
    .split("\n")
    .filter((l) =>
      /VUBD-STEP-FAIL|verify: bad|bad magic|verify failed|crc32c: verify|io_u error|Input\/output error|I\/O error/i.test(l),
    );
  return {
    hwQueues: num(/^VUBD-HWQUEUES n=(\d+)/m),
    sectors: num(/^VUBD-SECTORS n=(\d+)/m),
    discardMaxBytes: num(/^VUBD-DISCARD-MAX bytes=(\d+)/m),
    discard: str(/^VUBD-DISCARD (\S+)/m),
    flush: str(/^VUBD-FLUSH (\S+)/m),
    writeCache: str(/^VUBD-WRITE-CACHE mode=(\S+)/m),
    markerOk: /^VUBD-MARKER ok /m.test(output),
    fioLines,
    errors,
  };
}

/** The 4 KiB block fio-verify.sh writes at MARKER_OFFSET: 128 lines `VUBD-MARKER-%019d\n`. */
export function expectedMarkerBlock(): Buffer {
  let s = "";
  for (let i = 0; i < 128; i++) s += `VUBD-MARKER-${String(i).padStart(19, "0")}\n`;
  const buf = Buffer.from(s, "ascii");
  if (buf.length !== MARKER_LENGTH) throw new Error(`marker is ${buf.length} bytes`);
  return buf;
}

/** Read the marker region of a raw image from the host. */
export async function readMarkerBlock(imagePath: string): Promise<Buffer> {
  const fh = await fsp.open(imagePath, "r");
  try {
    const buf = Buffer.alloc(MARKER_LENGTH);
    const { bytesRead } = await fh.read(buf, 0, MARKER_LENGTH, MARKER_OFFSET);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Create (or reset) a sparse raw image of `bytes`. */
export async function createSparseImage(imagePath: string, bytes: number): Promise<void> {
  await fsp.writeFile(imagePath, "");
  await fsp.truncate(imagePath, bytes);
}

/** Kernel version baked into the guest image, if recorded by build.sh. */
export function guestKernelVersion(outDir: string = DEFAULT_GUEST_OUT): string | null {
  try {
    return readFileSync(path.join(outDir, "kernel-version"), "utf8").trim();
  } catch {
    return null;
  }
}

/** Synchronous check used by skip logic: is `bin --version` runnable? */
export function canRun(bin: string, args: readonly string[] = ["--version"]): boolean {
  const r = spawnSync(bin, args, { stdio: "ignore", timeout: 10_000 });
  return r.status === 0;
}
