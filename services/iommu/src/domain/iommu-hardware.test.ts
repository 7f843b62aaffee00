import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import {
  AttachKind,
  DeviceFunction,
  DomainType,
  FaultReason,
  FlushCause,
  FlushScope,
  IOTLB_FLUSH_LOG_SIZE,
  IommuHardware,
  MAX_PASIDS,
  type AttachDomainSpec,
  type DeviceSpec,
  type DmaAccess,
} from "./iommu-hardware.js";
import { memoryIommuState } from "../adapters/memory-iommu-state.js";

const RW: DmaAccess = { read: true, write: true, execute: false, privileged: false };
const R: DmaAccess = { read: true, write: false, execute: false, privileged: false };
const W: DmaAccess = { read: false, write: true, execute: false, privileged: false };
const PAGE = 0x1000n;

const dev = (deviceId: string, over: Partial<DeviceSpec> = {}): DeviceSpec => ({
  deviceId,
  maxPasids: 1 << 20,
  priCapable: true,
  function: DeviceFunction.PF,
  parentDeviceId: "",
  iommuGroup: 1,
  priCredits: 0,
  ...over,
});

const paging = (hw: IommuHardware) => hw.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;

const attach = (over: Partial<AttachDomainSpec> & { domainId: number }): AttachDomainSpec => ({
  deviceId: "d0",
  pasid: 5,
  withoutPasid: false,
  generation: 0,
  owner: "vfio/vfio-1",
  ownerData: new Uint8Array([1, 2]),
  ...over,
});

/** Expects `fn` to throw a DomainError with this code and reason. */
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

/** Runs a call that must be refused and checks the state did not change. */
function refusedUnchanged(hw: IommuHardware, fn: () => unknown, code: number, reason: string): DomainError {
  const before = hw.snapshot([], IOTLB_FLUSH_LOG_SIZE);
  const e = refused(fn, code, reason);
  expect(hw.snapshot([], IOTLB_FLUSH_LOG_SIZE)).toEqual(before);
  return e;
}

