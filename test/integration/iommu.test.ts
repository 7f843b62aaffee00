import { spawnSync } from "node:child_process";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { connect } from "@nats-io/transport-node";
import { readHistory } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { core, events, iommu } from "@ioasid/proto";
import { waitFor, type ServiceProcess } from "@ioasid/testkit";
import { expectRefused, serviceEntry } from "../support/core-fixture.js";
import {
  createVmSet,
  devicesWithStage2,
  eventsOf,
  holdersOf,
  IOMMU_BIND_HOLDER,
  nextSeq,
  pf,
  startIommuProcess,
  startIommuStack,
  type IommuStack,
} from "../support/iommu-fixture.js";

// The IOMMU role through its built process, with the real core and NATS: the test plays VFIO (set,
// alloc, free through the core), KVM/VDCM (references through the core) and the devices.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const BIND = "iommu/dmar0/bind";
const KVM = { role: "kvm", instance: "vm-1", purpose: "vmcs" };

let stack: IommuStack;
let nextToken = 0x5000n;
let nextDevice = 0;
const newDevices = (n: number) => Array.from({ length: n }, () => `0000:6a:${(nextDevice++).toString(16).padStart(2, "0")}.0`);

beforeAll(async () => {
  stack = await startIommuStack();
});
afterAll(async () => {
  // Graceful shutdown exits 0, even with a fault-handler stream left open by a test.
  expect(await stack?.stop()).toBe(0);
});

/** A VM with `n` devices whose stage 2 is attached, and one allocated host PASID. */
async function vm(n = 2) {
  const { c, iommu: client } = stack;
  const setId = await createVmSet(c, nextToken++);
  const devices = newDevices(n);
  const stage2 = await devicesWithStage2(client, ...devices);
  const { ioasid, generation } = await c.alloc(P(core.AllocRequest, { setId }));
  return { setId, devices, stage2, ioasid, generation };
}

const bindReq = (v: Awaited<ReturnType<typeof vm>>, deviceId: string, gpasid = 101) =>
  P(iommu.BindGpasidRequest, {
    setId: v.setId,
    hpasid: v.ioasid,
    generation: v.generation,
    gpasid,
    deviceId,
    guestPgtable: 0x7000n,
    owner: "vfio/vfio-1",
    ownerData: Buffer.from("container-1"),
  });

const unbindReq = (v: Awaited<ReturnType<typeof vm>>, deviceId: string) =>
  P(iommu.UnbindGpasidRequest, { setId: v.setId, hpasid: v.ioasid, generation: v.generation, gpasid: 101, deviceId });

/** QueryState without its timestamp, for before/after comparisons. */
async function state(maxIotlbFlushes = 1000) {
  const { takenAt: _takenAt, ...rest } = await stack.iommu.queryState(P(iommu.QueryStateRequest, { maxIotlbFlushes }));
  return rest;
}

const entriesAt = async (deviceIds: string[], pasid: number) =>
  (await stack.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds }))).devices.flatMap((d) =>
    d.pasidEntries.filter((e) => e.pasid === pasid && !e.withoutPasid),
  );

