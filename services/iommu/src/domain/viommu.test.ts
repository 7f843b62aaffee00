import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { Code, DomainError } from "@ioasid/errors";
import { DeviceFunction, DomainType, FaultReason, IommuHardware, type DmaAccess, type DeviceSpec } from "./iommu-hardware.js";
import { MAX_VEVENTQ_DEPTH, VeventqType, ViommuTable, type VeventFault, type VeventqItem, type ViommuHardwareView, type ViommuKeptEntry } from "./viommu.js";

// The vIOMMU rules against the real hardware tables (no fake: IommuHardware is pure too), through
// the same view the driver gives them.

const RW: DmaAccess = { read: true, write: true, execute: false, privileged: false };
const OWNER = "vfio/vfio-1";

const dev = (deviceId: string): DeviceSpec => ({
  deviceId,
  maxPasids: 1 << 20,
  priCapable: false,
  function: DeviceFunction.PF,
  parentDeviceId: "",
  iommuGroup: 1,
  priCredits: 0,
});

const viewOf = (hw: IommuHardware): ViommuHardwareView => ({
  assertDevice: (id) => hw.assertDevice(id),
  domain: (id) => hw.domain(id),
  attachments: () => hw.snapshot([], 0).handles,
});

/** Hardware with devices d0, d1 and a PAGING stage 2; a table with a vIOMMU over it. */
function setup() {
  const hw = new IommuHardware();
  hw.registerDevice(dev("d0"));
  hw.registerDevice(dev("d1"));
  const stage2 = hw.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
  const t = new ViommuTable({ now: () => new Date(1_700_000_000_000) });
  const hwv = viewOf(hw);
  const viommu = t.allocViommu({ deviceId: "d0", parentDomainId: stage2, owner: OWNER }, hwv);
  /** A NESTED domain allocated on the vIOMMU (what the driver's createDomain does). */
  const nested = () => {
    const parentDomainId = t.nestedParent(viommu.viommuId, DomainType.NESTED, 0);
    const d = hw.createDomain({ type: DomainType.NESTED, parentDomainId, guestPgtable: 0x7000n, mmToken: 0n });
    t.addNestedDomain(viommu.viommuId, d.domainId);
    return d.domainId;
  };
  return { hw, hwv, t, stage2, viommu, nested };
}

const fault = (deviceId: string, address = 0x5000n): VeventFault => ({
  deviceId,
  pasid: 5,
  withoutPasid: false,
  address,
  access: RW,
  reason: FaultReason.NOT_PRESENT,
  at: new Date(1_700_000_000_001),
});

function refused(fn: () => unknown, code: number, reason: string): DomainError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DomainError);
    const e = err as DomainError;
    expect({ code: e.code, reason: e.reason }).toEqual({ code, reason });
    return e;
  }
  throw new Error(`expected ${reason}`);
}

/** A refusal that leaves every object as it was (and consumes no id). */
function refusedUnchanged(t: ViommuTable, fn: () => unknown, code: number, reason: string): void {
  const before = t.snapshot();
  refused(fn, code, reason);
  expect(t.snapshot()).toEqual(before);
  expect(t.hasChanges()).toBe(false);
}

/** Sequence numbers in the order a reader sees them: each event's, each marker's whole gap. */
const seen = (items: readonly VeventqItem[]): bigint[] =>
  items.flatMap((it) => (it.kind === "event" ? [it.event.sequence] : Array.from({ length: Number(it.count) }, (_, i) => it.firstSequence + BigInt(i))));