describe("IommuHardware devices", () => {
  it("registers a device with an empty PASID table and the default PRI credits", () => {
    const hw = new IommuHardware();
    const d = hw.registerDevice(dev("d0"));
    expect(d).toMatchObject({ deviceId: "d0", pasidEntries: [], priCredits: 32 });
  });

  it("refuses a duplicate, a bad max_pasids, a VF without a registered PF and a PF with a parent, changing nothing", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("pf"));
    refusedUnchanged(hw, () => hw.registerDevice(dev("pf")), Code.ALREADY_EXISTS, "DEVICE_EXISTS");
    refusedUnchanged(hw, () => hw.registerDevice(dev("x", { maxPasids: MAX_PASIDS + 1 })), Code.INVALID_ARGUMENT, "PASID_OUT_OF_RANGE");
    refusedUnchanged(hw, () => hw.registerDevice(dev("vf", { function: "VF", parentDeviceId: "nope" })), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    refusedUnchanged(hw, () => hw.registerDevice(dev("vf", { function: "VF" })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refusedUnchanged(hw, () => hw.registerDevice(dev("p2", { parentDeviceId: "pf" })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refusedUnchanged(hw, () => hw.registerDevice(dev("")), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refusedUnchanged(hw, () => hw.registerDevice(dev("has space")), Code.INVALID_ARGUMENT, "INVALID_FIELD");
  });

  it("refuses to remove a PF while a VF names it, and tears every handle down on removal", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("pf"));
    hw.registerDevice(dev("vf", { function: "VF", parentDeviceId: "pf" }));
    refused(() => hw.registerDevice(dev("vf2", { function: "VF", parentDeviceId: "vf" })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refusedUnchanged(hw, () => hw.removeDevice("pf"), Code.FAILED_PRECONDITION, "DEVICE_IN_USE");
    const dom = paging(hw);
    hw.attachDomain(attach({ domainId: dom, deviceId: "vf", pasid: 3 }));
    hw.attachDomain(attach({ domainId: dom, deviceId: "vf", pasid: 0, withoutPasid: true }));
    const { result, changes } = hw.removeDevice("vf");
    expect(result).toHaveLength(2);
    expect(changes.filter((c) => c.kind === "teardownPasid")).toHaveLength(2);
    expect(changes.filter((c) => c.kind === "iotlbFlush").map((c) => c.kind === "iotlbFlush" && c.flush.cause)).toEqual([
      FlushCause.DEVICE_REMOVED,
      FlushCause.DEVICE_REMOVED,
    ]);
    expect(hw.domain(dom)!.attachCount).toBe(0);
    expect(hw.device("vf")).toBeUndefined();
    hw.removeDevice("pf");
  });
});

describe("IommuHardware domains", () => {
  it("creates paging, SVA and nested domains with their required fields", () => {
    const hw = new IommuHardware();
    const p = paging(hw);
    expect(hw.createDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken: 9n }).mmToken).toBe(9n);
    const n = hw.createDomain({ type: DomainType.NESTED, parentDomainId: p, guestPgtable: 0x5000n, mmToken: 0n });
    expect(n).toMatchObject({ type: "NESTED", parentDomainId: p, guestPgtable: 0x5000n });
    refusedUnchanged(
      hw,
      () => hw.createDomain({ type: DomainType.NESTED, parentDomainId: 99, guestPgtable: 1n, mmToken: 0n }),
      Code.NOT_FOUND,
      "DOMAIN_NOT_FOUND",
    );
    refusedUnchanged(
      hw,
      () => hw.createDomain({ type: DomainType.NESTED, parentDomainId: n.domainId, guestPgtable: 1n, mmToken: 0n }),
      Code.FAILED_PRECONDITION,
      "DOMAIN_NOT_PAGING",
    );
    refusedUnchanged(
      hw,
      () => hw.createDomain({ type: DomainType.NESTED, parentDomainId: p, guestPgtable: 0n, mmToken: 0n }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
    refusedUnchanged(
      hw,
      () => hw.createDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
    refusedUnchanged(
      hw,
      () => hw.createDomain({ type: DomainType.PAGING, parentDomainId: p, guestPgtable: 0n, mmToken: 0n }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
  });

  it("frees only an unused domain: not while attached, not while the parent of a nested one", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    const n = hw.createDomain({ type: DomainType.NESTED, parentDomainId: p, guestPgtable: 0x5000n, mmToken: 0n }).domainId;
    refusedUnchanged(hw, () => hw.freeDomain(p), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    hw.attachDomain(attach({ domainId: n }));
    refusedUnchanged(hw, () => hw.freeDomain(n), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    hw.detachDomain({ domainId: n, deviceId: "d0", pasid: 5, withoutPasid: false });
    hw.freeDomain(n);
    hw.freeDomain(p);
    refused(() => hw.freeDomain(p), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
  });
});

describe("IommuHardware attach handles", () => {
  it("attaches at a PASID with the owner's data and programs the entry", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    const { result: h, changes } = hw.attachDomain(attach({ domainId: p, generation: 3 }));
    expect(h).toMatchObject({ kind: AttachKind.DOMAIN, deviceId: "d0", pasid: 5, owner: "vfio/vfio-1", ownerData: new Uint8Array([1, 2]), generation: 3 });
    expect(changes.map((c) => c.kind)).toEqual(["pasidEntrySet"]);
    expect(hw.device("d0")!.pasidEntries).toEqual([
      { pasid: 5, withoutPasid: false, domainId: p, domainType: "PAGING", handleId: h.handleId, setId: 0, gpasid: 0, generation: 3, faultReporting: true },
    ]);
    expect(hw.domain(p)!.attachCount).toBe(1);
  });

  it("never takes PASID 0 as a PASID target, refuses a taken PASID, out of range PASIDs and SVA domains", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0", { maxPasids: 16 }));
    const p = paging(hw);
    const sva = hw.createDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken: 7n }).domainId;
    hw.attachDomain(attach({ domainId: p }));
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p, pasid: 0 })), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p })), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p, pasid: 16 })), Code.INVALID_ARGUMENT, "PASID_OUT_OF_RANGE");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: sva, pasid: 6 })), Code.FAILED_PRECONDITION, "DOMAIN_INCOMPATIBLE");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p, pasid: 6, deviceId: "nope" })), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: 99, pasid: 6 })), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p, pasid: 6, owner: "" })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p, pasid: 3, withoutPasid: true })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    // Requests without PASID go through RID_PASID (entry 0).
    const rid = hw.attachDomain(attach({ domainId: p, pasid: 0, withoutPasid: true })).result;
    expect(rid).toMatchObject({ pasid: 0, withoutPasid: true });
    refusedUnchanged(hw, () => hw.attachDomain(attach({ domainId: p, pasid: 0, withoutPasid: true })), Code.FAILED_PRECONDITION, "PASID_IN_USE");
  });

  it("detaches with a flush, and refuses another domain or an empty target", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    const q = paging(hw);
    hw.attachDomain(attach({ domainId: p }));
    refusedUnchanged(hw, () => hw.detachDomain({ domainId: q, deviceId: "d0", pasid: 5, withoutPasid: false }), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
    refusedUnchanged(hw, () => hw.detachDomain({ domainId: p, deviceId: "d0", pasid: 6, withoutPasid: false }), Code.NOT_FOUND, "ATTACH_HANDLE_NOT_FOUND");
    const { changes } = hw.detachDomain({ domainId: p, deviceId: "d0", pasid: 5, withoutPasid: false });
    expect(changes.map((c) => c.kind)).toEqual(["teardownPasid", "iotlbFlush"]);
    const flush = hw.snapshot([], 1).flushes[0]!;
    expect(flush).toMatchObject({ scope: FlushScope.PASID, cause: FlushCause.DETACH, domainId: p, pasid: 5, deviceId: "d0", deviceTlb: true });
    expect(hw.device("d0")!.pasidEntries).toEqual([]);
  });
});

