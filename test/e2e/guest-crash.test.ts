/**
 * E2E: kill -9 vubd under a `packed=on` guest running fio verify, restart it on the same socket;
 * QEMU reconnects (chardev reconnect=1) and the guest finishes with no verify error and no hang.
 *
 * A default vubd does not offer RING_PACKED, so the packed=on guest negotiates split rings with
 * INFLIGHT_SHMFD, and the restarted vubd resubmits what the killed one left in flight. (QEMU's
 * packed-ring restore does nothing: with packed rings offered, this guest hung.)
 *
 *   npx tsc -p tsconfig.json && node --test dist/test/e2e/guest-crash.test.js
 */
import assert from "node:assert/strict";
import { existsSync, unlinkSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { test } from "node:test";
import {
  VUBD_MAIN,
  bootGuest,
  createSparseImage,
  ensureGuestImage,
  parseFioReport,
  startDaemon,
  vubdDaemonCommand,
  type DaemonHandle,
  guestPrerequisiteProblem,
  e2eSkip,
} from "./guest.js";

const IMAGE_BYTES = 256 * 1024 * 1024;
const GUEST_TIMEOUT_MS = 240_000; // a healthy run takes ~25 s under TCG; a hung guest runs into this
const NUM_QUEUES = 2;
/** how long into fio's write phase the daemon dies */
const KILL_AFTER_MS = 1500;


const problem = guestPrerequisiteProblem();
const skip = e2eSkip(problem);

/** The ring layouts the kernel's queues started with (SeaBIOS starts queue 0 first, split). */
function kernelRingLayouts(logs: string): string[] {
  return logs
    .split("\n")
    .filter((l) => l.includes('"queue started"'))
    .slice(-NUM_QUEUES)
    .map((l) => (l.includes('"packed":true') ? "packed" : l.includes('"packed":false') ? "split" : "?"));
}

test(
  `kill -9 vubd under a packed=on guest doing fio verify, restart on the same socket: 0 verify errors, no hang`,
  { skip, timeout: GUEST_TIMEOUT_MS + 60_000 },
  async (t) => {
    if (problem !== null) assert.fail(problem);
    await ensureGuestImage();
    assert.ok(existsSync(VUBD_MAIN), `${VUBD_MAIN} missing: build the daemon first`);
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-e2e-crash-"));
    const socketPath = path.join(dir, "vubd.sock");
    const imagePath = path.join(dir, "disk.img");
    await createSparseImage(imagePath, IMAGE_BYTES);
    const command = vubdDaemonCommand({ socketPath, imagePath, numQueues: NUM_QUEUES });

    let first: DaemonHandle | undefined = await startDaemon({ command, socketPath });
    let second: DaemonHandle | undefined;
    let killedAt = 0;
    let restart: Promise<void> | undefined;
    let consoleText = "";
    try {
      const guest = await bootGuest({
        socketPath,
        numQueues: NUM_QUEUES,
        packed: true,
        reconnectS: 1,
        testName: "fio-verify",
        timeoutMs: GUEST_TIMEOUT_MS,
        onOutput: (chunk) => {
          consoleText += chunk;
          if (restart === undefined && consoleText.includes("== phase write")) {
            restart = (async () => {
              await new Promise((r) => setTimeout(r, KILL_AFTER_MS));
              first!.proc.kill("SIGKILL");
              await first!.stop({ signal: "SIGKILL" });
              killedAt = consoleText.length;
              // The dead daemon's socket file stays: remove it so startDaemon waits for the new one.
              unlinkSync(socketPath);
              second = await startDaemon({ command, socketPath });
            })();
          }
        },
      });
      await restart;
      const report = parseFioReport(guest.output);
      t.diagnostic(`guest finished in ${(guest.durationMs / 1000).toFixed(1)} s, rc=${guest.rc}`);
      for (const { phase, line } of report.fioLines) t.diagnostic(`fio ${phase}: ${line}`);
      const context = () =>
        `\n--- guest console (tail) ---\n${guest.output.slice(-5000)}` +
        `\n--- qemu stderr ---\n${guest.qemuStderr.slice(-3000)}` +
        `\n--- first daemon (tail) ---\n${first?.logs().slice(-3000)}` +
        `\n--- second daemon (tail) ---\n${second?.logs().slice(-5000)}`;

      assert.ok(restart !== undefined, `fio's write phase never started${context()}`);
      assert.ok(second !== undefined, `the daemon was not restarted${context()}`);
      assert.equal(guest.timedOut, false, `guest hung after the restart (timed out after ${GUEST_TIMEOUT_MS} ms)${context()}`);
      assert.equal(second.exited(), null, `restarted daemon exited during the run${context()}`);
      assert.notEqual(guest.rc, null, `guest never printed the result marker${context()}`);
      assert.deepEqual(report.errors, [], `verify/I-O errors in the guest${context()}`);
      assert.equal(guest.rc, 0, `guest test failed${context()}`);
      assert.equal(report.markerOk, true, `guest could not read back its marker${context()}`);
      assert.ok(killedAt > 0 && killedAt < guest.output.indexOf("VUBD-E2E-RESULT"), "the kill happened before the guest finished");
      // packed=on against a backend without RING_PACKED: QEMU falls back to split rings, before and after.
      assert.deepEqual(kernelRingLayouts(first!.logs()), ["split", "split"], `first daemon's ring layout${context()}`);
      assert.deepEqual(kernelRingLayouts(second.logs()), ["split", "split"], `restarted daemon's ring layout${context()}`);
      const resubmits = second.logs().split("\n").filter((l) => l.includes("left in flight by the previous backend"));
      t.diagnostic(`restarted vubd: ${resubmits.length} queue(s) resubmitted requests${resubmits.map((l) => ` | ${(/resubmitting \d+/.exec(l) ?? [""])[0]}`).join("")}`);
    } finally {
      await first?.stop({ signal: "SIGKILL" });
      const exit = await second?.stop({ signal: "SIGTERM", timeoutMs: 2000 });
      if (exit) t.diagnostic(`restarted daemon stopped: code=${exit.code} signal=${exit.signal} in ${exit.elapsedMs} ms`);
      first = undefined;
    }
    await fsp.rm(dir, { recursive: true, force: true });
  },
);
