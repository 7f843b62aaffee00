import type { HistoryActionCase } from "@ioasid/bus";
import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { EventType, OWNER_ROLE, TokenType, type Holder } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import { IommuDriver, type BindGpasidSpec, type IommuEvent, type IommuHistoryAction } from "./iommu-driver.js";
import { DeviceFunction, DomainType, IommuHardware, IOTLB_FLUSH_LOG_SIZE, type DeviceSpec } from "./iommu-hardware.js";
import { memoryIommuState } from "../adapters/memory-iommu-state.js";

const HOLDER = { role: "iommu", instance: "dmar0", purpose: "bind" };
const HOLDER_KEY = "iommu/dmar0/bind";

const dev = (deviceId: string, maxPasids = 1 << 20): DeviceSpec => ({
  deviceId,
  maxPasids,
  priCapable: true,
  function: DeviceFunction.PF,
  parentDeviceId: "",
  iommuGroup: 1,
  priCredits: 0,
});

// The driver runs against the real core model (the testkit's InProcessCore); the test sets the
// core up as VFIO would (sets, IOASIDs, frees) through `core.space`, and applies acknowledgements
// as the core service does.

/** Creates a set (as VFIO would: token type MM) and allocates exactly these IOASIDs in it. @returns the set id */
function setWith(core: InProcessCore, ...ioasids: number[]): number {
  const setId = core.space.createSet({ token: { type: TokenType.MM, value: BigInt(1000 + core.space.listSets().length) }, quota: 64 }).id;
  for (const id of ioasids) core.space.alloc(setId, { min: id, max: id });
  return setId;
}

/** A core event as the bus handler hands it to the driver (`adapters/iommu-event-handler.ts`). */
function toDriverEvent(e: InProcessCore["events"][number]): IommuEvent {
  return { seq: e.seq, type: e.type, ioasid: e.ioasid, generation: e.generation, spid: e.spid, setId: e.setId };
}

/** VFIO's free: the FREE the core commits when references remain (undefined when it reclaimed the IOASID at once). */
function freeIoasid(core: InProcessCore, setId: number, ioasid: number): IommuEvent | undefined {
  const seq = core.events.at(-1)?.seq ?? 0;
  core.space.free(setId, ioasid);
  const e = core.eventsAfter(seq, ioasid).find((x) => x.type === "FREE");
  return e === undefined ? undefined : toDriverEvent(e);
}

/** What the core says of an IOASID: refcount, holders (`role/instance/purpose`; the allocation reference as "set-owner"), SPID, state. */
function info(core: InProcessCore, ioasid: number): { refcount: number; holders: Record<string, number>; spid: number; state: string } | undefined {
  const i = core.space.describe(ioasid);
  if (i === undefined) return undefined;
  const holders = Object.fromEntries(
    i.holders.map((h) => [h.holder.role === OWNER_ROLE ? OWNER_ROLE : `${h.holder.role}/${h.holder.instance}/${h.holder.purpose}`, h.count]),
  );
  return { refcount: i.refcount, holders, spid: i.spid, state: i.state };
}

/** What the core service does with an acknowledgement's detach_spid: detach (silently on a FREE_PENDING IOASID). */
function ackDetachSpid(core: InProcessCore, ioasid: number): void {
  const i = core.space.describe(ioasid);
  if (i !== undefined && i.spid !== 0) core.space.detachSpid(i.setId, ioasid);
}

/** What the core service does with an acknowledgement's release: puts the holder's reference, if held. */
function ackRelease(core: InProcessCore, ioasid: number, holder: Holder): void {
  const i = core.space.describe(ioasid);
  if (i?.holders.some((h) => h.holder.role === holder.role && h.holder.instance === holder.instance && h.holder.purpose === holder.purpose)) {
    core.space.put(i.setId, ioasid, holder);
  }
}

interface Rig {
  core: InProcessCore;
  driver: IommuDriver;
  history: { action: HistoryActionCase; step: IommuHistoryAction; fields: Record<string, unknown> }[];
  parent: number;
}

