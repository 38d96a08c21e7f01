/**
 * E2E: a Linux guest (QEMU/TCG) runs fio with verification against a
 * vhost-user-blk disk served by vubd, with 1 and 2 virtqueues.
 *
 *   npx tsc -p tsconfig.json && node --test dist/test/e2e/guest-fio.test.js
 *
 * VUBD_E2E_BACKEND=qsd runs the same test against qemu-storage-daemon (the
 * reference backend) to validate the rig itself.
 *
 * Needs the Debian packages qemu-system-x86, busybox-static and fio (the guest
 * image is built by scripts/guest/build.sh, cached in scripts/guest/out).
 * Without them the test is skipped, except under CI=true where it fails.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  VUBD_MAIN,
  backendCommand,
  bootGuest,
  ensureGuestImage,
  expectedMarkerBlock,
  guestKernelVersion,
  parseFioReport,
  qsdBinary,
  readMarkerBlock,
  createSparseImage,
  selectedBackend,
  startDaemon,
  type DaemonExit,
  type DaemonHandle,
  type GuestResult,
  guestPrerequisiteProblem,
  e2eSkip,
} from "./guest.js";
import { CephCluster, cephSkip } from "../helpers/ceph-cluster.js";

const IMAGE_BYTES = 256 * 1024 * 1024;
const GUEST_TIMEOUT_MS = 180_000; // a healthy run takes ~20 s under TCG
const DAEMON_STOP_MS = 2000;

const backend = selectedBackend();

/** Why the test cannot run here, or null. Under CI a reason is a failure, not a skip. */
function prerequisiteProblem(): string | null {
  const guest = guestPrerequisiteProblem();
  if (guest !== null) return guest;
  if (backend === "qsd" && qsdBinary() === null) {
    return "qemu-storage-daemon not found: install the Debian package qemu-system-common";
  }
  return null;
}

const problem = prerequisiteProblem();
const skip = e2eSkip(problem);

// Built once (build.sh is cached: ~0.1 s when scripts/guest/out is up to date).
let imageReady: Promise<unknown> | undefined;

