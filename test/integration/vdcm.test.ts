import { spawnSync } from "node:child_process";
import { afterEach, describe, expect, it } from "vitest";
import { eventOf, stepLabel, type HistoryRecord } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { core, events, vdcm } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { expectRefused, serviceEntry } from "../support/core-fixture.js";
import {
  bindGuestPasid,
  createVmSet,
  historyOf,
  holdersOf,
  IOMMU_HOLDER,
  KVM_HOLDER,
  restartVdcm,
  startVdcmStack,
  type VdcmClient,
  type VdcmFixture,
} from "../support/vdcm-fixture.js";

// VDCM (DESIGN §5 "VDCM"; ioasid.rst "VDCM PASID Programming") as a process against the real core
// and NATS. The test plays VFIO and the IOMMU by calling the core directly (sets, alloc, SPID
// attach, get, free) and the guest by calling VDCM's virtual registers. Descriptors' DMA goes to a
// stand-in IOMMU that only translates.

const DEV = "0000:6a:01.0";
const M1 = "11111111-1111-4111-8111-111111111111";
const M2 = "22222222-2222-4222-8222-222222222222";
const WQ0 = `${DEV}.wq0`;
const VDCM_WQ0 = `vdcm/vdcm0/${WQ0}`;

let f: VdcmFixture | undefined;
afterEach(async () => {
  await f?.stop();
  f = undefined;
});

/** DEV with dedicated wq 0, 1 and shared wq 2; M1 = [wq 0, shared wq 2] and M2 = [wq 1, shared wq 2]. */
async function registerDsa(v: VdcmClient): Promise<void> {
  await v.registerDevice(
    vdcm.RegisterDeviceRequest.fromPartial({
      deviceId: DEV,
      wqs: [
        { wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED },
        { wqId: 1, mode: vdcm.WqMode.WQ_MODE_DEDICATED },
        { wqId: 2, mode: vdcm.WqMode.WQ_MODE_SHARED },
      ],
    }),
  );
  await v.createMdev({ parentDeviceId: DEV, mdevUuid: M1, wqIds: [0, 2] });
  await v.createMdev({ parentDeviceId: DEV, mdevUuid: M2, wqIds: [1, 2] });
}

/** A started stack with DEV, M1 assigned to VM 1 and M2 assigned to VM 2 (sets created empty, as VFIO does). */
async function twoVms(): Promise<{ f: VdcmFixture; vm1: number; vm2: number }> {
  f = await startVdcmStack();
  await registerDsa(f.client);
  const vm1 = await createVmSet(f.core.client, 1001n);
  const vm2 = await createVmSet(f.core.client, 1002n);
  expect((await f.client.assignMdev({ mdevUuid: M1, setId: vm1 })).registered).toBe(true);
  expect((await f.client.assignMdev({ mdevUuid: M2, setId: vm2 })).registered).toBe(true);
  return { f, vm1, vm2 };
}

const entriesOf = async (v: VdcmClient) => (await v.queryState({ deviceIds: [DEV] })).devices[0]!.pasidEntries;

/** QueryState without its timestamp: what must not change when a call is refused. */
const hardware = async (v: VdcmClient) => {
  const { takenAt: _t, ...rest } = await v.queryState({ deviceIds: [] });
  return rest;
};

const submit = (x: Parameters<typeof vdcm.SubmitDescriptorRequest.fromPartial>[0]) =>
  vdcm.SubmitDescriptorRequest.fromPartial({ descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_NOOP }, ...x });