describe("IommuHardware replace (iommufd)", () => {
  it("replaces in one step: the entry moves to the new domain under a new handle, attach counts follow, the old domain is flushed", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    const q = paging(hw);
    const n = hw.createDomain({ type: DomainType.NESTED, parentDomainId: q, guestPgtable: 0x9000n, mmToken: 0n }).domainId;
    const old = hw.attachDomain(attach({ domainId: p, generation: 4 })).result;
    const spec = { ...attach({ domainId: n, generation: 4, owner: "vfio/vfio-2", ownerData: new Uint8Array([9]) }), oldDomainId: p };
    const { result, changes } = hw.replaceDomain(spec);
    expect(result.replaced).toMatchObject({ handleId: old.handleId, domainId: p });
    expect(result.handle).toMatchObject({ kind: AttachKind.DOMAIN, domainId: n, pasid: 5, generation: 4, owner: "vfio/vfio-2" });
    expect(result.handle.handleId).not.toBe(old.handleId);
    // The new entry is written before the old domain's flush: no moment without a translation.
    expect(changes.map((c) => c.kind)).toEqual(["pasidEntrySet", "iotlbFlush"]);
    expect(hw.snapshot([], 1).flushes[0]).toMatchObject({ scope: FlushScope.PASID, cause: FlushCause.REPLACE, domainId: p, pasid: 5, deviceId: "d0" });
    expect(hw.device("d0")!.pasidEntries).toMatchObject([{ pasid: 5, domainId: n, domainType: DomainType.NESTED, handleId: result.handle.handleId }]);
    expect([hw.domain(p)!.attachCount, hw.domain(n)!.attachCount]).toEqual([0, 1]);
    expect(hw.handle(old.handleId)).toBeUndefined();
    // p is free to go; q is n's parent and stays.
    hw.freeDomain(p);
    refusedUnchanged(hw, () => hw.freeDomain(q), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    // Back to a paging domain, and the same domain again: nothing changes.
    hw.replaceDomain({ ...spec, domainId: q, oldDomainId: 0 });
    const before = hw.snapshot([], IOTLB_FLUSH_LOG_SIZE);
    const same = hw.replaceDomain({ ...spec, domainId: q, oldDomainId: 0 });
    expect(same.result.replaced).toBeUndefined();
    expect(same.changes).toEqual([]);
    expect(hw.snapshot([], IOTLB_FLUSH_LOG_SIZE)).toEqual(before);
  });

  it("refuses an unattached target, an SVA domain, a bind's entry and the wrong old domain, changing nothing", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    const q = paging(hw);
    const sva = hw.createDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken: 7n }).domainId;
    const spec = (over: Partial<AttachDomainSpec> & { domainId: number }, oldDomainId = 0) => ({ ...attach(over), oldDomainId });
    refusedUnchanged(hw, () => hw.replaceDomain(spec({ domainId: q })), Code.INVALID_ARGUMENT, "PASID_NOT_ATTACHED");
    hw.attachDomain(attach({ domainId: p }));
    refusedUnchanged(hw, () => hw.replaceDomain(spec({ domainId: sva })), Code.FAILED_PRECONDITION, "DOMAIN_INCOMPATIBLE");
    refusedUnchanged(hw, () => hw.replaceDomain(spec({ domainId: q }, q)), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
    refusedUnchanged(hw, () => hw.replaceDomain(spec({ domainId: q, pasid: 0 })), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED");
    refusedUnchanged(hw, () => hw.replaceDomain(spec({ domainId: 999 })), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    hw.attachDomain(attach({ domainId: p, pasid: 0, withoutPasid: true }));
    hw.createBinding({ hpasid: 30, setId: 1, generation: 2, gpasid: 3 });
    hw.installGpasidEntry({ deviceId: "d0", hpasid: 30, parentDomainId: 0, guestPgtable: 0x1000n, owner: "vfio/v", ownerData: new Uint8Array() });
    refusedUnchanged(hw, () => hw.replaceDomain(spec({ domainId: q, pasid: 30 })), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
  });
});

describe("IommuHardware guest binds", () => {
  const bind = (hw: IommuHardware, deviceId: string, hpasid = 201, parentDomainId = 0) => {
    hw.createBinding({ hpasid, setId: 4, generation: 2, gpasid: 101 });
    return hw.installGpasidEntry({ deviceId, hpasid, parentDomainId, guestPgtable: 0x9000n, owner: "vfio/v", ownerData: new Uint8Array() });
  };

  it("programs a NESTED entry over the device's RID domain and tracks the devices of the host PASID", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    hw.registerDevice(dev("d1"));
    const p = paging(hw);
    refused(() => bind(hw, "d0"), Code.NOT_FOUND, "DOMAIN_NOT_FOUND"); // no RID domain and no parent named
    hw.attachDomain(attach({ domainId: p, pasid: 0, withoutPasid: true }));
    const h = bind(hw, "d0").result;
    bind(hw, "d1", 201, p);
    expect(h).toMatchObject({ kind: AttachKind.GPASID_BIND, setId: 4, gpasid: 101, generation: 2, pasid: 201 });
    const nested = hw.domain(h.domainId)!;
    expect(nested).toMatchObject({ type: "NESTED", parentDomainId: p, guestPgtable: 0x9000n, implicit: true, attachCount: 1 });
    expect([...hw.binding(201)!.devices]).toEqual(["d0", "d1"]);
    refused(() => bind(hw, "d0"), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    hw.removeGpasidEntry(201, "d0");
    expect([...hw.binding(201)!.devices]).toEqual(["d1"]);
    expect(hw.domain(h.domainId)).toBeUndefined(); // the implicit nested domain went with its handle
  });

  it("tears down on FREE only the entries of that generation, on every device, with fault reporting off", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    hw.registerDevice(dev("d1"));
    const p = paging(hw);
    bind(hw, "d0", 201, p);
    bind(hw, "d1", 201, p);
    hw.attachDomain(attach({ domainId: p, deviceId: "d0", pasid: 202 })); // unchecked: not the IOASID's
    hw.attachDomain(attach({ domainId: p, deviceId: "d1", pasid: 202, generation: 7 }));
    expect(hw.hasIoasidState(201, 2)).toBe(true);
    expect(hw.hasIoasidState(201, 1)).toBe(false);
    expect(hw.teardownIoasid(201, 1).result).toEqual([]);
    const { result, changes } = hw.teardownIoasid(201, 2);
    expect(result.map((h) => h.deviceId)).toEqual(["d0", "d1"]);
    const torn = changes.filter((c) => c.kind === "teardownPasid");
    expect(torn.map((c) => c.kind === "teardownPasid" && c.entry.faultReporting)).toEqual([false, false]);
    expect(changes.filter((c) => c.kind === "iotlbFlush").map((c) => c.kind === "iotlbFlush" && c.flush.cause)).toEqual([
      FlushCause.IOASID_FREE,
      FlushCause.IOASID_FREE,
    ]);
    expect(hw.binding(201)!.devices.size).toBe(0);
    expect(hw.teardownIoasid(201, 2).result).toEqual([]); // idempotent
    expect(hw.teardownIoasid(202, 7).result.map((h) => h.deviceId)).toEqual(["d1"]);
    expect(hw.handleAt("d0", 202)).toBeDefined();
  });
});

