import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { core, iommu, vdcm, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { expectRefused, startCore, type CoreFixture } from "../support/core-fixture.js";
import {
  startIommu,
  startVdcm,
  startVfio,
  startVmm,
  waitContainerGone,
  waitSetGone,
  type RoleFixture,
  type VfioFixture,
  type VmmProcess,
  errorLines,
} from "../support/vfio-fixture.js";

// VFIO with the real IOMMU and VDCM processes (and the real core and NATS): physical devices and
// mdevs assigned through them, guest PASID binds, isolation between two VMs, and the crashed-VMM
// teardown reaching the IOMMU's PASID tables and VDCM's device entries.

const PF = "0000:6a:01.0";
const PF2 = "0000:6a:02.0";
const IDXD = "0000:6b:00.0";
const MDEV = "6f0c2a1e-0000-4000-8000-000000000001";
const deviceRef = (id: string): vfio.DeviceRef => ({ ref: { $case: "deviceId", value: id } });
const mdevRef = (uuid: string): vfio.DeviceRef => ({ ref: { $case: "mdevUuid", value: uuid } });

let fx: CoreFixture;
let mmu: RoleFixture<typeof iommu.IommuServiceService>;
let dcm: RoleFixture<typeof vdcm.VdcmServiceService>;
let vf: VfioFixture;
let vmm: VmmProcess | undefined;

beforeEach(async () => {
  fx = await startCore();
  mmu = await startIommu(fx);
  dcm = await startVdcm(fx, mmu.proc.address);
  vf = await startVfio(fx, { IOMMU_ADDRESS: mmu.proc.address, VDCM_ADDRESS: dcm.proc.address });
  for (const [deviceId, group] of [
    [PF, 1],
    [PF2, 2],
    [IDXD, 3],
  ] as const) {
    await mmu.client.registerDevice(
      iommu.RegisterDeviceRequest.fromPartial({
        deviceId,
        maxPasids: 1 << 20,
        priCapable: true,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
        iommuGroup: group,
      }),
    );
  }
  await dcm.client.registerDevice(vdcm.RegisterDeviceRequest.fromPartial({ deviceId: IDXD, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED }] }));
  await dcm.client.createMdev(vdcm.CreateMdevRequest.fromPartial({ parentDeviceId: IDXD, mdevUuid: MDEV, wqIds: [0] }));
});
afterEach(async () => {
  await vmm?.proc.stop("SIGKILL");
  vmm = undefined;
  expect(errorLines(vf.proc)).toEqual([]);
  const codes = [await vf?.stop(), await dcm?.stop(), await mmu?.stop(), await fx?.stop()];
  expect(codes).toEqual([0, 0, 0, 0]);
});

async function iommuState() {
  return mmu.client.queryState(iommu.QueryStateRequest.fromPartial({}));
}

