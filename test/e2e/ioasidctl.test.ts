import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";

// ioasidctl as a user runs it: up, a VM with a VMM process, guest verbs, inspect, the crash,
// timeline (terminal and HTML), down — against the embedded stack on ports of its own.

const run = promisify(execFile);
const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-"));
const base = 20_000 + Math.floor(Math.random() * 20_000);
const natsPort = base + 10;

async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000 });
  return stdout;
}

afterAll(async () => {
  if (existsSync(join(dir, "stack.json"))) await ctl("down").catch(() => undefined);
  rmSync(dir, { recursive: true, force: true });
});

describe("ioasidctl", () => {
  it("has --help on every command", async () => {
    const top = (await run(process.execPath, [cli, "--help"])).stdout;
    const names = [...top.matchAll(/^ {2}(\w+) {2}/gm)].map((m) => m[1]!);
    expect(names).toEqual(
      expect.arrayContaining(["up", "down", "status", "inspect", "timeline", "scenario", "demo", "vm", "pasid", "bind", "unbind", "mdev", "enqcmd", "submit"]),
    );
    for (const n of names) expect((await run(process.execPath, [cli, n, "--help"])).stdout).toContain("usage:");
  });

  it("brings the stack up, drives a VM through it, shows it, crashes it, and brings the stack down", async () => {
    const up = await ctl("up", "--base-port", String(base), "--nats-port", String(natsPort));
    for (const s of ["ioasid-core", "iommu", "vfio", "kvm", "vdcm"]) expect(up).toMatch(new RegExp(`${s}\\s+pid \\d+ .*SERVING`));
    await expect(ctl("up", "--base-port", String(base), "--nats-port", String(natsPort))).rejects.toThrow(/already running/);

    await ctl("mdev", "create", "--device", "idxd0", "--uuid", "mdev-cli", "--wqs", "0");
    expect(await ctl("vm", "create", "--name", "vm1", "--token", "4242")).toMatch(/vm vm1: kvm vm \d+, vfio container \d+, set \d+/);
    await ctl("mdev", "assign", "--vm", "vm1", "--uuid", "mdev-cli");
    const alloc = JSON.parse(await ctl("pasid", "alloc", "--vm", "vm1")) as { hpasid: number };
    await ctl("bind", "--vm", "vm1", "--pasid", String(alloc.hpasid), "--gpasid", "101", "--mdev", "mdev-cli");
    const inspect = await ctl("inspect");
    expect(inspect).toMatch(new RegExp(`\\s${alloc.hpasid}\\s+set \\d+\\s+gen \\d+\\s+ACTIVE\\s+spid 101`));
    const state = JSON.parse(await ctl("inspect", "--json")) as { ioasids: Array<{ ioasid: number; spid: number }> };
    expect(state.ioasids.find((i) => i.ioasid === alloc.hpasid)?.spid).toBe(101);
    expect(await ctl("enqcmd", "--vm", "vm1", "--gpasid", "999")).toMatch(/ENQCMD_OUTCOME_GP/);

    // kill -9 the VMM: VFIO frees the VM's IOASIDs.
    await ctl("vm", "crash", "--name", "vm1");
    let after = "";
    for (let i = 0; i < 100 && !/in use 0/.test(after); i++) {
      after = await ctl("inspect");
      if (!/in use 0/.test(after)) await new Promise((r) => setTimeout(r, 100));
    }
    expect(after).toMatch(/in use 0/);

    const html = join(dir, "t.html");
    const timeline = await ctl("timeline", "--ioasid", String(alloc.hpasid), "--html", html);
    expect(timeline).toMatch(/VFIO\s+IOMMU\s+KVM\s+VDCM\s+IOASID\s+Ref/);
    expect(timeline).toContain("Reclaimed");
    expect(readFileSync(html, "utf8")).toContain("sequenceDiagram");

    const down = await ctl("down");
    expect(down).toMatch(/nats-server\s+pid \d+ stopped/);
    expect(existsSync(join(dir, "stack.json"))).toBe(false);
  }, 120_000);

  it("says what to do when a port is taken", async () => {
    const { createServer } = await import("node:net");
    const srv = createServer().listen(base + 100, "127.0.0.1");
    await new Promise((r) => srv.once("listening", r));
    try {
      const other = mkdtempSync(join(tmpdir(), "ioasidctl-"));
      await expect(
        run(process.execPath, [cli, "up", "--dir", other, "--base-port", String(base + 100), "--nats-port", String(natsPort + 100)]),
      ).rejects.toThrow(/port \d+ \(ioasid-core\) is in use/);
      expect(existsSync(join(other, "stack.json"))).toBe(false);
      rmSync(other, { recursive: true, force: true });
    } finally {
      srv.close();
    }
  });
});
