/**
 * E2E: live storage migration under a real guest. A Linux guest (QEMU/TCG,
 * vhost-user-blk with 2 virtqueues served by vubd) keeps running fio with
 * verification while the host, over vubd's QMP control socket, mirrors the
 * disk to a new sparse image (blockdev-add + blockdev-mirror), waits for
 * BLOCK_JOB_READY and pivots (job-complete). The host then grows the new
 * image (block_resize): the guest learns about it through vhost-user
 * CONFIG_CHANGE_MSG, and that size change is the host's "pivot done" signal.
 * The guest then re-verifies everything it wrote (reads now come from the new
 * image) and writes a post-pivot marker; the host finally inspects both image
 * files. Guest side: scripts/guest/tests/mirror.sh (its header has the layout).
 *
 *   npx tsc -p tsconfig.json && node --test dist/test/e2e/guest-mirror.test.js
 *
 * Needs the Debian packages qemu-system-x86, busybox-static and fio; without
 * them the test is skipped, except under CI=true where it fails. vubd only
 * (VUBD_E2E_BACKEND=qsd does not apply: the QMP flow uses vubd's export0/file0).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { test } from "node:test";
import { QmpClient, type QmpEvent } from "../../src/control/qmp-client.js";
import {
  VUBD_MAIN,
  bootGuest,
  createSparseImage,
  ensureGuestImage,
  guestKernelVersion,
  parseFioReport,
  startDaemon,
  vubdDaemonCommand,
  type DaemonExit,
  type DaemonHandle,
  type GuestResult,
  guestPrerequisiteProblem,
  e2eSkip,
} from "./guest.js";
import { Console, fioBlockProblems, readRegion, sleep } from "./migration.js";
import { CephCluster, cephSkip } from "../helpers/ceph-cluster.js";

const MIB = 1024 * 1024;
const NUM_QUEUES = 2;
const IMAGE_BYTES = 256 * MIB; // old image and (same size) mirror target
const GROWN_BYTES = IMAGE_BYTES + 64 * MIB; // block_resize of the target after the pivot
const GUEST_TIMEOUT_MS = 150_000; // a healthy run takes ~25 s under TCG
const DAEMON_STOP_MS = 2000;
/** Live verify-writes before the mirror starts, in the READY state, and after the pivot. */
const LIVE_BEFORE_MIRROR_MS = 2000;
const LIVE_WHILE_READY_MS = 3000;
const LIVE_AFTER_PIVOT_MS = 2000;
/** From the start of a live pass (its console line) to its fio writing. */
const LIVE_PASS_SETTLE_MS = 400;
/**
 * The mirror's copy rate (QEMU's `speed`): 256 MiB at 64 MiB/s takes ~4 s, longer than a live
 * pass (~2 s), so guest writes land while the copy runs however fast the host copies.
 */
const MIRROR_SPEED = 64 * MIB;

// Layout shared with scripts/guest/tests/mirror.sh.
const BASE = { offset: 0, bytes: 64 * MIB }; // crc32c, written once before the mirror
const LIVE = { offset: 128 * MIB, bytes: 16 * MIB }; // meta + per-pass verify_pattern; last pass after the resize
const GROWN = { offset: IMAGE_BYTES, bytes: 4 * MIB }; // written after the resize
const MARKER_OFFSET = 100 * MIB;
const BLOCK = 4096;

const EXPORT_ID = "export0";
const OLD_NODE = "file0";
const NEW_NODE = "file1";
const JOB_ID = "mirror0";


const problem = guestPrerequisiteProblem();
const skip = e2eSkip(problem);

/** 128 lines `VUBD-<name>-%016d\n` = 4 KiB (name: 9 characters), as mirror.sh's marker(). */
function markerBlock(name: "PRE-PIVOT" | "POSTPIVOT"): Buffer {
  let s = "";
  for (let i = 0; i < 128; i++) s += `VUBD-${name}-${String(i).padStart(16, "0")}\n`;
  const b = Buffer.from(s, "ascii");
  assert.equal(b.length, BLOCK);
  return b;
}

interface QueueStats {
  queue: number;
  writeOps: number;
  readOps: number;
  errors: number;
}
interface Stats {
  exports: Array<{ id: string; "node-name": string; queues: QueueStats[] }>;
  nodes: Array<{ "node-name": string; "write-ops": number; "read-ops": number }>;
}
const exportWrites = (s: Stats): number => s.exports[0]!.queues.reduce((n, q) => n + q.writeOps, 0);
const nodeWrites = (s: Stats, node: string): number | undefined => s.nodes.find((n) => n["node-name"] === node)?.["write-ops"];
const exportErrors = (s: Stats): number => s.exports[0]!.queues.reduce((n, q) => n + q.errors, 0);