describe("IommuHardware native SVA", () => {
  it("shares the mm's PASID between devices, counts users per bond, and releases leftover bonds", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    hw.registerDevice(dev("d1"));
    hw.registerDevice(dev("nopasid", { maxPasids: 0 }));
    hw.addMm({ mmToken: 77n, setId: 9, pasid: 12, generation: 1 });
    const a = hw.svaBind("d0", 77n, "vdcm/x", new Uint8Array()).result;
    const b = hw.svaBind("d1", 77n, "vdcm/x", new Uint8Array()).result;
    expect(hw.svaBind("d0", 77n, "vdcm/x", new Uint8Array()).result.users).toBe(2);
    expect([a.pasid, b.pasid]).toEqual([12, 12]);
    expect(a.domainId).toBe(b.domainId);
    refusedUnchanged(hw, () => hw.svaBind("nopasid", 77n, "vdcm/x", new Uint8Array()), Code.FAILED_PRECONDITION, "PASID_NOT_SUPPORTED");
    expect(hw.svaUnbind("d0", 77n).result).toBe(1);
    expect(hw.svaUnbind("d0", 77n).result).toBe(0);
    refusedUnchanged(hw, () => hw.svaUnbind("d0", 77n), Code.NOT_FOUND, "SVA_BOND_NOT_FOUND");
    expect(hw.releaseMmBonds(77n).result).toBe(1);
    expect(hw.snapshot().bonds).toEqual([]);
    expect(hw.domain(a.domainId)).toBeUndefined();
  });

  it("refuses a device whose PASID table has something else at the mm's PASID", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    hw.attachDomain(attach({ domainId: paging(hw), pasid: 12 }));
    hw.addMm({ mmToken: 77n, setId: 9, pasid: 12, generation: 1 });
    refusedUnchanged(hw, () => hw.svaBind("d0", 77n, "o", new Uint8Array()), Code.FAILED_PRECONDITION, "PASID_IN_USE");
  });
});

