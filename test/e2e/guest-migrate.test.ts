/**
 * E2E: live migration of a guest whose disk is on vubd, with real QEMU (TCG)
 * on both sides on this machine. QEMU A runs the guest (scripts/guest/tests/
 * migrate.sh: fio verify-writes in passes) on vubd A; vubd B serves the same
 * image with --incoming, and QEMU B waits with `-incoming unix:…` on it.
 *
 *   1. migrate under load: the guest finishes on B with 0 errors, A ends in
 *      postmigrate, vubd A stopped its rings (GET_VRING_BASE) and released the
 *      write lock, vubd B took it;
 *   2. migrate_cancel half-way (bandwidth-limited): the guest finishes on A;
 *   3. QEMU B killed -9 half-way: migration `failed`, the guest finishes on A.
 * Each time the host checks the image afterwards (marker, last fio pattern).
 *
 *   npx tsc -p tsconfig.json && node --test dist/test/e2e/guest-migrate.test.js
 *
 * VUBD_E2E_BACKEND=qsd runs the same migrations on qemu-storage-daemon (the
 * reference backend) to validate the rig; the vubd log checks are skipped then.
 *
 * Needs the Debian packages qemu-system-x86, busybox-static and fio; skipped
 * without them, except under CI=true where it fails.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { describe, test, type TestContext } from "node:test";
import type { QmpClient } from "../../src/control/qmp-client.js";
import {
  VUBD_MAIN,
  bootGuest,
  createSparseImage,
  e2eSkip,
  ensureGuestImage,
  expectedMarkerBlock,
  guestPrerequisiteProblem,
  parseFioReport,
  qsdBinary,
  readMarkerBlock,
  selectedBackend,
  startDaemon,
  vubdDaemonCommand,
  type DaemonHandle,
  type GuestResult,
} from "./guest.js";
import {
  Console,
  LIVE_REGION,
  MIB,
  connectQmp,
  fioBlockProblems,
  patternBytes,
  pollMigration,
  qmpQemuArgs,
  readRegion,
  sleep,
  vmStatus,
  writeHostFlag,
  type MigrationInfo,
} from "./migration.js";

const IMAGE_BYTES = 128 * MIB;
const NUM_QUEUES = 2;
const GUEST_MEM_MIB = 384; // 256 MiB is too little to unpack the initramfs (88 MiB of fio libraries)
const GUEST_TIMEOUT_MS = 400_000; // a healthy run takes ~1 min under TCG
const BOOT_TIMEOUT_MS = 150_000; // until the guest's second fio pass starts
const MIGRATION_TIMEOUT_MS = 180_000;
/** Tests 2 and 3: slow enough that the migration is still copying RAM seconds later. */
const SLOW_BANDWIDTH = 4 * MIB;
/** ... and this much copied before the cancel / the kill, so it is really half-way. */
const HALF_WAY_BYTES = 8 * MIB;
const HALF_WAY_MS = 3000;

/** VUBD_E2E_BACKEND=qsd runs the same migrations on qemu-storage-daemon (the reference) to validate the rig. */
const backend = selectedBackend();

/** QSD has no --incoming: both sides open the image without locks (QEMU's locking=off). */
function qsdMigrationCommand(socketPath: string, imagePath: string): string[] {
  return [
    qsdBinary() ?? "qemu-storage-daemon",
    "--blockdev", `driver=file,node-name=f0,filename=${imagePath},locking=off,cache.direct=on`,
    "--export", `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${socketPath},writable=on,num-queues=${NUM_QUEUES}`,
  ];
}

const problem = backend === "qsd" && qsdBinary() === null ? "qemu-storage-daemon not found: install the Debian package qemu-system-common" : guestPrerequisiteProblem();
const skip = e2eSkip(problem);
let imageReady: Promise<unknown> | undefined;

const DONE = ["completed", "failed", "cancelled"];
const PASS_RE = /^VUBD-MIG-PASS iter=(\d+)/gm;

/** One side of the migration: a vubd, and a QEMU on it with a QMP socket. */
interface Side {
  name: string;
  socketPath: string;
  qmpPath: string;
  daemon: DaemonHandle;
  console: Console;
  abort: AbortController;
  guest: Promise<GuestResult>;
  qmp?: QmpClient;
}