describe("iommu: guest PASID bind and unbind (normal life cycle, steps 3–5 and 17–19)", () => {
  it("takes one reference and emits one BIND for the first device; the last unbind emits UNBIND and keeps the reference until the FREE", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(2);
    const from = await nextSeq(c);
    const [d0, d1] = v.devices as [string, string];

    const first = await client.bindGpasid(bindReq(v, d0));
    expect(first.firstBind).toBe(true);
    expect(first.handle).toMatchObject({ kind: iommu.AttachKind.ATTACH_KIND_GPASID_BIND, pasid: v.ioasid, gpasid: 101, setId: v.setId, owner: "vfio/vfio-1" });
    expect(first.handle!.ownerData.toString()).toBe("container-1");
    const afterFirst = await c.describe({ ioasid: v.ioasid });
    expect(afterFirst.info!.refcount).toBe(2); // step 4: refcount 2
    expect(afterFirst.info!.spid).toBe(101);
    expect((await holdersOf(c, v.ioasid))![BIND]).toBe(1);
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["BIND"]); // step 5

    // A second device bound to the same host PASID: no second BIND, no second reference.
    expect((await client.bindGpasid(bindReq(v, d1))).firstBind).toBe(false);
    expect((await c.describe({ ioasid: v.ioasid })).info!.refcount).toBe(2);
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["BIND"]);
    const entries = await entriesAt(v.devices, v.ioasid);
    expect(entries.map((e) => [e.domainType, e.setId, e.gpasid, e.generation])).toEqual([
      [iommu.DomainType.DOMAIN_TYPE_NESTED, v.setId, 101, v.generation],
      [iommu.DomainType.DOMAIN_TYPE_NESTED, v.setId, 101, v.generation],
    ]);

    // Unbinding one device: its entry goes, no UNBIND, the reference stays.
    expect(await client.unbindGpasid(unbindReq(v, d0))).toMatchObject({ unbound: true, lastUnbind: false });
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["BIND"]);
    expect((await holdersOf(c, v.ioasid))![BIND]).toBe(1);
    expect((await entriesAt(v.devices, v.ioasid)).length).toBe(1);

    // The last unbind: UNBIND (step 19); the IOMMU keeps its reference (steps 22–23: the free
    // drops VFIO's, then the IOMMU puts its own).
    expect(await client.unbindGpasid(unbindReq(v, d1))).toMatchObject({ unbound: true, lastUnbind: true });
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["BIND", "UNBIND"]);
    const after = (await c.describe({ ioasid: v.ioasid })).info!;
    expect(after).toMatchObject({ refcount: 2, spid: 0, state: core.IoasidState.IOASID_STATE_ACTIVE });
    expect((await holdersOf(c, v.ioasid))![BIND]).toBe(1);
    expect(await entriesAt(v.devices, v.ioasid)).toEqual([]);
    const flushes = (await state()).iotlbFlushes.filter((f) => f.pasid === v.ioasid);
    expect(flushes.map((f) => [f.cause, f.deviceId, f.deviceTlb])).toEqual([
      [iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_DETACH, d0, true],
      [iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_DETACH, d1, true],
    ]);

    // VFIO frees (step 22, refcount 1): the FREE reaches the IOMMU, which releases its reference
    // with the ack (step 23, refcount 0): reclaimed (step 24).
    const freed = await c.free(P(core.FreeRequest, { setId: v.setId, ioasid: v.ioasid }));
    expect(freed.outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
    await waitFor(async () => (await holdersOf(c, v.ioasid)) === undefined, { timeoutMs: 10_000, message: "the IOASID reclaimed after the IOMMU released" });
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["BIND", "UNBIND", "FREE", "RECLAIM"]);
  });

  it("refuses another set's bind and unbind, and changes nothing", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(1);
    const [d0] = v.devices as [string];
    await client.bindGpasid(bindReq(v, d0));
    const intruder = await createVmSet(c, nextToken++);
    const from = await nextSeq(c);
    const before = await state();
    const holders = await holdersOf(c, v.ioasid);

    await expectRefused(client.bindGpasid({ ...bindReq(v, d0), setId: intruder, generation: 0 }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await expectRefused(client.unbindGpasid({ ...unbindReq(v, d0), setId: intruder, generation: 0 }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    // Not bound yet anywhere: the ownership check still refuses.
    const other = await c.alloc(P(core.AllocRequest, { setId: v.setId }));
    await expectRefused(
      client.unbindGpasid(P(iommu.UnbindGpasidRequest, { setId: intruder, hpasid: other.ioasid, deviceId: d0 })),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );

    expect(await state()).toEqual(before);
    expect(await holdersOf(c, v.ioasid)).toEqual(holders);
    expect(await eventsOf(c, from, v.ioasid)).toEqual([]);
  });

  it("refuses a guest bind on a host process's SVA PASID (its set is not a VM's), and changes nothing", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(1);
    const [d0] = v.devices as [string];
    const [host] = newDevices(1) as [string];
    await client.registerDevice(pf(host));
    const mm = nextToken++;
    const bond = (await client.svaBind(P(iommu.SvaBindRequest, { deviceId: host, mmToken: mm, owner: "idxd/wq0" }))).bond!;
    const sva = (await c.describe({ ioasid: bond.pasid })).info!;
    expect((await c.listSets({})).sets.find((x) => x.setId === sva.setId)?.tokenType).toBe(events.TokenType.TOKEN_TYPE_NONE);
    const from = await nextSeq(c);
    const before = await state();
    const holders = await holdersOf(c, bond.pasid);

    // The guest names the host PASID with its own set id: the core's set check refuses it first.
    await expectRefused(client.bindGpasid({ ...bindReq(v, d0), hpasid: bond.pasid, generation: sva.generation }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    // Named with the SVA set's own id: the IOASID is in that set, but the set is not a VM's.
    await expectRefused(
      client.bindGpasid({ ...bindReq(v, d0), setId: sva.setId, hpasid: bond.pasid, generation: sva.generation }),
      Code.PERMISSION_DENIED,
      "SET_NOT_A_VM",
    );

    expect(await state()).toEqual(before);
    expect(await holdersOf(c, bond.pasid)).toEqual(holders);
    expect(await eventsOf(c, from, bond.pasid)).toEqual([]);
    await client.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm }));
  });
});

