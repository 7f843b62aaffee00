import { Code } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { dev, err, mdev, open, refused, setup } from "./vfio-containers.fixture.js";

describe("VfioContainers › devices", () => {
  it("attaches a physical device's RID to the VM's stage-2 domain, created once", async () => {
    const { iommu, vfio, history } = setup();
    const c = await open(vfio, 7n);
    await Promise.all([vfio.assignDevice(c.containerId, dev("0000:6a:01.0")), vfio.assignDevice(c.containerId, dev("0000:6a:02.0"))]);
    expect(iommu.log.filter((l) => l.startsWith("createDomain"))).toHaveLength(1);
    expect(iommu.rid.get("0000:6a:01.0")).toBe(iommu.rid.get("0000:6a:02.0"));
    expect(history.filter((h) => h.action === "deviceAssign")).toHaveLength(2);
  });

  it("refuses DEVICE_ALREADY_ASSIGNED in the same container and DEVICE_BUSY from another, even while in flight", async () => {
    const { vfio, iommu } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    const first = vfio.assignDevice(a.containerId, dev("0000:6a:01.0"));
    await refused(vfio.assignDevice(a.containerId, dev("0000:6a:01.0")), Code.ALREADY_EXISTS, "DEVICE_ALREADY_ASSIGNED");
    await refused(vfio.assignDevice(b.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    await first;
    await refused(vfio.assignDevice(b.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect(iommu.log.filter((l) => l.startsWith("attach"))).toHaveLength(1);
  });

  it("keeps a device another VM has an mdev of, and an mdev of a device another VM has whole, apart (DEVICE_BUSY)", async () => {
    const { vfio, vdcm } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await vfio.assignDevice(a.containerId, mdev("mdev-c")); // on 0000:6a:03.0
    await refused(vfio.assignDevice(b.containerId, dev("0000:6a:03.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    await vfio.assignDevice(b.containerId, dev("0000:6a:02.0"));
    vdcm.mdevs.set("mdev-d", { parent: "0000:6a:02.0", setId: 0 });
    await refused(vfio.assignDevice(a.containerId, mdev("mdev-d")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect(vdcm.mdevs.get("mdev-d")!.setId).toBe(0); // VDCM's assignment was undone
  });

  it("passes the device's absence through and leaves nothing assigned when the assignment fails", async () => {
    const { vfio, iommu } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await refused(vfio.assignDevice(a.containerId, dev("nope")), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await refused(vfio.assignDevice(a.containerId, mdev("nope")), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    iommu.rid.set("0000:6a:02.0", 999); // someone outside VFIO attached its RID
    await refused(vfio.assignDevice(a.containerId, dev("0000:6a:02.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect((await vfio.queryState(a.containerId))[0]!.devices).toEqual([]);
    iommu.rid.delete("0000:6a:02.0");
    await vfio.assignDevice(b.containerId, dev("0000:6a:02.0")); // free for another VM
  });

  it("assigns an mdev through VDCM with the set; the first mdev after PASIDs is SET_NOT_EMPTY", async () => {
    const { vfio, vdcm } = setup();
    const a = await open(vfio, 7n);
    const r = await vfio.assignDevice(a.containerId, mdev("mdev-a"));
    expect(r).toMatchObject({ device: mdev("mdev-a"), parentDeviceId: "idxd0" });
    expect(vdcm.log).toEqual([`assign mdev-a ${a.setId}`]);
    const b = await open(vfio, 8n);
    await vfio.allocPasid(b.containerId);
    await refused(vfio.assignDevice(b.containerId, mdev("mdev-b")), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await refused(vfio.assignDevice(b.containerId, mdev("mdev-a")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect((await vfio.queryState(b.containerId))[0]!.devices).toEqual([]);
  });

  it("unassigns: unbinds the device's guest binds first, then detaches; DEVICE_NOT_ASSIGNED otherwise", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    await refused(vfio.unassignDevice(c.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0n });
    iommu.log.length = 0;
    await expect(vfio.unassignDevice(c.containerId, dev("0000:6a:01.0"))).resolves.toEqual({ unbound: 1 });
    expect(iommu.log).toEqual([`unbind 0000:6a:01.0 ${p.hpasid} -> true`, expect.stringMatching(/^detach 0000:6a:01.0 /)]);
    expect((await vfio.queryState(c.containerId))[0]!.devices).toEqual([]);
  });

  it("keeps the device assigned when the IOMMU cannot detach it", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    iommu.failures.set("detachDevice", [err(Code.UNAVAILABLE, "UNAVAILABLE")]);
    await refused(vfio.unassignDevice(c.containerId, dev("0000:6a:01.0")), Code.UNAVAILABLE, "UNAVAILABLE");
    expect((await vfio.queryState(c.containerId))[0]!.devices).toHaveLength(1);
    await vfio.unassignDevice(c.containerId, dev("0000:6a:01.0"));
  });
});