function startQemu(side: Omit<Side, "guest" | "console" | "abort">, extraQemuArgs: string[]): Side {
  const console = new Console(`QEMU ${side.name}`);
  const abort = new AbortController();
  const guest = bootGuest({
    socketPath: side.socketPath,
    numQueues: NUM_QUEUES,
    memMiB: GUEST_MEM_MIB,
    testName: "migrate",
    timeoutMs: GUEST_TIMEOUT_MS,
    extraQemuArgs: [...qmpQemuArgs(side.qmpPath), ...extraQemuArgs],
    onOutput: console.push,
    signal: abort.signal,
  }).finally(() => console.end());
  guest.catch(() => {}); // awaited later; a spawn failure must not be an unhandled rejection first
  return { ...side, console, abort, guest };
}

/** Kill QEMU (if still running) and wait until it is gone. */
async function killQemu(side: Side): Promise<GuestResult | undefined> {
  side.qmp?.close();
  side.abort.abort();
  return side.guest.catch(() => undefined);
}

/** The daemon's log lines with this msg, from character `since` of its log on. */
const logLines = (d: DaemonHandle, msg: string, since = 0) =>
  d.logs().slice(since).split("\n").filter((l) => l.includes(`"msg":"${msg}"`));

async function waitForLog(d: DaemonHandle, msg: string, since: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (logLines(d, msg, since).length === 0) {
    if (Date.now() > deadline) throw new Error(`no "${msg}" in the daemon log within ${timeoutMs} ms`);
    await sleep(200);
  }
}

function describeMigration(info: MigrationInfo): string {
  const ram = info.ram;
  return (
    `status=${info.status} total-time=${info["total-time"]} ms downtime=${info.downtime} ms setup-time=${info["setup-time"]} ms` +
    (ram ? ` ram transferred=${(ram.transferred / MIB).toFixed(1)} MiB dirty-sync-count=${ram["dirty-sync-count"]} mbps=${ram.mbps}` : "") +
    (info["error-desc"] ? ` error="${info["error-desc"]}"` : "")
  );
}

type Scenario = "complete" | "cancel" | "destination-killed";

