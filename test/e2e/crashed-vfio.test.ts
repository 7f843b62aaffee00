import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isDomainError } from "@ioasid/errors";
import { iommu, vdcm, vfio } from "@ioasid/proto";
import { DEFAULT_HOST_MEMORY } from "@ioasid/vfio";
import { natsEnv, startService, waitFor, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// Issue 6: VFIO killed with -9 takes its VMMs' sessions with it. Back on the same address, it finds
// the containers it had (kept in JetStream) and closes each as a crashed guest: every IOASID of the
// set freed and reclaimed through the ordered FREE events, the mdev given back to VDCM, the VM's
// stage-2 domain freed at the IOMMU — nothing of those VMs stays allocated (L2).

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

let stack: StackFixture;
let revived: ServiceProcess | undefined;
beforeAll(async () => {
  stack = await startStack();
}, 60_000);
afterAll(async () => {
  await revived?.stop();
  await stack?.stop();
});

describe("a crashed VFIO", () => {
  it("closes, when it returns, the containers it had: sets freed and reclaimed, mdevs unassigned, stage-2 domains freed", async () => {
    const c = stack.clients;
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, { deviceId: "dsa-v", maxPasidEntries: 16, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 }] }),
    );
    await c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, {
        deviceId: "dsa-v",
        maxPasids: 1 << 20,
        priCapable: true,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
        iommuGroup: 5,
      }),
    );
    await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "dsa-v", mdevUuid: "mdev-v", wqIds: [0] }));
    const opened = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xf10n, quota: 4, vmName: "vfio-crash" }));
    const session = new AbortController();
    const sessionEnded = new Promise<void>((resolve) => {
      void (async () => {
        try {
          for await (const _ of c.vfio.session({ containerId: opened.containerId }, { signal: session.signal }));
        } catch {
          /* the stream breaks with VFIO */
        }
        resolve();
      })();
    });
    await waitFor(
      async () => (await c.vfio.queryState({ containerId: opened.containerId })).containers[0]?.state === vfio.ContainerState.CONTAINER_STATE_ACTIVE,
    );
    const mdev = { ref: { $case: "mdevUuid" as const, value: "mdev-v" } };
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: mdev }));
    // Guest RAM: host memory VFIO gave the container (OpenContainerResponse.guest_memory).
    const hpa = opened.guestMemory[0]!.paddr;
    await c.vfio.mapDma(
      P(vfio.MapDmaRequest, { containerId: opened.containerId, iova: 0n, paddr: hpa, size: 0x10_0000n, access: { read: true, write: true } }),
    );
    const pasids = [];
    for (let i = 0; i < 2; i++) {
      const a = await c.vfio.allocPasid({ containerId: opened.containerId });
      await c.vfio.bindGuestPasid(
        P(vfio.BindGuestPasidRequest, {
          containerId: opened.containerId,
          device: mdev,
          hpasid: a.hpasid,
          generation: a.generation,
          gpasid: 70 + i,
          guestPgtable: 0x5000n,
        }),
      );
      pasids.push(a.hpasid);
    }
    await c.vdcm.writeWqPasid(P(vdcm.WriteWqPasidRequest, { mdevUuid: "mdev-v", virtualWq: 0, gpasid: 70 }));
    const stage2 = (await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).domains.find((d) => d.mappings.some((m) => m.paddr === hpa))!.domainId;

    const address = stack.procs.vfio.address;
    stack.procs.vfio.kill("SIGKILL");
    await stack.procs.vfio.exited;
    await sessionEnded;
    // While VFIO is away nothing frees the set: its IOASIDs stay allocated.
    for (const p of pasids) expect((await c.core.describe({ ioasid: p })).info?.setId).toBe(opened.setId);

    revived = await startService({
      name: "vfio",
      entry: serviceEntry("vfio"),
      env: {
        VFIO_GRPC_ADDRESS: address,
        ...(await natsEnv(stack.nats, "vfio")),
        IOASID_CORE_ADDRESS: stack.addresses.core,
        IOMMU_ADDRESS: stack.addresses.iommu,
        VDCM_ADDRESS: stack.addresses.vdcm,
      },
    });
    await waitFor(async () => (await c.core.listSets({})).sets.every((s) => s.setId !== opened.setId), {
      timeoutMs: 10_000,
      intervalMs: 50,
      message: "the set freed and destroyed",
    });
    await waitFor(async () => (await c.vdcm.queryState(P(vdcm.QueryStateRequest, {}))).mdevs.find((m) => m.mdevUuid === "mdev-v")?.setId === 0, {
      timeoutMs: 10_000,
      message: "the mdev given back",
    });
    await waitFor(async () => !(await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).domains.some((d) => d.domainId === stage2), {
      timeoutMs: 10_000,
      message: "the stage-2 domain freed",
    });
    expect((await c.vdcm.queryState(P(vdcm.QueryStateRequest, {}))).devices[0]!.pasidEntries).toEqual([]);
    expect((await c.vfio.queryState({ containerId: 0 })).containers).toEqual([]);
    expect(revived.logs()).toContain("closed the containers of the life before a crash");
    // The revived VFIO kept the crashed container's host memory until it had closed it, then put it
    // back in the pool: a VM asking for the whole pool is given it, the crashed VM's memory included
    // (refused with HOST_MEMORY_EXHAUSTED, creating nothing, until then).
    let whole: vfio.OpenContainerResponse | undefined;
    await waitFor(
      async () => {
        try {
          whole = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xf11n, quota: 1, guestMemorySize: DEFAULT_HOST_MEMORY.size }));
          return true;
        } catch (err) {
          if (isDomainError(err, "HOST_MEMORY_EXHAUSTED")) return false;
          throw err;
        }
      },
      { timeoutMs: 10_000, message: "the crashed VM's host memory back in the pool" },
    );
    expect(whole!.guestMemory).toEqual([{ paddr: DEFAULT_HOST_MEMORY.base, size: DEFAULT_HOST_MEMORY.size }]);
    await c.vfio.closeContainer({ containerId: whole!.containerId });
  }, 60_000);
});
