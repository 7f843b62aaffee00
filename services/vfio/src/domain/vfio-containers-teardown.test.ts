import { describe, expect, it } from "vitest";
import { dev, KVM, mdev, open, settle, setup } from "./vfio-containers.fixture.js";

describe("VfioContainers › teardown order", () => {
  it("frees the set first and unassigns mdevs only once the set is reclaimed (KVM → VDCM → IOMMU, S5)", async () => {
    const { core, vfio, vdcm, scheduler } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, mdev("mdev-a"));
    const p = await vfio.allocPasid(c.containerId);
    core.space.get(c.setId, p.hpasid, KVM); // KVM still holds it: its FREE delivery has not been acknowledged
    const r = await vfio.closeContainer(c.containerId);
    expect(r).toEqual({ freed: 1, unassignedDevices: 1 });
    await scheduler.advance(2000);
    expect(vdcm.log).toEqual([`assign mdev-a ${c.setId}`]); // not unassigned yet
    expect(vfio.size).toBe(1);
    core.space.put(c.setId, p.hpasid, KVM); // KVM acknowledged: reclaimed, set destroyed
    await scheduler.advance(1000);
    expect(vdcm.log).toEqual([`assign mdev-a ${c.setId}`, "unassign mdev-a"]);
    expect(vfio.size).toBe(0);
  });

  it("unassigns the mdevs anyway when the set is not reclaimed within the bound", async () => {
    const { core, vfio, vdcm, scheduler } = setup({ reclaimWaitMs: 3000 });
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, mdev("mdev-a"));
    const p = await vfio.allocPasid(c.containerId);
    core.space.get(c.setId, p.hpasid, KVM); // a subscriber is down and keeps its reference
    await vfio.closeContainer(c.containerId);
    await scheduler.advance(3000);
    expect(vdcm.log).toContain("unassign mdev-a");
    expect(vfio.size).toBe(0);
  });

  it("waits for a call in flight before unassigning, so a device assigned during the close is not leaked", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    let release = (): void => {};
    iommu.gate = new Promise((r) => (release = r));
    const assigning = vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    await expect(vfio.closeContainer(c.containerId)).resolves.toEqual({ freed: 0, unassignedDevices: 1 });
    await settle();
    expect(vfio.size).toBe(1); // the release phase waits for the assignment
    release();
    await assigning;
    await vfio.whenReleased(c.containerId);
    expect(vfio.size).toBe(0);
    expect(iommu.rid.has("0000:6a:01.0")).toBe(false);
    expect(iommu.domains.size).toBe(0);
  });

  it("frees the stage-2 domain once the IOMMU's FREE teardown no longer uses it", async () => {
    const { vfio, iommu, scheduler } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0n });
    iommu.teardownOnFree = false; // the IOMMU's FREE teardown is late
    await vfio.closeContainer(c.containerId);
    await scheduler.advance(500);
    expect(iommu.domains.size).toBe(1); // DOMAIN_IN_USE: retried
    expect(iommu.rid.has("0000:6a:01.0")).toBe(false);
    iommu.teardown(p.hpasid);
    await scheduler.advance(10_000);
    expect(iommu.domains.size).toBe(0);
    expect(scheduler.pending).toBe(0);
  });

  it("records the container's life in history: open, session, alloc, close with the reason, release", async () => {
    const { vfio, actions } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    const p = await vfio.allocPasid(c.containerId);
    await vfio.freePasid(c.containerId, p.hpasid, p.generation);
    lease.end();
    await vfio.whenReleased(c.containerId);
    expect(actions()).toEqual(["containerOpen", "sessionAttach", "vcmdAlloc", "vcmdFree", "containerClose", "containerRelease"]);
  });
});