function rig(...devices: string[]): Rig {
  const core = new InProcessCore();
  const history: Rig["history"] = [];
  const driver = new IommuDriver({
    hardware: new IommuHardware(),
    core,
    instance: "dmar0",
    history: { record: (step, fields = {}) => history.push({ action: step.$case, step, fields: fields as Record<string, unknown> }) },
  });
  for (const d of devices.length === 0 ? ["d0", "d1"] : devices) driver.registerDevice(dev(d));
  const parent = driver.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
  return { core, driver, history, parent };
}

const bindSpec = (r: Rig, over: Partial<BindGpasidSpec> & { setId: number }): BindGpasidSpec => ({
  hpasid: 201,
  generation: 0,
  gpasid: 101,
  deviceId: "d0",
  guestPgtable: 0x9000n,
  parentDomainId: r.parent,
  owner: "vfio/vfio-1",
  ownerData: new Uint8Array(),
  ...over,
});

async function refused(p: Promise<unknown>, code: number, reason: string): Promise<void> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(DomainError);
    expect({ code: (err as DomainError).code, reason: (err as DomainError).reason }).toEqual({ code, reason });
    return;
  }
  throw new Error(`expected ${reason}`);
}

/** Delivers a FREE to the driver as the bus would, applying the released references like the core. */
async function deliver(r: Rig, e: IommuEvent | undefined): Promise<string[]> {
  if (e === undefined) throw new Error("no FREE emitted");
  const result = await r.driver.handleEvent(e);
  // As the core applies an acknowledgement: the SPID detach, then the releases.
  if (result?.detachSpid === true) ackDetachSpid(r.core, e.ioasid);
  for (const purpose of result?.release ?? []) ackRelease(r.core, e.ioasid, { ...HOLDER, purpose });
  return [...(result?.release ?? [])];
}

/** The IOASID events the core committed (set and allocation events left out). */
const kinds = (r: Rig) => r.core.events.filter((e) => ["BIND", "UNBIND", "FREE", "RECLAIM"].includes(e.type)).map((e) => `${e.type}:${e.ioasid}`);

