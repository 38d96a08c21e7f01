/**
 * E2E: libvirt 9.0 as deployed, QEMU running as libvirt-qemu (not root). A
 * transient domain (TCG, direct kernel boot, memfd shared memory) boots on a
 * <disk type='vhostuser'> served by vubd (root; socket group libvirt-qemu,
 * mode 0660); the guest (scripts/guest/tests/libvirt.sh) does I/O on it; a
 * second vhostuser disk, added to the same vubd at run time (block-export-add), is hot-plugged and unplugged with
 * virsh attach-device / detach-device; virsh shutdown powers it off through
 * the ACPI power button (busybox acpid in the guest).
 *
 *   npx tsc -p tsconfig.json && node --test dist/test/e2e/libvirt.test.js
 *
 * Needs the Debian packages libvirt-daemon-system, libvirt-clients,
 * libvirt-daemon-driver-qemu, qemu-system-x86, busybox-static and fio, and root.
 * Without them the test is skipped, except under CI=true where it fails.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { QmpClient } from "../../src/control/qmp-client.js";
import { existsSync, readFileSync, statSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { test } from "node:test";
import {
  REPO_ROOT,
  VUBD_MAIN,
  createSparseImage,
  e2eSkip,
  ensureGuestImage,
  guestPrerequisiteProblem,
  startDaemon,
  vubdDaemonCommand,
  type DaemonHandle,
} from "./guest.js";
import { QEMU_GROUP, QEMU_USER, domainXml, libvirtPrerequisiteProblem, startLibvirt, vhostUserDiskXml } from "./libvirt.js";

const IMAGE_BYTES = 256 * 1024 * 1024;
const STEP_TIMEOUT_MS = 180_000; // boot to first I/O takes ~15 s under TCG on an idle machine
/** libvirt.sh writes 1 MiB of "VUBD-LIBVIRT-<dev>\n" lines at this offset. */
const DATA_OFFSET = 1024 * 1024;
const DATA_LENGTH = 1024 * 1024;

const problem = guestPrerequisiteProblem() ?? libvirtPrerequisiteProblem();
const skip = e2eSkip(problem);

function expectedData(dev: string): Buffer {
  const line = `VUBD-LIBVIRT-${dev}\n`;
  return Buffer.from(line.repeat(Math.ceil(DATA_LENGTH / line.length))).subarray(0, DATA_LENGTH);
}

