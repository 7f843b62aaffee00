import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { eventOf, readHistory } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { decodeVfioCapability } from "@ioasid/grpc-kit";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { findPasid } from "@ioasid/cli";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// A VMM killed (SIGKILL) mid-life-cycle: VFIO sees its session drop and frees every IOASID of the
// VM's set; KVM, VDCM and the IOMMU clear their tables through the ordered FREE events, in
// CPU → DEVICE → IOMMU order, and every IOASID is reclaimed.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));

let stack: StackFixture;
let vmm: ChildProcess | undefined;
beforeAll(async () => {
  stack = await startStack();
}, 60_000);
afterAll(async () => {
  vmm?.kill("SIGKILL");
  await stack?.stop();
});

describe("crashed VMM", () => {
  it("frees every IOASID of its VM and empties every role's tables of it, CPU → DEVICE → IOMMU", async () => {
    const c = stack.clients;
    const token = 0x5eedn;
    const since = performance.timeOrigin + performance.now();
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, {
        deviceId: "dsa0",
        maxPasidEntries: 64,
        wqs: [0, 1, 2, 3].map((wqId) => ({ wqId, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 })),
      }),
    );
    await c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, {
        deviceId: "dsa0",
        maxPasids: 1 << 20,
        priCapable: true,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
        iommuGroup: 7,
      }),
    );
    await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "dsa0", mdevUuid: "mdev-crash", wqIds: [0, 1, 2, 3] }));
    const vm = (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 1, vmName: "doomed" }))).vm!;

    // The VMM: a process of its own holding the VFIO session (as `ioasidctl vm create` runs it).
    const vmmCredentials = (await stack.nats.certificateDir({ role: "vmm", instance: "doomed" })) ?? "";
    vmm = spawn(process.execPath, [cli, "vmm-agent", "--vfio", stack.addresses.vfio, "--token", String(token), "--quota", "16", "--name", "doomed"], {
      stdio: ["ignore", "pipe", "inherit"],
      env: { ...process.env, IOASID_CREDENTIALS_DIR: vmmCredentials },
    });
    const opened = await new Promise<{ containerId: number; setId: number; capability: string }>((resolve, reject) => {
      vmm!.stdout!.on("data", (d) => {
        const line = String(d)
          .split("\n")
          .find((l) => l.startsWith("{"));
        if (line !== undefined) resolve(JSON.parse(line) as { containerId: number; setId: number; capability: string });
      });
      vmm!.on("exit", (code) => reject(new Error(`VMM exited ${code}`)));
    });
    // The test acts for that VMM, with the capability it printed.
    c.vfio.remember(opened.containerId, decodeVfioCapability(opened.capability)!);
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: { ref: { $case: "mdevUuid", value: "mdev-crash" } } }));

    // Four guest PASIDs bound, in KVM's table and programmed into the device.
    const hpasids: number[] = [];
    for (let i = 0; i < 4; i++) {
      const a = await c.vfio.allocPasid({ containerId: opened.containerId });
      hpasids.push(a.hpasid);
      await c.vfio.bindGuestPasid(
        P(vfio.BindGuestPasidRequest, {
          containerId: opened.containerId,
          device: { ref: { $case: "mdevUuid", value: "mdev-crash" } },
          hpasid: a.hpasid,
          generation: a.generation,
          gpasid: 200 + i,
          guestPgtable: 0x2000n,
        }),
      );
    }
    await waitFor(async () => ((await c.kvm.queryState({ vmId: vm.vmId })).vms[0]?.translations.length ?? 0) === 4, {
      timeoutMs: 10_000,
      message: "4 VMCS entries",
    });
    for (let i = 0; i < 4; i++) await c.vdcm.writeWqPasid({ mdevUuid: "mdev-crash", virtualWq: i, gpasid: 200 + i });
    for (const h of hpasids) expect((await c.core.describe({ ioasid: h })).info!.refcount).toBe(4);

    // kill -9 the VMM.
    vmm.kill("SIGKILL");
    await waitFor(
      async () => {
        for (const h of hpasids) {
          try {
            await c.core.describe({ ioasid: h });
            return false;
          } catch (err) {
            if (!isDomainError(err, "IOASID_NOT_FOUND")) throw err;
          }
        }
        return true;
      },
      { timeoutMs: 15_000, message: "every IOASID of the crashed VM reclaimed" },
    );
    await expectRefusedSet(c, opened.setId);

    // Every role's tables are empty of them.
    const [k, d, i] = await Promise.all([
      c.kvm.queryState({ vmId: 0 }),
      c.vdcm.queryState({ deviceIds: [] }),
      c.iommu.queryState({ deviceIds: [], maxIotlbFlushes: 0, viommusOnly: false }),
    ]);
    for (const h of hpasids) {
      expect(findPasid(k, h), `kvm still has ${h}`).toEqual([]);
      expect(findPasid(d, h), `vdcm still has ${h}`).toEqual([]);
      expect(findPasid(i, h), `iommu still has ${h}`).toEqual([]);
    }

    // In CPU → DEVICE → IOMMU order, per IOASID: KVM's release before VDCM's before the IOMMU's.
    const history = await readHistory(c.nc, { sinceMs: since });
    for (const h of hpasids) {
      const puts = history
        .filter((r) => r.ioasid === h && r.action?.$case === "ioasidPut")
        .map((r) => (r.action.$case === "ioasidPut" ? r.action.value.holder?.role : undefined));
      expect(puts, `releases of ${h}`).toEqual(["kvm", "vdcm", "iommu"]);
      const reclaim = history.find((r) => r.ioasid === h && eventOf(r) === "RECLAIM");
      expect(reclaim?.refcount).toBe(0);
    }
  }, 90_000);
});

async function expectRefusedSet(c: StackFixture["clients"], setId: number): Promise<void> {
  await waitFor(
    async () => {
      try {
        await c.core.getSet(P(core.GetSetRequest, { setId }));
        return false;
      } catch (err) {
        return isDomainError(err, "SET_NOT_FOUND");
      }
    },
    { timeoutMs: 10_000, message: `set ${setId} destroyed` },
  );
}