describe("IommuDriver guest binds", () => {
  it("takes the reference and attaches the SPID on the first device bind only (one BIND, refcount 2)", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    const first = await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    expect(first.firstBind).toBe(true);
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, spid: 101, holders: { [HOLDER_KEY]: 1 } });
    const second = await r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "d1" }));
    expect(second.firstBind).toBe(false);
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, holders: { [HOLDER_KEY]: 1 } });
    expect(kinds(r)).toEqual(["BIND:201"]);
    expect(r.history.filter((h) => h.action === "bindGpasid").map((h) => h.fields["refcount"])).toEqual([2, undefined]);
    expect(r.history.filter((h) => h.action === "pasidEntrySet").map((h) => h.fields["ioasid"])).toEqual([201, 201]);
  });

  it("takes one reference when two devices bind the same host PASID concurrently", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    const results = await Promise.all([r.driver.bindGpasid(bindSpec(r, { setId: set })), r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "d1" }))]);
    expect(results.map((x) => x.firstBind).sort()).toEqual([false, true]);
    expect(info(r.core, 201)!.holders[HOLDER_KEY]).toBe(1);
    expect(kinds(r)).toEqual(["BIND:201"]);
  });

  it("emits UNBIND only on the last device unbind, which keeps the reference until the FREE releases it", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    await r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "d1" }));
    expect(await r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 0, gpasid: 101, deviceId: "d0" })).toEqual({
      unbound: true,
      lastUnbind: false,
      answeredFaultGroups: 0,
    });
    expect(kinds(r)).toEqual(["BIND:201"]);
    expect(info(r.core, 201)!.refcount).toBe(2);
    expect(await r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 1, gpasid: 0, deviceId: "d1" })).toEqual({
      unbound: true,
      lastUnbind: true,
      answeredFaultGroups: 0,
    });
    // Step 19: UNBIND; the reference stays (steps 22–23: ioasid_free() 1, then the IOMMU's put 0).
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201"]);
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, spid: 0, holders: { "set-owner": 1, [HOLDER_KEY]: 1 } });
    expect(r.core.calls).not.toContain("put");
    expect(r.history.map((h) => h.action)).toContain("teardownPasid");
    expect(r.history.map((h) => h.action)).toContain("iotlbFlush");
    expect(r.history.filter((h) => h.action === "unbindGpasid").map((h) => h.fields["refcount"])).toEqual([undefined, undefined]);
    expect(r.driver.hw.binding(201)).toMatchObject({ refHeld: true, spidAttached: false });
    expect(r.driver.hw.binding(201)!.devices.size).toBe(0);
    // The FREE reaches the IOMMU, which releases the reference with the ack: reclaimed.
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201", "FREE:201", "RECLAIM:201"]);
    expect(r.core.calls.filter((c) => c === "detachSpid")).toHaveLength(1);
    expect(r.driver.hw.binding(201)).toBeUndefined();
  });

  it("attaches the SPID again (a new BIND) on a rebind after the last unbind, without a second reference", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    await r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d0" });
    expect((await r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "d1" }))).firstBind).toBe(true);
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201", "BIND:201"]);
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, spid: 101, holders: { [HOLDER_KEY]: 1 } });
    expect(r.core.calls.filter((c) => c === "get")).toHaveLength(1);
    expect(r.history.filter((h) => h.action === "bindGpasid").map((h) => h.fields["refcount"])).toEqual([2, undefined]);
    // The FREE detaches the SPID without UNBIND and releases the one reference.
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201", "BIND:201", "FREE:201", "RECLAIM:201"]);
  });

  it("refuses another set's IOASID, a FREE_PENDING one, a stale generation and a mismatched SPID, changing nothing", async () => {
    const r = rig();
    const mine = setWith(r.core, 201, 202);
    const other = setWith(r.core, 300);
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: other })), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: mine, generation: 9 })), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    await r.driver.bindGpasid(bindSpec(r, { setId: mine }));
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: mine, deviceId: "d1", gpasid: 102 })), Code.FAILED_PRECONDITION, "SPID_MISMATCH");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: mine, hpasid: 202, deviceId: "d0" })), Code.INVALID_ARGUMENT, "SPID_IN_USE");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: mine, deviceId: "d0" })), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    freeIoasid(r.core, mine, 202);
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: mine, hpasid: 202, gpasid: 7 })), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    const before = r.driver.snapshot([], IOTLB_FLUSH_LOG_SIZE);
    await refused(r.driver.unbindGpasid({ setId: other, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d0" }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await refused(r.driver.unbindGpasid({ setId: other, hpasid: 300, generation: 0, gpasid: 0, deviceId: "nope" }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    expect(r.driver.snapshot([], IOTLB_FLUSH_LOG_SIZE)).toEqual(before);
    expect(kinds(r)).toEqual(["BIND:201", "RECLAIM:202"]);
    expect(info(r.core, 201)!.refcount).toBe(2);
  });

  it("refuses input it cannot use before calling the core", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: 0 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, gpasid: 0 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, gpasid: 1 << 20 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, hpasid: 0 })), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "zz" })), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, owner: "" })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, parentDomainId: 77 })), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    await refused(r.driver.unbindGpasid({ setId: 0, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d0" }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(r.core.calls).toEqual([]);
  });

  it("undoes the reference when attaching the SPID fails, so a failed bind changes nothing", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    r.core.failNext("attachSpid", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set })), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(info(r.core, 201)).toMatchObject({ refcount: 1, spid: 0 });
    expect(r.driver.hw.binding(201)).toBeUndefined();
    expect(r.driver.snapshot([], 0).devices.flatMap((d) => d.pasidEntries)).toEqual([]);
    expect((await r.driver.bindGpasid(bindSpec(r, { setId: set }))).firstBind).toBe(true);
  });

  it("puts back a reference whose get was applied but whose answer was lost", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    r.core.loseAnswerOf("get");
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set })), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(info(r.core, 201)).toMatchObject({ refcount: 1, holders: { "set-owner": 1 } });
    expect(r.driver.hw.binding(201)).toBeUndefined();
  });

  it("leaves such a reference to the IOASID's FREE when it cannot be put back either", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    r.core.loseAnswerOf("get");
    r.core.failNext("put", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set })), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(info(r.core, 201)!.holders[HOLDER_KEY]).toBe(1);
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
  });

  it("asks the core, before relying on it, about a reference whose get lost its answer", async () => {
    const r = rig();
    const set = setWith(r.core, 201, 202);
    // 201: the get never reached the core, and the undo could not either.
    r.core.failNext("get", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    r.core.failNext("put", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set })), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(info(r.core, 201)!.holders[HOLDER_KEY]).toBeUndefined();
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, holders: { [HOLDER_KEY]: 1 } });
    // So the guest's free leaves the IOASID FREE_PENDING until the IOMMU tears its entry down.
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
    // 202: the get was applied and its answer lost: the next bind takes no second reference.
    r.core.loseAnswerOf("get");
    r.core.failNext("put", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: set, hpasid: 202, gpasid: 102 })), Code.UNAVAILABLE, "UNAVAILABLE");
    await r.driver.bindGpasid(bindSpec(r, { setId: set, hpasid: 202, gpasid: 102 }));
    expect(info(r.core, 202)).toMatchObject({ refcount: 2, holders: { [HOLDER_KEY]: 1 } });
  });

  it("finishes on the next call a detach the core failed to make, keeping the reference for the FREE", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    r.core.failNext("detachSpid", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await refused(r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d0" }), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(info(r.core, 201)).toMatchObject({ spid: 101, holders: { [HOLDER_KEY]: 1 } });
    expect(kinds(r)).toEqual(["BIND:201"]);
    expect(await r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d0" })).toEqual({
      unbound: false,
      lastUnbind: false,
      answeredFaultGroups: 0,
    });
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201"]);
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, spid: 0, holders: { "set-owner": 1, [HOLDER_KEY]: 1 } });
    expect(r.core.calls).not.toContain("put");
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
  });

  it("leaves a put that failed on device removal to the FREE", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    r.core.failNext("put", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    expect(await r.driver.removeDevice("d0")).toEqual({ handles: 1, answeredFaultGroups: 0 });
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201"]);
    expect(info(r.core, 201)!.holders[HOLDER_KEY]).toBe(1);
    // An unbind finds nothing on another device and keeps the reference (a guest unbind never puts).
    expect(await r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d1" })).toEqual({
      unbound: false,
      lastUnbind: false,
      answeredFaultGroups: 0,
    });
    expect(info(r.core, 201)!.holders[HOLDER_KEY]).toBe(1);
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
  });
});

