/**
 * E2E: what `npm start` prints works. `npm start` runs `vubd --default` in the package root; this
 * test runs the same command in a scratch directory (so the image and socket land there), takes
 * the qemu-system-x86_64 command line it printed, runs it unchanged, and uses the guest's busybox
 * shell on the serial console: the guest must see /dev/vda with the default image's size, and a
 * block it writes must reach the image file vubd created.
 *
 * Needs qemu-system-x86 (and the test guest from scripts/guest/build.sh); skipped without them,
 * except under CI=true where it fails.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { test } from "node:test";
import { VUBD_MAIN, ensureGuestImage, guestPrerequisiteProblem, e2eSkip } from "./guest.js";

const DEFAULT_IMAGE_BYTES = 2 ** 30;
const TIMEOUT_MS = 120_000;

const problem = guestPrerequisiteProblem();
const skip = e2eSkip(problem);

/** Collects a child's output and waits for patterns in it. */
class Output {
  text = "";
  private waiters: { re: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  constructor(stream: NodeJS.ReadableStream) {
    stream.setEncoding("utf8");
    stream.on("data", (d: string) => {
      this.text += d.replace(/\r\n/g, "\n");
      this.waiters = this.waiters.filter((w) => {
        const m = w.re.exec(this.text);
        if (m) w.resolve(m);
        return !m;
      });
    });
  }
  waitFor(re: RegExp, timeoutMs: number, what: string): Promise<RegExpExecArray> {
    const m = re.exec(this.text);
    if (m) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`${what}: no ${re} within ${timeoutMs} ms; output so far:\n${this.text.slice(-4000)}`)), timeoutMs);
      this.waiters.push({ re, resolve: (x) => (clearTimeout(t), resolve(x)) });
    });
  }
}

/** The printed command: from "qemu-system-x86_64" through the last backslash-continued line. */
function printedQemuArgv(stdout: string): string[] {
  const start = stdout.indexOf("qemu-system-x86_64 ");
  assert.ok(start >= 0, `no qemu command line in vubd's output:\n${stdout}`);
  const lines: string[] = [];
  for (const line of stdout.slice(start).split("\n")) {
    lines.push(line.replace(/\\$/, ""));
    if (!line.endsWith("\\")) break;
  }
  return lines.join(" ").trim().split(/\s+/);
}

function exited(p: ChildProcess, ms: number): Promise<boolean> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve(true);
  return new Promise((r) => {
    const t = setTimeout(() => r(false), ms);
    p.once("exit", () => (clearTimeout(t), r(true)));
  });
}

test("the QEMU command line vubd --default prints boots a guest that sees and writes the disk", { skip, timeout: TIMEOUT_MS + 30_000 }, async (t) => {
  if (problem !== null) assert.fail(problem);
  await ensureGuestImage(); // the printed command names the test guest when it has been built
  assert.ok(existsSync(VUBD_MAIN), `${VUBD_MAIN} missing: run npm install first`);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-e2e-start-"));
  const vubd = spawn(process.execPath, [VUBD_MAIN, "--default"], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
  const vout = new Output(vubd.stdout!);
  const verr = new Output(vubd.stderr!);
  let qemu: ChildProcess | undefined;
  try {
    await vout.waitFor(/Ctrl-A X\.|scripts\/guest\/build\.sh\./, 15_000, "vubd --default");
    const image = path.join(dir, "vubd-disk.img");
    assert.equal((await fsp.stat(image)).size, DEFAULT_IMAGE_BYTES, "the default image was created, sparse, 1 GiB");
    assert.match(verr.text, /created sparse image/);
    const argv = printedQemuArgv(vout.text);
    assert.ok(argv.includes(`socket,id=vubd0,path=${path.join(dir, "vubd.sock")},reconnect=1`), `printed command: ${argv.join(" ")}`);
    assert.ok(!argv.includes("BZIMAGE"), "the test guest is built, so the printed command names it");
    t.diagnostic(`printed: ${argv.join(" ")}`);

    qemu = spawn(argv[0]!, argv.slice(1), { cwd: dir, stdio: ["pipe", "pipe", "pipe"] });
    const serial = new Output(qemu.stdout!);
    const qerr = new Output(qemu.stderr!);
    const gone = new Promise<never>((_, reject) =>
      qemu!.once("exit", (code) => reject(new Error(`QEMU exited (${code}) early:\n${qerr.text}\n${serial.text.slice(-4000)}`))),
    );
    const wait = (re: RegExp, what: string) => Promise.race([serial.waitFor(re, TIMEOUT_MS, what), gone]);
    await wait(/starting a shell/, "guest boot");
    // Quoted halves keep the echoed command line from matching the answers.
    qemu.stdin!.write(
      'while [ ! -b /dev/vda ]; do sleep 0.1; done; echo "VUBD-""SIZE $(cat /sys/block/vda/size)"; ' +
        'printf "written-by-the-npm-start-guest" | dd of=/dev/vda bs=512 seek=2048 conv=sync oflag=direct 2>/dev/null && echo "VUBD-""WROTE ok"\n',
    );
    // Up to the line end: output arrives in chunks, and a chunk may end inside the number.
    const size = await wait(/^VUBD-SIZE (\d+)\r?\n/m, "guest disk size");
    assert.equal(Number(size[1]) * 512, DEFAULT_IMAGE_BYTES, "the guest sees the default image's size");
    await wait(/^VUBD-WROTE ok/m, "guest write");
    qemu.stdin!.write("poweroff -f\n");
    assert.ok(await exited(qemu, 20_000), "guest powered off");

    const fh = await fsp.open(image, "r");
    const buf = Buffer.alloc(512);
    await fh.read(buf, 0, 512, 2048 * 512);
    await fh.close();
    assert.equal(buf.subarray(0, 30).toString("latin1"), "written-by-the-npm-start-guest", "the guest's write is in the image");
    assert.ok(buf.subarray(30).every((b) => b === 0));
  } finally {
    if (qemu && !(await exited(qemu, 0))) qemu.kill("SIGKILL");
    vubd.kill("SIGTERM");
    assert.ok(await exited(vubd, 2000), "vubd exits on SIGTERM");
    await fsp.rm(dir, { recursive: true, force: true });
  }
  assert.equal(vubd.exitCode, 0, `vubd exit code; stderr:\n${verr.text.slice(-3000)}`);
});
