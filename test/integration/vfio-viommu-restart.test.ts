import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { iommu, vfio } from "@ioasid/proto";
import { natsEnv, startService, waitFor, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { openGuest, registerDevice } from "../support/fault-fixture.js";

// Issue 16 with issue 6's crashed VFIO: a VFIO killed with -9 while its VM has a vIOMMU, a vdevice,
// an event queue and a device nested on the vIOMMU comes back, finds them in its kept state, and
// destroys them in order before it frees the VM's stage 2 — nothing of the VM stays at the IOMMU.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const pci = (id: string) => ({ ref: { $case: "deviceId" as const, value: id } });

let stack: StackFixture;
let revived: ServiceProcess | undefined;
beforeAll(async () => {
  stack = await startStack();
}, 60_000);
afterAll(async () => {
  await revived?.stop();
  await stack?.stop();
});

describe("a crashed VFIO with a VM's vIOMMU", () => {
  it("destroys, when it returns, the kept event queue, vdevice and vIOMMU (after the nested domain) and frees the stage 2", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-r0");
    await registerDevice(c, "pf-r1", { priCapable: false });
    const g = await openGuest(c, 0xc100n, "pf-r0");
    const id = g.containerId;
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: id, device: pci("pf-r1") }));
    const v = (await c.vfio.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci("pf-r0") }))).viommu!;
    const d = (await c.vfio.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: id, viommuId: v.viommuId, device: pci("pf-r1"), virtId: 9n }))).vdevice!;
    const q = (await c.vfio.allocVeventq({ containerId: id, viommuId: v.viommuId, depth: 2 })).veventq!;
    const nested = await c.vfio.replaceDeviceDomain(
      P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci("pf-r1"), guestPgtable: 0x9000n, viommuId: v.viommuId }),
    );

    const address = stack.procs.vfio.address;
    stack.procs.vfio.kill("SIGKILL");
    await stack.procs.vfio.exited;
    // While VFIO is away its VM's objects stay at the IOMMU.
    expect((await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).viommus.some((x) => x.viommuId === v.viommuId)).toBe(true);

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
    await waitFor(async () => !(await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).domains.some((x) => x.domainId === g.stage2), {
      message: "the crashed VM's stage 2 freed",
    });
    const after = await c.iommu.queryState(P(iommu.QueryStateRequest, {}));
    expect(after.viommus.some((x) => x.viommuId === v.viommuId)).toBe(false);
    expect(after.vdevices.some((x) => x.vdeviceId === d.vdeviceId)).toBe(false);
    expect(after.veventqs.some((x) => x.veventqId === q.veventqId)).toBe(false);
    expect(after.domains.some((x) => x.domainId === nested.domainId)).toBe(false);
    expect((await c.vfio.queryState({ containerId: 0 })).containers).toEqual([]);
  });
});