describe("IommuDriver FREE (free before unbind)", () => {
  it("tears the entries down on every device, detaches the SPID (no UNBIND) and releases the reference with the ack", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    await r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "d1" }));
    const free = freeIoasid(r.core, set, 201);
    expect(await deliver(r, free)).toEqual(["bind"]);
    expect(r.driver.snapshot([], 0).devices.flatMap((d) => d.pasidEntries)).toEqual([]);
    expect(kinds(r)).toEqual(["BIND:201", "FREE:201", "RECLAIM:201"]);
    // The detach travels with the acknowledgement: no call to the core per IOASID.
    expect(r.core.calls.filter((c) => c === "detachSpid")).toHaveLength(0);
    const flushes = r.driver.snapshot([], 10).flushes;
    expect(flushes.map((f) => [f.cause, f.deviceId, f.pasid])).toEqual([
      ["IOASID_FREE", "d0", 201],
      ["IOASID_FREE", "d1", 201],
    ]);
    expect(r.history.find((h) => h.action === "iommuNbHandler")!.fields).toMatchObject({ ioasid: 201, seq: Number(free!.seq) });
    // Redelivery: nothing left, nothing released, answered synchronously.
    expect(r.driver.handleEvent(free!)).toBeUndefined();
    // The late unbind (step 30) finds nothing and changes nothing.
    expect(await r.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 1, gpasid: 101, deviceId: "d0" })).toEqual({
      unbound: false,
      lastUnbind: false,
      answeredFaultGroups: 0,
    });
    expect(kinds(r)).toEqual(["BIND:201", "FREE:201", "RECLAIM:201"]);
  });

  it("ignores events it has nothing for, and FREEs of another generation", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    const e: IommuEvent = { seq: 99, type: EventType.FREE, ioasid: 201, generation: 5, spid: 0, setId: set };
    expect(r.driver.handleEvent(e)).toBeUndefined();
    expect(r.driver.handleEvent({ ...e, ioasid: 7, generation: 1 })).toBeUndefined();
    expect(r.driver.handleEvent({ ...e, type: EventType.BIND, generation: 1 })).toBeUndefined();
    expect(r.driver.snapshot([], 0).devices[0]!.pasidEntries).toHaveLength(1);
  });

  it("tears down a checked domain attachment of the freed IOASID but leaves an unchecked one", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.attachDomain({
      domainId: r.parent,
      deviceId: "d0",
      pasid: 201,
      withoutPasid: false,
      generation: 1,
      owner: "vdcm/x",
      ownerData: new Uint8Array(),
    });
    await r.driver.attachDomain({
      domainId: r.parent,
      deviceId: "d1",
      pasid: 201,
      withoutPasid: false,
      generation: 0,
      owner: "vdcm/x",
      ownerData: new Uint8Array(),
    });
    // The IOMMU holds no reference for a domain attachment: a VDCM-like holder keeps it FREE_PENDING.
    r.core.space.get(set, 201, { role: "vdcm", instance: "x", purpose: "wq" });
    expect(await deliver(r, freeIoasid(r.core, set, 201))).toEqual([]);
    expect(r.driver.hw.handleAt("d0", 201)).toBeUndefined();
    expect(r.driver.hw.handleAt("d1", 201)).toBeDefined();
  });

  it("answers a FREE synchronously-settled with the SPID detach and the release in the ack, whatever the core's state", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    const free = freeIoasid(r.core, set, 201)!;
    // Even with the core unreachable the handler needs nothing from it: the ack carries it all.
    r.core.failNext("detachSpid", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await expect(r.driver.handleEvent(free)).resolves.toEqual({ release: ["bind"], detachSpid: true });
    expect(r.driver.hw.handleAt("d0", 201)).toBeUndefined();
    expect(r.driver.snapshot([], 10).flushes).toHaveLength(1);
    // A redelivery (the ack was lost) finds nothing: nothing torn down twice, nothing released twice.
    expect(r.driver.handleEvent(free)).toBeUndefined();
  });
});