describe("ViommuTable: vIOMMU over a parent domain", () => {
  it("needs a registered device and a PAGING parent, and allocates nothing when refused", () => {
    const { hw, hwv, t } = setup();
    t.takeChanges();
    const sva = hw.createDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken: 0x99n }).domainId;
    refusedUnchanged(t, () => t.allocViommu({ deviceId: "nope", parentDomainId: 1, owner: OWNER }, hwv), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    refusedUnchanged(t, () => t.allocViommu({ deviceId: "d0", parentDomainId: 999, owner: OWNER }, hwv), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    refusedUnchanged(t, () => t.allocViommu({ deviceId: "d0", parentDomainId: sva, owner: OWNER }, hwv), Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING");
    refusedUnchanged(t, () => t.allocViommu({ deviceId: "d0", parentDomainId: 0, owner: OWNER }, hwv), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refusedUnchanged(t, () => t.allocViommu({ deviceId: "d0", parentDomainId: 1, owner: "" }, hwv), Code.INVALID_ARGUMENT, "INVALID_FIELD");
  });

  it("holds its parent: the parent cannot be freed until the vIOMMU is destroyed", () => {
    const { t, stage2, viommu } = setup();
    refused(() => t.assertDomainFreeable(stage2), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    t.destroyViommu(viommu.viommuId);
    expect(() => t.assertDomainFreeable(stage2)).not.toThrow();
    refused(() => t.destroyViommu(viommu.viommuId), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
  });

  it("gives a NESTED domain on it the vIOMMU's parent, and refuses another parent or another type", () => {
    const { t, stage2, viommu } = setup();
    expect(t.nestedParent(viommu.viommuId, DomainType.NESTED, 0)).toBe(stage2);
    expect(t.nestedParent(viommu.viommuId, DomainType.NESTED, stage2)).toBe(stage2);
    refused(() => t.nestedParent(viommu.viommuId, DomainType.NESTED, stage2 + 100), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refused(() => t.nestedParent(viommu.viommuId, DomainType.PAGING, 0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refused(() => t.nestedParent(viommu.viommuId + 100, DomainType.NESTED, 0), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
  });
});

describe("ViommuTable: vdevices", () => {
  it("refuses a second vdevice with the same virt_id in one vIOMMU (ALREADY_EXISTS), but not in another", () => {
    const { hwv, t, stage2, viommu } = setup();
    const v0 = t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d0", virtId: 0x10n }, hwv);
    expect(v0).toMatchObject({ viommuId: viommu.viommuId, deviceId: "d0", virtId: 0x10n });
    t.takeChanges();
    refusedUnchanged(t, () => t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 0x10n }, hwv), Code.ALREADY_EXISTS, "VDEVICE_EXISTS");
    // A device has one guest identity per vIOMMU.
    refusedUnchanged(t, () => t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d0", virtId: 0x11n }, hwv), Code.ALREADY_EXISTS, "VDEVICE_EXISTS");
    refusedUnchanged(t, () => t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "nope", virtId: 0x12n }, hwv), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    refusedUnchanged(t, () => t.allocVdevice({ viommuId: 999, deviceId: "d1", virtId: 0x12n }, hwv), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    const other = t.allocViommu({ deviceId: "d1", parentDomainId: stage2, owner: "vfio/vfio-2" }, hwv);
    expect(t.allocVdevice({ viommuId: other.viommuId, deviceId: "d1", virtId: 0x10n }, hwv).virtId).toBe(0x10n);
  });

  it("a nested attach of a domain on a vIOMMU needs the device's vdevice in it (NOT_FOUND); other domains do not", () => {
    const { hwv, t, stage2, viommu, nested } = setup();
    const n = nested();
    refused(() => t.checkNestedAttach(n, "d1"), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 0x21n }, hwv);
    expect(() => t.checkNestedAttach(n, "d1")).not.toThrow();
    expect(() => t.checkNestedAttach(stage2, "d0")).not.toThrow();
  });

  it("refuses to destroy a vdevice a nested attachment uses (FAILED_PRECONDITION) until it is detached", () => {
    const { hw, hwv, t, viommu, nested } = setup();
    const n = nested();
    const vdev = t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 0x21n }, hwv);
    const spec = { domainId: n, deviceId: "d1", pasid: 5, withoutPasid: false };
    hw.attachDomain({ ...spec, generation: 0, owner: OWNER, ownerData: new Uint8Array() });
    t.takeChanges();
    refusedUnchanged(t, () => t.destroyVdevice(vdev.vdeviceId, hwv), Code.FAILED_PRECONDITION, "VDEVICE_IN_USE");
    hw.detachDomain(spec);
    t.destroyVdevice(vdev.vdeviceId, hwv);
    refused(() => t.destroyVdevice(vdev.vdeviceId, hwv), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
  });

  it("destroys a removed device's vdevices", () => {
    const { hwv, t, stage2, viommu } = setup();
    const other = t.allocViommu({ deviceId: "d1", parentDomainId: stage2, owner: OWNER }, hwv);
    t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 1n }, hwv);
    t.allocVdevice({ viommuId: other.viommuId, deviceId: "d1", virtId: 1n }, hwv);
    t.allocVdevice({ viommuId: other.viommuId, deviceId: "d0", virtId: 2n }, hwv);
    expect(t.removeDevice("d1")).toBe(2);
    expect(t.snapshot().vdevices.map((d) => d.deviceId)).toEqual(["d0"]);
  });
});

describe("ViommuTable: destruction order", () => {
  it("refuses to destroy a vIOMMU with vdevices, vEVENTQs or nested domains (FAILED_PRECONDITION), then destroys it once they are gone", () => {
    const { hwv, t, viommu, nested } = setup();
    const vdev = t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d0", virtId: 1n }, hwv);
    const q = t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 4 });
    const n = nested();
    expect(t.viommu(viommu.viommuId)).toMatchObject({ vdeviceCount: 1, veventqCount: 1, nestedDomainIds: [n] });
    t.takeChanges();
    refusedUnchanged(t, () => t.destroyViommu(viommu.viommuId), Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    t.destroyVdevice(vdev.vdeviceId, hwv);
    refused(() => t.destroyViommu(viommu.viommuId), Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    t.destroyVeventq(q.veventqId);
    refused(() => t.destroyViommu(viommu.viommuId), Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    t.forgetDomain(n);
    t.destroyViommu(viommu.viommuId);
    expect(t.snapshot()).toEqual({ viommus: [], vdevices: [], veventqs: [] });
  });
});

describe("ViommuTable: vEVENTQs", () => {
  it("allows one queue per type per vIOMMU (ALREADY_EXISTS) and a depth of 1..MAX_VEVENTQ_DEPTH", () => {
    const { t, viommu } = setup();
    const q = t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 1 });
    expect(q).toMatchObject({ depth: 1, queuedEvents: 0, nextSequence: 1n, lostEvents: 0n });
    t.takeChanges();
    refusedUnchanged(t, () => t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 8 }), Code.ALREADY_EXISTS, "VEVENTQ_EXISTS");
    for (const depth of [0, MAX_VEVENTQ_DEPTH + 1, 1.5]) {
      refusedUnchanged(t, () => t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    }
    refusedUnchanged(t, () => t.allocVeventq({ viommuId: 999, type: VeventqType.DMA_FAULT, depth: 1 }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    refused(() => t.readVeventq(999, 0), Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
  });

  it("queues faults of its vIOMMU's nested domains by virt_id, with sequence numbers; others not", () => {
    const { hwv, t, stage2, viommu, nested } = setup();
    const n = nested();
    t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 0x21n }, hwv);
    // No queue yet: nothing is kept for later.
    expect(t.reportFault(n, fault("d1"))).toBeUndefined();
    const q = t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 4 });
    expect(t.reportFault(n, fault("d1", 0x5000n))).toBe("queued");
    expect(t.reportFault(n, fault("d1", 0x6000n))).toBe("queued");
    // A fault under the plain stage 2, or of a device without vdevice: not this vIOMMU's.
    expect(t.reportFault(stage2, fault("d1"))).toBeUndefined();
    expect(t.reportFault(n, fault("d0"))).toBeUndefined();
    const items = t.readVeventq(q.veventqId, 0);
    expect(items).toEqual([
      {
        kind: "event",
        event: {
          sequence: 1n,
          virtId: 0x21n,
          pasid: 5,
          withoutPasid: false,
          address: 0x5000n,
          access: RW,
          reason: "NOT_PRESENT",
          at: new Date(1_700_000_000_001),
        },
      },
      { kind: "event", event: expect.objectContaining({ sequence: 2n, virtId: 0x21n, address: 0x6000n }) },
    ]);
    // The guest never sees the host's device id.
    expect(JSON.stringify(items, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))).not.toContain("d1");
    expect(t.readVeventq(q.veventqId, 0)).toEqual([]);
  });

  it("reports an overflow as a LOST_EVENTS marker carrying the gap, before the next event delivered", () => {
    const { hwv, t, viommu, nested } = setup();
    const n = nested();
    t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 7n }, hwv);
    const q = t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 2 });
    const results = Array.from({ length: 5 }, (_, i) => t.reportFault(n, fault("d1", BigInt(0x1000 * (i + 1)))));
    expect(results).toEqual(["queued", "queued", "lost", "lost", "lost"]);
    expect(t.snapshot().veventqs[0]).toMatchObject({ queuedEvents: 2, nextSequence: 6n, lostEvents: 3n });
    // Read one: room for one more, which queues behind the marker.
    expect(t.readVeventq(q.veventqId, 1).map((it) => (it.kind === "event" ? it.event.sequence : it))).toEqual([1n]);
    expect(t.reportFault(n, fault("d1"))).toBe("queued");
    expect(t.readVeventq(q.veventqId, 0).map((it) => (it.kind === "event" ? it.event.sequence : it))).toEqual([
      2n,
      { kind: "lostEvents", firstSequence: 3n, count: 3n },
      6n,
    ]);
  });

  it("never leaves a silent hole: whatever the faults and reads, the reader sees every sequence number once, in order (property)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 5 }), fc.array(fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 4 })), { maxLength: 60 }), (depth, ops) => {
        const { hwv, t, viommu, nested } = setup();
        const n = nested();
        t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 1n }, hwv);
        const q = t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth });
        const read: VeventqItem[] = [];
        let reported = 0;
        for (const op of ops) {
          if (op === 0) {
            t.reportFault(n, fault("d1"));
            reported++;
          } else read.push(...t.readVeventq(q.veventqId, op));
          const now = t.snapshot().veventqs[0]!;
          expect(now.queuedEvents).toBeLessThanOrEqual(depth);
        }
        read.push(...t.readVeventq(q.veventqId, 0));
        expect(seen(read)).toEqual(Array.from({ length: reported }, (_, i) => BigInt(i + 1)));
        // One marker per gap: two markers never follow each other.
        for (let i = 1; i < read.length; i++) expect(read[i - 1]!.kind === "lostEvents" && read[i]!.kind === "lostEvents").toBe(false);
      }),
    );
  });
});

