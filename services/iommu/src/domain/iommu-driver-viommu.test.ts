import { describe, expect, it } from "vitest";
import { TokenType } from "@ioasid/ioasid";
import { InProcessCore, waitFor } from "@ioasid/testkit";
import { IommuDriver } from "./iommu-driver.js";
import { DeviceFunction, DomainType, IommuHardware } from "./iommu-hardware.js";
import { VeventqType } from "./viommu.js";
import { memoryIommuState } from "../adapters/memory-iommu-state.js";

// The driver's vIOMMU wiring (viommu.ts holds the rules; viommu.test.ts tests them) against the real
// core model: which reported faults reach a vEVENTQ, and that they are kept without waiting for the
// next call.

const READ = { read: true, write: false, execute: false, privileged: false };

/** A driver with a store, device d0, the VM's stage 2, a vIOMMU with d0's vdevice, a DMA_FAULT queue and a nested domain on it. */
function rig() {
  const core = new InProcessCore();
  const store = memoryIommuState();
  const driver = new IommuDriver({ hardware: new IommuHardware(), core, instance: "dmar0", store });
  driver.registerDevice({
    deviceId: "d0",
    maxPasids: 1 << 20,
    priCapable: true,
    function: DeviceFunction.PF,
    parentDeviceId: "",
    iommuGroup: 1,
    priCredits: 0,
  });
  const stage2 = driver.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
  const viommu = driver.allocViommu({ deviceId: "d0", parentDomainId: stage2, owner: "vfio/vfio-1" });
  driver.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d0", virtId: 0x42n });
  const q = driver.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 8 });
  const nested = driver.createDomain({ type: DomainType.NESTED, parentDomainId: 0, guestPgtable: 0x7000n, mmToken: 0n }, viommu.viommuId).domainId;
  const setId = core.space.createSet({ token: { type: TokenType.MM, value: 0x1000n }, quota: 8 }).id;
  const { ioasid, generation } = core.space.alloc(setId, { min: 201, max: 201 });
  return { core, store, driver, q, nested, setId, ioasid, generation };
}

const keptItems = (r: ReturnType<typeof rig>) => {
  const e = r.store.saved.get(`veq/${r.q.veventqId}`);
  return e?.kind === "veventq" ? e.veventq.items : [];
};

describe("IommuDriver vIOMMU wiring", () => {
  it("queues a fault under an IOASID's nested attachment once the core says the IOASID is live, and keeps it without another call", async () => {
    const r = rig();
    await r.driver.attachDomain({
      domainId: r.nested,
      deviceId: "d0",
      pasid: r.ioasid,
      withoutPasid: false,
      generation: r.generation,
      owner: "vfio/vfio-1",
      ownerData: new Uint8Array(),
    });
    await r.driver.persist();
    expect(r.driver.translate({ deviceId: "d0", pasid: r.ioasid, withoutPasid: false, address: 0x10_0000n, access: READ })).toMatchObject({ outcome: "FAULT" });
    // The report waits for the core's answer; nothing else is called meanwhile.
    await waitFor(() => keptItems(r).length === 1, { timeoutMs: 5000, message: "the event kept" });
    expect(keptItems(r)).toEqual([{ kind: "event", event: expect.objectContaining({ sequence: 1n, virtId: 0x42n, pasid: r.ioasid, reason: "NOT_PRESENT" }) }]);
  });

  it("queues nothing between the IOASID's free and the teardown of its entry (no fault reporting after free, ioasid.rst)", async () => {
    const r = rig();
    await r.driver.attachDomain({
      domainId: r.nested,
      deviceId: "d0",
      pasid: r.ioasid,
      withoutPasid: false,
      generation: r.generation,
      owner: "vfio/vfio-1",
      ownerData: new Uint8Array(),
    });
    r.core.space.free(r.setId, r.ioasid); // no reference left: reclaimed at once; the FREE has not reached the IOMMU
    const before = r.driver.counters.faultsSuppressed;
    r.driver.translate({ deviceId: "d0", pasid: r.ioasid, withoutPasid: false, address: 0x10_0000n, access: READ });
    await waitFor(() => r.driver.counters.faultsSuppressed === before + 1, { timeoutMs: 5000, message: "the fault suppressed" });
    expect(r.driver.readVeventq(r.q.veventqId, 0)).toEqual([]);
    expect(r.driver.viommus.snapshot().veventqs[0]).toMatchObject({ nextSequence: 1n, lostEvents: 0n });
  });
});
