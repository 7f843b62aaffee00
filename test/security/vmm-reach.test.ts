import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { createClient } from "@ioasid/grpc-kit";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// Issue 14 item 3, DESIGN §11: "VMMs reach only VFIO (the roles' other services are not reachable
// with a VMM's credential)". Without it, a guest's VMM could name another VM's vm_id at KVM
// (DestroyVm), its mdev at VDCM (clear its WQ) or a device at the IOMMU, around VFIO's capability.
// A stack with mTLS (as `ioasidctl up` runs it); the VMM presents a VMM certificate of the stack's CA.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

let stack: StackFixture;
beforeAll(async () => {
  stack = await startStack();
}, 90_000);
afterAll(async () => {
  await stack?.stop();
});

async function refusedAsVmm(call: Promise<unknown>, what: string): Promise<void> {
  const err = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, `${what} was accepted`).toBeInstanceOf(DomainError);
  expect((err as DomainError).code, what).toBe(Code.PERMISSION_DENIED);
  expect((err as DomainError).reason, what).toBe("ROLE_NOT_ALLOWED");
}

describe("a VMM's credential (issue 14, DESIGN §11)", () => {
  it("reaches VFIO, and nothing else: KVM, VDCM, the IOMMU and the core refuse it, and nothing changes", async () => {
    const tls = stack.vmmTls;
    expect(tls, "the stack fixture runs with mTLS").toBeDefined();
    const as = { tls: tls!, deadlineMs: 5000 };
    const c = stack.clients;
    // A VM that exists (created by the operator, as ioasidctl does).
    const vm = (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: 0xbeefn, vcpuCount: 1, vmName: "victim" }))).vm!;
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, { deviceId: "iax9", maxPasidEntries: 8, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 4 }] }),
    );
    const before = JSON.stringify({
      vms: (await c.kvm.queryState({ vmId: 0 })).vms.map((v) => v.vmId),
      devices: (await c.vdcm.queryState({ deviceIds: [] })).devices.map((d) => d.deviceId),
    });

    const vmmKvm = createClient(kvm.KvmServiceService, stack.addresses.kvm, as);
    const vmmVdcm = createClient(vdcm.VdcmServiceService, stack.addresses.vdcm, as);
    const vmmIommu = createClient(iommu.IommuServiceService, stack.addresses.iommu, as);
    const vmmCore = createClient(core.CoreServiceService, stack.addresses.core, as);
    const vmmVfio = createClient(vfio.VfioServiceService, stack.addresses.vfio, as);
    try {
      await refusedAsVmm(vmmKvm.destroyVm({ vmId: vm.vmId }), "KVM DestroyVm of another VM");
      await refusedAsVmm(vmmKvm.queryState({ vmId: 0 }), "KVM QueryState");
      await refusedAsVmm(vmmVdcm.removeDevice({ deviceId: "iax9" }), "VDCM RemoveDevice");
      await refusedAsVmm(vmmIommu.queryState({ deviceIds: [], maxIotlbFlushes: 0, viommusOnly: false }), "IOMMU QueryState");
      await refusedAsVmm(vmmCore.listSets({}), "the core's ListSets");
      expect(
        JSON.stringify({
          vms: (await c.kvm.queryState({ vmId: 0 })).vms.map((v) => v.vmId),
          devices: (await c.vdcm.queryState({ deviceIds: [] })).devices.map((d) => d.deviceId),
        }),
      ).toBe(before);
      // VFIO serves it: the VMM opens its own container.
      const opened = await vmmVfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xbeefn, quota: 2, vmName: "victim" }));
      expect(opened.containerId).toBeGreaterThan(0);
      await vmmVfio.closeContainer(
        { containerId: opened.containerId },
        { metadata: { "ioasid-vfio-capability": Buffer.from(opened.capability).toString("hex") } },
      );
    } finally {
      for (const cl of [vmmKvm, vmmVdcm, vmmIommu, vmmCore, vmmVfio]) cl.close();
    }
  });
});
