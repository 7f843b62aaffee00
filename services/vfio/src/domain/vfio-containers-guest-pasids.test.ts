import { Code } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { MAX_GPASID } from "./guest-pasids.js";
import { dev, ioasidsOf, KVM, mdev, open, refused, setIds, setup, snapshot } from "./vfio-containers.fixture.js";

describe("VfioContainers › guest PASIDs (virtual command)", () => {
  it("allocates in the container's set and records vcmd_alloc; frees and records vcmd_free", async () => {
    const { core, vfio, history } = setup();
    const c = await open(vfio, 7n);
    const p = await vfio.allocPasid(c.containerId);
    expect(core.space.describe(p.hpasid)).toMatchObject({ setId: c.setId, generation: p.generation });
    expect(history.at(-1)).toMatchObject({ action: "vcmdAlloc", fields: { ioasid: p.hpasid, generation: p.generation, setId: c.setId } });
    await expect(vfio.freePasid(c.containerId, p.hpasid, p.generation)).resolves.toEqual({ reclaimed: true, alreadyFreePending: false });
    expect(history.at(-1)).toMatchObject({ action: "vcmdFree", fields: { ioasid: p.hpasid, setId: c.setId } });
    await refused(vfio.freePasid(c.containerId, p.hpasid, 0), Code.NOT_FOUND, "IOASID_NOT_FOUND");
  });

  it("surfaces the set's quota as SET_QUOTA_EXCEEDED", async () => {
    const { vfio } = setup();
    const c = await open(vfio, 7n, { quota: 1 });
    await vfio.allocPasid(c.containerId);
    await refused(vfio.allocPasid(c.containerId), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
  });

  it("lets a guest free before unbind (FREE_PENDING, then idempotent) and the late unbind fails harmlessly", async () => {
    const { core, iommu, vfio } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation, gpasid: 101, guestPgtable: 0x1000n });
    iommu.teardownOnFree = false; // the IOMMU is slow: its FREE teardown has not run yet
    await expect(vfio.freePasid(c.containerId, p.hpasid, p.generation)).resolves.toEqual({ reclaimed: false, alreadyFreePending: false });
    await expect(vfio.freePasid(c.containerId, p.hpasid, 0)).resolves.toEqual({ reclaimed: false, alreadyFreePending: true });
    // The IOMMU's teardown runs, the IOASID is reclaimed; the guest's unbind comes too late.
    iommu.teardown(p.hpasid);
    expect(core.space.describe(p.hpasid)).toBeUndefined();
    await expect(
      vfio.unbindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation, gpasid: 101 }),
    ).resolves.toEqual({ unbound: false, lastUnbind: false });
  });

  it("refuses hpasid 0 as INVALID_FIELD", async () => {
    const { vfio } = setup();
    const c = await open(vfio, 7n);
    const e = await refused(vfio.freePasid(c.containerId, 0, 0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(e.metadata["field"]).toBe("hpasid");
  });
});

describe("VfioContainers › isolation between VMs (S3)", () => {
  it("refuses a second VM's free, bind, unbind and lookup of the first VM's PASIDs, changing nothing", async () => {
    const { core, iommu, vfio } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await vfio.assignDevice(a.containerId, dev("0000:6a:01.0"));
    await vfio.assignDevice(b.containerId, dev("0000:6a:02.0"));
    const p = await vfio.allocPasid(a.containerId);
    await vfio.bindGuestPasid(a.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation, gpasid: 101, guestPgtable: 0n });
    const before = snapshot(core);
    const iommuBefore = [...iommu.binds.keys()];
    await refused(vfio.freePasid(b.containerId, p.hpasid, 0), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await refused(
      vfio.bindGuestPasid(b.containerId, { device: dev("0000:6a:02.0"), hpasid: p.hpasid, generation: 0, gpasid: 5, guestPgtable: 0n }),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    await refused(
      vfio.unbindGuestPasid(b.containerId, { device: dev("0000:6a:02.0"), hpasid: p.hpasid, generation: 0, gpasid: 0 }),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    // B cannot even name A's device.
    await refused(
      vfio.bindGuestPasid(b.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 5, guestPgtable: 0n }),
      Code.FAILED_PRECONDITION,
      "DEVICE_NOT_ASSIGNED",
    );
    expect(snapshot(core)).toBe(before);
    expect([...iommu.binds.keys()]).toEqual(iommuBefore);
    expect((await vfio.queryState(b.containerId))[0]!.pasids).toEqual([]);
    expect((await vfio.queryState(a.containerId))[0]!.pasids).toHaveLength(1);
  });

  it("closing one VM frees only its own set", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await vfio.allocPasid(a.containerId);
    const pb = await vfio.allocPasid(b.containerId);
    await vfio.closeContainer(a.containerId);
    expect(ioasidsOf(core).map((i) => i.ioasid)).toEqual([pb.hpasid]);
    expect(setIds(core)).toContain(b.setId);
  });
});