async function exportNode(qmp: QmpClient): Promise<string> {
  const exps = await qmp.execute<Array<{ id: string; "node-name": string }>>("query-block-exports");
  const e = exps.find((x) => x.id === EXPORT_ID);
  assert.ok(e, `export ${EXPORT_ID} missing from query-block-exports: ${JSON.stringify(exps)}`);
  return e["node-name"];
}

/** What the host-side QMP driver observed. */
interface Timeline {
  mirrorStartMs?: number;
  readyMs?: number;
  pivotMs?: number;
  resizeMs?: number;
  guestSawSizeMs?: number;
  nodeWhileReady?: string;
  nodeAfterPivot?: string;
  readyEvent?: QmpEvent;
  completedEvent?: QmpEvent;
  liveIterAtMirror?: number;
  liveIterAtPivot?: number;
  stats: Record<string, Stats>;
}

// The target is a second image file, or an rbd image in a Ceph cluster the test starts: a disk
// moved into the cluster while the VM runs, read back afterwards through `rbd export`.
for (const target of ["file", "rbd"] as const) test(
  `guest fio verify survives blockdev-mirror + pivot + resize (num-queues=${NUM_QUEUES})${target === "rbd" ? ", into an rbd image (checked through rbd export)" : ""}`,
  { skip: skip || (target === "rbd" ? cephSkip() : false), timeout: GUEST_TIMEOUT_MS + 120_000 },
  async (t) => {
    if (problem !== null) assert.fail(problem); // CI=true: a missing prerequisite is a failure
    await ensureGuestImage();
    assert.ok(existsSync(VUBD_MAIN), `${VUBD_MAIN} missing: build the daemon first (npx tsc -p tsconfig.json)`);

    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-e2e-mirror-"));
    const socketPath = path.join(dir, "vubd.sock");
    const qmpPath = path.join(dir, "qmp.sock");
    const oldImage = path.join(dir, "old.img");
    const newImage = path.join(dir, "new.img");
    await createSparseImage(oldImage, IMAGE_BYTES);
    await createSparseImage(newImage, IMAGE_BYTES);
    let ceph: CephCluster | undefined;
    if (target === "rbd") {
      await fsp.rm(newImage); // written from the cluster at the end (rbd export)
      ceph = await CephCluster.start({ images: { mirror: IMAGE_BYTES } });
    }

    let daemon: DaemonHandle | undefined;
    let qmp: QmpClient | undefined;
    let guest: GuestResult | undefined;
    let daemonExit: DaemonExit | undefined;
    let driverError: unknown;
    const tl: Timeline = { stats: {} };
    const t0 = Date.now();
    const since = () => Date.now() - t0;
    const context = () =>
      `\n--- guest console (tail) ---\n${guest?.output.slice(-6000) ?? "(none)"}` +
      `\n--- qemu stderr ---\n${guest?.qemuStderr.slice(-3000) ?? ""}` +
      `\n--- daemon log (tail) ---\n${daemon?.logs().slice(-6000) ?? ""}` +
      `\n--- host timeline ---\n${JSON.stringify({ ...tl, stats: undefined })}`;

    try {
      daemon = await startDaemon({
        command: [...vubdDaemonCommand({ socketPath, imagePath: oldImage, numQueues: NUM_QUEUES }), `--control=${qmpPath}`],
        socketPath,
      });
      t.diagnostic(`vubd pid=${daemon.proc.pid} kernel=${guestKernelVersion() ?? "?"}`);
      // The control socket listens before the vhost-user one, so it is up by now.
      qmp = await QmpClient.connect(qmpPath);
      assert.equal(await exportNode(qmp), OLD_NODE, "export root before the mirror");

      const abort = new AbortController();
      daemon.proc.once("exit", () => abort.abort()); // a dead daemon would hang the guest's I/O
      const con = new Console("guest");
      const guestDone = bootGuest({
        socketPath,
        numQueues: NUM_QUEUES,
        testName: "mirror",
        timeoutMs: GUEST_TIMEOUT_MS,
        signal: abort.signal,
        onOutput: (c) => con.push(c),
      }).finally(() => con.end());

      // Host side, concurrently with the guest.
      const driver = async (q: QmpClient): Promise<void> => {
        const stats = async (label: string) => (tl.stats[label] = await q.execute<Stats>("query-stats"));
        const livePasses = () => con.count(/^VUBD-LIVE iter=/gm);
        const written = await con.waitFor(/^VUBD-PHASE written rc=(\d+)/m, 90_000);
        if (written[1] !== "0") throw new Error("guest base phase failed; not mirroring");
        await con.waitFor(/^VUBD-LIVE iter=0 /m, 30_000);
        await sleep(LIVE_BEFORE_MIRROR_MS);
        // Start the copy early in a live pass, once its fio is past start-up and writing.
        await con.waitFor(new RegExp(`^VUBD-LIVE iter=${livePasses()} `, "m"), 30_000);
        await sleep(LIVE_PASS_SETTLE_MS);

        await stats("before-mirror");
        await q.execute(
          "blockdev-add",
          ceph
            ? { driver: "rbd", "node-name": NEW_NODE, pool: ceph.pool, image: "mirror", conf: ceph.conf, cache: { direct: true } }
            : { driver: "file", "node-name": NEW_NODE, filename: newImage },
        );
        const started = Date.now();
        tl.mirrorStartMs = since();
        tl.liveIterAtMirror = livePasses();
        const isJob = (e: QmpEvent) => e.data["device"] === JOB_ID;
        const completed = q.waitEvent("BLOCK_JOB_COMPLETED", isJob, 60_000);
        completed.catch(() => {}); // awaited below; not an unhandled rejection meanwhile
        await q.execute("blockdev-mirror", { "job-id": JOB_ID, device: EXPORT_ID, target: NEW_NODE, sync: "full", speed: MIRROR_SPEED });
        const first = await Promise.race([q.waitEvent("BLOCK_JOB_READY", isJob, 60_000), completed]);
        if (first.event !== "BLOCK_JOB_READY") throw new Error(`mirror ended before READY: ${JSON.stringify(first.data)}`);
        tl.readyEvent = first;
        tl.readyMs = Date.now() - started;
        await stats("ready");
        tl.nodeWhileReady = await exportNode(q);

        await sleep(LIVE_WHILE_READY_MS); // guest writes now go to both images through the filter
        await stats("before-pivot");
        const pivotStart = Date.now();
        await q.execute("job-complete", { id: JOB_ID });
        tl.completedEvent = await completed;
        tl.pivotMs = Date.now() - pivotStart;
        tl.liveIterAtPivot = livePasses();
        tl.nodeAfterPivot = await exportNode(q);
        await stats("after-pivot");
        // Resizing an unused node would never reach the guest: fail now, not at its timeout.
        if (tl.nodeAfterPivot !== NEW_NODE) throw new Error(`export root after job-complete is ${tl.nodeAfterPivot}, not ${NEW_NODE}`);

        await sleep(LIVE_AFTER_PIVOT_MS); // guest writes now go to the new image only
        const resizeAt = Date.now();
        tl.resizeMs = since();
        await q.execute("block_resize", { "node-name": NEW_NODE, size: GROWN_BYTES });
        await con.waitFor(/^VUBD-SIZE sectors=(\d+)/m, 60_000);
        tl.guestSawSizeMs = Date.now() - resizeAt;
      };
      const driven = driver(qmp).catch((e: unknown) => {
        driverError = e;
        abort.abort(); // no point letting the guest wait for a signal that will not come
      });
      guest = await guestDone;
      await driven;
      if (driverError === undefined && daemon.exited() === null) tl.stats["end"] = await qmp.execute<Stats>("query-stats");

      // ---- what the guest and the host saw ----
      const out = guest.output;
      const report = parseFioReport(out);
      const patternErrors = out.split("\n").filter((l) => /got pattern|bad pattern/i.test(l));
      const lastLive = /^VUBD-LIVE-LAST pattern=(0x[0-9a-f]{8}) iterations=(\d+)/m.exec(out);
      const sizeLine = /^VUBD-SIZE sectors=(\d+)/m.exec(out);
      t.diagnostic(`guest finished in ${(guest.durationMs / 1000).toFixed(1)} s, rc=${guest.rc}, whole test so far ${(since() / 1000).toFixed(1)} s`);
      for (const { phase, line } of report.fioLines.filter((l) => l.phase !== "live")) t.diagnostic(`fio ${phase}: ${line}`);
      const liveLines = report.fioLines.filter((l) => l.phase === "live");
      const passUp = [...out.matchAll(/^VUBD-LIVE iter=\d+ pattern=\S+ up=([\d.]+)/gm)].map((m) => Number(m[1]));
      t.diagnostic(`live passes took ${passUp.slice(1).map((u, k) => (u - passUp[k]!).toFixed(2)).join(" ")} s (guest uptime deltas)`);
      t.diagnostic(`fio live: ${liveLines.length} summary lines over ${lastLive?.[2] ?? "?"} passes; last: ${liveLines.slice(-2).map((l) => l.line).join(" | ")}`);
      if (tl.readyMs !== undefined) {
        t.diagnostic(
          `mirror: blockdev-mirror -> BLOCK_JOB_READY ${tl.readyMs} ms (${IMAGE_BYTES / MIB} MiB, ` +
            `${((IMAGE_BYTES / MIB) / (tl.readyMs / 1000)).toFixed(0)} MiB/s), job-complete -> COMPLETED ${tl.pivotMs ?? "?"} ms, ` +
            `block_resize -> guest saw it ${tl.guestSawSizeMs ?? "?"} ms; live pass started at mirror/pivot: ${tl.liveIterAtMirror}/${tl.liveIterAtPivot}`,
        );
      }
      for (const [label, s] of Object.entries(tl.stats)) {
        t.diagnostic(
          `query-stats ${label}: export root=${s.exports[0]?.["node-name"]} writes/queue=${s.exports[0]?.queues.map((q) => q.writeOps).join("/")} ` +
            `nodes=${s.nodes.map((n) => `${n["node-name"]}:w${n["write-ops"]}`).join(",")}`,
        );
      }

      if (driverError !== undefined) assert.fail(`host QMP driver failed: ${(driverError as Error).stack ?? String(driverError)}${context()}`);
      assert.equal(guest.timedOut, false, `guest timed out after ${GUEST_TIMEOUT_MS} ms${context()}`);
      assert.equal(daemon.exited(), null, `daemon exited during the guest run: ${JSON.stringify(daemon.exited())}${context()}`);
      assert.notEqual(guest.rc, null, `guest never printed the result marker${context()}`);
      assert.deepEqual([...report.errors, ...patternErrors], [], `verify/I-O errors in the guest${context()}`);
      assert.equal(guest.rc, 0, `guest test failed${context()}`);
      assert.equal(report.hwQueues, NUM_QUEUES, `guest saw ${report.hwQueues} hardware queues${context()}`);
      assert.equal(report.sectors, IMAGE_BYTES / 512, `guest's initial disk size${context()}`);
      for (const phase of ["base", "live", "final-base", "final-live", "grown"]) {
        assert.ok(report.fioLines.some((l) => l.phase === phase), `no fio summary for phase ${phase}${context()}`);
      }
      assert.match(out, /^VUBD-MARKER pre ok /m, `guest could not read back its pre-pivot marker${context()}`);
      assert.match(out, /^VUBD-MARKER post ok /m, `guest could not read back its post-pivot marker${context()}`);

      // The guest noticed the resize, which the host only issued after the pivot:
      // so the final verify passes (final-base, final-live) read the NEW image.
      assert.ok(sizeLine, `no VUBD-SIZE line${context()}`);
      assert.equal(Number(sizeLine[1]), GROWN_BYTES / 512, `guest's disk size after block_resize${context()}`);
      assert.ok(lastLive, `no VUBD-LIVE-LAST line${context()}`);
      // fio was writing throughout: its live loop had started before blockdev-mirror and only
      // stops when it sees the resize; the export's write counters moved across each stage.
      const w = (label: string) => exportWrites(tl.stats[label]!);
      assert.ok(w("ready") > w("before-mirror"), `no guest writes between blockdev-mirror and READY (${w("before-mirror")} -> ${w("ready")})`);
      assert.ok(w("before-pivot") > w("ready"), `no guest writes while the job was READY (${w("ready")} -> ${w("before-pivot")})`);
      for (const q of tl.stats["before-pivot"]!.exports[0]!.queues) {
        assert.ok(q.writeOps > 0, `queue ${q.queue} carried no writes: ${JSON.stringify(tl.stats["before-pivot"]!.exports[0]!.queues)}`);
      }
      assert.equal(exportErrors(tl.stats["end"]!), 0, "export queues counted I/O errors");
      // After the pivot the old node gets no more writes; the new one takes all of them.
      const oldAtPivot = nodeWrites(tl.stats["after-pivot"]!, OLD_NODE);
      assert.equal(nodeWrites(tl.stats["end"]!, OLD_NODE), oldAtPivot, `${OLD_NODE} was written after the pivot`);
      assert.ok(
        (nodeWrites(tl.stats["end"]!, NEW_NODE) ?? 0) > (nodeWrites(tl.stats["after-pivot"]!, NEW_NODE) ?? Infinity),
        `${NEW_NODE} got no writes after the pivot`,
      );
      assert.ok(
        Number(lastLive[2]) > (tl.liveIterAtPivot ?? Infinity),
        `no live pass started after the pivot (passes ${lastLive[2]}, started by the pivot ${tl.liveIterAtPivot})`,
      );

      // QMP view of the pivot.
      assert.equal(tl.readyEvent?.data["len"], IMAGE_BYTES, `READY len: ${JSON.stringify(tl.readyEvent?.data)}`);
      assert.equal(tl.completedEvent?.data["error"], undefined, `mirror completed with an error: ${JSON.stringify(tl.completedEvent?.data)}`);
      assert.notEqual(tl.nodeWhileReady, NEW_NODE, "export pivoted before job-complete");
      assert.equal(tl.nodeAfterPivot, NEW_NODE, "export root right after job-complete");
      assert.equal(await exportNode(qmp), NEW_NODE, "export root at the end (query-block-exports)");
    } finally {
      qmp?.close();
      if (daemon !== undefined) {
        daemonExit = await daemon.stop({ signal: "SIGTERM", timeoutMs: DAEMON_STOP_MS });
        t.diagnostic(`daemon stopped: code=${daemonExit.code} signal=${daemonExit.signal} in ${daemonExit.elapsedMs} ms`);
      }
      if (ceph) {
        try {
          await ceph.exportTo("mirror", newImage); // what another Ceph client reads
        } finally {
          ceph.stop();
        }
      }
    }
    assert.equal(daemonExit?.killed, false, `daemon did not exit within ${DAEMON_STOP_MS} ms of SIGTERM\n${daemon.logs().slice(-4000)}`);

    // ---- host view of the two image files ----
    assert.equal((await fsp.stat(newImage)).size, GROWN_BYTES, "new image size after block_resize");
    assert.equal((await fsp.stat(oldImage)).size, IMAGE_BYTES, "old image size");
    // Marker: written to the old image before the mirror (and copied); overwritten after the
    // pivot, which must reach only the new image.
    const newMarker = await readRegion(newImage, MARKER_OFFSET, BLOCK);
    const oldMarker = await readRegion(oldImage, MARKER_OFFSET, BLOCK);
    const show = (b: Buffer) => JSON.stringify(b.subarray(0, 40).toString("latin1"));
    assert.ok(newMarker.equals(markerBlock("POSTPIVOT")), `new image at 100 MiB: ${show(newMarker)} (want the post-pivot marker)`);
    assert.ok(!oldMarker.equals(markerBlock("POSTPIVOT")), "the post-pivot marker reached the OLD image: the pivot did not switch images");
    assert.ok(oldMarker.equals(markerBlock("PRE-PIVOT")), `old image at 100 MiB: ${show(oldMarker)} (want the pre-pivot marker)`);

    // fio's data in the new image: the base region (copied by the mirror) block for block;
    // the live region holds the LAST pass's pattern (writes during the copy were mirrored);
    // the grown region, past the old end, exists only in the new image.
    const baseNew = await readRegion(newImage, BASE.offset, BASE.bytes);
    assert.deepEqual(fioBlockProblems(baseNew, BASE.offset, BASE.bytes), [], "fio base data in the new image");
    const baseOld = await readRegion(oldImage, BASE.offset, BASE.bytes);
    assert.ok(baseNew.equals(baseOld), "base region differs between the old and the new image");
    const lastPattern = Buffer.from(/^VUBD-LIVE-LAST pattern=0x([0-9a-f]{8})/m.exec(guest!.output)![1]!, "hex");
    const liveNew = await readRegion(newImage, LIVE.offset, LIVE.bytes);
    assert.deepEqual(fioBlockProblems(liveNew, LIVE.offset, LIVE.bytes, lastPattern), [], "fio live data in the new image");
    const grownNew = await readRegion(newImage, GROWN.offset, GROWN.bytes);
    assert.deepEqual(fioBlockProblems(grownNew, GROWN.offset, GROWN.bytes), [], "fio data past the old end of the new image");
    // The last live pass ran after the resize, i.e. after the pivot: none of it is in the old image.
    const liveOld = await readRegion(oldImage, LIVE.offset, LIVE.bytes);
    let leaked = 0;
    for (let at = 0; at < LIVE.bytes; at += BLOCK) if (liveOld.subarray(at + BLOCK - 4, at + BLOCK).equals(lastPattern)) leaked++;
    assert.equal(leaked, 0, `${leaked} blocks of the post-pivot live pass reached the OLD image`);
    // ... while the old image does hold earlier passes (it was the live disk before the pivot).
    assert.deepEqual(fioBlockProblems(liveOld, LIVE.offset, LIVE.bytes), [], "fio live data (pre-pivot passes) in the old image");
    t.diagnostic(`whole test ${(since() / 1000).toFixed(1)} s`);
    await fsp.rm(dir, { recursive: true, force: true }); // kept on failure, for a look
  },
);