describe("IommuDriver guest bind ownership", () => {
  it("refuses a guest bind on a PASID of a set that is not a VM's (a host process's SVA set), changing nothing", async () => {
    const r = rig();
    const sva = r.core.space.createSet({ token: { type: TokenType.NONE, value: 77n }, quota: 1 }).id;
    r.core.space.alloc(sva, { min: 201, max: 201 });
    const before = info(r.core, 201);
    await refused(r.driver.bindGpasid(bindSpec(r, { setId: sva })), Code.PERMISSION_DENIED, "SET_NOT_A_VM");
    expect(info(r.core, 201)).toEqual(before);
    expect(r.driver.hw.handleAt("d0", 201)).toBeUndefined();
    expect(r.driver.hw.binding(201)).toBeUndefined();
    expect(kinds(r)).toEqual([]);
    // The same PASID number in a VM's set binds.
    const vmSet = setWith(r.core, 202);
    await expect(r.driver.bindGpasid(bindSpec(r, { setId: vmSet, hpasid: 202 }))).resolves.toMatchObject({ firstBind: true });
  });
});

describe("IommuDriver attach and generations", () => {
  it("checks a given generation against the core and refuses stale or free-pending IOASIDs", async () => {
    const r = rig();
    const set = setWith(r.core, 201, 202);
    const base = { domainId: r.parent, deviceId: "d0", withoutPasid: false, owner: "o", ownerData: new Uint8Array() };
    await refused(r.driver.attachDomain({ ...base, pasid: 201, generation: 2 }), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    await refused(r.driver.attachDomain({ ...base, pasid: 555, generation: 1 }), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    r.core.space.get(set, 202, { role: "vdcm", instance: "x", purpose: "wq" });
    freeIoasid(r.core, set, 202);
    await refused(r.driver.attachDomain({ ...base, pasid: 202, generation: 1 }), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    await refused(r.driver.attachDomain({ ...base, pasid: 0, generation: 0 }), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED");
    await r.driver.attachDomain({ ...base, pasid: 201, generation: 1 });
    await refused(r.driver.attachDomain({ ...base, pasid: 201, generation: 1 }), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    await refused(
      r.driver.detachDomain({ domainId: r.parent, deviceId: "d0", pasid: 201, withoutPasid: false, generation: 3 }),
      Code.FAILED_PRECONDITION,
      "STALE_GENERATION",
    );
    expect(await r.driver.detachDomain({ domainId: r.parent, deviceId: "d0", pasid: 201, withoutPasid: false, generation: 1 })).toBe(0);
    // An unchecked attachment at a FREE_PENDING IOASID can still be detached naming its generation.
    await r.driver.attachDomain({ ...base, pasid: 202, generation: 0 });
    await refused(
      r.driver.detachDomain({ domainId: r.parent, deviceId: "d0", pasid: 202, withoutPasid: false, generation: 2 }),
      Code.FAILED_PRECONDITION,
      "STALE_GENERATION",
    );
    expect(await r.driver.detachDomain({ domainId: r.parent, deviceId: "d0", pasid: 202, withoutPasid: false, generation: 1 })).toBe(0);
  });

  it("releases a bind's SPID and reference when its last device is removed", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    await r.driver.bindGpasid(bindSpec(r, { setId: set, deviceId: "d1" }));
    expect(await r.driver.removeDevice("d0")).toEqual({ handles: 1, answeredFaultGroups: 0 });
    expect(info(r.core, 201)!.refcount).toBe(2);
    expect(await r.driver.removeDevice("d1")).toEqual({ handles: 1, answeredFaultGroups: 0 });
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201"]);
    expect(info(r.core, 201)).toMatchObject({ refcount: 1, spid: 0 });
  });
});

describe("IommuDriver native SVA", () => {
  it("gives an mm one PASID shared by its devices, kept after the last unbind and freed on release", async () => {
    const r = rig("d0", "d1", "small");
    const a = await r.driver.svaBind({ deviceId: "d0", mmToken: 0xabcn, owner: "vdcm/x", ownerData: new Uint8Array() });
    const b = await r.driver.svaBind({ deviceId: "d1", mmToken: 0xabcn, owner: "vdcm/x", ownerData: new Uint8Array() });
    expect(a.pasidAllocated).toBe(true);
    expect(b.pasidAllocated).toBe(false);
    expect(b.bond.pasid).toBe(a.bond.pasid);
    expect(r.core.calls.filter((c) => c === "alloc")).toHaveLength(1);
    expect(await r.driver.svaUnbind("d0", 0xabcn)).toBe(0);
    expect(await r.driver.svaUnbind("d1", 0xabcn)).toBe(0);
    expect(info(r.core, a.bond.pasid)).toMatchObject({ state: "ACTIVE" });
    const again = await r.driver.svaBind({ deviceId: "d0", mmToken: 0xabcn, owner: "vdcm/x", ownerData: new Uint8Array() });
    expect(again).toMatchObject({ pasidAllocated: false, bond: { pasid: a.bond.pasid } });
    expect(await r.driver.releaseMm(0xabcn)).toEqual({ pasid: a.bond.pasid, tornDownBonds: 1 });
    expect(info(r.core, a.bond.pasid)).toBeUndefined();
    expect(r.driver.snapshot([], 0).bonds).toEqual([]);
    expect(await r.driver.releaseMm(0xabcn)).toEqual({ pasid: 0, tornDownBonds: 0 });
  });

  it("undoes the mm's allocation when its first bind fails", async () => {
    const r = rig("d0");
    r.driver.registerDevice(dev("tiny", 4));
    await r.driver.attachDomain({ domainId: r.parent, deviceId: "d0", pasid: 1, withoutPasid: false, generation: 0, owner: "o", ownerData: new Uint8Array() });
    await refused(r.driver.svaBind({ deviceId: "d0", mmToken: 5n, owner: "o", ownerData: new Uint8Array() }), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(r.driver.hw.mm(5n)).toBeUndefined();
    expect(info(r.core, 1)).toBeUndefined();
    const ok = await r.driver.svaBind({ deviceId: "tiny", mmToken: 5n, owner: "o", ownerData: new Uint8Array() });
    expect(ok.bond.pasid).toBeLessThan(4);
    await refused(r.driver.svaBind({ deviceId: "d0", mmToken: 0n, owner: "o", ownerData: new Uint8Array() }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
  });

  it("forgets an mm whose PASID was freed by someone else", async () => {
    const r = rig("d0");
    const { bond } = await r.driver.svaBind({ deviceId: "d0", mmToken: 5n, owner: "o", ownerData: new Uint8Array() });
    const setId = r.driver.hw.mm(5n)!.setId;
    r.core.space.get(setId, bond.pasid, { role: "vdcm", instance: "x", purpose: "wq" });
    await deliver(r, freeIoasid(r.core, setId, bond.pasid));
    expect(r.driver.hw.mm(5n)).toBeUndefined();
    expect(r.driver.snapshot([], 0).bonds).toEqual([]);
  });
});

describe("IommuDriver store writes", () => {
  it("group-commits them: persists made while a write is in flight join one next write, and each resolves once its changes are kept", async () => {
    const writes: Array<{ keys: string[]; keep: () => void }> = [];
    const store = { write: (changes: readonly { key: string }[]) => new Promise<void>((keep) => writes.push({ keys: changes.map((c) => c.key), keep })) };
    const driver = new IommuDriver({ hardware: new IommuHardware(), core: new InProcessCore(), instance: "dmar0", store });
    const turn = () => new Promise((r) => setImmediate(r));
    driver.registerDevice(dev("d0"));
    const first = driver.persist();
    await turn();
    expect(writes).toHaveLength(1);
    // Two more handlers' changes while the first write is in flight (a delivery batch's FREEs).
    driver.registerDevice(dev("d1"));
    const second = driver.persist();
    driver.registerDevice(dev("d2"));
    const third = driver.persist();
    const kept: string[] = [];
    void second.then(() => kept.push("second"));
    void third.then(() => kept.push("third"));
    await turn();
    expect(writes, "the next write waits for the one in flight").toHaveLength(1);
    writes[0]!.keep();
    await first;
    await turn();
    expect(writes, "one write for both, not one each").toHaveLength(2);
    expect(writes[1]!.keys.some((k) => k.includes("d1")) && writes[1]!.keys.some((k) => k.includes("d2"))).toBe(true);
    expect(kept).toEqual([]);
    writes[1]!.keep();
    await Promise.all([second, third]);
    expect(kept.sort()).toEqual(["second", "third"]);
    // Nothing changed since: a persist waits for nothing new and writes nothing.
    await driver.persist();
    expect(writes).toHaveLength(2);
  });
});

describe("IommuDriver after a restart", () => {
  /** A second driver (the restarted IOMMU: empty tables) on the same core. */
  function restarted(r: Rig): Rig {
    const driver = new IommuDriver({ hardware: new IommuHardware(), core: r.core, instance: "dmar0" });
    for (const d of ["d0", "d1"]) driver.registerDevice(dev(d));
    const parent = driver.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
    return { ...r, driver, parent };
  }

  it("comes back from its store with its binds; reconcile keeps what the core still records and tears down a bind whose reference is gone", async () => {
    const store = memoryIommuState();
    const saved = store.saved;
    const core = new InProcessCore();
    const first = new IommuDriver({ hardware: new IommuHardware(), core, instance: "dmar0", store });
    for (const d of ["d0", "d1"]) first.registerDevice(dev(d));
    const parent = first.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
    const r0: Rig = { core, driver: first, history: [], parent };
    const set = setWith(core, 201, 202);
    await first.bindGpasid(bindSpec(r0, { setId: set, hpasid: 201, gpasid: 101 }));
    await first.bindGpasid(bindSpec(r0, { setId: set, hpasid: 202, gpasid: 102, deviceId: "d1" }));
    await first.persist();
    // kill -9; meanwhile an operator releases the IOMMU's reference on 202.
    core.space.put(set, 202, { role: "iommu", instance: "dmar0", purpose: "bind" });
    const back = new IommuDriver({ hardware: IommuHardware.restore(saved), core, instance: "dmar0", store, saved });
    expect(await back.reconcile()).toMatchObject({ adopted: 0 });
    expect(back.hw.handleAt("d0", 201)).toBeDefined();
    expect(back.hw.handleAt("d1", 202), "nothing stays programmed for a reference that is gone").toBeUndefined();
    expect(back.hw.binding(202)).toBeUndefined();
    expect(IommuHardware.restore(saved).handleAt("d1", 202)).toBeUndefined();
    // The FREE of 201 still releases the kept reference with the ack.
    expect(await deliver({ ...r0, driver: back }, freeIoasid(core, set, 201))).toEqual(["bind"]);
  });

  it("counts as its bind's a reference the core records for a bind kept without it (a crash right after the get)", async () => {
    const store = memoryIommuState();
    const core = new InProcessCore();
    const first = new IommuDriver({ hardware: new IommuHardware(), core, instance: "dmar0", store });
    for (const d of ["d0", "d1"]) first.registerDevice(dev(d));
    const parent = first.createDomain({ type: DomainType.PAGING, parentDomainId: 0, guestPgtable: 0n, mmToken: 0n }).domainId;
    const r0: Rig = { core, driver: first, history: [], parent };
    const set = setWith(core, 201);
    // The bind state is kept, the get is applied but its answer lost, and the undo cannot reach the core.
    core.loseAnswerOf("get");
    core.failNext("put", new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core down"));
    await refused(first.bindGpasid(bindSpec(r0, { setId: set })), Code.UNAVAILABLE, "UNAVAILABLE");
    // kill -9 before refHeld reached the store: what was kept says "no reference".
    first.hw.binding(201)!.refHeld = false;
    await first.persist();
    expect(info(core, 201)!.holders[HOLDER_KEY]).toBe(1);
    const back = new IommuDriver({ hardware: IommuHardware.restore(store.saved), core, instance: "dmar0", store, saved: store.saved });
    expect(await back.reconcile()).toMatchObject({ adopted: 1 });
    expect(await deliver({ ...r0, driver: back }, freeIoasid(core, set, 201))).toEqual(["bind"]);
    expect(info(core, 201)).toBeUndefined();
  });

  it("takes back its bind references, so the IOASID's FREE still releases them", async () => {
    const r = rig();
    const set = setWith(r.core, 201, 202);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    const r2 = restarted(r);
    expect(await r2.driver.adoptHeldReferences()).toBe(1);
    expect(await r2.driver.adoptHeldReferences()).toBe(0);
    expect(await deliver(r2, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
    expect(kinds(r)).toEqual(["BIND:201", "FREE:201", "RECLAIM:201"]);
  });

  it("lets the last unbind after a restart emit UNBIND but keep the reference for the FREE, and a rebind reuse the SPID without a second BIND", async () => {
    const r = rig();
    const set = setWith(r.core, 201);
    await r.driver.bindGpasid(bindSpec(r, { setId: set }));
    const r2 = restarted(r);
    await r2.driver.adoptHeldReferences();
    expect((await r2.driver.bindGpasid(bindSpec(r2, { setId: set, deviceId: "d1" }))).firstBind).toBe(false);
    expect(info(r.core, 201)!.holders[HOLDER_KEY]).toBe(1);
    expect(await r2.driver.unbindGpasid({ setId: set, hpasid: 201, generation: 0, gpasid: 0, deviceId: "d1" })).toEqual({
      unbound: true,
      lastUnbind: true,
      answeredFaultGroups: 0,
    });
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201"]);
    expect(info(r.core, 201)).toMatchObject({ refcount: 2, spid: 0, holders: { [HOLDER_KEY]: 1 } });
    expect(await deliver(r2, freeIoasid(r.core, set, 201))).toEqual(["bind"]);
    expect(info(r.core, 201)).toBeUndefined();
    expect(kinds(r)).toEqual(["BIND:201", "UNBIND:201", "FREE:201", "RECLAIM:201"]);
  });
});