describe("VDCM with the real core", () => {
  it("registers per set at DEVICE priority for FREE on the first mdev, and withdraws with the last", async () => {
    const { f, vm1 } = await twoVms();
    const mine = (await f.core.client.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "vdcm");
    expect(mine.map((r) => ({ instance: r.subscriber!.instance, priority: r.priority, scope: r.scope, events: r.events }))).toEqual([
      { instance: "vdcm0", priority: events.Priority.PRIORITY_DEVICE, scope: { $case: "setId", value: vm1 }, events: [events.EventType.EVENT_TYPE_FREE] },
      expect.objectContaining({ instance: "vdcm0", priority: events.Priority.PRIORITY_DEVICE }),
    ]);
    const m3 = (await f.client.createMdev({ parentDeviceId: DEV, mdevUuid: "", wqIds: [2] })).mdev!.mdevUuid;
    expect((await f.client.assignMdev({ mdevUuid: m3, setId: vm1 })).registered).toBe(false);
    expect(await f.client.unassignMdev({ mdevUuid: M1 })).toEqual({ clearedEntries: 0, unregistered: false });
    expect(await f.client.unassignMdev({ mdevUuid: m3 })).toEqual({ clearedEntries: 0, unregistered: true });
    const left = (await f.core.client.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "vdcm");
    expect(left.map((r) => r.activeSetId)).not.toContain(vm1);
    expect((await f.client.queryState({ deviceIds: [] })).registeredSetIds).not.toContain(vm1);
  });

  it("refuses to register on a set that already has IOASIDs (SET_NOT_EMPTY) and leaves the mdev unassigned", async () => {
    f = await startVdcmStack();
    await registerDsa(f.client);
    const vm = await createVmSet(f.core.client, 1003n);
    await f.core.client.alloc(core.AllocRequest.fromPartial({ setId: vm }));
    const before = await hardware(f.client);
    await expectRefused(f.client.assignMdev({ mdevUuid: M1, setId: vm }), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await expectRefused(f.client.assignMdev({ mdevUuid: M1, setId: 999 }), Code.NOT_FOUND, "SET_NOT_FOUND");
    expect(await hardware(f.client)).toEqual(before);
    expect((await f.core.client.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "vdcm")).toEqual([]);
  });

  it("mdev_write(gpasid) takes a reference (refcount 4) and programs the HOST PASID; mdev_clear drains, clears and puts (steps 8–16)", async () => {
    const { f, vm1 } = await twoVms();
    const since = Date.now();
    const { ioasid, generation } = await bindGuestPasid(f.core.client, vm1, 101);
    const { entry } = await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    expect(entry).toMatchObject({ hpasid: ioasid, generation, gpasid: 101, setId: vm1, wqId: 0, mdevUuid: M1 });
    expect(entry!.state).toBe(vdcm.DevicePasidEntryState.DEVICE_PASID_ENTRY_STATE_PROGRAMMED);
    const { info } = await f.core.client.describe({ ioasid });
    expect(info!.refcount).toBe(4);
    const holders = (await holdersOf(f.core.client, ioasid))!;
    expect(Object.keys(holders).filter((k) => !k.startsWith("set-owner/"))).toEqual(["iommu/iommu0/bind", "kvm/vm/vmcs", VDCM_WQ0]);
    expect(holders[VDCM_WQ0]).toBe(1);
    const dev = (await f.client.queryState({ deviceIds: [DEV] })).devices[0]!;
    expect(dev.wqs[0]!.hpasid).toBe(ioasid);
    expect(dev.pasidEntries.map((e) => [e.hpasid, e.gpasid])).toEqual([[ioasid, 101]]);

    expect(await f.client.clearWqPasid({ mdevUuid: M1, virtualWq: 0 })).toEqual({ cleared: true, hpasid: ioasid, gpasid: 101, generation });
    expect((await f.core.client.describe({ ioasid })).info!.refcount).toBe(3);
    expect(await holdersOf(f.core.client, ioasid)).not.toHaveProperty(VDCM_WQ0);
    expect(await entriesOf(f.client)).toEqual([]);
    expect(await f.client.clearWqPasid({ mdevUuid: M1, virtualWq: 0 })).toEqual({ cleared: false, hpasid: 0, gpasid: 0, generation: 0 });

    let steps: string[] = [];
    await waitFor(
      async () => {
        const h = (await historyOf(f.nc, since)).filter((r) => r.ioasid === ioasid && (r.role === "vdcm" || stepLabel(r).startsWith("ioasid_")));
        steps = h.map((r) => `${r.role}:${stepLabel(r)}${r.refcount === undefined ? "" : `:${r.refcount}`}`);
        return steps.length >= 6;
      },
      { timeoutMs: 5000, message: "the write and clear in the history" },
    );
    expect(steps).toEqual(["ioasid:ioasid_get:2", "ioasid:ioasid_get:3", "ioasid:ioasid_get:4", "vdcm:vdev_write:4", "vdcm:vdev_clear", "ioasid:ioasid_put:3"]);
  });

  it("on FREE drains and clears the programmed entry and releases its reference: the IOASID is reclaimed at the last release", async () => {
    const { f, vm1 } = await twoVms();
    const since = Date.now();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101, { holders: false });
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    expect((await f.core.client.describe({ ioasid })).info!.refcount).toBe(2);
    // The guest misbehaves: VFIO frees before the device is cleared.
    const freed = await f.core.client.free(core.FreeRequest.fromPartial({ setId: vm1, ioasid }));
    expect(freed.outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
    await waitFor(async () => (await holdersOf(f.core.client, ioasid)) === undefined, { timeoutMs: 10_000, message: "the IOASID reclaimed" });
    expect(await entriesOf(f.client)).toEqual([]);
    expect((await f.client.queryState({ deviceIds: [DEV] })).devices[0]!.wqs[0]!.hpasid).toBe(0);
    // The guest's late clear finds nothing.
    expect((await f.client.clearWqPasid({ mdevUuid: M1, virtualWq: 0 })).cleared).toBe(false);
    let steps: string[] = [];
    await waitFor(
      async () => {
        steps = (await historyOf(f.nc, since)).filter((r) => r.ioasid === ioasid).map((r) => `${r.role}:${stepLabel(r)}`);
        return steps.includes("ioasid:event:RECLAIM");
      },
      { timeoutMs: 5000, message: "the reclaim in the history" },
    );
    const at = (s: string) => steps.indexOf(s);
    expect(at("ioasid:event:FREE")).toBeGreaterThanOrEqual(0);
    expect(at("vdcm:vdev_clear")).toBeGreaterThan(at("ioasid:event:FREE"));
    expect(at("ioasid:event:RECLAIM")).toBeGreaterThan(at("vdcm:vdev_clear"));
    const clear = (await historyOf(f.nc, since, "vdcm")).find((r) => r.action?.$case === "vdevClear")!;
    const free = (await historyOf(f.nc, since, "ioasid")).find((r) => eventOf(r) === "FREE" && r.ioasid === ioasid)!;
    expect(clear.seq).toBe(free.seq);
  });

  it("keeps the IOASID FREE_PENDING while others hold it: the FREE releases only VDCM's reference", async () => {
    const { f, vm1 } = await twoVms();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101);
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    await f.core.client.free(core.FreeRequest.fromPartial({ setId: vm1, ioasid }));
    await waitFor(async () => !Object.hasOwn((await holdersOf(f.core.client, ioasid)) ?? {}, VDCM_WQ0), {
      timeoutMs: 10_000,
      message: "VDCM's reference released",
    });
    const { info } = await f.core.client.describe({ ioasid });
    expect(info!.state).toBe(core.IoasidState.IOASID_STATE_FREE_PENDING);
    expect(info!.refcount).toBe(2);
    expect(await entriesOf(f.client)).toEqual([]);
    // Being freed: the guest cannot program it again.
    await expectRefused(f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 }), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    for (const holder of [IOMMU_HOLDER, KVM_HOLDER]) await f.core.client.put(core.PutRequest.fromPartial({ setId: vm1, ioasid, holder }));
    expect(await holdersOf(f.core.client, ioasid)).toBeUndefined();
  });

  it("refuses a guest PASID the guest never bound, and programs nothing", async () => {
    const { f, vm1 } = await twoVms();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101);
    const before = await hardware(f.client);
    await expectRefused(f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 102 }), Code.NOT_FOUND, "SPID_NOT_FOUND");
    expect(await hardware(f.client)).toEqual(before);
    expect((await f.core.client.describe({ ioasid })).info!.refcount).toBe(3);
    // The work queue is free for a legal write afterwards.
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
  });

  it("confines a second VM to its own mdev: it cannot program, clear or submit with the first VM's PASIDs", async () => {
    const { f, vm1, vm2 } = await twoVms();
    const { ioasid: h1 } = await bindGuestPasid(f.core.client, vm1, 101);
    await bindGuestPasid(f.core.client, vm2, 202);
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    const before = await hardware(f.client);
    const refs = await holdersOf(f.core.client, h1);
    // Guest numbering: VM 2 never bound 101 in its set.
    await expectRefused(f.client.writeWqPasid({ mdevUuid: M2, virtualWq: 0, gpasid: 101 }), Code.NOT_FOUND, "SPID_NOT_FOUND");
    // A descriptor that does not translate is the portal's -EINVAL, the lookup's reason beside it.
    const guest = await expectRefused(
      f.client.submitDescriptor(submit({ mdevUuid: M2, virtualWq: 1, pasid: 101, pasidSpace: vdcm.PasidSpace.PASID_SPACE_GUEST })),
      Code.INVALID_ARGUMENT,
      "PASID_UNTRANSLATABLE",
    );
    expect(guest.metadata).toMatchObject({ lookup: "SPID_NOT_FOUND" });
    // Host numbering: VM 1's host PASID belongs to another set.
    const host = await expectRefused(
      f.client.submitDescriptor(submit({ mdevUuid: M2, virtualWq: 1, pasid: h1, pasidSpace: vdcm.PasidSpace.PASID_SPACE_HOST })),
      Code.INVALID_ARGUMENT,
      "PASID_UNTRANSLATABLE",
    );
    expect(host.metadata).toMatchObject({ lookup: "IOASID_NOT_IN_SET" });
    // Its clear only reaches its own work queue.
    expect((await f.client.clearWqPasid({ mdevUuid: M2, virtualWq: 0 })).cleared).toBe(false);
    // Nor can it take the first VM's mdev.
    await expectRefused(f.client.assignMdev({ mdevUuid: M1, setId: vm2 }), Code.FAILED_PRECONDITION, "MDEV_BUSY");
    expect(await hardware(f.client)).toEqual(before);
    expect(await holdersOf(f.core.client, h1)).toEqual(refs);
    expect(f.iommu.requests).toEqual([]);
  });

  it("never programs a PASID for one guest while another guest's context for it is on the device (PASID_IN_USE)", async () => {
    const { f, vm1, vm2 } = await twoVms();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101, { holders: false });
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    // An operator force-releases VDCM's reference; the IOASID is freed, reclaimed and VM 2 gets it.
    await f.core.client.put(core.PutRequest.fromPartial({ setId: vm1, ioasid, holder: { role: "vdcm", instance: "vdcm0", purpose: WQ0 } }));
    await f.core.client.free(core.FreeRequest.fromPartial({ setId: vm1, ioasid }));
    const again = await bindGuestPasid(f.core.client, vm2, 555, { holders: false });
    expect(again.ioasid).toBe(ioasid);
    const before = await hardware(f.client);
    await expectRefused(f.client.writeWqPasid({ mdevUuid: M2, virtualWq: 0, gpasid: 555 }), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(await hardware(f.client)).toEqual(before);
    // The reference the translation took was given back.
    expect((await f.core.client.describe({ ioasid })).info!.refcount).toBe(1);
  });

  it("translates a shared work queue's descriptor PASID, or drops it: nothing untranslatable reaches the device", async () => {
    const { f, vm1 } = await twoVms();
    const since = Date.now();
    const { ioasid, generation } = await bindGuestPasid(f.core.client, vm1, 101);
    f.iommu.map(DEV, ioasid, 0x10000n);
    f.iommu.map(DEV, ioasid, 0x20000n);
    const memmove = { op: vdcm.DescriptorOp.DESCRIPTOR_OP_MEMMOVE, srcAddress: 0x10000n, dstAddress: 0x20000n, size: 256n };
    const ok = await f.client.submitDescriptor(
      submit({ mdevUuid: M1, virtualWq: 1, pasid: 101, pasidSpace: vdcm.PasidSpace.PASID_SPACE_GUEST, descriptor: memmove }),
    );
    expect(ok).toEqual({
      hpasid: ioasid,
      generation,
      status: vdcm.CompletionStatus.COMPLETION_STATUS_SUCCESS,
      bytesCompleted: 256n,
      faultAddress: 0n,
      faultGroupId: 0n,
    });
    // The DMA reached the IOMMU tagged with the host PASID.
    expect(f.iommu.requests.map((r) => [r.deviceId, r.pasid, r.address])).toEqual([
      [DEV, ioasid, 0x10000n],
      [DEV, ioasid, 0x20000n],
    ]);
    // ENQCMD already translated: the host PASID of the mdev's own set.
    const host = await f.client.submitDescriptor(
      submit({
        mdevUuid: M1,
        virtualWq: 1,
        pasid: ioasid,
        generation,
        pasidSpace: vdcm.PasidSpace.PASID_SPACE_HOST,
        descriptor: { ...memmove, srcAddress: 0x30000n },
      }),
    );
    expect(host).toMatchObject({ status: vdcm.CompletionStatus.COMPLETION_STATUS_DMA_FAULT, faultAddress: 0x30000n, bytesCompleted: 0n });
    // The reference held while the descriptors ran is gone.
    expect((await f.core.client.describe({ ioasid })).info!.refcount).toBe(3);
    const seen = f.iommu.requests.length;
    // Untranslatable: the portal's -EINVAL (DESIGN §5 VDCM), the lookup's reason in the metadata.
    const unknown = await expectRefused(
      f.client.submitDescriptor(submit({ mdevUuid: M1, virtualWq: 1, pasid: 999, pasidSpace: vdcm.PasidSpace.PASID_SPACE_GUEST, descriptor: memmove })),
      Code.INVALID_ARGUMENT,
      "PASID_UNTRANSLATABLE",
    );
    expect(unknown.metadata).toMatchObject({ lookup: "SPID_NOT_FOUND" });
    const stale = await expectRefused(
      f.client.submitDescriptor(
        submit({ mdevUuid: M1, virtualWq: 1, pasid: ioasid, generation: generation + 1, pasidSpace: vdcm.PasidSpace.PASID_SPACE_HOST }),
      ),
      Code.INVALID_ARGUMENT,
      "PASID_UNTRANSLATABLE",
    );
    expect(stale.metadata).toMatchObject({ lookup: "STALE_GENERATION" });
    expect(f.iommu.requests).toHaveLength(seen);
    let submits: HistoryRecord[] = [];
    await waitFor(
      async () => {
        submits = (await historyOf(f.nc, since, "vdcm")).filter((r) => r.action?.$case === "submit");
        return submits.length >= 4;
      },
      { timeoutMs: 5000, message: "four submit records" },
    );
    expect(submits.filter((r) => r.action?.$case === "submit" && r.action.value.dropped)).toHaveLength(2);
  });

  it("runs a dedicated work queue's descriptor with its programmed host PASID", async () => {
    const { f, vm1 } = await twoVms();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101);
    await expectRefused(f.client.submitDescriptor(submit({ mdevUuid: M1, virtualWq: 0 })), Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED");
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    f.iommu.map(DEV, ioasid, 0x4000n);
    const fill = { op: vdcm.DescriptorOp.DESCRIPTOR_OP_FILL, dstAddress: 0x4000n, size: 4096n };
    expect(await f.client.submitDescriptor(submit({ mdevUuid: M1, virtualWq: 0, descriptor: fill }))).toMatchObject({
      hpasid: ioasid,
      status: vdcm.CompletionStatus.COMPLETION_STATUS_SUCCESS,
      bytesCompleted: 4096n,
    });
    expect(f.iommu.requests.map((r) => r.pasid)).toEqual([ioasid]);
  });

  it("unassigning an mdev drains and clears its PASIDs and releases their references", async () => {
    const { f, vm1 } = await twoVms();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101);
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    await expectRefused(f.client.destroyMdev({ mdevUuid: M1 }), Code.FAILED_PRECONDITION, "MDEV_ASSIGNED");
    await expectRefused(f.client.removeDevice({ deviceId: DEV }), Code.FAILED_PRECONDITION, "DEVICE_IN_USE");
    expect(await f.client.unassignMdev({ mdevUuid: M1 })).toEqual({ clearedEntries: 1, unregistered: true });
    expect((await f.core.client.describe({ ioasid })).info!.refcount).toBe(3);
    expect(await entriesOf(f.client)).toEqual([]);
    await f.client.destroyMdev({ mdevUuid: M1 });
    await f.client.unassignMdev({ mdevUuid: M2 });
    await f.client.destroyMdev({ mdevUuid: M2 });
    await f.client.removeDevice({ deviceId: DEV });
    expect((await f.client.queryState({ deviceIds: [] })).devices).toEqual([]);
  });

  it("refuses bad input with the contract's codes and changes nothing", async () => {
    const { f, vm1 } = await twoVms();
    await bindGuestPasid(f.core.client, vm1, 101);
    const v = f.client;
    const before = await hardware(v);
    const dedicated = (wqId: number) => ({ wqId, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 0 });
    await expectRefused(v.registerDevice({ deviceId: "dsa1", wqs: [], maxPasidEntries: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.registerDevice({ deviceId: "dsa1", wqs: [dedicated(1), dedicated(1)], maxPasidEntries: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(
      v.registerDevice({ deviceId: "dsa1", wqs: [{ wqId: 1, mode: 0, size: 0 }], maxPasidEntries: 0 }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
    await expectRefused(v.registerDevice({ deviceId: "", wqs: [dedicated(1)], maxPasidEntries: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.registerDevice({ deviceId: DEV, wqs: [dedicated(1)], maxPasidEntries: 0 }), Code.ALREADY_EXISTS, "DEVICE_EXISTS");
    await expectRefused(v.removeDevice({ deviceId: "nope" }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await expectRefused(v.createMdev({ parentDeviceId: DEV, mdevUuid: "", wqIds: [0] }), Code.FAILED_PRECONDITION, "WQ_IN_USE");
    await expectRefused(v.createMdev({ parentDeviceId: DEV, mdevUuid: "", wqIds: [7] }), Code.NOT_FOUND, "WQ_NOT_FOUND");
    await expectRefused(v.createMdev({ parentDeviceId: "nope", mdevUuid: "", wqIds: [0] }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await expectRefused(v.createMdev({ parentDeviceId: DEV, mdevUuid: M1, wqIds: [2] }), Code.ALREADY_EXISTS, "MDEV_EXISTS");
    await expectRefused(v.createMdev({ parentDeviceId: DEV, mdevUuid: "not a uuid", wqIds: [2] }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.destroyMdev({ mdevUuid: "33333333-3333-4333-8333-333333333333" }), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await expectRefused(v.assignMdev({ mdevUuid: M1, setId: vm1 }), Code.ALREADY_EXISTS, "MDEV_ALREADY_ASSIGNED");
    await expectRefused(v.assignMdev({ mdevUuid: M1, setId: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.writeWqPasid({ mdevUuid: M1, virtualWq: 1, gpasid: 101 }), Code.FAILED_PRECONDITION, "WQ_SHARED");
    await expectRefused(v.writeWqPasid({ mdevUuid: M1, virtualWq: 5, gpasid: 101 }), Code.NOT_FOUND, "WQ_NOT_FOUND");
    await expectRefused(v.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.writeWqPasid({ mdevUuid: "", virtualWq: 0, gpasid: 101 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.clearWqPasid({ mdevUuid: M1, virtualWq: 5 }), Code.NOT_FOUND, "WQ_NOT_FOUND");
    await expectRefused(v.submitDescriptor(submit({ mdevUuid: M1, virtualWq: 1, pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(
      v.submitDescriptor(submit({ mdevUuid: M1, virtualWq: 1, pasid: 101, pasidSpace: vdcm.PasidSpace.PASID_SPACE_GUEST, descriptor: { op: 0 } })),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
    await expectRefused(v.submitDescriptor(submit({ mdevUuid: M1, virtualWq: 0, pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(v.queryState({ deviceIds: ["nope"] }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    expect(await hardware(v)).toEqual(before);
    // Unassigned mdevs have no virtual registers to write.
    const m3 = (await v.createMdev({ parentDeviceId: DEV, mdevUuid: "", wqIds: [2] })).mdev!.mdevUuid;
    await expectRefused(v.writeWqPasid({ mdevUuid: m3, virtualWq: 0, gpasid: 101 }), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
    await expectRefused(v.clearWqPasid({ mdevUuid: m3, virtualWq: 0 }), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
    await expectRefused(v.unassignMdev({ mdevUuid: m3 }), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
  });

  it("after a crash, a restarted VDCM comes back with its device tables: the entry, its reference and the registrations stay, and a clear then releases", async () => {
    const { f, vm1 } = await twoVms();
    const { ioasid } = await bindGuestPasid(f.core.client, vm1, 101);
    await f.client.writeWqPasid({ mdevUuid: M1, virtualWq: 0, gpasid: 101 });
    expect(await holdersOf(f.core.client, ioasid)).toHaveProperty([VDCM_WQ0], 1);
    const registrations = (await f.core.client.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "vdcm");
    const before = await f.client.queryState({ deviceIds: [] });
    await restartVdcm(f);
    expect(await holdersOf(f.core.client, ioasid)).toHaveProperty([VDCM_WQ0], 1);
    expect((await f.core.client.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "vdcm")).toEqual(registrations);
    const after = await f.client.queryState({ deviceIds: [] });
    expect([after.devices, after.mdevs]).toEqual([before.devices, before.mdevs]);
    expect((await f.client.clearWqPasid({ mdevUuid: M1, virtualWq: 0 })).cleared).toBe(true);
    expect(await holdersOf(f.core.client, ioasid)).not.toHaveProperty([VDCM_WQ0]);
  });
});

describe("VDCM process", () => {
  it("refuses bad configuration with every problem named and exit code 2, before listening", () => {
    const r = spawnSync(process.execPath, [serviceEntry("vdcm")], {
      encoding: "utf8",
      timeout: 10_000,
      env: { ...process.env, VDCM_GRPC_ADDRESS: "nope", IOMMU_ADDRESS: "x:99999" },
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("VDCM_GRPC_ADDRESS");
    expect(r.stderr).toContain("IOMMU_ADDRESS");
    expect(r.stdout).not.toContain('"msg":"listening"');
    const bad = spawnSync(process.execPath, [serviceEntry("vdcm")], { encoding: "utf8", timeout: 10_000, env: { ...process.env, VDCM_INSTANCE: "a b" } });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain("VDCM_INSTANCE");
  });

  it("documents its configuration with --help", () => {
    const r = spawnSync(process.execPath, [serviceEntry("vdcm"), "--help"], { encoding: "utf8", timeout: 10_000 });
    expect(r.status).toBe(0);
    for (const name of ["VDCM_GRPC_ADDRESS", "VDCM_INSTANCE", "IOMMU_ADDRESS", "IOASID_CORE_ADDRESS", "NATS_URL", "IOASID_BUS_PREFIX", "LOG_LEVEL"]) {
      expect(r.stdout).toContain(name);
    }
  });
});