describe(`e2e guest fio against ${backend}`, () => {
  const cases = [
    { numQueues: 1, packed: false },
    { numQueues: 2, packed: false },
    // qemu-storage-daemon has no packed rings; vubd does, with --ring-packed.
    // (A packed=on guest on a default vubd gets split rings: test/e2e/guest-crash.test.ts.)
    ...(backend === "vubd" ? [{ numQueues: 2, packed: true }] : []),
    // 5 GiB of guest RAM: regions over 4 GiB are mapped in chunks (pc machine: 3 GiB low + 2 GiB high).
    ...(backend === "vubd" ? [{ numQueues: 2, packed: false, memMiB: 5120 }] : []),
    // The disk is an rbd image in a Ceph cluster the test starts (librbd; --cache=none: rbd_cache off).
    ...(backend === "vubd" ? [{ numQueues: 2, packed: false, rbd: true }] : []),
  ] as { numQueues: number; packed: boolean; memMiB?: number; rbd?: boolean }[];
  for (const { numQueues, packed, memMiB, rbd } of cases) {
    test(`fio verify through vhost-user-blk, num-queues=${numQueues}${packed ? ", packed=on" : ""}${memMiB ? `, ${memMiB} MiB guest` : ""}${rbd ? ", on a Ceph rbd image" : ""}`, { skip: skip || (rbd ? cephSkip() : false), timeout: GUEST_TIMEOUT_MS + 120_000 }, async (t) => {
      // Under CI=true a missing prerequisite fails the test instead of skipping it.
      if (problem !== null) assert.fail(problem);
      imageReady ??= ensureGuestImage();
      await imageReady;
      if (backend === "vubd") {
        assert.ok(existsSync(VUBD_MAIN), `${VUBD_MAIN} missing: build the daemon first (npx tsc -p tsconfig.json)`);
      }
      const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-e2e-"));
      const socketPath = path.join(dir, "vubd.sock");
      const imagePath = path.join(dir, "disk.img");
      await createSparseImage(imagePath, IMAGE_BYTES);
      const ceph = rbd ? await CephCluster.start({ images: { disk: IMAGE_BYTES } }) : undefined;
      if (ceph) await fsp.rm(imagePath); // rbd export writes it at the end

      let daemon: DaemonHandle | undefined;
      let guest: GuestResult | undefined;
      let daemonExit: DaemonExit | undefined;
      try {
        daemon = await startDaemon({
          // vubd offers packed rings only when asked (they turn crash recovery off).
          command: backendCommand(backend, {
            socketPath,
            imagePath: ceph ? `rbd:${ceph.pool}/disk:conf=${ceph.conf}` : imagePath,
            numQueues,
            extraArgs: [...(packed ? ["--ring-packed"] : []), ...(ceph ? ["--cache=none"] : [])],
          }),
          socketPath,
        });
        t.diagnostic(`backend=${backend} pid=${daemon.proc.pid} kernel=${guestKernelVersion() ?? "?"}`);

        // If the daemon dies mid-run the guest's I/O just hangs: stop QEMU at once instead.
        const abort = new AbortController();
        daemon.proc.once("exit", () => abort.abort());
        guest = await bootGuest({
          socketPath,
          numQueues,
          packed,
          ...(memMiB ? { memMiB } : {}),
          testName: "fio-verify",
          timeoutMs: GUEST_TIMEOUT_MS,
          signal: abort.signal,
        });
        const report = parseFioReport(guest.output);
        t.diagnostic(`guest finished in ${(guest.durationMs / 1000).toFixed(1)} s, rc=${guest.rc}`);
        for (const { phase, line } of report.fioLines) t.diagnostic(`fio ${phase}: ${line}`);
        t.diagnostic(
          `hw queues=${report.hwQueues} sectors=${report.sectors} discard_max_bytes=${report.discardMaxBytes} ` +
            `discard=${report.discard} flush=${report.flush} write_cache=${report.writeCache}`,
        );

        const context = () =>
          `\n--- guest console (tail) ---\n${guest!.output.slice(-6000)}` +
          `\n--- qemu stderr ---\n${guest!.qemuStderr.slice(-3000)}` +
          `\n--- daemon log (tail) ---\n${daemon!.logs().slice(-6000)}`;

        assert.equal(guest.timedOut, false, `guest timed out after ${GUEST_TIMEOUT_MS} ms${context()}`);
        assert.equal(daemon.exited(), null, `daemon exited during the guest run: ${JSON.stringify(daemon.exited())}${context()}`);
        assert.notEqual(guest.rc, null, `guest never printed the result marker${context()}`);
        assert.deepEqual(report.errors, [], `verify/I-O errors in the guest${context()}`);
        assert.equal(guest.rc, 0, `guest test failed${context()}`);
        assert.equal(report.hwQueues, numQueues, `guest saw ${report.hwQueues} hardware queues${context()}`);
        assert.equal(report.sectors, IMAGE_BYTES / 512, `guest disk size${context()}`);
        assert.equal(report.markerOk, true, `guest could not read back its marker${context()}`);
        assert.ok(report.fioLines.some((l) => l.phase === "write"), `no fio summary in the output${context()}`);
        if (backend === "vubd") {
          // The daemon logs each queue start with the ring layout QEMU negotiated.
          const starts = daemon.logs().split("\n").filter((l) => l.includes('"queue started"'));
          assert.ok(starts.length >= numQueues, `no queue start logged${context()}`);
          // SeaBIOS drives queue 0 first (split rings, no EVENT_IDX); the kernel's queues start last.
          const kernelStarts = starts.slice(-numQueues);
          assert.ok(kernelStarts.every((l) => l.includes(`"packed":${packed}`)), `queues ran with the wrong ring layout${context()}`);
          if (memMiB !== undefined && memMiB > 4096) {
            // QEMU puts RAM above 3 GiB at 4 GiB: a region ending past 4 GiB of its memfd.
            assert.match(daemon.logs(), /"gpa":4294967296/, `no guest memory region above 4 GiB was mapped${context()}`);
          }
        }
      } finally {
        // The guest has powered off (or was killed by bootGuest); now the daemon.
        if (daemon !== undefined) {
          daemonExit = await daemon.stop({ signal: "SIGTERM", timeoutMs: DAEMON_STOP_MS });
          t.diagnostic(`daemon stopped: code=${daemonExit.code} signal=${daemonExit.signal} in ${daemonExit.elapsedMs} ms`);
        }
        if (ceph) {
          try {
            await ceph.exportTo("disk", imagePath); // the host view: what another Ceph client reads
          } finally {
            ceph.stop();
          }
        }
      }
      assert.equal(
        daemonExit?.killed,
        false,
        `daemon did not exit within ${DAEMON_STOP_MS} ms of SIGTERM\n${daemon.logs().slice(-4000)}`,
      );

      // Host view: the marker block the guest wrote at 64 MiB is in the image file.
      const onDisk = await readMarkerBlock(imagePath);
      const expected = expectedMarkerBlock();
      assert.ok(
        onDisk.equals(expected),
        `marker mismatch at 64 MiB: got ${JSON.stringify(onDisk.subarray(0, 64).toString("latin1"))}`,
      );
      await fsp.rm(dir, { recursive: true, force: true }); // kept on failure, for a look
    });
  }
});