describe("ViommuTable: kept state", () => {
  it("comes back from what takeChanges wrote: objects, nested domains, queued items and the id counter", () => {
    const { hw, hwv, t, stage2, viommu, nested } = setup();
    const n = nested();
    t.allocVdevice({ viommuId: viommu.viommuId, deviceId: "d1", virtId: 0x21n }, hwv);
    const q = t.allocVeventq({ viommuId: viommu.viommuId, type: VeventqType.DMA_FAULT, depth: 1 });
    t.reportFault(n, fault("d1", 0x1000n));
    t.reportFault(n, fault("d1", 0x2000n));
    const store = new Map<string, ViommuKeptEntry>();
    for (const c of t.takeChanges()) {
      if (c.value === undefined) store.delete(c.key);
      else store.set(c.key, c.value);
    }
    const back = ViommuTable.restore(store);
    expect(back.snapshot()).toEqual(t.snapshot());
    expect(back.domainViommu(n)).toBe(viommu.viommuId);
    refused(() => back.assertDomainFreeable(stage2), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    expect(back.readVeventq(q.veventqId, 0)).toEqual(t.readVeventq(q.veventqId, 0));
    // Ids are never reused after a restart.
    const again = back.allocViommu({ deviceId: "d0", parentDomainId: stage2, owner: OWNER }, viewOf(hw));
    expect(again.viommuId).toBeGreaterThan(q.veventqId);
  });
});