describe("iommu: FREE before unbind (misbehaving guest, steps 15–30)", () => {
  it("tears down the entries on every device, flushes, emits no UNBIND, releases its reference, and the late unbind is harmless", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(2);
    const [d0, d1] = v.devices as [string, string];
    await client.bindGpasid(bindReq(v, d0));
    await client.bindGpasid(bindReq(v, d1));
    // KVM's reference (step 6) keeps the IOASID FREE_PENDING after the IOMMU released.
    await c.get(P(core.GetRequest, { setId: v.setId, ioasid: v.ioasid, holder: KVM }));
    const from = await nextSeq(c);
    const since = Date.now();

    const freed = await c.free(P(core.FreeRequest, { setId: v.setId, ioasid: v.ioasid }));
    expect(freed.outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
    await waitFor(async () => (await holdersOf(c, v.ioasid))?.[BIND] === undefined, { timeoutMs: 10_000, message: "the IOMMU released its bind reference" });
    expect(await holdersOf(c, v.ioasid)).toEqual({ "kvm/vm-1/vmcs": 1 });
    expect(await entriesAt(v.devices, v.ioasid)).toEqual([]);
    const flushes = (await state()).iotlbFlushes.filter((f) => f.pasid === v.ioasid && f.cause === iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE);
    expect(flushes.map((f) => [f.deviceId, f.scope, f.deviceTlb])).toEqual([
      [d0, iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_PASID, true],
      [d1, iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_PASID, true],
    ]);
    // The SPID was detached without UNBIND (the FREE covers it).
    expect((await c.describe({ ioasid: v.ioasid })).info!.spid).toBe(0);
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["FREE"]);

    // The last holder puts: reclaimed.
    await c.put(P(core.PutRequest, { setId: v.setId, ioasid: v.ioasid, holder: KVM }));
    expect(await holdersOf(c, v.ioasid)).toBeUndefined();

    // Step 30: the late unbind finds nothing, changes nothing, emits nothing.
    const before = await state();
    expect(await client.unbindGpasid(unbindReq(v, d0))).toMatchObject({ unbound: false, lastUnbind: false });
    expect(await client.unbindGpasid(P(iommu.UnbindGpasidRequest, { setId: v.setId, hpasid: v.ioasid, deviceId: d1 }))).toMatchObject({ unbound: false });
    expect(await state()).toEqual(before);
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["FREE", "RECLAIM"]);

    // The history shows the teardown and the flushes, tied to the FREE's delivery.
    const nc = await connect({ servers: stack.core.nats.url });
    try {
      await waitFor(
        async () => {
          const h = (await readHistory(nc, { sinceMs: since })).filter((r) => r.role === "iommu" && r.ioasid === v.ioasid);
          const freeSeq = h.find((r) => r.action?.$case === "iommuNbHandler")?.seq;
          return (
            freeSeq !== undefined &&
            h.filter((r) => r.seq === freeSeq && (r.action?.$case === "teardownPasid" || r.action?.$case === "iotlbFlush")).length === 4
          );
        },
        { timeoutMs: 5000, message: "teardown_pasid and iotlb_flush records of the FREE" },
      );
    } finally {
      await nc.close();
    }
  });

  it("reclaims at once when the IOMMU's was the last reference", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(1);
    await client.bindGpasid(bindReq(v, v.devices[0]!));
    const from = await nextSeq(c);
    await c.free(P(core.FreeRequest, { setId: v.setId, ioasid: v.ioasid }));
    await waitFor(async () => (await holdersOf(c, v.ioasid)) === undefined, { timeoutMs: 10_000, message: "the IOASID reclaimed" });
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["FREE", "RECLAIM"]);
    // A fresh allocation of the same set can be bound again.
    const again = await c.alloc(P(core.AllocRequest, { setId: v.setId }));
    const r = await client.bindGpasid({ ...bindReq(v, v.devices[0]!), hpasid: again.ioasid, generation: again.generation });
    expect(r.firstBind).toBe(true);
  });
});