async function readImage(image: string): Promise<Buffer> {
  const fh = await fsp.open(image, "r");
  try {
    const buf = Buffer.alloc(DATA_LENGTH);
    const { bytesRead } = await fh.read(buf, 0, DATA_LENGTH, DATA_OFFSET);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** vubd as root; its socket reachable for libvirt-qemu only (group libvirt-qemu, mode 0660), or for root only (the default 0600). */
function startVubd(socketPath: string, imagePath: string, opts: { forQemu?: boolean; extraArgs?: string[] } = {}): Promise<DaemonHandle> {
  const access = opts.forQemu === false ? [] : ["--socket-mode=0660", `--socket-group=${QEMU_GROUP}`, ...(opts.extraArgs ?? [])];
  return startDaemon({
    command: vubdDaemonCommand({ socketPath, imagePath, numQueues: 1, extraArgs: access }),
    socketPath,
  });
}

/** vubd log lines at error level or above (pino: 50 error, 60 fatal). */
function errorLines(logs: string): string[] {
  return logs.split("\n").filter((l) => /"level":(5|6)\d/.test(l));
}

test("libvirt: vhostuser disks on vubd, QEMU as libvirt-qemu, hot-plug, ACPI shutdown", { skip, timeout: 900_000 }, async (t) => {
  // Under CI=true a missing prerequisite fails the test instead of skipping it.
  if (problem !== null) assert.fail(problem);
  assert.ok(existsSync(VUBD_MAIN), `${VUBD_MAIN} missing: build the daemon first (npx tsc -p tsconfig.json)`);
  const image = await ensureGuestImage();

  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-libvirt-"));
  // libvirt-qemu must reach the kernel and initrd (libvirt chowns them to it while the domain runs).
  await fsp.chmod(dir, 0o755);
  const sockDir = path.join(dir, "sock");
  await fsp.mkdir(sockDir, { mode: 0o750 });
  const qemuGid = Number(spawnSync("getent", ["group", QEMU_GROUP], { encoding: "utf8" }).stdout.split(":")[2]);
  await fsp.chown(sockDir, 0, qemuGid);
  const kernel = path.join(dir, "vmlinuz");
  const initrd = path.join(dir, "initramfs.cpio.gz");
  await fsp.copyFile(image.kernel, kernel);
  await fsp.copyFile(image.initrd, initrd);
  const imageA = path.join(dir, "a.img");
  const imageB = path.join(dir, "b.img");
  await createSparseImage(imageA, IMAGE_BYTES);
  await createSparseImage(imageB, IMAGE_BYTES);
  const sockA = path.join(sockDir, "vda.sock");
  const sockB = path.join(sockDir, "vdb.sock");
  const consoleLog = path.join(dir, "console.log");
  const name = `vubd-e2e-libvirt-${process.pid}`;
  const domainLog = `/var/log/libvirt/qemu/${name}.log`;

  const daemons: DaemonHandle[] = [];
  const libvirt = await startLibvirt(dir);
  const virsh = async (...args: string[]) => {
    const r = await libvirt.virsh(...args);
    // A virsh create that never returns is, most likely, QEMU retrying a socket it may not use (<reconnect>).
    const why = r.code === null ? "did not return in 2 minutes (killed)" : `failed: ${r.stderr}`;
    assert.equal(r.code, 0, `virsh ${args.join(" ")} ${why}\nlibvirtd:\n${libvirt.logs()}`);
    return r.stdout;
  };
  const consoleText = () => (existsSync(consoleLog) ? readFileSync(consoleLog, "utf8").replace(/\r/g, "") : "");
  const waitConsole = async (re: RegExp, what: string) => {
    const deadline = Date.now() + STEP_TIMEOUT_MS;
    for (;;) {
      const out = consoleText();
      if (re.test(out)) return;
      const failed = /^VUBD-STEP-FAIL .*$/m.exec(out);
      if (failed || Date.now() > deadline) {
        assert.fail(`${failed ? failed[0] : `timed out waiting for ${what}`}\nconsole:\n${out}\nvubd:\n${daemons.map((d) => d.logs()).join("")}`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  try {
    // First a socket only root can use: libvirt leaves vhostuser sockets alone (no DAC relabel),
    // so the unprivileged QEMU is refused. (Without <reconnect>: with it QEMU retries forever.)
    const root = await startVubd(path.join(sockDir, "root-only.sock"), imageA, { forQemu: false });
    daemons.push(root);
    const deniedXml = path.join(dir, "denied.xml");
    await fsp.writeFile(
      deniedXml,
      domainXml({
        name: `${name}-denied`,
        kernel,
        initrd,
        cmdline: "console=ttyS0",
        diskXml: vhostUserDiskXml(path.join(sockDir, "root-only.sock"), "vda", { reconnect: false }),
        consoleLog: path.join(dir, "denied.log"),
      }),
    );
    const denied = await libvirt.virsh("create", deniedXml);
    assert.notEqual(denied.code, 0, "QEMU connected to a socket only root may use: is it running as root?");
    assert.match(denied.stderr, /Failed to connect to '.*root-only\.sock': Permission denied/);
    assert.equal((await root.stop()).code, 0);
    await fsp.rm(`/var/log/libvirt/qemu/${name}-denied.log`, { force: true });

    // One vubd for every disk of the host: vda from its command line, vdb added over QMP later.
    const control = path.join(dir, "control.sock");
    daemons.push(await startVubd(sockA, imageA, { extraArgs: [`--control=${control}`] }));
    const xmlPath = path.join(dir, "domain.xml");
    await fsp.writeFile(
      xmlPath,
      domainXml({
        name,
        kernel,
        initrd,
        cmdline: "console=ttyS0 quiet panic=-1 vubd.test=libvirt",
        diskXml: vhostUserDiskXml(sockA, "vda"),
        consoleLog,
      }),
    );
    // Transient (create, not define): nothing stays in /etc/libvirt/qemu.
    await virsh("create", xmlPath);

    const qemuPid = Number(readFileSync(`/run/libvirt/qemu/${name}.pid`, "utf8").trim());
    const user = spawnSync("ps", ["-o", "user=", "-p", String(qemuPid)], { encoding: "utf8" }).stdout.trim();
    assert.equal(user, QEMU_USER, `QEMU (pid ${qemuPid}) runs as ${user}, not ${QEMU_USER}`);
    const creds = readFileSync(`/proc/${qemuPid}/status`, "utf8").split("\n").filter((l) => /^(Uid|Gid|Groups):/.test(l));
    t.diagnostic(`QEMU credentials: ${creds.join("; ")}`);
    // Its group is libvirt-qemu (qemu.conf's default on Debian), which only that user is in: the socket's group.
    assert.equal(Number(/^Gid:\s+(\d+)/m.exec(creds.join("\n"))?.[1]), qemuGid, "QEMU's gid is not libvirt-qemu's");
    const sockStat = statSync(sockA);
    assert.deepEqual([sockStat.uid, sockStat.gid, sockStat.mode & 0o777], [0, qemuGid, 0o660], "vda socket owner, group, mode");

    await waitConsole(/^VUBD-LV vda-io ok sectors=524288$/m, "I/O on vda");
    assert.ok((await readImage(imageA)).equals(expectedData("vda")), "the guest's vda data is not in the image");

    // The hot-plugged disk is a second export of the same vubd, which also checks the peer:
    // only libvirt-qemu's QEMU gets in.
    const qmp = await QmpClient.connect(control);
    await qmp.execute("blockdev-add", { driver: "file", "node-name": "vdb", filename: imageB });
    await qmp.execute("block-export-add", {
      type: "vhost-user-blk", id: "vdb", "node-name": "vdb", addr: { type: "unix", path: sockB }, writable: true,
      "socket-mode": "0660", "socket-group": QEMU_GROUP, "allow-uid": QEMU_USER,
    });
    const sockBStat = statSync(sockB);
    assert.deepEqual([sockBStat.gid, sockBStat.mode & 0o777], [qemuGid, 0o660], "vdb socket group and mode");
    const vdbXml = path.join(dir, "vdb.xml");
    await fsp.writeFile(vdbXml, vhostUserDiskXml(sockB, "vdb"));
    await waitConsole(/^VUBD-LV waiting-vdb$/m, "the guest to wait for vdb");
    await virsh("attach-device", name, vdbXml, "--live");
    await waitConsole(/^VUBD-LV vdb-io ok sectors=524288$/m, "I/O on the hot-plugged vdb");
    assert.ok((await readImage(imageB)).equals(expectedData("vdb")), "the guest's vdb data is not in the image");
    assert.match(await virsh("domblklist", name), /vdb\s+\S*vdb\.sock/);

    await virsh("detach-device", name, vdbXml, "--live");
    await waitConsole(/^VUBD-LV vdb-gone$/m, "vdb to disappear from the guest");
    assert.doesNotMatch(await virsh("domblklist", name), /vdb/);
    // QEMU let go of vdb's socket: the export can be deleted in safe mode (retried while the session closes).
    for (let tries = 0; ; tries++) {
      try {
        await qmp.execute("block-export-del", { id: "vdb", mode: "safe" });
        break;
      } catch (e) {
        if (!/still in use/.test((e as Error).message) || tries > 500) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    assert.ok(qmp.events.some((e) => e.event === "BLOCK_EXPORT_DELETED" && (e.data as { id?: string }).id === "vdb"), "BLOCK_EXPORT_DELETED for vdb");
    assert.ok(!existsSync(sockB), "vdb's socket is removed with its export");
    await qmp.execute("blockdev-del", { "node-name": "vdb" });
    qmp.close();

    await waitConsole(/^VUBD-LV waiting-power-button$/m, "the guest to wait for the power button");
    await virsh("shutdown", name, "--mode", "acpi");
    await waitConsole(/^VUBD-E2E-RESULT rc=0$/m, "the guest's result after the power button");
    assert.match(consoleText(), /^VUBD-LV power-button$/m);
    // A transient domain disappears once QEMU is gone; libvirt logs why.
    const deadline = Date.now() + 60_000;
    while ((await virsh("list", "--all", "--name")).split("\n").includes(name)) {
      assert.ok(Date.now() < deadline, `domain ${name} still listed a minute after the guest powered off`);
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.match(readFileSync(domainLog, "utf8"), /shutting down, reason=shutdown\s*$/);

    for (const [d, sock] of [[daemons[1]!, sockA]] as const) {
      assert.equal(d.exited(), null, `vubd for ${sock} exited:\n${d.logs()}`);
      assert.ok(statSync(sock).isSocket(), `${sock} is gone`);
      assert.deepEqual(errorLines(d.logs()), [], `vubd for ${sock} logged errors`);
      const warnings = d.logs().split("\n").filter((l) => l.includes('"level":40'));
      if (warnings.length > 0) t.diagnostic(`vubd for ${sock} warned:\n${warnings.join("\n")}`);
    }
    for (const d of daemons.slice(1)) {
      const exit = await d.stop();
      assert.ok(exit.code === 0 && !exit.killed, `vubd did not stop cleanly on SIGTERM: ${JSON.stringify(exit)}\n${d.logs()}`);
    }
    t.diagnostic(`boot to shutdown: console\n${consoleText().split("\n").filter((l) => l.startsWith("VUBD-")).join("\n")}`);
  } finally {
    const listed = await libvirt.virsh("list", "--all", "--name");
    if (listed.stdout.split("\n").includes(name)) await libvirt.virsh("destroy", name);
    for (const d of daemons) {
      const exit = await d.stop();
      if (exit.killed) t.diagnostic(`vubd needed SIGKILL:\n${d.logs()}`);
    }
    await libvirt.stop();
    await fsp.rm(domainLog, { force: true });
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

/** The first ```xml block of the README's libvirt section. */
function readmeDomainXml(): string {
  const readme = readFileSync(path.join(REPO_ROOT, "README.md"), "utf8");
  const section = readme.slice(readme.indexOf("### libvirt"));
  const m = /```xml\n([\s\S]*?)```/.exec(section);
  assert.ok(m, "no ```xml block in the README's libvirt section");
  return m[1]!;
}

test("libvirt: the README's domain XML is accepted, and what it says libvirt refuses in a vhostuser disk is refused", { skip, timeout: 120_000 }, async () => {
  if (problem !== null) assert.fail(problem);
  const name = `vubd-e2e-readme-${process.pid}`;
  const base = readmeDomainXml().replace(/<name>[^<]*<\/name>/, `<name>${name}</name>`);
  const inDisk = (extra: string) => base.replace("<target dev='vda' bus='virtio'/>", `<target dev='vda' bus='virtio'/>\n      ${extra}`);
  const driver = (attr: string) => base.replace("<driver name='qemu' type='raw'/>", `<driver name='qemu' type='raw' ${attr}/>`);
  const refused: Array<[string, string, RegExp]> = [
    ["<readonly/>", inDisk("<readonly/>"), /readonly is not supported with vhostuser disk/],
    ["<serial>", inDisk("<serial>vubd0</serial>"), /serial is not supported with vhostuser disk/],
    ["<iotune>", inDisk("<iotune><total_iops_sec>100</total_iops_sec></iotune>"), /iotune is not supported with vhostuser disk/],
    ["discard=", driver("discard='unmap'"), /discard is not supported with vhostuser disk/],
    ["cache=", driver("cache='none'"), /cache is not supported with vhostuser disk/],
    ["io=", driver("io='native'"), /io is not supported with vhostuser disk/],
    ["detect_zeroes=", driver("detect_zeroes='on'"), /detect_zeroes is not supported with vhostuser disk/],
    ["<blockio>", inDisk("<blockio logical_block_size='4096'/>"), /blockio is not supported with vhostuser disk/],
    ["<shareable/>", inDisk("<shareable/>"), /shareable is not supported with vhostuser disk/],
    ["no <memoryBacking>", base.replace(/ *<memoryBacking>[\s\S]*?<\/memoryBacking>\n/, ""), /'vhostuser' requires shared memory/],
  ];
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "vubd-libvirt-readme-"));
  const libvirt = await startLibvirt(dir);
  try {
    const define = async (xml: string) => {
      const file = path.join(dir, "domain.xml");
      await fsp.writeFile(file, xml);
      return libvirt.virsh("define", file);
    };
    for (const [what, xml, error] of refused) {
      const r = await define(xml);
      assert.notEqual(r.code, 0, `libvirt accepted ${what} in a vhostuser disk`);
      assert.match(r.stderr, error, `${what}: ${r.stderr}`);
    }
    for (const xml of [base, driver("queues='2'")]) {
      const r = await define(xml);
      assert.equal(r.code, 0, `virsh define of the README's domain failed: ${r.stderr}`);
      const dumped = await libvirt.virsh("dumpxml", name);
      assert.match(dumped.stdout, /<disk type='vhostuser' device='disk'/);
      assert.equal((await libvirt.virsh("undefine", name)).code, 0);
    }
  } finally {
    if ((await libvirt.virsh("list", "--all", "--name")).stdout.split("\n").includes(name)) await libvirt.virsh("undefine", name);
    await libvirt.stop();
    await fsp.rm(dir, { recursive: true, force: true });
  }
});
