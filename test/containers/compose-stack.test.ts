import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addressesOf, connectStack, readState, type StackClients } from "@ioasid/cli";
import { isDomainError } from "@ioasid/errors";
import { core } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";

// The docker-compose stack as a user drives it: ioasidctl attached to the published ports, both
// life cycles of the document, and a role container killed in the middle of a crashed guest's
// teardown. scripts/test-containers.sh starts the stack and says how to reach it:
//   IOASID_CT_COMPOSE   the compose command of the running stack, as a JSON array
//   IOASID_PORT_*       its ports (docker-compose.yml's variables), DOCKER_HOST its engine

const run = promisify(execFile);
const composeEnv = process.env["IOASID_CT_COMPOSE"];
if (composeEnv === undefined) {
  throw new Error("IOASID_CT_COMPOSE is not set: run the container tests with `npm run test:containers` (it starts the compose stack)");
}
const compose = JSON.parse(composeEnv) as string[];
const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasid-containers-"));
const log = (line: string): void => console.log(`containers: ${line}`);

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

async function exec(file: string, args: readonly string[], timeoutMs = 60_000): Promise<Run> {
  try {
    const { stdout, stderr } = await run(file, [...args], { timeout: timeoutMs, maxBuffer: 16 << 20 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message: string };
    return { code: typeof e.code === "number" ? e.code : -1, stdout: e.stdout ?? "", stderr: e.stderr ?? e.message };
  }
}

/** ioasidctl with this test's --dir; throws with its output when it fails. */
async function ctl(...args: string[]): Promise<string> {
  const r = await exec(process.execPath, [cli, ...args, "--dir", dir]);
  if (r.code !== 0) throw new Error(`ioasidctl ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

async function composeRun(...args: string[]): Promise<string> {
  const r = await exec(compose[0]!, [...compose.slice(1), ...args], 120_000);
  if (r.code !== 0) throw new Error(`${compose.join(" ")} ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

async function docker(...args: string[]): Promise<string> {
  const r = await exec("docker", args);
  if (r.code !== 0) throw new Error(`docker ${args.join(" ")} exited ${r.code}:\n${r.stderr}`);
  return r.stdout.trim();
}

/** The container of a compose service, and its state ("running healthy", "exited -"). */
async function containerOf(service: string): Promise<string> {
  const id = (await composeRun("ps", "-q", service)).trim();
  if (id === "") throw new Error(`compose has no container for ${service}`);
  return id;
}
const stateOf = (id: string): Promise<string> => docker("inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}", id);

let clients: StackClients | undefined;

beforeAll(async () => {
  const out = await ctl("attach", "--timeout-ms", "60000");
  log(`ioasidctl attach --dir ${dir}\n${out.trimEnd()}`);
  clients = await connectStack(addressesOf(readState(dir)));
});

afterAll(async () => {
  await clients?.close();
  // A VMM process `vm create` started and a failed test left behind.
  const vms = join(dir, "vms.json");
  if (existsSync(vms)) {
    for (const vm of JSON.parse(readFileSync(vms, "utf8")) as Array<{ agentPid: number }>) {
      try {
        process.kill(vm.agentPid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  }
  rmSync(dir, { recursive: true, force: true });
});

describe("the docker-compose stack, driven by ioasidctl", () => {
  it("is attached: NATS connects and all five services answer SERVING on the published ports", async () => {
    const status = await ctl("status");
    for (const s of ["ioasid-core", "iommu", "vfio", "kvm", "vdcm"]) expect(status).toMatch(new RegExp(`^${s}\\s.*SERVING`, "m"));
    for (const s of ["nats", "ioasid-core", "iommu", "vfio", "kvm", "vdcm"]) expect(await stateOf(await containerOf(s))).toBe("running healthy");
  });

  for (const kind of ["normal", "crash"] as const) {
    const title = kind === "normal" ? "the normal life cycle (steps 1–24)" : "the crashed-guest life cycle (free before unbind, steps 13–30)";
    it(`runs ${title} with every invariant ok`, async () => {
      const started = Date.now();
      const r = await exec(process.execPath, [cli, "scenario", "run", kind, "--dir", dir]);
      const checks = r.stdout.split("\n").filter((l) => /^\s+(ok|FAIL)\s/.test(l));
      log(`scenario run ${kind}: exit ${r.code} in ${Date.now() - started} ms\n${checks.join("\n")}`);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(checks.length).toBeGreaterThan(5);
      expect(checks.filter((l) => /^\s+FAIL/.test(l))).toEqual([]);
    });
  }

  it("completes a crashed guest's cleanup once a killed VDCM container is back", async () => {
    const c = clients!;
    const token = String(Date.now());
    const uuid = `mdev-ct-${token}`;
    await ctl("mdev", "create", "--device", "idxd-ct", "--uuid", uuid, "--wqs", "0");
    const created = (await ctl("vm", "create", "--name", "vm-ct", "--token", token)).trim();
    const vmId = Number(/kvm vm (\d+)/.exec(created)?.[1]);
    log(created);
    await ctl("mdev", "assign", "--vm", "vm-ct", "--uuid", uuid);
    const { hpasid, generation } = JSON.parse(await ctl("pasid", "alloc", "--vm", "vm-ct")) as { hpasid: number; generation: number };
    await ctl("bind", "--vm", "vm-ct", "--pasid", String(hpasid), "--gpasid", "101", "--mdev", uuid);
    await ctl("mdev", "program", "--uuid", uuid, "--wq", "0", "--gpasid", "101");
    const holders = async (): Promise<{ state: string; roles: string[] } | undefined> => {
      try {
        const info = (await c.core.describe({ ioasid: hpasid })).info!;
        if (info.generation !== generation) return undefined;
        return { state: core.ioasidStateToJSON(info.state).replace("IOASID_STATE_", ""), roles: info.holders.map((h) => h.holder!.role).sort() };
      } catch (err) {
        if (isDomainError(err, "IOASID_NOT_FOUND")) return undefined;
        throw err;
      }
    };
    const before = await holders();
    expect(before).toEqual({ state: "ACTIVE", roles: ["iommu", "kvm", "set-owner", "vdcm"] });
    log(`guest up: host PASID ${hpasid} bound (IOMMU, KVM) and programmed on ${uuid} (VDCM); references held by ${before!.roles.join(", ")}`);

    const vdcm = await containerOf("vdcm");
    let killedAt = 0;
    try {
      // The role dies first, then the VMM: VFIO frees the set while VDCM cannot answer its FREE.
      await docker("kill", "--signal", "KILL", vdcm);
      killedAt = Date.now();
      await waitFor(async () => (await stateOf(vdcm)).startsWith("exited"), { timeoutMs: 10_000, message: "the VDCM container to exit" });
      log(`killed the VDCM container ${vdcm.slice(0, 12)} with SIGKILL (exit code ${await docker("inspect", "-f", "{{.State.ExitCode}}", vdcm)})`);
      log((await ctl("vm", "crash", "--name", "vm-ct")).trim());

      // KVM (CPU priority) and the IOMMU release theirs; VDCM's delivery is missed, its reference
      // stays: the PASID waits in FREE_PENDING, not reclaimed while a device may still use it.
      await waitFor(async () => JSON.stringify(await holders()) === JSON.stringify({ state: "FREE_PENDING", roles: ["vdcm"] }), {
        timeoutMs: 20_000,
        message: `host PASID ${hpasid} to be FREE_PENDING with only VDCM's reference`,
      });
      const stats = await c.core.getStats({});
      expect(stats.deliveriesMissed).toBeGreaterThan(0);
      log(`VMM crashed while VDCM is down: host PASID ${hpasid} FREE_PENDING, held only by vdcm; deliveries missed ${stats.deliveriesMissed}`);
    } finally {
      if (!(await stateOf(vdcm)).startsWith("running")) await composeRun("start", "vdcm");
    }
    const startedAt = Date.now();
    await waitFor(async () => (await stateOf(vdcm)) === "running healthy", { timeoutMs: 60_000, message: "the VDCM container to be healthy again" });
    log(`VDCM container started again: healthy ${Date.now() - startedAt} ms after \`${compose[0]} start vdcm\` (${Date.now() - killedAt} ms after the kill)`);

    // Back, VDCM settles what its earlier life left (its reference, the missed FREE): reclaimed.
    await waitFor(async () => (await holders()) === undefined, { timeoutMs: 20_000, message: `host PASID ${hpasid} to be reclaimed` });
    const reclaimedAt = Date.now();
    await waitFor(async () => (await c.core.getStats({})).deliveriesMissed === 0, { timeoutMs: 20_000, message: "no delivery left missed" });
    const sets = (await c.core.listSets({})).sets.map((s) => s.setId);
    // `vm crash` keeps the VM's record, marked crashed, so the CLI can still list and destroy it.
    const vms = (): unknown[] => JSON.parse(readFileSync(join(dir, "vms.json"), "utf8")) as unknown[];
    expect(vms()).toEqual([expect.objectContaining({ name: "vm-ct", vmId, crashed: true })]);
    // Every device, not only idxd-ct: whatever VDCM kept across its restart.
    const vdcmState = await c.vdcm.queryState({ deviceIds: [] });
    expect(vdcmState.devices.flatMap((d) => d.pasidEntries).filter((e) => e.hpasid === hpasid)).toEqual([]);
    const kvmState = await c.kvm.queryState({ vmId: 0 });
    expect(kvmState.vms.flatMap((v) => v.translations).filter((t) => t.hpasid === hpasid)).toEqual([]);
    // Tidy for whoever uses the stack next: the VM in KVM (a crash does not destroy it), through
    // the CLI as an operator would; the record goes with it.
    log((await ctl("vm", "destroy", "--name", "vm-ct")).trim());
    expect(vms()).toEqual([]);
    expect((await c.kvm.queryState({ vmId: 0 })).vms.filter((v) => v.vmId === vmId)).toEqual([]);
    log(
      `cleanup complete: host PASID ${hpasid} reclaimed ${reclaimedAt - startedAt} ms after the restart; no delivery missed; ` +
        `VDCM's PASID table and KVM's VMCS tables empty for it; sets left: ${sets.length === 0 ? "none" : sets.join(", ")}`,
    );
  });
});