describe("iommu: devices", () => {
  it("registers PFs and VFs with their IOMMU group, refuses to remove a PF with a VF, and a removal releases the binds it ends", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(1);
    const [pfId] = v.devices as [string];
    const [vfId] = newDevices(1) as [string];
    const vf = await client.registerDevice(
      P(iommu.RegisterDeviceRequest, {
        deviceId: vfId,
        maxPasids: 64,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_VF,
        parentDeviceId: pfId,
        iommuGroup: 7,
        priCredits: 4,
      }),
    );
    expect(vf.device).toMatchObject({ deviceId: vfId, parentDeviceId: pfId, iommuGroup: 7, priCredits: 4, maxPasids: 64, pasidEntries: [] });
    await expectRefused(client.removeDevice({ deviceId: pfId }), Code.FAILED_PRECONDITION, "DEVICE_IN_USE");
    await client.removeDevice({ deviceId: vfId });

    await client.bindGpasid(bindReq(v, pfId));
    const from = await nextSeq(c);
    expect(await client.removeDevice({ deviceId: pfId })).toMatchObject({ detachedHandles: 2 }); // the stage 2 and the bind
    expect(await eventsOf(c, from, v.ioasid)).toEqual(["UNBIND"]);
    expect((await holdersOf(c, v.ioasid))![BIND]).toBeUndefined();
    await expectRefused(client.queryState(P(iommu.QueryStateRequest, { deviceIds: [pfId] })), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    const flushes = (await state()).iotlbFlushes.filter((f) => f.deviceId === pfId && f.cause === iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_DEVICE_REMOVED);
    expect(flushes).toHaveLength(2);
  });
});

