import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { randomBasePort } from "../support/free-ports.js";

// ioasidctl as a user runs it: up, a VM with a VMM process, guest verbs, inspect, the crash,
// timeline (terminal and HTML), down — against the embedded stack on ports of its own.

const run = promisify(execFile);
const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-"));
const base = randomBasePort();
const natsPort = base + 10;

async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000 });
  return stdout;
}

/** ioasidctl to its end, whatever its exit status. */
function ctlCode(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
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

    // status --json: every process up, exit 0.
    const status = JSON.parse(await ctl("status", "--json")) as {
      ok: boolean;
      nats: { up: boolean; pid: number };
      supervisor: { running: boolean };
      services: { name: string; pid: number; address: string; metrics: string; health: string; restarts: number }[];
    };
    expect(status).toMatchObject({ ok: true, nats: { up: true, pid: expect.any(Number) }, supervisor: { running: true } });
    expect(status.services.map((s) => [s.name, s.health, typeof s.pid, s.restarts])).toEqual(
      ["ioasid-core", "iommu", "vfio", "kvm", "vdcm"].map((s) => [s, "SERVING", "number", 0]),
    );
    // Each service's Prometheus endpoint: base-port+5 … +9, in service order, answering a scrape.
    expect(status.services.map((s) => s.metrics)).toEqual([5, 6, 7, 8, 9].map((i) => `http://127.0.0.1:${base + i}/metrics`));
    for (const s of status.services) expect(await (await fetch(s.metrics)).text(), s.name).toMatch(/^ioasid_grpc_server_handled_total\{/m);
    expect(await ctl("status")).toContain(`metrics http://127.0.0.1:${base + 5}/metrics`);

    await ctl("mdev", "create", "--device", "idxd0", "--uuid", "mdev-cli", "--wqs", "0");
    expect(await ctl("vm", "create", "--name", "vm1", "--token", "4242")).toMatch(/vm vm1: kvm vm \d+, vfio container \d+, set \d+/);
    await ctl("mdev", "assign", "--vm", "vm1", "--uuid", "mdev-cli");
    const alloc = JSON.parse(await ctl("pasid", "alloc", "--vm", "vm1")) as { hpasid: number };
    await ctl("bind", "--vm", "vm1", "--pasid", String(alloc.hpasid), "--gpasid", "101", "--mdev", "mdev-cli");
    const inspect = await ctl("inspect");
    expect(inspect).toMatch(new RegExp(`\\s${alloc.hpasid}\\s+set \\d+\\s+gen \\d+\\s+ACTIVE\\s+spid 101`));
    // The proto3 JSON mapping: enum names, 64-bit integers as decimal strings, bytes as base64.
    const state = JSON.parse(await ctl("inspect", "--json")) as {
      stats: { capacity: number };
      sets: Array<{ token: unknown }>;
      ioasids: Array<{ ioasid: number; spid: number; state: unknown }>;
      vfio: { containers: Array<{ state: unknown; guestMemory: Array<{ paddr: unknown }> }> };
    };
    const entry = state.ioasids.find((i) => i.ioasid === alloc.hpasid);
    expect(entry).toMatchObject({ spid: 101, state: "IOASID_STATE_ACTIVE" });
    expect(state.sets.length).toBeGreaterThan(0);
    for (const set of state.sets) expect(set.token).toMatch(/^\d+$/);
    expect(state.vfio.containers[0]).toMatchObject({
      state: expect.stringMatching(/^CONTAINER_STATE_/),
      guestMemory: [{ paddr: expect.stringMatching(/^\d+$/) }],
    });

    // #GP is a refusal: exit 3, for every command's refusals.
    const gp = await ctlCode("enqcmd", "--vm", "vm1", "--gpasid", "999");
    expect({ code: gp.code, stdout: gp.stdout }).toEqual({ code: 3, stdout: expect.stringMatching(/ENQCMD_OUTCOME_GP/) });
    const gpJson = await ctlCode("enqcmd", "--vm", "vm1", "--gpasid", "999", "--json");
    expect(gpJson.code).toBe(3);
    expect(JSON.parse(gpJson.stdout)).toMatchObject({ outcome: "ENQCMD_OUTCOME_GP" });

    // kill -9 the VMM: VFIO frees the VM's IOASIDs.
    await ctl("vm", "crash", "--name", "vm1");
    let after = "";
    for (let i = 0; i < 100 && !/in use 0/.test(after); i++) {
      after = await ctl("inspect");
      if (!/in use 0/.test(after)) await new Promise((r) => setTimeout(r, 100));
    }
    expect(after).toMatch(/in use 0/);

    // The crashed VM stays listed and can be destroyed, and its name taken again (issue 17).
    expect(await ctl("vm", "list")).toMatch(/^vm1 .* CRASHED/m);
    expect(await ctl("vm", "destroy", "--name", "vm1")).toContain("vm vm1 destroyed");
    expect(await ctl("inspect")).not.toMatch(/\(vm1, set/);
    expect(await ctl("vm", "create", "--name", "vm1", "--token", "4242")).toMatch(/vm vm1: kvm vm \d+/);
    const twice = await ctlCode("vm", "create", "--name", "vm1", "--token", "4242");
    expect({ code: twice.code, stderr: twice.stderr }).toEqual({
      code: 1,
      stderr: expect.stringMatching(/vm vm1 exists: `ioasidctl vm destroy --name vm1` first/),
    });

    const html = join(dir, "t.html");
    const timeline = await ctl("timeline", "--ioasid", String(alloc.hpasid), "--html", html);
    expect(timeline).toMatch(/VFIO\s+IOMMU\s+KVM\s+VDCM\s+IOASID\s+Ref/);
    expect(timeline).toContain("Reclaimed");
    expect(readFileSync(html, "utf8")).toContain("sequenceDiagram");
    // A filter that matches nothing says so and exits 1, rather than printing unrelated rows.
    const none = await ctlCode("timeline", "--ioasid", "99999");
    expect({ code: none.code, stdout: none.stdout, stderr: none.stderr }).toEqual({
      code: 1,
      stdout: "",
      stderr: "ioasidctl timeline: no IOASID 99999 in the history\n",
    });

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