describe("IommuHardware I/O page tables and translation", () => {
  it("maps page-aligned ranges and refuses misalignment, empty or wrapping ranges and overlaps", () => {
    const hw = new IommuHardware();
    const p = paging(hw);
    hw.map(p, { iova: 0x10000n, paddr: 0x80000n, size: 2n * PAGE, access: RW });
    const m =
      (iova: bigint, paddr: bigint, size: bigint, access = RW) =>
      () =>
        hw.map(p, { iova, paddr, size, access });
    refusedUnchanged(hw, m(0x10800n, 0n, PAGE), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
    refusedUnchanged(hw, m(0x20000n, 0x1n, PAGE), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
    refusedUnchanged(hw, m(0x20000n, 0n, 0x800n), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
    refusedUnchanged(hw, m(0x20000n, 0n, 0n), Code.INVALID_ARGUMENT, "INVALID_RANGE");
    refusedUnchanged(hw, m((1n << 64n) - PAGE, 0n, 2n * PAGE), Code.INVALID_ARGUMENT, "INVALID_RANGE");
    refusedUnchanged(hw, m(0x11000n, 0n, PAGE), Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED");
    refusedUnchanged(hw, m(0xf000n, 0n, 2n * PAGE), Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED");
    refusedUnchanged(hw, m(0x20000n, 0n, PAGE, { read: false, write: false, execute: true, privileged: false }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    hw.map(p, { iova: 0xf000n, paddr: 0n, size: PAGE, access: R }); // adjacent is fine
    const sva = hw.createDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken: 1n }).domainId;
    refusedUnchanged(hw, () => hw.map(sva, { iova: 0n, paddr: 0n, size: PAGE, access: RW }), Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING");
    refusedUnchanged(hw, () => hw.map(99, { iova: 0n, paddr: 0n, size: PAGE, access: RW }), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
  });

  it("translates a mapped address, faults on a miss, a permission mismatch, a missing entry or a PASID out of range", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0", { maxPasids: 64, priCapable: false }));
    const p = paging(hw);
    hw.map(p, { iova: 0x10000n, paddr: 0x80000n, size: 2n * PAGE, access: R });
    const h = hw.attachDomain(attach({ domainId: p, pasid: 5 })).result;
    const t = (address: bigint, access = R, pasid = 5) => hw.translate({ deviceId: "d0", pasid, withoutPasid: false, address, access });
    expect(t(0x11234n)).toEqual({ outcome: "TRANSLATED", outputAddress: 0x81234n, handleId: h.handleId });
    expect(t(0x12000n)).toEqual({ outcome: "FAULT", reason: FaultReason.NOT_PRESENT, handleId: h.handleId });
    expect(t(0x10000n, W)).toEqual({ outcome: "FAULT", reason: FaultReason.PERMISSION, handleId: h.handleId });
    expect(t(0x10000n, R, 6)).toEqual({ outcome: "FAULT", reason: FaultReason.NO_PASID_ENTRY, handleId: 0n });
    expect(t(0x10000n, R, 64)).toEqual({ outcome: "FAULT", reason: FaultReason.PASID_OUT_OF_RANGE, handleId: 0n });
    // The same miss on a PRI-capable device is a page request under the handle; a permission
    // mismatch still faults.
    hw.registerDevice(dev("d1", { maxPasids: 64 }));
    const h1 = hw.attachDomain(attach({ domainId: p, pasid: 5, deviceId: "d1" })).result;
    const t1 = (address: bigint, access = R) => hw.translate({ deviceId: "d1", pasid: 5, withoutPasid: false, address, access });
    expect(t1(0x12000n)).toMatchObject({ outcome: "MISS", handle: { handleId: h1.handleId, owner: h1.owner } });
    expect(t1(0x10000n, W)).toEqual({ outcome: "FAULT", reason: FaultReason.PERMISSION, handleId: h1.handleId });
    expect(hw.translate({ deviceId: "d0", pasid: 0, withoutPasid: true, address: 0x10000n, access: R }).outcome).toBe("FAULT");
    refused(() => t(0x10000n, { read: false, write: false, execute: false, privileged: false }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refused(() => t(0x10000n, R, 0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refused(() => hw.translate({ deviceId: "zz", pasid: 5, withoutPasid: false, address: 0n, access: R }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
  });

  it("translates a nested entry through its parent and an SVA entry as the process address", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    hw.map(p, { iova: 0x4000n, paddr: 0x100000n, size: PAGE, access: RW });
    hw.createBinding({ hpasid: 30, setId: 1, generation: 1, gpasid: 3 });
    hw.installGpasidEntry({ deviceId: "d0", hpasid: 30, parentDomainId: p, guestPgtable: 0x1000n, owner: "o", ownerData: new Uint8Array() });
    const t = (address: bigint, access = RW) => hw.translate({ deviceId: "d0", pasid: 30, withoutPasid: false, address, access });
    // First stage empty: a miss (page request on this PRI device).
    expect(t(0x7000_0010n)).toMatchObject({ outcome: "MISS" });
    // The guest installs GVA 0x7000_0000 → GPA 0x4000; the parent maps GPA 0x4000 → HPA 0x100000.
    hw.mapGuest(30, { iova: 0x7000_0000n, paddr: 0x4000n, size: PAGE, access: R });
    expect(t(0x7000_0010n, R)).toMatchObject({ outcome: "TRANSLATED", outputAddress: 0x100010n });
    expect(t(0x7000_0010n, W)).toMatchObject({ outcome: "FAULT", reason: FaultReason.PERMISSION });
    // A first-stage hit whose GPA the second stage lacks is a fault, never a page request.
    hw.mapGuest(30, { iova: 0x7000_1000n, paddr: 0x9000n, size: PAGE, access: RW });
    expect(t(0x7000_1000n)).toMatchObject({ outcome: "FAULT", reason: FaultReason.NOT_PRESENT });
    expect(() => hw.mapGuest(31, { iova: 0n, paddr: 0n, size: PAGE, access: R })).toThrow(expect.objectContaining({ reason: "GUEST_BIND_NOT_FOUND" }));
    expect(hw.unmapGuest(30, 0x7000_0000n, PAGE).result).toBe(PAGE);
    expect(t(0x7000_0010n, R)).toMatchObject({ outcome: "MISS" });
    hw.addMm({ mmToken: 5n, setId: 2, pasid: 40, generation: 1 });
    hw.svaBind("d0", 5n, "o", new Uint8Array());
    expect(hw.translate({ deviceId: "d0", pasid: 40, withoutPasid: false, address: 0xdead000n, access: RW })).toMatchObject({
      outcome: "TRANSLATED",
      outputAddress: 0xdead000n,
    });
  });

  it("unmaps inside a range, splitting straddling mappings, and flushes the range where the domain is reachable", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    hw.map(p, { iova: 0x10000n, paddr: 0x80000n, size: 4n * PAGE, access: RW });
    hw.attachDomain(attach({ domainId: p, pasid: 0, withoutPasid: true }));
    hw.createBinding({ hpasid: 30, setId: 1, generation: 1, gpasid: 3 });
    const bound = hw.installGpasidEntry({
      deviceId: "d0",
      hpasid: 30,
      parentDomainId: 0,
      guestPgtable: 0x1000n,
      owner: "o",
      ownerData: new Uint8Array(),
    }).result;
    const { result, changes } = hw.unmap(p, 0x11000n, 2n * PAGE);
    expect(result).toBe(2n * PAGE);
    expect(hw.domain(p)!.mappings.map((m) => [m.iova, m.paddr, m.size])).toEqual([
      [0x10000n, 0x80000n, PAGE],
      [0x13000n, 0x83000n, PAGE],
    ]);
    const flushes = changes.flatMap((c) => (c.kind === "iotlbFlush" ? [c.flush] : []));
    expect(flushes.map((f) => [f.scope, f.cause, f.pasid, f.address, f.size])).toEqual([
      [FlushScope.RANGE, FlushCause.UNMAP, 0, 0x11000n, 2n * PAGE],
      [FlushScope.RANGE, FlushCause.UNMAP, 30, 0x11000n, 2n * PAGE],
    ]);
    expect(flushes[1]!.domainId).toBe(bound.domainId);
    expect(hw.unmap(p, 0x40000n, PAGE)).toEqual({ result: 0n, changes: [] });
    expect(hw.translate({ deviceId: "d0", pasid: 0, withoutPasid: true, address: 0x11000n, access: RW })).toMatchObject({ outcome: "MISS" });
  });

  it("keeps only the most recent IOTLB flush records", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    // Past twice the log's size: the log is trimmed in halves, and still shows the last IOTLB_FLUSH_LOG_SIZE.
    const n = 2 * IOTLB_FLUSH_LOG_SIZE + 5;
    for (let i = 0; i < n; i++) {
      hw.attachDomain(attach({ domainId: p }));
      hw.detachDomain({ domainId: p, deviceId: "d0", pasid: 5, withoutPasid: false });
    }
    const all = hw.snapshot([], IOTLB_FLUSH_LOG_SIZE * 3).flushes;
    expect(all).toHaveLength(IOTLB_FLUSH_LOG_SIZE);
    expect(all[0]!.seq).toBe(BigInt(n - IOTLB_FLUSH_LOG_SIZE + 1));
    expect(all.at(-1)!.seq).toBe(BigInt(n));
    expect(hw.snapshot([], 2).flushes.map((f) => f.seq)).toEqual([BigInt(n - 1), BigInt(n)]);
  });

  it("selects devices in a snapshot and refuses an unknown one", () => {
    const hw = new IommuHardware();
    hw.registerDevice(dev("b"));
    hw.registerDevice(dev("a"));
    hw.attachDomain(attach({ domainId: paging(hw), deviceId: "b" }));
    expect(hw.snapshot().devices.map((d) => d.deviceId)).toEqual(["a", "b"]);
    const s = hw.snapshot(["a"]);
    expect(s.devices.map((d) => d.deviceId)).toEqual(["a"]);
    expect(s.handles).toEqual([]);
    expect(s.domains).toHaveLength(1);
    refused(() => hw.snapshot(["zz"]), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
  });
});

describe("IommuHardware kept in a store", () => {
  it("comes back from what takeChanges wrote: devices, domains with mappings, handles (PASID tables), guest binds with their first stage, mm bonds", async () => {
    // Through the state codec, as to JetStream: a field it forgot would not come back.
    const store = memoryIommuState();
    const saved = store.saved;
    const keep = (hw: IommuHardware) => store.write(hw.takeChanges());
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    hw.registerDevice(dev("d1", { priCapable: false }));
    const p = paging(hw);
    hw.map(p, { iova: 0x4000n, paddr: 0x100000n, size: 2n * PAGE, access: RW });
    hw.attachDomain(attach({ domainId: p, pasid: 0, withoutPasid: true }));
    const b = hw.createBinding({ hpasid: 30, setId: 1, generation: 2, gpasid: 3 });
    b.refHeld = true;
    b.spidAttached = true;
    hw.installGpasidEntry({ deviceId: "d0", hpasid: 30, parentDomainId: 0, guestPgtable: 0x1000n, owner: "vfio/v", ownerData: new Uint8Array([7, 8]) });
    hw.installGpasidEntry({ deviceId: "d1", hpasid: 30, parentDomainId: p, guestPgtable: 0x1000n, owner: "vfio/v", ownerData: new Uint8Array([9]) });
    hw.mapGuest(30, { iova: 0x7000n, paddr: 0x4000n, size: PAGE, access: R });
    hw.addMm({ mmToken: 5n, setId: 2, pasid: 40, generation: 1 });
    hw.svaBind("d0", 5n, "o", new Uint8Array());
    hw.svaBind("d0", 5n, "o", new Uint8Array());
    const gone = hw.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
    hw.freeDomain(gone);
    await keep(hw);

    const back = IommuHardware.restore(saved);
    const strip = (x: IommuHardware) => ({ ...x.snapshot([], 0), flushes: [] });
    expect(strip(back)).toEqual(strip(hw));
    expect(back.binding(30)).toMatchObject({ refHeld: true, spidAttached: true, devices: new Set(["d0", "d1"]) });
    expect(back.translate({ deviceId: "d0", pasid: 30, withoutPasid: false, address: 0x7010n, access: R })).toMatchObject({
      outcome: "TRANSLATED",
      outputAddress: 0x100010n,
    });
    // New ids continue after the restored ones; a change after the restore is tracked again.
    const next = back.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
    expect(next).toBeGreaterThan(gone);
    back.binding(30)!.refHeld = false;
    expect(
      back
        .takeChanges()
        .map((c) => c.key)
        .sort(),
    ).toEqual(["bind/30", `dom/${next}`, "ids"].sort());
  });

  /** A store with a guest bind of PASID 30 on d0 (generation 2), and the hardware that wrote it. */
  async function boundGuest() {
    const store = memoryIommuState();
    const hw = new IommuHardware();
    hw.registerDevice(dev("d0"));
    const p = paging(hw);
    hw.map(p, { iova: 0n, paddr: 0x100000n, size: 64n * PAGE, access: RW });
    hw.createBinding({ hpasid: 30, setId: 1, generation: 2, gpasid: 3 });
    hw.installGpasidEntry({ deviceId: "d0", hpasid: 30, parentDomainId: p, guestPgtable: 0x1000n, owner: "vfio/v", ownerData: new Uint8Array() });
    await store.write(hw.takeChanges());
    return { store, hw, keep: () => store.write(hw.takeChanges()) };
  }
  const firstStage = (hw: IommuHardware) => hw.binding(30)!.firstStage.map((m) => ({ ...m }));

  it("writes a guest page mapped as its range alone, not the bind's whole first stage again (issue 15: a fault's cost grew with the pages mapped)", async () => {
    const { hw, keep } = await boundGuest();
    for (let i = 0n; i < 50n; i++) hw.mapGuest(30, { iova: 0x10_0000n + i * PAGE, paddr: i * PAGE, size: PAGE, access: RW });
    await keep();
    hw.mapGuest(30, { iova: 0x20_0000n, paddr: 0x5000n, size: PAGE, access: R });
    const changes = hw.takeChanges();
    expect(changes.map((c) => c.key)).toEqual(["gp/30/200000"]);
    expect(changes[0]!.value).toEqual({
      kind: "guestMapping",
      guestMapping: { hpasid: 30, generation: 2, mapping: { iova: 0x20_0000n, paddr: 0x5000n, size: PAGE, access: R } },
    });
  });

  it("comes back with the first stage from its ranges: a range split by an unmap, one removed, none of a bind that is gone", async () => {
    const { store, hw, keep } = await boundGuest();
    hw.mapGuest(30, { iova: 0x10_0000n, paddr: 0n, size: 3n * PAGE, access: RW });
    hw.mapGuest(30, { iova: 0x20_0000n, paddr: 0x8000n, size: PAGE, access: R });
    hw.mapGuest(30, { iova: 0x30_0000n, paddr: 0x9000n, size: PAGE, access: R });
    await keep();
    hw.unmapGuest(30, 0x10_1000n, PAGE); // the middle page: two pieces left
    hw.unmapGuest(30, 0x20_0000n, PAGE);
    await keep();
    expect([...store.saved.keys()].filter((k) => k.startsWith("gp/")).sort()).toEqual(["gp/30/100000", "gp/30/102000", "gp/30/300000"]);
    const back = IommuHardware.restore(store.saved);
    expect(firstStage(back)).toEqual(firstStage(hw));
    expect(firstStage(back).map((m) => [m.iova, m.size])).toEqual([
      [0x10_0000n, PAGE],
      [0x10_2000n, PAGE],
      [0x30_0000n, PAGE],
    ]);
    expect(back.takeChanges()).toEqual([]); // nothing to write again after a clean start

    // The bind goes: its ranges are deleted with it.
    hw.removeGpasidEntry(30, "d0");
    hw.deleteBinding(30);
    await keep();
    expect([...store.saved.keys()].filter((k) => k.startsWith("gp/") || k.startsWith("bind/"))).toEqual([]);
    expect(IommuHardware.restore(store.saved).binding(30)).toBeUndefined();
  });

  it("unmaps from a first stage of hundreds of thousands of ranges (the table refilled in place, not spread into a call)", async () => {
    const { hw } = await boundGuest();
    const n = 300_000n;
    for (let i = 0n; i < n; i++) hw.mapGuest(30, { iova: i * 2n * PAGE, paddr: 0n, size: PAGE, access: R });
    hw.takeChanges();
    expect(hw.unmapGuest(30, 0n, PAGE).result).toBe(PAGE);
    expect(hw.binding(30)!.firstStage.length).toBe(Number(n) - 1);
    expect(hw.takeChanges().map((c) => c.key)).toEqual(["gp/30/0"]);
  });

  it("keeps a first stage read from a bind's own entry (state written before each range had a key) under its ranges' keys at the next write", async () => {
    const { store, hw, keep } = await boundGuest();
    hw.mapGuest(30, { iova: 0x10_0000n, paddr: 0n, size: PAGE, access: RW });
    hw.mapGuest(30, { iova: 0x20_0000n, paddr: 0x8000n, size: 2n * PAGE, access: R });
    await keep();
    // The old layout: the table inside the bind's entry, no `gp/` keys.
    const old = new Map(store.saved);
    for (const k of [...old.keys()]) if (k.startsWith("gp/")) old.delete(k);
    const bind = old.get("bind/30")!;
    if (bind.kind !== "gpasidBinding") throw new Error("unreachable");
    old.set("bind/30", { kind: "gpasidBinding", binding: { ...bind.binding, firstStage: firstStage(hw) } });

    const back = IommuHardware.restore(old);
    expect(firstStage(back)).toEqual(firstStage(hw));
    // Written again: the ranges first, then the bind without its table.
    const rewritten = back.takeChanges();
    expect(rewritten.map((c) => c.key)).toEqual(["gp/30/100000", "gp/30/200000", "bind/30"]);
    const again = memoryIommuState();
    await again.write([...old].map(([key, value]) => ({ key, value })));
    await again.write(rewritten);
    const twice = IommuHardware.restore(again.saved);
    expect(firstStage(twice)).toEqual(firstStage(hw));
    const keptBind = again.saved.get("bind/30");
    expect(keptBind?.kind === "gpasidBinding" && keptBind.binding.firstStage).toEqual([]);

    // Stopped after the ranges were written and before the bind was: the table in both places is
    // read once (a duplicate would be unmapped, and counted, twice).
    const both = memoryIommuState();
    await both.write([...old].map(([key, value]) => ({ key, value })));
    await both.write(rewritten.filter((c) => c.key.startsWith("gp/")));
    const once = IommuHardware.restore(both.saved);
    expect(firstStage(once)).toEqual(firstStage(hw));
    expect(once.unmapGuest(30, 0x20_0000n, 2n * PAGE).result).toBe(2n * PAGE);
  });

  it("drops a kept range of a bind that is gone or of an older generation of the PASID, and deletes its key", async () => {
    const { store, hw, keep } = await boundGuest();
    hw.mapGuest(30, { iova: 0x10_0000n, paddr: 0n, size: PAGE, access: RW });
    await keep();
    const saved = new Map(store.saved);
    const m = { iova: 0x40_0000n, paddr: 0x3000n, size: PAGE, access: R };
    saved.set("gp/30/400000", { kind: "guestMapping", guestMapping: { hpasid: 30, generation: 1, mapping: m } });
    saved.set("gp/31/400000", { kind: "guestMapping", guestMapping: { hpasid: 31, generation: 2, mapping: m } });
    const back = IommuHardware.restore(saved);
    expect(firstStage(back)).toEqual(firstStage(hw));
    const changes = back.takeChanges();
    expect(changes.map((c) => c.key).sort()).toEqual(["gp/30/400000", "gp/31/400000"]);
    expect(changes.every((c) => c.value === undefined)).toBe(true);
  });
});