async function runScenario(t: TestContext, scenario: Scenario): Promise<void> {
  if (problem !== null) assert.fail(problem);
  imageReady ??= ensureGuestImage();
  await imageReady;
  assert.ok(existsSync(VUBD_MAIN), `${VUBD_MAIN} missing: build the daemon first (npx tsc -p tsconfig.json)`);
  const started = Date.now();
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-e2e-mig-"));
  const imagePath = path.join(dir, "disk.img");
  const migSock = path.join(dir, "migrate.sock");
  await createSparseImage(imagePath, IMAGE_BYTES);

  const sides: Side[] = [];
  const daemons: DaemonHandle[] = [];
  const startVubd = async (name: string, extra: string[]) => {
    const socketPath = path.join(dir, `vubd-${name}.sock`);
    // --cache=none: no host page cache holds data the other side cannot see (README: Live migration).
    const command =
      backend === "qsd"
        ? qsdMigrationCommand(socketPath, imagePath)
        : vubdDaemonCommand({ socketPath, imagePath, numQueues: NUM_QUEUES, extraArgs: ["--cache=none", ...extra] });
    const daemon = await startDaemon({ command, socketPath });
    daemons.push(daemon);
    return { name, socketPath, qmpPath: path.join(dir, `qmp-${name}.sock`), daemon };
  };
  const context = () =>
    sides
      .map(
        (s) =>
          `\n--- QEMU ${s.name} console (tail) ---\n${s.console.output.slice(-4000)}` +
          `\n--- vubd ${s.name} log (tail) ---\n${s.daemon.logs().slice(-4000)}`,
      )
      .join("");

  let finalGuest: GuestResult | undefined;
  let runsOn: Side | undefined;
  try {
    const a = await startVubd("A", []);
    const b = await startVubd("B", ["--incoming"]);
    const srcSide = startQemu(a, []);
    sides.push(srcSide);
    const dstSide = startQemu(b, ["-incoming", `unix:${migSock}`]);
    sides.push(dstSide);
    srcSide.qmp = await connectQmp(srcSide.qmpPath);
    dstSide.qmp = await connectQmp(dstSide.qmpPath);
    assert.equal(await vmStatus(dstSide.qmp), "inmigrate", "QEMU B waits for the incoming migration");

    // The guest is in its second fio pass: I/O is going on when the migration starts.
    await srcSide.console.waitFor(/^VUBD-MIG-PASS iter=1 /m, BOOT_TIMEOUT_MS);
    await sleep(500);
    if (scenario !== "complete") await srcSide.qmp.execute("migrate-set-parameters", { "max-bandwidth": SLOW_BANDWIDTH });
    const passesBefore = srcSide.console.count(PASS_RE);
    // SeaBIOS and the kernel's probe already started and stopped the rings: look at what follows.
    const sinceA = srcSide.daemon.logs().length;
    const sinceB = dstSide.daemon.logs().length;
    await srcSide.qmp.execute("migrate", { uri: `unix:${migSock}` });
    t.diagnostic(`migrate started during guest pass ${passesBefore - 1}`);

    if (scenario !== "complete") {
      const half = await pollMigration(
        srcSide.qmp,
        (i) =>
          DONE.includes(i.status) ||
          (i.status === "active" && (i.ram?.transferred ?? 0) >= HALF_WAY_BYTES && (i["total-time"] ?? 0) >= HALF_WAY_MS),
        MIGRATION_TIMEOUT_MS,
      );
      t.diagnostic(`half-way: ${describeMigration(half)}`);
      assert.equal(half.status, "active", `migration not half-way: ${describeMigration(half)}`);
      assert.ok(half.ram!.remaining > 0, `migration has nothing left to copy: ${describeMigration(half)}`);
    }
    if (scenario === "complete") {
      const info = await pollMigration(srcSide.qmp, (i) => DONE.includes(i.status), MIGRATION_TIMEOUT_MS);
      t.diagnostic(`migration: ${describeMigration(info)}`);
      assert.equal(info.status, "completed", `migration did not complete: ${describeMigration(info)}`);
      assert.equal(typeof info["total-time"], "number", "query-migrate reports total-time");
      assert.equal(typeof info.downtime, "number", "query-migrate reports downtime");
      assert.equal(await vmStatus(srcSide.qmp), "postmigrate", "QEMU A after the migration");
      const deadline = Date.now() + 30_000;
      while ((await vmStatus(dstSide.qmp)) !== "running") {
        assert.ok(Date.now() < deadline, `QEMU B is ${await vmStatus(dstSide.qmp)}, not running`);
        await sleep(200);
      }
    }
    if (scenario === "complete" && backend === "vubd") {
      // vubd A: logging was on, GET_VRING_BASE stopped both rings and dropped the write lock,
      // all while QEMU A is still connected (postmigrate), so not by a disconnect.
      const logsA = srcSide.daemon.logs();
      assert.match(logsA.slice(sinceA), /"logging":true/, `vubd A never had dirty logging on`);
      const stoppedA = logLines(srcSide.daemon, "queue stopped", sinceA);
      assert.deepEqual(
        [...new Set(stoppedA.map((l) => (JSON.parse(l) as { queue: number }).queue))].sort(),
        [0, 1],
        `vubd A did not stop both rings`,
      );
      assert.equal(logLines(srcSide.daemon, "device stopped: image write lock released", sinceA).length, 1, `vubd A kept the write lock`);
      assert.equal(logLines(srcSide.daemon, "frontend disconnected", sinceA).length, 0, `QEMU A disconnected from vubd A`);
      await waitForLog(dstSide.daemon, "device started: image write lock taken", sinceB, 30_000).catch((e: Error) =>
        assert.fail(`${e.message}: vubd B did not take the write lock`),
      );
    }
    if (scenario === "complete") {
      runsOn = dstSide;
    } else {
      if (scenario === "cancel") await srcSide.qmp.execute("migrate_cancel");
      else dstSide.abort.abort(); // bootGuest kills QEMU B with SIGKILL
      const want = scenario === "cancel" ? "cancelled" : "failed";
      const info = await pollMigration(srcSide.qmp, (i) => DONE.includes(i.status), MIGRATION_TIMEOUT_MS);
      t.diagnostic(`migration: ${describeMigration(info)}`);
      assert.equal(info.status, want, `migration ${info.status}, not ${want}`);
      assert.equal(await vmStatus(srcSide.qmp), "running", "QEMU A goes on running the guest");
      const dst = await killQemu(dstSide);
      t.diagnostic(`QEMU B: exit code=${dst?.exitCode} signal=${dst?.exitSignal}`);
      if (backend === "vubd") {
        assert.equal(logLines(dstSide.daemon, "device started: image write lock taken", sinceB).length, 0, `vubd B took the write lock`);
        assert.equal(logLines(srcSide.daemon, "device stopped: image write lock released", sinceA).length, 0, `vubd A released the write lock`);
        // QEMU A turns logging back off (SET_FEATURES without VHOST_F_LOG_ALL) and goes on with vubd A.
        await waitForLog(srcSide.daemon, "dirty logging on (live migration)", sinceA, 1000).catch((e: Error) => assert.fail(`${e.message}: logging never on`));
        await waitForLog(srcSide.daemon, "dirty logging off", sinceA, 30_000).catch((e: Error) =>
          assert.fail(`${e.message}: vubd A still logs after the ${want} migration`),
        );
      }
      runsOn = srcSide;
    }

    const passesAt = runsOn.console.count(PASS_RE);
    await writeHostFlag(imagePath, "done");
    finalGuest = await runsOn.guest;
    const output = srcSide.console.output + (runsOn === dstSide ? dstSide.console.output : "");
    const report = parseFioReport(output);
    const patternErrors = output.split("\n").filter((l) => /got pattern|bad pattern/i.test(l));
    t.diagnostic(
      `guest passes: ${srcSide.console.count(PASS_RE)} on A, ${dstSide.console.count(PASS_RE)} on B ` +
        `(${passesAt} on ${runsOn.name} when the flag was set); guest ran ${(finalGuest.durationMs / 1000).toFixed(1)} s`,
    );
    assert.equal(finalGuest.timedOut, false, `guest timed out`);
    assert.notEqual(finalGuest.rc, null, `guest never printed the result marker\n${finalGuest.qemuStderr.slice(-2000)}`);
    assert.deepEqual([...report.errors, ...patternErrors], [], `verify/I-O errors in the guest`);
    assert.equal(finalGuest.rc, 0, `guest test failed`);
    assert.equal(report.markerOk, true, `guest could not read back its marker`);
    assert.match(runsOn.console.output, /^VUBD-MIG-FLAG seen/m, `the guest did not finish on QEMU ${runsOn.name}`);
    if (runsOn === dstSide) {
      assert.ok(dstSide.console.count(PASS_RE) >= 1, `no fio pass ran on QEMU B`);
      const srcGone = await killQemu(srcSide);
      assert.equal(srcGone?.rc ?? null, null, "the guest printed its result on QEMU A too");
    }
    for (const d of daemons) assert.equal(d.exited(), null, `a vubd exited during the run: ${JSON.stringify(d.exited())}`);
    const lastPattern = /^VUBD-MIG-LAST pattern=(0x[0-9a-f]{8})/m.exec(output)?.[1];
    assert.ok(lastPattern, `no VUBD-MIG-LAST line`);

    for (const s of sides) await killQemu(s);
    for (const d of daemons) {
      const exit = await d.stop({ timeoutMs: 5000 });
      assert.equal(exit.killed, false, `vubd did not exit on SIGTERM\n${d.logs().slice(-3000)}`);
    }
    // The host's view of the image: the guest's marker, and the last pass's data everywhere.
    assert.ok((await readMarkerBlock(imagePath)).equals(expectedMarkerBlock()), "marker at 64 MiB in the image");
    const live = await readRegion(imagePath, LIVE_REGION.offset, LIVE_REGION.bytes);
    assert.deepEqual(fioBlockProblems(live, LIVE_REGION.offset, LIVE_REGION.bytes, patternBytes(lastPattern)), [], "live region on the host");
    t.diagnostic(`test took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    await fsp.rm(dir, { recursive: true, force: true }); // kept on failure, for a look
  } catch (e) {
    // Whatever failed, show what both sides said (QEMU's stderr is complete only once it is gone).
    const ends = await Promise.all(sides.map(killQemu));
    const stderr = sides.map((s, i) => `\n--- QEMU ${s.name} stderr ---\n${ends[i]?.qemuStderr.slice(-3000) ?? "?"}`).join("");
    for (const [i, s] of sides.entries()) {
      await fsp.writeFile(path.join(dir, `console-${s.name}.log`), s.console.output);
      await fsp.writeFile(path.join(dir, `vubd-${s.name}.log`), s.daemon.logs());
      await fsp.writeFile(path.join(dir, `qemu-${s.name}.stderr`), ends[i]?.qemuStderr ?? "");
    }
    if (e instanceof Error) e.message += `${context()}${stderr}\n(files kept in ${dir}: consoles, logs)`;
    throw e;
  } finally {
    for (const s of sides) await killQemu(s);
    for (const d of daemons) await d.stop({ signal: "SIGKILL" });
  }
}

describe("e2e live migration between two QEMUs on vubd", { concurrency: 1 }, () => {
  const opts = { skip, timeout: GUEST_TIMEOUT_MS + 120_000 };
  test("migration under fio load: the guest finishes on the destination with 0 errors", opts, (t) => runScenario(t, "complete"));
  test("migration cancelled half-way: the source goes on, disk intact", opts, (t) => runScenario(t, "cancel"));
  test("destination QEMU killed mid-migration: migration failed, the source goes on, disk intact", opts, (t) =>
    runScenario(t, "destination-killed"),
  );
});
