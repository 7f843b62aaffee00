import { Code } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { dev, MapStore, open, optionsOf, refused, setup } from "./vfio-containers.fixture.js";
import { VfioContainers } from "./vfio-containers.js";

// The vIOMMU objects of a container (issue 16; container-viommus.ts) against the in-memory IOMMU:
// the order the teardown destroys them in, and that a VFIO back from kill -9 still does.

const PF = "0000:6a:01.0";
const PF2 = "0000:6a:02.0";

/** A container with two devices, a vIOMMU, a vdevice, an event queue and PF2 nested on the vIOMMU. */
async function withViommu(s: ReturnType<typeof setup>) {
  const c = await open(s.vfio, 7n);
  await s.vfio.assignDevice(c.containerId, dev(PF));
  await s.vfio.assignDevice(c.containerId, dev(PF2));
  const v = await s.vfio.allocViommu(c.containerId, dev(PF));
  const d = await s.vfio.allocVdevice(c.containerId, v.viommuId, dev(PF2), 0x42n);
  const q = await s.vfio.allocVeventq(c.containerId, v.viommuId, 4);
  const nested = await s.vfio.replaceDeviceDomain(c.containerId, dev(PF2), 0x9000n, v.viommuId);
  return { c, v, d, q, nested };
}

/** The IOMMU's log from the first teardown step on. */
const teardownSteps = (log: readonly string[]) => log.slice(log.findIndex((l) => l.startsWith("detach")));

describe("VfioContainers › vIOMMU teardown", () => {
  it("destroys event queues, then vdevices, then the vIOMMU — after the nested domain on it — before it frees the stage 2", async () => {
    const s = setup();
    const { c, v, d, q, nested } = await withViommu(s);
    const lease = s.vfio.attachSession(c.containerId);
    lease.end();
    await s.vfio.whenReleased(c.containerId);
    expect(teardownSteps(s.iommu.log)).toEqual([
      `detach ${PF} ${v.parentDomainId}`,
      `detach ${PF2} ${nested.domainId}`,
      `freeDomain ${nested.domainId}`,
      `destroyVeventq ${q.id}`,
      `destroyVdevice ${d.id}`,
      `destroyViommu ${v.viommuId}`,
      `freeDomain ${v.parentDomainId}`,
    ]);
    expect(s.iommu.domains.size).toBe(0);
    expect(s.iommu.viommus.size).toBe(0);
    expect(s.actions()).toEqual(expect.arrayContaining(["veventqDestroy", "vdeviceDestroy", "viommuDestroy"]));
  });

  it("a VFIO back from kill -9 destroys the kept vIOMMU objects in the same order before it frees the stage 2", async () => {
    const store = new MapStore();
    const first = setup({ store });
    const { v, d, q, nested } = await withViommu(first);
    // VFIO is killed: nothing of it runs any more; a new one starts from the kept state.
    const restarted = new VfioContainers({ ...optionsOf(first), store, saved: new Map(store.saved) });
    first.iommu.log.length = 0;
    expect(await restarted.closeRestored()).toBe(1);
    expect(teardownSteps(first.iommu.log)).toEqual([
      `detach ${PF} ${v.parentDomainId}`,
      `detach ${PF2} ${nested.domainId}`,
      `freeDomain ${nested.domainId}`,
      `destroyVeventq ${q.id}`,
      `destroyVdevice ${d.id}`,
      `destroyViommu ${v.viommuId}`,
      `freeDomain ${v.parentDomainId}`,
    ]);
    expect(first.iommu.domains.size).toBe(0);
    expect(first.iommu.viommus.size).toBe(0);
  });

  it("a VFIO killed between the IOMMU's allocation and keeping it still destroys what the IOMMU has over the stage 2", async () => {
    const store = new MapStore();
    const first = setup({ store });
    const c = await open(first.vfio, 7n);
    await first.vfio.assignDevice(c.containerId, dev(PF));
    const kept = store.saved.get(`ctr/${c.containerId}`);
    // Killed after the IOMMU allocated these, before VFIO kept them: the kept entry knows none.
    const v = await first.vfio.allocViommu(c.containerId, dev(PF));
    await first.vfio.allocVeventq(c.containerId, v.viommuId, 4);
    store.saved.set(`ctr/${c.containerId}`, kept!);
    const restarted = new VfioContainers({ ...optionsOf(first), store, saved: new Map(store.saved) });
    expect(await restarted.closeRestored()).toBe(1);
    expect(first.iommu.viommus.size).toBe(0);
    expect(first.iommu.domains.size, "the stage 2 freed").toBe(0);
  });

  it("UnassignDevice detaches and frees the device's nested domain, then destroys its vdevices; the vIOMMU stays", async () => {
    const s = setup();
    const { c, v, d, nested } = await withViommu(s);
    s.iommu.log.length = 0;
    await s.vfio.unassignDevice(c.containerId, dev(PF2));
    expect(s.iommu.log).toEqual([`detach ${PF2} ${nested.domainId}`, `freeDomain ${nested.domainId}`, `destroyVdevice ${d.id}`]);
    const [view] = await s.vfio.queryState(c.containerId);
    expect(view!.viommus).toEqual([expect.objectContaining({ viommuId: v.viommuId, vdevices: [] })]);
  });

  it("undoes a vdevice whose device was unassigned while it was being allocated, and refuses it DEVICE_NOT_ASSIGNED", async () => {
    const s = setup();
    const c = await open(s.vfio, 7n);
    await s.vfio.assignDevice(c.containerId, dev(PF));
    await s.vfio.assignDevice(c.containerId, dev(PF2));
    const v = await s.vfio.allocViommu(c.containerId, dev(PF));
    let release = (): void => {};
    s.iommu.vdeviceGate = new Promise((r) => (release = r));
    const allocating = s.vfio.allocVdevice(c.containerId, v.viommuId, dev(PF2), 1n);
    await s.vfio.unassignDevice(c.containerId, dev(PF2));
    release();
    await refused(allocating, Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    expect(s.iommu.viommus.get(v.viommuId)!.vdevices.size).toBe(0);
    const [view] = await s.vfio.queryState(c.containerId);
    expect(view!.viommus[0]!.vdevices).toEqual([]);
  });

  it("refuses another container's vIOMMU objects NOT_FOUND, as ids never allocated, and asks the IOMMU nothing", async () => {
    const s = setup();
    const a = await withViommu(s);
    const b = await open(s.vfio, 8n);
    await s.vfio.assignDevice(b.containerId, dev("0000:6a:03.0"));
    const logged = s.iommu.log.length;
    for (const id of [a.v.viommuId, 9999]) {
      await refused(s.vfio.destroyViommu(b.containerId, id), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
      await refused(s.vfio.allocVdevice(b.containerId, id, dev("0000:6a:03.0"), 1n), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
      await refused(s.vfio.allocVeventq(b.containerId, id, 4), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
      await refused(s.vfio.replaceDeviceDomain(b.containerId, dev("0000:6a:03.0"), 0x9000n, id), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    }
    for (const id of [a.d.id, 9999]) await refused(s.vfio.destroyVdevice(b.containerId, id), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    for (const id of [a.q.id, 9999]) {
      await refused(s.vfio.destroyVeventq(b.containerId, id), Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
      await refused(s.vfio.readVeventq(b.containerId, id, 0), Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
    }
    expect(s.iommu.log.length).toBe(logged);
  });
});
