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

  it("replaces a device's domain: a nested domain over the stage 2 created, the replaced one freed, a failed replace's domain freed again, and unassign detaches and frees the nested one", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const stage2 = iommu.rid.get("0000:6a:01.0")!;
    const on = await vfio.replaceDeviceDomain(c.containerId, dev("0000:6a:01.0"), 0x9000n);
    expect(iommu.rid.get("0000:6a:01.0")).toBe(on.domainId);
    expect(iommu.domains.get(on.domainId)!.parent).toBe(stage2);
    // The IOMMU refuses the next replace: the nested domain made for it is freed, the old stays.
    iommu.failures.set("replaceDevice", [err(Code.RESOURCE_EXHAUSTED, "FAULT_INJECTED")]);
    const domainsBefore = [...iommu.domains.keys()];
    await refused(vfio.replaceDeviceDomain(c.containerId, dev("0000:6a:01.0"), 0xa000n), Code.RESOURCE_EXHAUSTED, "FAULT_INJECTED");
    expect([...iommu.domains.keys()]).toEqual(domainsBefore);
    expect(iommu.rid.get("0000:6a:01.0")).toBe(on.domainId);
    expect((await vfio.queryState(c.containerId))[0]!.devices[0]!.nested).toEqual({ domainId: on.domainId, guestPgtable: 0x9000n });
    const next = await vfio.replaceDeviceDomain(c.containerId, dev("0000:6a:01.0"), 0xa000n);
    expect(iommu.domains.has(on.domainId)).toBe(false);
    await refused(vfio.replaceDeviceDomain(c.containerId, mdev("mdev-a"), 0x9000n), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.replaceDeviceDomain(c.containerId, dev("0000:6a:02.0"), 0x9000n), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    await vfio.unassignDevice(c.containerId, dev("0000:6a:01.0"));
    expect(iommu.log.slice(-2)).toEqual([`detach 0000:6a:01.0 ${next.domainId}`, `freeDomain ${next.domainId}`]);
    expect(iommu.rid.has("0000:6a:01.0")).toBe(false);
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

describe("VfioContainers › a refused call creates nothing (DESIGN §8, issue 14)", () => {
  const access = { read: true, write: true, execute: false, privileged: false };
  const domainsCreated = (log: readonly string[]) => log.filter((l) => l.startsWith("createDomain")).length;

  it("refuses a first AssignDevice of an unknown device, or of one already attached elsewhere, before creating the stage-2 domain", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    await refused(vfio.assignDevice(c.containerId, dev("0000:ff:00.0")), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    iommu.rid.set("0000:6a:01.0", 999); // attached without PASID by someone else
    await refused(vfio.assignDevice(c.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect(domainsCreated(iommu.log)).toBe(0);
    expect(iommu.domains.size).toBe(0);
    // The legitimate path still creates it.
    await vfio.assignDevice(c.containerId, dev("0000:6a:02.0"));
    expect(domainsCreated(iommu.log)).toBe(1);
  });

  it("refuses a MapDma of a bad shape before creating the stage-2 domain", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    // Host addresses inside the memory the container was given (only their shape is wrong).
    const hpa = c.guestMemory[0]!.paddr;
    await refused(vfio.mapDma(c.containerId, { iova: 0x1001n, paddr: hpa + 0x2000n, size: 0x1000n, access }), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
    await refused(vfio.mapDma(c.containerId, { iova: 0x1000n, paddr: hpa + 0x2001n, size: 0x1000n, access }), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
    await refused(vfio.mapDma(c.containerId, { iova: 0x1000n, paddr: hpa + 0x2000n, size: 0n, access }), Code.INVALID_ARGUMENT, "INVALID_RANGE");
    await refused(vfio.mapDma(c.containerId, { iova: 0xfffffffffffff000n, paddr: hpa, size: 0x2000n, access }), Code.INVALID_ARGUMENT, "INVALID_RANGE");
    await refused(
      vfio.mapDma(c.containerId, { iova: 0x1000n, paddr: hpa + 0x2000n, size: 0x1000n, access: { ...access, read: false, write: false } }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
    expect(domainsCreated(iommu.log)).toBe(0);
    await vfio.mapDma(c.containerId, { iova: 0x1000n, paddr: hpa + 0x2000n, size: 0x1000n, access });
    expect(domainsCreated(iommu.log)).toBe(1);
  });

  it("answers an UnmapDma before any mapping with 0 and creates no domain; a bad range is refused", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    expect(await vfio.unmapDma(c.containerId, 0x1000n, 0x1000n)).toBe(0n);
    await refused(vfio.unmapDma(c.containerId, 0x1001n, 0x1000n), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
    expect(domainsCreated(iommu.log)).toBe(0);
  });
});
