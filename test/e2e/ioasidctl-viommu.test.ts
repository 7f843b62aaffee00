import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { onFreePorts, PORT_TAKEN } from "../support/free-ports.js";

// `ioasidctl viommu` as a user runs it (issue 16 item 5), against the embedded stack on ports of its
// own: a VM's vIOMMU, a vdevice and an event queue; a device nested on the vIOMMU faults more than
// the queue holds, and `viommu read` shows the events by virt_id and the LOST_EVENTS gap; objects
// are destroyed in order, and the timeline shows them.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-viommu-"));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs ioasidctl to its end, whatever its exit status. */
function ctl(...args: string[]): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
}

/** Runs ioasidctl and expects exit 0 (its stderr in the message otherwise). */
async function ok(...args: string[]): Promise<Ran> {
  const r = await ctl(...args);
  expect(r.code, `${args.join(" ")}\n${r.stderr}`).toBe(0);
  return r;
}

afterAll(async () => {
  if (existsSync(join(dir, "stack.json"))) await ctl("down");
  rmSync(dir, { recursive: true, force: true });
});

describe("ioasidctl viommu", () => {
  it("has --help and is listed", async () => {
    const top = await ctl("--help");
    expect(top.stdout).toMatch(/^ {2}viommu +\S/m);
    const h = await ctl("viommu", "--help");
    expect(h.code).toBe(0);
    for (const verb of ["alloc", "vdevice", "eventq", "read", "destroy"]) expect(h.stdout).toContain(`ioasidctl viommu ${verb} `);
    expect((await ctl("device", "--help")).stdout).toContain("--viommu ID");
  });

  it("refuses bad flags with exit 2 before sending anything (no stack is running)", async () => {
    const bad: string[][] = [
      ["viommu"],
      ["viommu", "create", "--vm", "vm1", "--device", "pf-x"],
      ["viommu", "alloc", "--vm", "vm1"],
      ["viommu", "vdevice", "--vm", "vm1", "--viommu", "1", "--device", "pf-x"],
      ["viommu", "vdevice", "--vm", "vm1", "--viommu", "0", "--device", "pf-x", "--virt-id", "1"],
      ["viommu", "vdevice", "--vm", "vm1", "--viommu", "1", "--device", "pf-x", "--virt-id", "x"],
      ["viommu", "eventq", "--vm", "vm1", "--viommu", "1", "--depth", "0"],
      ["viommu", "eventq", "--vm", "vm1", "--viommu", "1", "--depth", "4097"],
      ["viommu", "eventq", "--vm", "vm1", "--depth", "4"],
      ["viommu", "read", "--vm", "vm1"],
      ["viommu", "read", "--vm", "vm1", "--eventq", "1", "--max", "-1"],
      ["viommu", "destroy", "--vm", "vm1"],
      ["viommu", "destroy", "--vm", "vm1", "--eventq", "1", "--viommu", "2"],
      ["viommu", "alloc", "--vm", "vm1", "--device", "pf-x", "--no-such-flag"],
      ["device", "replace", "--vm", "vm1", "--device", "pf-x", "--stage2", "--viommu", "1"],
      ["device", "replace", "--vm", "vm1", "--device", "pf-x", "--guest-pgtable", "0x9000", "--viommu", "0"],
    ];
    for (const args of bad) {
      const r = await ctl(...args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr).toMatch(/usage:/);
      expect(r.stderr).not.toMatch(/no stack is running/);
    }
  });

  it("allocates a vIOMMU, a vdevice and an event queue, reads a nested device's faults by virt_id with the LOST_EVENTS gap, and destroys in order", async () => {
    const up = await onFreePorts(
      (base) => ctl("up", "--base-port", String(base), "--nats-port", String(base + 10)),
      (r) => PORT_TAKEN.test(r.stderr),
    );
    expect(up.code, up.stderr).toBe(0);
    await ok("vm", "create", "--name", "vm-vi", "--token", "4646");
    await ok("device", "register", "--device", "pf-host");
    // Without PRI, a fault is an unrecoverable DMA fault: what the event queue carries.
    await ok("device", "register", "--device", "pf-nest", "--no-pri");
    await ok("device", "assign", "--vm", "vm-vi", "--device", "pf-host");
    await ok("device", "assign", "--vm", "vm-vi", "--device", "pf-nest");

    const viommu = JSON.parse((await ok("viommu", "alloc", "--vm", "vm-vi", "--device", "pf-host", "--json")).stdout) as { viommuId: number };
    const v = String(viommu.viommuId);
    const vdev = await ok("viommu", "vdevice", "--vm", "vm-vi", "--viommu", v, "--device", "pf-nest", "--virt-id", "0x42");
    const vdevice = /^vdevice (\d+) in viommu \d+: device pf-nest is virt_id 0x42 to the guest$/m.exec(vdev.stdout)?.[1];
    expect(vdevice, vdev.stdout).toBeDefined();
    const q = await ok("viommu", "eventq", "--vm", "vm-vi", "--viommu", v, "--depth", "2");
    const eventq = /^eventq (\d+) on viommu \d+: DMA faults, 2 deep$/m.exec(q.stdout)?.[1];
    expect(eventq, q.stdout).toBeDefined();
    // A virt_id is unique per vIOMMU: refused with its reason, exit 1.
    const dup = await ctl("viommu", "vdevice", "--vm", "vm-vi", "--viommu", v, "--device", "pf-host", "--virt-id", "0x42");
    expect(dup.code).toBe(1);
    expect(dup.stderr).toContain("VDEVICE_EXISTS");

    const nested = await ok("device", "replace", "--vm", "vm-vi", "--device", "pf-nest", "--guest-pgtable", "0x9000", "--viommu", v);
    expect(nested.stdout).toMatch(new RegExp(`nested domain on viommu ${v} over the stage 2`));
    // Four faults into a queue two deep: 1 and 2 queued, 3 and 4 lost.
    for (const address of ["0x100000", "0x200000", "0x300000", "0x400000"]) {
      const dma = await ctl("dma", "--device", "pf-nest", "--without-pasid", "--address", address);
      expect(dma.code, dma.stderr).toBe(3);
    }
    const read = await ok("viommu", "read", "--vm", "vm-vi", "--eventq", eventq!);
    expect(read.stdout.trim().split("\n")).toEqual([
      "seq 1 virt_id 0x42 no PASID address 0x100000 NOT_PRESENT",
      "seq 2 virt_id 0x42 no PASID address 0x200000 NOT_PRESENT",
      "lost 3..4 (2 events): the queue overflowed",
    ]);
    expect(read.stdout).not.toContain("pf-nest");
    expect((await ok("viommu", "read", "--vm", "vm-vi", "--eventq", eventq!, "--json")).stdout).toBe("");

    // In order: the vIOMMU is in use until its queue, vdevice and nested domain are gone.
    const busy = await ctl("viommu", "destroy", "--vm", "vm-vi", "--viommu", v);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain("VIOMMU_IN_USE");
    await ok("viommu", "destroy", "--vm", "vm-vi", "--eventq", eventq!);
    await ok("device", "replace", "--vm", "vm-vi", "--device", "pf-nest", "--stage2");
    await ok("viommu", "destroy", "--vm", "vm-vi", "--vdevice", vdevice!);
    const gone = await ok("viommu", "destroy", "--vm", "vm-vi", "--viommu", v);
    expect(gone.stdout).toContain(`viommu ${v} of vm vm-vi destroyed`);
    const again = await ctl("viommu", "destroy", "--vm", "vm-vi", "--viommu", v);
    expect(again.code).toBe(1);
    expect(again.stderr).toContain("VIOMMU_NOT_FOUND");

    // History records are sent as they happen, not awaited by the call: read until all are there (bounded).
    const steps = ["viommu_alloc", "vdevice_alloc", "veventq_alloc", "veventq_destroy", "vdevice_destroy", "viommu_destroy"];
    let timeline = "";
    for (let attempt = 0; attempt < 20 && !steps.every((x) => timeline.includes(x)); attempt++) {
      timeline = (await ok("timeline")).stdout.replace(/\s+/g, "");
    }
    for (const step of steps) expect(timeline, step).toContain(step);
    expect((await ctl("down")).code).toBe(0);
  }, 180_000);
});