describe("VfioContainers › guest binds", () => {
  it("binds with the set id, the generation the core confirmed, and the VM's stage-2 domain; an mdev on its parent", async () => {
    const { vfio, iommu, history } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, mdev("mdev-a"));
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const domain = iommu.rid.get("0000:6a:01.0");
    const p = await vfio.allocPasid(c.containerId);
    const r1 = await vfio.bindGuestPasid(c.containerId, { device: mdev("mdev-a"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0x5000n });
    const r2 = await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0x5000n });
    expect([r1.firstBind, r2.firstBind]).toEqual([true, false]);
    expect(iommu.log.filter((l) => l.startsWith("bind"))).toEqual([
      `bind idxd0 ${p.hpasid} gpasid 101 set ${c.setId} gen ${p.generation} parent ${domain}`,
      `bind 0000:6a:01.0 ${p.hpasid} gpasid 101 set ${c.setId} gen ${p.generation} parent ${domain}`,
    ]);
    const owner = JSON.parse(new TextDecoder().decode(iommu.binds.get(`idxd0/${p.hpasid}`)!.ownerData)) as unknown;
    expect(owner).toEqual({ containerId: c.containerId, device: { kind: "mdev", id: "mdev-a" } });
    expect(history.filter((h) => h.action === "bindGpasid")).toHaveLength(2);
    const [snap] = await vfio.queryState(c.containerId);
    expect(snap!.pasids).toEqual([
      { hpasid: p.hpasid, generation: p.generation, gpasid: 101, boundDevices: [mdev("mdev-a"), dev("0000:6a:01.0")], freePending: false },
    ]);
  });

  it("refuses a bind on an unassigned device, a FREE_PENDING or stale IOASID, and malformed input", async () => {
    const { core, vfio } = setup();
    const c = await open(vfio, 7n);
    const p = await vfio.allocPasid(c.containerId);
    const bind = { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0n };
    await refused(vfio.bindGuestPasid(c.containerId, bind), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, generation: p.generation + 1 }), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, gpasid: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, gpasid: MAX_GPASID + 1 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, device: undefined }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, hpasid: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    core.space.get(c.setId, p.hpasid, KVM); // freed while KVM still holds it: FREE_PENDING
    core.space.free(c.setId, p.hpasid);
    await refused(vfio.bindGuestPasid(c.containerId, bind), Code.NOT_FOUND, "IOASID_FREE_PENDING");
  });

  it("unbinds; an unbind twice finds nothing and changes nothing", async () => {
    const { vfio, core } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    const where = { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation };
    await vfio.bindGuestPasid(c.containerId, { ...where, gpasid: 101, guestPgtable: 0n });
    await expect(vfio.unbindGuestPasid(c.containerId, { ...where, gpasid: 101 })).resolves.toEqual({ unbound: true, lastUnbind: true });
    const before = snapshot(core);
    await expect(vfio.unbindGuestPasid(c.containerId, { ...where, gpasid: 101 })).resolves.toEqual({ unbound: false, lastUnbind: false });
    expect(snapshot(core)).toBe(before);
  });
});
