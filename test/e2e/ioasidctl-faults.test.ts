import { execFile, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { onFreePorts, PORT_TAKEN } from "../support/free-ports.js";

// ioasidctl's IO page fault commands as a user runs them, against the embedded stack on ports of
// its own: the VMM watching and answering as the guest (`faults watch --respond success`), the
// device's DMA waiting for the page response and retrying (`dma --wait`), a refused second answer
// (`fault respond`), and the timeline showing the fault path.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-faults-"));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * The steps of `timeline`'s column table, each with its wrapped lines joined and without
 * whitespace (a long step wraps within its column: issue 17), for a whitespace-free comparison.
 */
function steps(table: string): string[] {
  const out: string[] = [];
  for (const line of table.split("\n").slice(2)) {
    const text = line.slice(5).replace(/\s+/g, "");
    if (line.slice(0, 3).trim() !== "") out.push(text);
    else if (out.length > 0) out[out.length - 1] += text;
  }
  return out;
}

/** Runs ioasidctl to its end, whatever its exit status. */
function ctl(...args: string[]): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
}

/** ioasidctl in the background: its output so far, and its exit. */
interface Background {
  readonly proc: ChildProcess;
  readonly stdout: () => string;
  readonly stderr: () => string;
  readonly exited: Promise<number>;
}
const background: Background[] = [];
function ctlInBackground(...args: string[]): Background {
  const proc = spawn(process.execPath, [cli, ...args, "--dir", dir], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  proc.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number>((resolve) => proc.once("exit", (code) => resolve(code ?? -1)));
  const b = { proc, stdout: () => stdout, stderr: () => stderr, exited };
  background.push(b);
  return b;
}

/** Resolves once `cond` holds, or fails after `ms`. */
async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A watcher that is attached (it says so on stderr once VFIO reports it). */
async function watcher(...args: string[]): Promise<Background> {
  const w = ctlInBackground("faults", "watch", "--vm", "vm1", ...args);
  await until(() => w.stderr().includes("watching IO page faults") || w.proc.exitCode !== null, 15_000, "the watcher to attach");
  expect(w.stderr()).toContain("watching IO page faults of vm vm1");
  return w;
}

afterAll(async () => {
  for (const b of background) if (b.proc.exitCode === null && b.proc.pid !== undefined) b.proc.kill("SIGKILL");
  if (existsSync(join(dir, "stack.json"))) await ctl("down");
  rmSync(dir, { recursive: true, force: true });
});

describe("ioasidctl IO page faults", () => {
  it("has --help on dma, faults, fault and guest-ram, and lists them", async () => {
    const top = await ctl("--help");
    for (const c of ["dma", "faults", "fault", "guest-ram", "device"]) {
      expect(top.stdout).toMatch(new RegExp(`^  ${c} +\\S`, "m"));
      const h = await ctl(c, "--help");
      expect(h.code).toBe(0);
      expect(h.stdout).toContain("usage:");
    }
  });

  it("refuses bad flags with exit 2 before sending anything (no stack is running)", async () => {
    const bad: string[][] = [
      ["dma", "--device", "idxd0", "--address", "0x1000"],
      ["dma", "--device", "idxd0", "--pasid", "1", "--without-pasid", "--address", "0x1000"],
      ["dma", "--device", "idxd0", "--pasid", "1", "--address", "0x1000", "--prgi", "3"],
      ["dma", "--device", "idxd0", "--pasid", "1", "--address", "0x1000", "--timeout-ms", "10"],
      ["dma", "--device", "idxd0", "--pasid", "1", "--address", "0x1000", "--access", "x"],
      ["faults", "watch", "--vm", "vm1", "--respond", "maybe"],
      ["faults", "watch", "--vm", "vm1", "--map-gpa-base", "0x1000"],
      ["faults", "list", "--vm", "vm1"],
      ["fault", "respond", "--vm", "vm1", "--group", "7", "--code", "retry"],
      ["fault", "respond", "--vm", "vm1", "--code", "success"],
      ["guest-ram", "--vm", "vm1", "--size", "0x800"],
      ["dma", "--no-such-flag"],
      ["device", "replace", "--vm", "vm1", "--device", "pf-x"],
      ["device", "replace", "--vm", "vm1", "--device", "pf-x", "--stage2", "--guest-pgtable", "0x9000"],
      ["device", "replace", "--vm", "vm1", "--device", "pf-x", "--guest-pgtable", "0x9001"],
      ["device", "swap", "--vm", "vm1", "--device", "pf-x"],
      ["device", "assign", "--vm", "vm1"],
    ];
    for (const args of bad) {
      const r = await ctl(...args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr).toMatch(/usage:/);
      expect(r.stderr).not.toMatch(/no stack is running/);
    }
  });

  it("completes a DMA through a page request the guest answers, refuses a second answer, and shows it all in the timeline", async () => {
    const up = await onFreePorts(
      (base) => ctl("up", "--base-port", String(base), "--nats-port", String(base + 10)),
      (r) => PORT_TAKEN.test(r.stderr),
    );
    expect(up.code, up.stderr).toBe(0);
    // A PRI-capable device (mdev create registers its parent at the IOMMU), a VM with a bound guest
    // PASID, and the VM's RAM in its stage-2 domain.
    expect((await ctl("mdev", "create", "--device", "idxd0", "--uuid", "mdev-f", "--wqs", "0")).code).toBe(0);
    expect((await ctl("vm", "create", "--name", "vm1", "--token", "4343")).code).toBe(0);
    expect((await ctl("mdev", "assign", "--vm", "vm1", "--uuid", "mdev-f")).code).toBe(0);
    const { hpasid } = JSON.parse((await ctl("pasid", "alloc", "--vm", "vm1")).stdout) as { hpasid: number };
    // VFIO's first call to the IOMMU: right after `up` it can fail UNAVAILABLE while VFIO's channel
    // to the IOMMU is still in grpc-js's reconnect backoff (VFIO's fault stream tried before the
    // IOMMU listened). A refused bind changes nothing; try again for a few seconds.
    let bind = await ctl("bind", "--vm", "vm1", "--pasid", String(hpasid), "--gpasid", "101", "--mdev", "mdev-f");
    for (let i = 0; i < 20 && bind.code !== 0 && bind.stderr.includes("UNAVAILABLE"); i++) {
      await new Promise((r) => setTimeout(r, 250));
      bind = await ctl("bind", "--vm", "vm1", "--pasid", String(hpasid), "--gpasid", "101", "--mdev", "mdev-f");
    }
    expect(bind.code).toBe(0);
    const ram = await ctl("guest-ram", "--vm", "vm1");
    expect(ram.stdout).toMatch(/guest RAM GPA 0x0\.\.0x3fffffff -> HPA 0x100000000\.\.0x13fffffff \(rw\) in its stage 2 \(VFIO MapDma\)/);
    const dma = ["dma", "--device", "idxd0", "--pasid", String(hpasid)];

    // Nobody watches: the group is answered FAILURE at once and the device gives up.
    const unwatched = await ctl(...dma, "--address", "0x100000", "--wait", "--timeout-ms", "5000");
    // Refused: the device gives up on the DMA (exit 3, as every refusal).
    expect(unwatched.code).toBe(3);
    expect(unwatched.stdout).toMatch(/page response for group \d+: FAILURE/);

    // The guest answers: the page is installed and the retry translates GVA → GPA → HPA.
    const guest = await watcher("--respond", "success", "--count", "2", "--json", "--timeout-ms", "30000");
    const done = await ctl(...dma, "--address", "0x200123", "--access", "rw", "--wait", "--timeout-ms", "10000");
    expect(done.stdout).toMatch(/^PAGE_REQUEST idxd0 PASID \d+ 0x200123 \(rw\): fault group (\d+) complete/m);
    expect(done.stdout).toMatch(/page response for group \d+: SUCCESS by HANDLER; the device retries/);
    expect(done.stdout).toMatch(/^retry: TRANSLATED idxd0 PASID \d+ 0x200123 \(rw\) -> 0x100200123 /m);
    expect(done.code).toBe(0);
    const group = /fault group (\d+)/.exec(done.stdout)![1]!;
    expect(await guest.exited).toBe(0);
    const items = guest
      .stdout()
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(items).toEqual([
      expect.objectContaining({
        kind: "group",
        faultGroupId: group,
        device: { mdevUuid: "mdev-f" },
        hpasid,
        gpasid: 101,
        requests: [{ address: "0x200000", access: "rw", lastRequest: true }],
      }),
      expect.objectContaining({ kind: "response", faultGroupId: group, code: "SUCCESS", sent: true, mapped: [{ gva: "0x200000", gpa: "0x200000" }] }),
      { kind: "answered", faultGroupId: group, code: "SUCCESS", source: "HANDLER" },
    ]);
    expect(guest.stderr()).toContain("2 item(s): 1 group(s), 1 answer(s), 0 fault(s)");

    // Exactly one response per group: a second answer is refused, with its reason.
    const again = await ctl("fault", "respond", "--vm", "vm1", "--group", group, "--code", "invalid");
    expect(again.code).toBe(1);
    expect(again.stderr).toContain(`group ${group} not answered: FAULT_GROUP_ALREADY_RESPONDED`);

    // A two-request group answered INVALID by hand: the waiting device gives up.
    const watching = await watcher("--count", "2");
    expect((await ctl(...dma, "--address", "0x300000", "--prgi", "5", "--not-last")).stdout).toMatch(/partial, waiting for its last request/);
    const waiting = ctlInBackground(...dma, "--address", "0x301000", "--prgi", "5", "--last", "--wait", "--timeout-ms", "20000");
    await until(() => /^group \d+ /m.test(watching.stdout()), 15_000, "the group to reach the watcher");
    const second = /^group (\d+) .* prgi 5 {2}requests 0x300000\(r\) 0x301000\(r,last\)$/m.exec(watching.stdout())?.[1];
    expect(second).toBeDefined();
    const answered = await ctl("fault", "respond", "--vm", "vm1", "--group", second!, "--code", "invalid");
    expect(answered.stdout).toContain(`group ${second} answered INVALID`);
    expect(await waiting.exited).toBe(3);
    expect(waiting.stdout()).toContain(`page response for group ${second}: INVALID by HANDLER; the device gives up on this DMA`);
    expect(await watching.exited).toBe(0);
    expect(watching.stdout()).toContain(`answered group ${second}: INVALID by HANDLER`);

    const html = join(dir, "faults.html");
    const timeline = await ctl("timeline", "--ioasid", String(hpasid), "--html", html);
    for (const step of [
      `iopf_group(${hpasid}, gpasid 101) group ${group} device idxd0`,
      `iopf_relay(${hpasid}, gpasid 101) container`,
      `page_response(${hpasid}, gpasid 101) group ${group} device idxd0 prgi 0: SUCCESS (HANDLER)`,
      `page_response(${hpasid}, gpasid 101) container`,
      "iopf_no_handler(",
    ]) {
      expect(
        steps(timeline.stdout).some((s) => s.includes(step.replace(/\s+/g, ""))),
        `${step}\n${timeline.stdout}`,
      ).toBe(true);
    }
    // The diagram's fault hand-offs (participants by id: iommu, vfio), Mermaid source escaped in the page.
    const page = readFileSync(html, "utf8");
    expect(page).toContain("iommu-&gt;&gt;vfio");
    expect(page).toContain("vfio-&gt;&gt;iommu");

    expect((await ctl("down")).code).toBe(0);
  }, 180_000);

  it("replaces a physical device's domain of a VM with `device replace`: nested translation on, off, and a refusal that changes nothing", async () => {
    const up = await onFreePorts(
      (base) => ctl("up", "--base-port", String(base), "--nats-port", String(base + 10)),
      (r) => PORT_TAKEN.test(r.stderr),
    );
    expect(up.code, up.stderr).toBe(0);
    expect((await ctl("vm", "create", "--name", "vm-dev", "--token", "4545")).code).toBe(0);
    expect((await ctl("device", "register", "--device", "pf-cli")).code).toBe(0);
    const assign = await ctl("device", "assign", "--vm", "vm-dev", "--device", "pf-cli");
    expect(assign.code, assign.stderr).toBe(0);
    const on = await ctl("device", "replace", "--vm", "vm-dev", "--device", "pf-cli", "--guest-pgtable", "0x9000", "--json");
    expect(on.code, on.stderr).toBe(0);
    const r = JSON.parse(on.stdout) as { domainId: number; guestPgtable: string };
    expect(r.guestPgtable).toBe(String(0x9000));
    const off = await ctl("device", "replace", "--vm", "vm-dev", "--device", "pf-cli", "--stage2");
    expect(off.code, off.stderr).toBe(0);
    expect(off.stdout).toMatch(/^device pf-cli of vm vm-dev: domain \d+ \(the VM's stage 2\); 0 fault group\(s\) of the old attachment answered INVALID$/m);
    expect(off.stdout).not.toContain(`domain ${r.domainId} `);
    // A device the VM does not have: refused with its reason, exit 1.
    const refused = await ctl("device", "replace", "--vm", "vm-dev", "--device", "pf-none", "--stage2");
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("DEVICE_NOT_ASSIGNED");
    expect((await ctl("device", "unassign", "--vm", "vm-dev", "--device", "pf-cli")).code).toBe(0);
    expect((await ctl("down")).code).toBe(0);
  }, 120_000);
});