describe("iommu: attach handles", () => {
  it("never attaches at PASID 0 and refuses a taken PASID, changing nothing", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(1);
    const [d0] = v.devices as [string];
    const attach = (pasid: number, extra: object = {}) =>
      client.attachDomain(P(iommu.AttachDomainRequest, { domainId: v.stage2, deviceId: d0, pasid, owner: "vdcm/idxd0", ...extra }));
    await expectRefused(attach(0), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED");
    const h = (await attach(v.ioasid, { generation: v.generation, ownerData: Buffer.from([7]) })).handle!;
    expect(h).toMatchObject({ kind: iommu.AttachKind.ATTACH_KIND_DOMAIN, pasid: v.ioasid, generation: v.generation });
    const before = await state();
    await expectRefused(attach(v.ioasid), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    await expectRefused(client.bindGpasid(bindReq(v, d0)), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    await expectRefused(attach(0, { withoutPasid: true }), Code.FAILED_PRECONDITION, "PASID_IN_USE"); // the stage 2 is there
    expect(await state()).toEqual(before);
    expect((await holdersOf(c, v.ioasid))![BIND]).toBeUndefined();
    await expectRefused(
      client.detachDomain(P(iommu.DetachDomainRequest, { domainId: v.stage2 + 1000, deviceId: d0, pasid: v.ioasid })),
      Code.FAILED_PRECONDITION,
      "DOMAIN_MISMATCH",
    );
    await client.detachDomain(P(iommu.DetachDomainRequest, { domainId: v.stage2, deviceId: d0, pasid: v.ioasid, generation: v.generation }));
    await expectRefused(
      client.detachDomain(P(iommu.DetachDomainRequest, { domainId: v.stage2, deviceId: d0, pasid: v.ioasid })),
      Code.NOT_FOUND,
      "ATTACH_HANDLE_NOT_FOUND",
    );
  });

  it("maps a paging domain and translates DMA through it; a miss is a page request on this PRI device, answered FAILURE with no handler", async () => {
    const { iommu: client } = stack;
    const [d0] = newDevices(1) as [string];
    const stage2 = await devicesWithStage2(client, d0);
    await client.map(P(iommu.MapRequest, { domainId: stage2, iova: 0x100000n, paddr: 0x4000_0000n, size: 0x2000n, access: { read: true, write: true } }));
    const translate = (address: bigint) => client.translate(P(iommu.TranslateRequest, { deviceId: d0, withoutPasid: true, address, access: { read: true } }));
    expect(await translate(0x101234n)).toMatchObject({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: 0x4000_1234n });
    const miss = await translate(0x102000n);
    expect(miss).toMatchObject({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST, groupComplete: true });
    // The handle's owner has no fault stream here: no handler, FAILURE at once.
    expect(await client.awaitPageResponse({ deviceId: d0, faultGroupId: miss.faultGroupId })).toEqual({
      code: iommu.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE,
      source: iommu.PageResponseSource.PAGE_RESPONSE_SOURCE_NO_HANDLER,
    });
    expect((await client.unmap(P(iommu.UnmapRequest, { domainId: stage2, iova: 0x100000n, size: 0x10000n }))).unmappedSize).toBe(0x2000n);
    expect((await translate(0x101234n)).outcome, "unmapped: a miss again").toBe(iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST);
    const flush = (await state()).iotlbFlushes.at(-1)!;
    expect(flush).toMatchObject({
      scope: iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_RANGE,
      cause: iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_UNMAP,
      deviceId: d0,
      address: 0x100000n,
    });
  });
});

describe("iommu: native SVA", () => {
  it("gives one mm one PASID shared by two devices, freed only when the mm is released", async () => {
    const { c, iommu: client } = stack;
    const [d0, d1] = newDevices(2) as [string, string];
    await client.registerDevice(pf(d0));
    await client.registerDevice(pf(d1));
    const mm = nextToken++;
    const a = await client.svaBind(P(iommu.SvaBindRequest, { deviceId: d0, mmToken: mm, owner: "idxd/wq0" }));
    const b = await client.svaBind(P(iommu.SvaBindRequest, { deviceId: d1, mmToken: mm, owner: "idxd/wq0" }));
    expect(a.pasidAllocated).toBe(true);
    expect(b.pasidAllocated).toBe(false);
    const pasid = a.bond!.pasid;
    expect(b.bond!.pasid).toBe(pasid);
    expect(b.bond!.domainId).toBe(a.bond!.domainId);
    expect((await c.describe({ ioasid: pasid })).info!.state).toBe(core.IoasidState.IOASID_STATE_ACTIVE);

    expect((await client.svaUnbind(P(iommu.SvaUnbindRequest, { deviceId: d0, mmToken: mm }))).remainingUsers).toBe(0);
    expect((await client.svaUnbind(P(iommu.SvaUnbindRequest, { deviceId: d1, mmToken: mm }))).remainingUsers).toBe(0);
    await expectRefused(client.svaUnbind(P(iommu.SvaUnbindRequest, { deviceId: d1, mmToken: mm })), Code.NOT_FOUND, "SVA_BOND_NOT_FOUND");
    // Still allocated after the last unbind: one PASID per mm until the mm goes away.
    expect((await c.describe({ ioasid: pasid })).info).toMatchObject({ state: core.IoasidState.IOASID_STATE_ACTIVE, refcount: 1 });
    const rebound = await client.svaBind(P(iommu.SvaBindRequest, { deviceId: d1, mmToken: mm, owner: "idxd/wq0" }));
    expect(rebound).toMatchObject({ pasidAllocated: false, bond: { pasid } });

    const released = await client.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm }));
    expect(released).toEqual({ pasid, tornDownBonds: 1 });
    expect(await holdersOf(c, pasid)).toBeUndefined();
    expect((await client.queryState(P(iommu.QueryStateRequest, { deviceIds: [d0, d1] }))).svaBonds).toEqual([]);
    expect(await client.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm }))).toEqual({ pasid: 0, tornDownBonds: 0 });
  });
});