describe("vfio with the real IOMMU and VDCM", () => {
  it("assigns a device and an mdev, binds guest PASIDs, keeps a second VM out, and tears everything down when the VMM is killed", async () => {
    vmm = await startVmm(vf.proc.address, { mmToken: 0xa1n });
    // The test acts for that VMM: it holds the capability the VMM's container answered.
    vf.client.remember(vmm.containerId, vmm.capability);
    const a = vmm.containerId;
    // mdevs before PASIDs: VDCM registers on the set with the first mdev.
    const m = await vf.client.assignDevice({ containerId: a, device: mdevRef(MDEV) });
    expect(m.assigned).toMatchObject({ device: mdevRef(MDEV), parentDeviceId: IDXD });
    await vf.client.assignDevice({ containerId: a, device: deviceRef(PF) });
    const p1 = await vf.client.allocPasid({ containerId: a });
    const p2 = await vf.client.allocPasid({ containerId: a });
    const b1 = await vf.client.bindGuestPasid(
      vfio.BindGuestPasidRequest.fromPartial({
        containerId: a,
        device: deviceRef(PF),
        hpasid: p1.hpasid,
        generation: p1.generation,
        gpasid: 101,
        guestPgtable: 0x10000n,
      }),
    );
    expect(b1.firstBind).toBe(true);
    await vf.client.bindGuestPasid(
      vfio.BindGuestPasidRequest.fromPartial({
        containerId: a,
        device: mdevRef(MDEV),
        hpasid: p2.hpasid,
        generation: p2.generation,
        gpasid: 102,
        guestPgtable: 0x20000n,
      }),
    );
    // The guest programs its work queue with guest PASID 102 (VDCM translates it to p2).
    const wq = await dcm.client.writeWqPasid({ mdevUuid: MDEV, virtualWq: 0, gpasid: 102 });
    expect(wq.entry).toMatchObject({ hpasid: p2.hpasid, setId: vmm.setId });

    const entries = (await iommuState()).devices.flatMap((d) => d.pasidEntries.filter((e) => !e.withoutPasid).map((e) => ({ d: d.deviceId, ...e })));
    expect(entries.map((e) => [e.d, e.pasid, e.gpasid, e.setId])).toEqual(
      expect.arrayContaining([
        [PF, p1.hpasid, 101, vmm.setId],
        [IDXD, p2.hpasid, 102, vmm.setId],
      ]),
    );
    const { containers } = await vf.client.queryState({ containerId: a });
    expect(containers[0]!.pasids).toEqual([
      { hpasid: p1.hpasid, generation: p1.generation, gpasid: 101, boundDevices: [deviceRef(PF)], freePending: false },
      { hpasid: p2.hpasid, generation: p2.generation, gpasid: 102, boundDevices: [mdevRef(MDEV)], freePending: false },
    ]);

    // A second VM cannot take A's device or mdev, nor reach A's PASIDs through its own device.
    const b = await vf.client.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 0xb2n, quota: 4 }));
    await expectRefused(vf.client.assignDevice({ containerId: b.containerId, device: deviceRef(PF) }), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    await expectRefused(vf.client.assignDevice({ containerId: b.containerId, device: mdevRef(MDEV) }), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    await vf.client.assignDevice({ containerId: b.containerId, device: deviceRef(PF2) });
    const before = { ioasids: await fx.client.listIoasids({ setId: 0 }), iommu: (await iommuState()).attachHandles };
    await expectRefused(
      vf.client.bindGuestPasid(vfio.BindGuestPasidRequest.fromPartial({ containerId: b.containerId, device: deviceRef(PF2), hpasid: p1.hpasid, gpasid: 7 })),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    await expectRefused(
      vf.client.unbindGuestPasid(vfio.UnbindGuestPasidRequest.fromPartial({ containerId: b.containerId, device: deviceRef(PF2), hpasid: p1.hpasid })),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    await expectRefused(vf.client.freePasid({ containerId: b.containerId, hpasid: p2.hpasid, generation: 0 }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    expect({ ioasids: await fx.client.listIoasids({ setId: 0 }), iommu: (await iommuState()).attachHandles }).toEqual(before);

    // The VMM crashes: every IOASID of its set is freed; the FREE events tear down VDCM's device
    // entry and the IOMMU's PASID entries; the set is reclaimed; the devices are unassigned.
    vmm.proc.kill("SIGKILL");
    await vmm.proc.exited;
    await waitSetGone(fx.client, vmm.setId);
    await waitContainerGone(vf.client, a);
    await waitFor(
      async () => {
        const s = await iommuState();
        return s.devices.find((d) => d.deviceId === PF)!.pasidEntries.length === 0 && s.domains.length === 1; // B's stage 2 only
      },
      { timeoutMs: 10_000, message: "A's PASID entries, RID attachment and domains gone at the IOMMU" },
    );
    const idxd = (await iommuState()).devices.find((d) => d.deviceId === IDXD)!;
    expect(idxd.pasidEntries).toEqual([]);
    const v = await dcm.client.queryState({ deviceIds: [] });
    expect(v.mdevs.find((x) => x.mdevUuid === MDEV)!.setId).toBe(0);
    expect(v.devices.find((x) => x.deviceId === IDXD)!.pasidEntries).toEqual([]);
    // B is untouched.
    expect((await iommuState()).devices.find((d) => d.deviceId === PF2)!.pasidEntries).toHaveLength(1); // its RID entry
    expect((await vf.client.queryState({ containerId: b.containerId })).containers[0]!.devices).toHaveLength(1);
    await vf.client.closeContainer({ containerId: b.containerId });
  });

  it("lets a guest free before unbind; the late unbind finds nothing; unassign unbinds what is left", async () => {
    const c = await vf.client.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 0xc3n, quota: 4 }));
    vmm = await startVmm(vf.proc.address, { containerId: c.containerId, capability: c.capability });
    await vf.client.assignDevice({ containerId: c.containerId, device: deviceRef(PF) });
    const p = await vf.client.allocPasid({ containerId: c.containerId });
    const q = await vf.client.allocPasid({ containerId: c.containerId });
    const bind = (x: { hpasid: number; generation: number }, gpasid: number) =>
      vf.client.bindGuestPasid(
        vfio.BindGuestPasidRequest.fromPartial({ containerId: c.containerId, device: deviceRef(PF), hpasid: x.hpasid, generation: x.generation, gpasid }),
      );
    await bind(p, 201);
    await bind(q, 202);
    // Free before unbind (ioasid.rst, the misbehaving guest): the IOMMU's FREE teardown removes the bind.
    expect(await vf.client.freePasid({ containerId: c.containerId, hpasid: p.hpasid, generation: p.generation })).toEqual({
      reclaimed: false,
      alreadyFreePending: false,
    });
    await waitFor(async () => (await fx.client.listIoasids({ setId: c.setId })).ioasids.every((i) => i.ioasid !== p.hpasid), {
      timeoutMs: 10_000,
      message: "the freed IOASID reclaimed",
    });
    expect(
      await vf.client.unbindGuestPasid(
        vfio.UnbindGuestPasidRequest.fromPartial({
          containerId: c.containerId,
          device: deviceRef(PF),
          hpasid: p.hpasid,
          generation: p.generation,
          gpasid: 201,
        }),
      ),
    ).toEqual({ unbound: false, lastUnbind: false });
    // Unassigning the device unbinds q first (UNBIND), then detaches the device. The IOMMU keeps
    // its reference until q's FREE (the document's table, steps 22–23): refcount 2.
    expect(await vf.client.unassignDevice({ containerId: c.containerId, device: deviceRef(PF) })).toEqual({ unbound: 1 });
    expect((await fx.client.find(core.FindRequest.fromPartial({ setId: c.setId, ioasid: q.hpasid }))).info).toMatchObject({ spid: 0, refcount: 2 });
    expect((await iommuState()).devices.find((d) => d.deviceId === PF)!.pasidEntries).toEqual([]);
    await vf.client.closeContainer({ containerId: c.containerId });
    await waitSetGone(fx.client, c.setId);
  });
});