describe("iommu: bad input", () => {
  it("refuses InjectFailure unless started with failure injection: a production IOMMU never fails on purpose", async () => {
    const before = await state();
    await expectRefused(
      stack.iommu.injectFailure({ operation: iommu.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_ATTACH, nth: 1 }),
      Code.FAILED_PRECONDITION,
      "FAULT_INJECTION_DISABLED",
    );
    // Nothing was armed: an attach right after succeeds.
    const [d0] = newDevices(1) as [string];
    const stage2 = await devicesWithStage2(stack.iommu, d0);
    expect(before.attachHandles.some((h) => h.deviceId === d0)).toBe(false);
    expect((await stack.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [d0] }))).attachHandles.map((h) => h.domainId)).toEqual([stage2]);
  });

  it("is refused with the contract's codes and changes nothing", async () => {
    const { c, iommu: client } = stack;
    const v = await vm(1);
    const [d0] = v.devices as [string];
    const from = await nextSeq(c);
    const before = await state();
    const holders = await holdersOf(c, v.ioasid);
    const refusals: [() => Promise<unknown>, number, string][] = [
      [() => client.registerDevice(P(iommu.RegisterDeviceRequest, { deviceId: "x", function: 0 })), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [() => client.registerDevice(pf(d0)), Code.ALREADY_EXISTS, "DEVICE_EXISTS"],
      [() => client.registerDevice(pf("big", (1 << 20) + 1)), Code.INVALID_ARGUMENT, "PASID_OUT_OF_RANGE"],
      [
        () => client.registerDevice(P(iommu.RegisterDeviceRequest, { deviceId: "vf", function: 2, parentDeviceId: "none" })),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
      ],
      [() => client.removeDevice({ deviceId: "none" }), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
      [() => client.createDomain(P(iommu.CreateDomainRequest, {})), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [() => client.createDomain(P(iommu.CreateDomainRequest, { type: 3, parentDomainId: 99999, guestPgtable: 1n })), Code.NOT_FOUND, "DOMAIN_NOT_FOUND"],
      [() => client.freeDomain({ domainId: v.stage2 }), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE"],
      [() => client.bindGpasid({ ...bindReq(v, d0), gpasid: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [() => client.bindGpasid({ ...bindReq(v, d0), hpasid: 0 }), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED"],
      [() => client.bindGpasid({ ...bindReq(v, d0), generation: v.generation + 1 }), Code.FAILED_PRECONDITION, "STALE_GENERATION"],
      [() => client.bindGpasid({ ...bindReq(v, "none") }), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
      [() => client.bindGpasid({ ...bindReq(v, d0), owner: "" }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [() => client.unbindGpasid({ ...unbindReq(v, d0), setId: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [
        () => client.map(P(iommu.MapRequest, { domainId: v.stage2, iova: 0x1001n, size: 0x1000n, access: { read: true } })),
        Code.INVALID_ARGUMENT,
        "ADDRESS_NOT_ALIGNED",
      ],
      [() => client.map(P(iommu.MapRequest, { domainId: v.stage2, iova: 0n, size: 0n, access: { read: true } })), Code.INVALID_ARGUMENT, "INVALID_RANGE"],
      [() => client.unmap(P(iommu.UnmapRequest, { domainId: 99999, iova: 0n, size: 0x1000n })), Code.NOT_FOUND, "DOMAIN_NOT_FOUND"],
      [() => client.translate(P(iommu.TranslateRequest, { deviceId: d0, withoutPasid: true })), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [
        () => client.translate(P(iommu.TranslateRequest, { deviceId: d0, pasid: 3, access: { read: true }, pageRequestGroup: { prgi: 512 } })),
        Code.INVALID_ARGUMENT,
        "INVALID_FIELD",
      ],
      [() => client.svaBind(P(iommu.SvaBindRequest, { deviceId: d0, mmToken: 0n, owner: "o" })), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [() => client.sendPageResponse(P(iommu.SendPageResponseRequest, { owner: "vfio/vfio-1", faultGroupId: 1n })), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      [
        () => client.sendPageResponse(P(iommu.SendPageResponseRequest, { owner: "vfio/vfio-1", faultGroupId: 987_654_321n, code: 1 })),
        Code.NOT_FOUND,
        "FAULT_GROUP_NOT_FOUND",
      ],
      [() => client.awaitPageResponse(P(iommu.AwaitPageResponseRequest, { deviceId: "none", faultGroupId: 1n })), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
      [() => client.queryState(P(iommu.QueryStateRequest, { deviceIds: ["none"] })), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
    ];
    for (const [call, code, reason] of refusals) await expectRefused(call(), code, reason);
    expect(await state()).toEqual(before);
    expect(await holdersOf(c, v.ioasid)).toEqual(holders);
    expect(await eventsOf(c, from, v.ioasid)).toEqual([]);
  });

  it("keeps one fault-handler stream per owner: a newer one ends the older with ABORTED", async () => {
    const { iommu: client } = stack;
    const controllers = [new AbortController(), new AbortController()];
    // Whichever of the two arrives second replaces the first: exactly one ends ABORTED.
    const streams = controllers.map(async (ac, i) => {
      try {
        for await (const _ of client.subscribeFaultGroups({ owner: "vfio/vfio-9" }, { signal: ac.signal, deadlineMs: 30_000 })) {
          // no fault group is raised yet
        }
        return { i, reason: "ended" };
      } catch (err) {
        return { i, reason: (err as { reason?: string }).reason ?? String(err) };
      }
    });
    const replaced = await Promise.race(streams);
    expect(replaced.reason).toBe("FAULT_HANDLER_REPLACED");
    controllers[1 - replaced.i]!.abort();
    expect((await streams[1 - replaced.i])!.reason).not.toBe("FAULT_HANDLER_REPLACED");
  });
});

describe("iommu: process", () => {
  it("lists its variables with --help and exits 2 on bad configuration before listening", () => {
    const entry = serviceEntry("iommu");
    const help = spawnSync(process.execPath, [entry, "--help"], { encoding: "utf8", timeout: 10_000 });
    expect(help.status).toBe(0);
    expect(help.stdout).toContain("IOMMU_GRPC_ADDRESS");
    expect(help.stdout).toContain("IOMMU_INSTANCE");
    const bad = spawnSync(process.execPath, [entry], { encoding: "utf8", timeout: 10_000, env: { ...process.env, IOMMU_GRPC_ADDRESS: "nowhere" } });
    expect(bad.status).toBe(2);
    expect(bad.stdout).not.toContain('"listening"');
    const badInstance = spawnSync(process.execPath, [entry], { encoding: "utf8", timeout: 10_000, env: { ...process.env, IOMMU_INSTANCE: "a b" } });
    expect(badInstance.status).toBe(2);
  });

  it("is registered with the core globally at IOMMU priority for FREE", async () => {
    const regs = (await stack.c.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "iommu");
    expect(regs).toHaveLength(1);
    expect(regs[0]).toMatchObject({
      subscriber: { name: "iommu", instance: IOMMU_BIND_HOLDER.instance },
      scope: { $case: "global", value: true },
      active: true,
    });
    expect(regs[0]!.priority).toBe(events.Priority.PRIORITY_IOMMU);
    expect(regs[0]!.events).toEqual([events.EventType.EVENT_TYPE_FREE]);
  });
});

describe("iommu: restart", () => {
  let own: IommuStack | undefined;
  let restartedProc: ServiceProcess | undefined;
  afterEach(async () => {
    await restartedProc?.stop();
    await own?.stop();
    restartedProc = undefined;
    own = undefined;
  });

  it("takes back the bind references it held, so a FREE missed while it was down still releases them", async () => {
    // A short delivery deadline: the FREE sent to the dead IOMMU is recorded missed quickly.
    own = await startIommuStack({ core: { IOASID_DELIVERY_DEADLINE: "300ms", IOASID_DELIVERY_RETRY: "200ms" } });
    const { c, iommu: client } = own;
    const setId = await createVmSet(c, 0x9001n);
    const [d0] = newDevices(1) as [string];
    const stage2 = await devicesWithStage2(client, d0);
    const { ioasid, generation } = await c.alloc(P(core.AllocRequest, { setId }));
    await client.bindGpasid(
      P(iommu.BindGpasidRequest, { setId, hpasid: ioasid, generation, gpasid: 101, deviceId: d0, parentDomainId: stage2, owner: "vfio/vfio-1" }),
    );
    const from = await nextSeq(c);

    own.proc.kill("SIGKILL");
    await own.proc.exited;
    await c.free(P(core.FreeRequest, { setId, ioasid }));
    expect((await holdersOf(c, ioasid))![BIND]).toBe(1); // nobody released it: the IOMMU is down

    restartedProc = await startIommuProcess(own.core);
    await waitFor(async () => (await holdersOf(c, ioasid)) === undefined, { timeoutMs: 15_000, message: "the IOASID reclaimed after the IOMMU came back" });
    expect(await eventsOf(c, from, ioasid)).toEqual(["FREE", "RECLAIM"]);
  });
});
