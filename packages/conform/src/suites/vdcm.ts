import { randomUUID } from "node:crypto";
import { Code } from "@ioasid/errors";
import { createClient, type PromiseClient } from "@ioasid/grpc-kit";
import { bus, core, events, history as historyProto, vdcm } from "@ioasid/proto";
import { ClauseFailure, eventually, expectEqual, expectMetadata, expectRefused, expectRefusedUnchanged, expectThat, show, type Clause } from "../clause.js";
import type { Harness, Tap, TappedDelivery } from "../harness.js";
import type { RoleSuite } from "../suite.js";
import { alloc, allocBound, createMmSet, deliveryOf, eventOf, free, referencesOf, stateOf } from "./core-steps.js";

type VdcmClient = PromiseClient<typeof vdcm.VdcmServiceService>;

/** What the VDCM clauses run with. */
export interface VdcmCtx {
  readonly h: Harness;
  readonly vdcm: VdcmClient;
  /** The next guest PASID no clause has used: each clause binds its own, so no break reaches another clause. */
  gpasid: number;
}

const { EventType, Priority } = events;
const { WQ_MODE_DEDICATED: DEDICATED, WQ_MODE_SHARED: SHARED } = vdcm.WqMode;
const { PASID_SPACE_GUEST: GUEST, PASID_SPACE_HOST: HOST } = vdcm.PasidSpace;
const PROGRAMMED = vdcm.DevicePasidEntryState.DEVICE_PASID_ENTRY_STATE_PROGRAMMED;
const NOOP = { op: vdcm.DescriptorOp.DESCRIPTOR_OP_NOOP };
/** A guest PASID no set binds in a run (the clauses' own start at 100). */
const NEVER_BOUND = 1_000_000;
/** A host PASID no set holds in a run (the core allocates from the bottom of the namespace). */
const NEVER_ALLOCATED = 1_000_001;

/**
 * The kit's own reference, taken before a FREE as the IOMMU's and KVM's would be: the FREE is then
 * emitted and the IOASID stays unreclaimed whatever the target holds, so each FREE clause checks
 * its own rule only. Released at the end of the clause.
 */
const KIT_HOLDER = { role: "conform", instance: "kit", purpose: "hold" } as const;

/** A physical device: dedicated work queues 0 and 1, shared work queue 2. */
async function newDevice(c: VdcmCtx): Promise<string> {
  const deviceId = c.h.uniqueName("dsa");
  await c.vdcm.registerDevice(
    vdcm.RegisterDeviceRequest.fromPartial({
      deviceId,
      wqs: [
        { wqId: 0, mode: DEDICATED },
        { wqId: 1, mode: DEDICATED },
        { wqId: 2, mode: SHARED },
      ],
    }),
  );
  return deviceId;
}

/** A VM: its IOASID set (as VFIO creates it), and an mdev of `device` composed from `wqIds` and assigned to it. */
interface Vm {
  readonly setId: number;
  readonly device: string;
  readonly mdev: string;
}

async function newMdev(c: VdcmCtx, device: string, wqIds: readonly number[]): Promise<string> {
  return (await c.vdcm.createMdev({ parentDeviceId: device, mdevUuid: "", wqIds: [...wqIds] })).mdev!.mdevUuid;
}

/** A VM with an mdev of `device` (virtual work queue i = physical `wqIds[i]`; default: dedicated 0, shared 2). */
async function newVm(c: VdcmCtx, device: string, wqIds: readonly number[] = [0, 2]): Promise<Vm> {
  const setId = await createMmSet(c.h, c.h.uniqueToken());
  const mdev = await newMdev(c, device, wqIds);
  await c.vdcm.assignMdev({ mdevUuid: mdev, setId });
  return { setId, device, mdev };
}

/** A fresh guest PASID for this clause. */
function gpasid(c: VdcmCtx): number {
  return c.gpasid++;
}

/** The subscriber instance VDCM registered on `setId` with (DESIGN §5: per set, DEVICE priority). */
async function vdcmInstanceOn(h: Harness, setId: number): Promise<string> {
  const regs = (await h.core.listRegistrations({})).registrations;
  const r = regs.find((x) => x.subscriber?.name === "vdcm" && x.scope?.$case === "setId" && x.scope.value === setId);
  if (r === undefined)
    throw new ClauseFailure(
      `a registration of subscriber "vdcm" on set ${setId}`,
      show(regs.map((x) => `${x.subscriber?.name}/${x.subscriber?.instance} ${x.scope?.$case}=${String(x.scope?.value)}`)),
    );
  return r.subscriber!.instance;
}

/** VDCM's registrations on `setId` as the core has them. */
async function vdcmRegistrationsOn(h: Harness, setId: number): Promise<Array<{ priority: events.Priority; events: events.EventType[] }>> {
  return (await h.core.listRegistrations({})).registrations
    .filter((r) => r.subscriber?.name === "vdcm" && r.scope?.$case === "setId" && r.scope.value === setId)
    .map((r) => ({ priority: r.priority, events: r.events }));
}

/** One device's PASID table as `wq<n>:<gpasid>-><hpasid>` (its set and state checked where it matters). */
async function entriesOf(c: VdcmCtx, device: string): Promise<string[]> {
  const d = (await c.vdcm.queryState({ deviceIds: [device] })).devices[0];
  return (d?.pasidEntries ?? []).map((e) => `wq${e.wqId}:${e.gpasid}->${e.hpasid}`);
}

/**
 * What a refused call must not change: every device and mdev VDCM has (ids, assignments), the sets
 * it is registered on, and the named devices whole (work queues, PASID tables). Other devices'
 * tables are left out: what a broken variant still does on an earlier case's device (a deferred
 * clear) must not fail this case.
 */
async function view(c: VdcmCtx, devices: readonly string[]): Promise<unknown> {
  const all = await c.vdcm.queryState({ deviceIds: [] });
  return {
    devices: all.devices.map((d) => d.deviceId),
    mdevs: all.mdevs.map((m) => `${m.mdevUuid}@${m.parentDeviceId}[${m.wqIds.join(",")}] set ${m.setId}`),
    registeredSetIds: all.registeredSetIds,
    detail: all.devices.filter((d) => devices.includes(d.deviceId)),
  };
}

/** VDCM's references in a set, as `ioasid/purpose×count`. */
async function vdcmReferencesIn(h: Harness, setId: number): Promise<string[]> {
  const list = (await h.core.listIoasids({ setId })).ioasids;
  return list.flatMap((i) => i.holders.filter((x) => x.holder!.role === "vdcm").map((x) => `${i.ioasid}/${x.holder!.purpose}×${x.count}`));
}

/** What a refused call must not change, with VDCM's references in the sets involved. */
function unchanged(c: VdcmCtx, devices: readonly string[], sets: readonly number[]): () => Promise<unknown> {
  return async () => ({ vdcm: await view(c, devices), references: await Promise.all(sets.map((s) => vdcmReferencesIn(c.h, s))) });
}

/** A guest PASID bound in the VM's set (alloc + SPID attached: BIND) and written to virtual work queue `vwq` (mdev_write). */
async function programmed(c: VdcmCtx, vm: Vm, vwq: number, gp: number): Promise<{ ioasid: number; generation: number; entry: vdcm.DevicePasidEntry }> {
  const a = await allocBound(c.h, vm.setId, gp);
  const { entry } = await c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: vwq, gpasid: gp });
  return { ...a, entry: entry! };
}

async function kitHold(h: Harness, setId: number, ioasid: number, generation: number): Promise<void> {
  await h.core.get(core.GetRequest.fromPartial({ setId, ioasid, generation, holder: KIT_HOLDER }));
}

async function kitRelease(h: Harness, setId: number, ioasid: number, generation: number): Promise<void> {
  await h.core.put(core.PutRequest.fromPartial({ setId, ioasid, generation, holder: KIT_HOLDER }));
}

async function withTap<T>(c: VdcmCtx, instance: string, body: (tap: Tap) => Promise<T>): Promise<T> {
  const tap = c.h.tap("vdcm", instance);
  try {
    return await body(tap);
  } finally {
    tap.close();
  }
}

/** Frees `a` with the kit holding a reference, and resolves with VDCM's acknowledgement of the FREE and what `atAck` saw then. */
async function freeSeenAtAck<T>(
  c: VdcmCtx,
  vm: Vm,
  a: { ioasid: number; generation: number },
  atAck: () => Promise<T>,
): Promise<{ ack: bus.AckBatch; delivery: TappedDelivery; seenAtAck: T }> {
  const instance = await vdcmInstanceOn(c.h, vm.setId);
  await kitHold(c.h, vm.setId, a.ioasid, a.generation);
  return withTap(c, instance, async (tap) => {
    const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid), atAck);
    await free(c.h, vm.setId, a.ioasid, a.generation);
    const { delivery, seenAtAck } = await acked;
    return { ack: delivery.ack!, delivery, seenAtAck };
  });
}

/** VDCM's own acknowledgement of the FREE of `ioasid` in a batch it answered. */
function ackOfFree(batch: bus.DeliveryBatch, ack: bus.AckBatch, ioasid: number): bus.Ack | undefined {
  const d = batch.deliveries.find((x) => x.event?.type === EventType.EVENT_TYPE_FREE && x.event.ioasid === ioasid);
  return ack.acks.find((x) => d !== undefined && x.registrationId === d.registrationId && x.seq === d.event!.seq);
}

const clauses: Clause<VdcmCtx>[] = [
  {
    id: "vdcm.rpc.register-device",
    statement: "RegisterDevice makes the device available with its work queues (defaults: size 32, table 1024) and an empty PASID table",
    source: "vdcm.proto RegisterDevice, QueryState",
    async run(c) {
      const deviceId = c.h.uniqueName("dsa");
      const res = await c.vdcm.registerDevice(
        vdcm.RegisterDeviceRequest.fromPartial({
          deviceId,
          wqs: [
            { wqId: 5, mode: SHARED, size: 64 },
            { wqId: 1, mode: DEDICATED },
          ],
        }),
      );
      const want = {
        deviceId,
        wqs: [
          { wqId: 1, mode: DEDICATED, size: 32, mdevUuids: [], hpasid: 0 },
          { wqId: 5, mode: SHARED, size: 64, mdevUuids: [], hpasid: 0 },
        ],
        maxPasidEntries: 1024,
        pasidEntries: [],
      };
      expectEqual(res.device, want, "RegisterDevice's answer");
      expectEqual((await c.vdcm.queryState({ deviceIds: [deviceId] })).devices, [want], "QueryState of the new device");
    },
  },
  {
    id: "vdcm.rpc.register-device.refused",
    statement: "RegisterDevice of a registered id is ALREADY_EXISTS DEVICE_EXISTS; malformed specs are INVALID_ARGUMENT INVALID_FIELD; none changes anything",
    source: "vdcm.proto RegisterDevice",
    async run(c) {
      const device = await newDevice(c);
      const fresh = c.h.uniqueName("dsa");
      const d = (wqId: number) => ({ wqId, mode: DEDICATED, size: 0 });
      const cases: Array<[string, vdcm.RegisterDeviceRequest, Code, string]> = [
        ["a registered id", { deviceId: device, wqs: [d(0)], maxPasidEntries: 0 }, Code.ALREADY_EXISTS, "DEVICE_EXISTS"],
        ["no work queue", { deviceId: fresh, wqs: [], maxPasidEntries: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["a work-queue id twice", { deviceId: fresh, wqs: [d(1), d(1)], maxPasidEntries: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["a mode UNSPECIFIED", { deviceId: fresh, wqs: [{ wqId: 1, mode: 0, size: 0 }], maxPasidEntries: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["a size above 65535", { deviceId: fresh, wqs: [{ ...d(1), size: 65536 }], maxPasidEntries: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["a table above 2^20", { deviceId: fresh, wqs: [d(1)], maxPasidEntries: 2 ** 20 + 1 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["no device id", { deviceId: "", wqs: [d(1)], maxPasidEntries: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["a device id with a space", { deviceId: "dsa 1", wqs: [d(1)], maxPasidEntries: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [what, req, code, reason] of cases) {
        await expectRefusedUnchanged(unchanged(c, [device], []), () => c.vdcm.registerDevice(req), code, reason, `RegisterDevice with ${what}`);
      }
    },
  },
  {
    id: "vdcm.rpc.remove-device",
    statement:
      "RemoveDevice withdraws a device no mdev uses; an unknown device is NOT_FOUND DEVICE_NOT_FOUND, one with mdevs FAILED_PRECONDITION DEVICE_IN_USE, changing nothing",
    source: "vdcm.proto RemoveDevice",
    async run(c) {
      const used = await newDevice(c);
      await newMdev(c, used, [2]);
      await expectRefusedUnchanged(unchanged(c, [used], []), () => c.vdcm.removeDevice({ deviceId: used }), Code.FAILED_PRECONDITION, "DEVICE_IN_USE");
      await expectRefusedUnchanged(
        unchanged(c, [used], []),
        () => c.vdcm.removeDevice({ deviceId: c.h.uniqueName("none") }),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
      );
      const gone = await newDevice(c);
      await c.vdcm.removeDevice({ deviceId: gone });
      const ids = (await c.vdcm.queryState({ deviceIds: [] })).devices.map((d) => d.deviceId);
      expectThat(!ids.includes(gone) && ids.includes(used), `${gone} gone and ${used} still there`, ids, "QueryState's devices after RemoveDevice");
    },
  },
  {
    id: "vdcm.rpc.create-mdev",
    statement:
      "CreateMdev composes an unassigned mdev from work queues of one device, in virtual order; UUIDs in lower case; a shared work queue backs several mdevs",
    source: "vdcm.proto CreateMdev",
    async run(c) {
      const device = await newDevice(c);
      const upper = randomUUID().toUpperCase();
      const m1 = (await c.vdcm.createMdev({ parentDeviceId: device, mdevUuid: upper, wqIds: [2, 0] })).mdev!;
      expectEqual(
        { uuid: m1.mdevUuid, parent: m1.parentDeviceId, wqIds: m1.wqIds, setId: m1.setId, assigned: m1.assignedAt },
        { uuid: upper.toLowerCase(), parent: device, wqIds: [2, 0], setId: 0, assigned: undefined },
        "the mdev CreateMdev answered",
      );
      const m2 = (await c.vdcm.createMdev({ parentDeviceId: device, mdevUuid: "", wqIds: [1, 2] })).mdev!;
      expectThat(m2.mdevUuid !== "" && m2.mdevUuid !== m1.mdevUuid, "a generated UUID of its own", m2.mdevUuid, "the mdev created without a UUID");
      const st = await c.vdcm.queryState({ deviceIds: [device] });
      expectEqual(
        st.devices[0]!.wqs.map((w) => ({ wq: w.wqId, mdevs: [...w.mdevUuids].sort() })),
        [
          { wq: 0, mdevs: [m1.mdevUuid] },
          { wq: 1, mdevs: [m2.mdevUuid] },
          { wq: 2, mdevs: [m1.mdevUuid, m2.mdevUuid].sort() },
        ],
        "the work queues' mdevs",
      );
      expectEqual(
        st.mdevs.map((m) => m.mdevUuid),
        [m1.mdevUuid, m2.mdevUuid].sort(),
        "QueryState's mdevs of the device (ascending)",
      );
    },
  },
  {
    id: "vdcm.rpc.create-mdev.refused",
    statement: "CreateMdev is refused as vdcm.proto says (DEVICE_NOT_FOUND, WQ_NOT_FOUND, MDEV_EXISTS, WQ_IN_USE, INVALID_FIELD) and changes nothing",
    source: "vdcm.proto CreateMdev",
    async run(c) {
      const device = await newDevice(c);
      const taken = randomUUID();
      await c.vdcm.createMdev({ parentDeviceId: device, mdevUuid: taken, wqIds: [0, 2] });
      const cases: Array<[string, vdcm.CreateMdevRequest, Code, string]> = [
        ["an unknown device", { parentDeviceId: c.h.uniqueName("none"), mdevUuid: "", wqIds: [0] }, Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
        ["an unknown work queue", { parentDeviceId: device, mdevUuid: "", wqIds: [7] }, Code.NOT_FOUND, "WQ_NOT_FOUND"],
        ["a UUID taken (in another case)", { parentDeviceId: device, mdevUuid: taken.toUpperCase(), wqIds: [2] }, Code.ALREADY_EXISTS, "MDEV_EXISTS"],
        ["a dedicated work queue that backs another mdev", { parentDeviceId: device, mdevUuid: "", wqIds: [0] }, Code.FAILED_PRECONDITION, "WQ_IN_USE"],
        ["no work queue", { parentDeviceId: device, mdevUuid: "", wqIds: [] }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["a work queue twice", { parentDeviceId: device, mdevUuid: "", wqIds: [2, 2] }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["an id that is neither a UUID nor a name", { parentDeviceId: device, mdevUuid: "not a uuid!", wqIds: [2] }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [what, req, code, reason] of cases) {
        await expectRefusedUnchanged(unchanged(c, [device], []), () => c.vdcm.createMdev(req), code, reason, `CreateMdev with ${what}`);
      }
    },
  },
  {
    id: "vdcm.rpc.destroy-mdev",
    statement:
      "DestroyMdev removes an unassigned mdev and frees its work queues; an unknown one is NOT_FOUND MDEV_NOT_FOUND, an assigned one FAILED_PRECONDITION MDEV_ASSIGNED",
    source: "vdcm.proto DestroyMdev",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [1]);
      await expectRefusedUnchanged(
        unchanged(c, [device], [vm.setId]),
        () => c.vdcm.destroyMdev({ mdevUuid: vm.mdev }),
        Code.FAILED_PRECONDITION,
        "MDEV_ASSIGNED",
      );
      await expectRefusedUnchanged(unchanged(c, [device], []), () => c.vdcm.destroyMdev({ mdevUuid: randomUUID() }), Code.NOT_FOUND, "MDEV_NOT_FOUND");
      const m = await newMdev(c, device, [0]);
      await c.vdcm.destroyMdev({ mdevUuid: m });
      const st = await c.vdcm.queryState({ deviceIds: [device] });
      expectEqual(
        { mdevs: st.mdevs.map((x) => x.mdevUuid), wq0: st.devices[0]!.wqs[0]!.mdevUuids },
        { mdevs: [vm.mdev], wq0: [] },
        "the device's mdevs after DestroyMdev",
      );
      // Its dedicated work queue backs a new mdev.
      await newMdev(c, device, [0]);
    },
  },
  {
    id: "vdcm.rpc.assign-mdev",
    statement: "AssignMdev gives the mdev to the set; the set's first mdev registers VDCM on it (set scope, DEVICE priority, FREE only), a second does not",
    source: "DESIGN §5 VDCM (FREE at DEVICE priority, per set); vdcm.proto AssignMdev",
    async run(c) {
      const device = await newDevice(c);
      const setId = await createMmSet(c.h, c.h.uniqueToken());
      const m1 = await newMdev(c, device, [0, 2]);
      const m2 = await newMdev(c, device, [1]);
      const first = await c.vdcm.assignMdev({ mdevUuid: m1, setId });
      expectEqual({ registered: first.registered, setId: first.mdev?.setId }, { registered: true, setId }, "the set's first AssignMdev");
      expectThat(first.mdev?.assignedAt !== undefined, "assigned_at set", first.mdev, "the assigned mdev");
      const second = await c.vdcm.assignMdev({ mdevUuid: m2, setId });
      expectEqual({ registered: second.registered, setId: second.mdev?.setId }, { registered: false, setId }, "the set's second AssignMdev");
      expectEqual(
        await vdcmRegistrationsOn(c.h, setId),
        [{ priority: Priority.PRIORITY_DEVICE, events: [EventType.EVENT_TYPE_FREE] }],
        "VDCM's registrations on the set at the core",
      );
      const st = await c.vdcm.queryState({ deviceIds: [device] });
      expectThat(st.registeredSetIds.includes(setId), `registered_set_ids to include ${setId}`, st.registeredSetIds, "QueryState");
    },
  },
  {
    id: "vdcm.rpc.assign-mdev.refused",
    statement:
      "AssignMdev is refused as vdcm.proto says (MDEV_NOT_FOUND, SET_NOT_FOUND, MDEV_ALREADY_ASSIGNED, MDEV_BUSY, SET_NOT_EMPTY, INVALID_FIELD) and changes nothing, at VDCM or the core",
    source: "DESIGN §3 (no replay: registering on a set with IOASIDs is refused); vdcm.proto AssignMdev",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0]);
      const other = await createMmSet(c.h, c.h.uniqueToken());
      const busy = await createMmSet(c.h, c.h.uniqueToken());
      await alloc(c.h, busy);
      const free_ = await newMdev(c, device, [1]);
      const state = async () => ({ vdcm: await view(c, [device]), regs: (await c.h.core.listRegistrations({})).registrations.length });
      const cases: Array<[string, vdcm.AssignMdevRequest, Code, string]> = [
        ["an unknown mdev", { mdevUuid: randomUUID(), setId: vm.setId }, Code.NOT_FOUND, "MDEV_NOT_FOUND"],
        ["a set that does not exist", { mdevUuid: free_, setId: 0x7fff_fff0 }, Code.NOT_FOUND, "SET_NOT_FOUND"],
        ["the set it is assigned to", { mdevUuid: vm.mdev, setId: vm.setId }, Code.ALREADY_EXISTS, "MDEV_ALREADY_ASSIGNED"],
        ["another set than the one it is assigned to", { mdevUuid: vm.mdev, setId: other }, Code.FAILED_PRECONDITION, "MDEV_BUSY"],
        ["a set that already has IOASIDs", { mdevUuid: free_, setId: busy }, Code.FAILED_PRECONDITION, "SET_NOT_EMPTY"],
        ["set_id 0", { mdevUuid: free_, setId: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [what, req, code, reason] of cases) {
        await expectRefusedUnchanged(state, () => c.vdcm.assignMdev(req), code, reason, `AssignMdev of ${what}`);
      }
    },
  },
  {
    id: "vdcm.rpc.unassign-mdev",
    statement:
      "UnassignMdev drains and clears every PASID the mdev programmed, releases their references, and the set's last mdev withdraws VDCM's registration",
    source: "vdcm.proto UnassignMdev",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 2]);
      const m2 = await newMdev(c, device, [1]);
      await c.vdcm.assignMdev({ mdevUuid: m2, setId: vm.setId });
      const a = await programmed(c, vm, 0, gpasid(c));
      expectEqual(await c.vdcm.unassignMdev({ mdevUuid: m2 }), { clearedEntries: 0, unregistered: false }, "UnassignMdev of the set's first of two mdevs");
      expectEqual(await c.vdcm.unassignMdev({ mdevUuid: vm.mdev }), { clearedEntries: 1, unregistered: true }, "UnassignMdev of the set's last mdev");
      expectEqual(await entriesOf(c, device), [], "the device's PASID table after UnassignMdev");
      expectEqual(await referencesOf(c.h, a.ioasid, "vdcm"), 0, "VDCM's references after UnassignMdev");
      expectEqual(await vdcmRegistrationsOn(c.h, vm.setId), [], "VDCM's registrations on the set after its last mdev went");
      const st = await c.vdcm.queryState({ deviceIds: [device] });
      expectEqual(
        { sets: st.mdevs.map((m) => m.setId), registered: st.registeredSetIds.includes(vm.setId) },
        { sets: [0, 0], registered: false },
        "QueryState after UnassignMdev",
      );
    },
  },
  {
    id: "vdcm.rpc.unassign-mdev.refused",
    statement:
      "UnassignMdev of an unknown mdev is NOT_FOUND MDEV_NOT_FOUND, of an unassigned one FAILED_PRECONDITION MDEV_NOT_ASSIGNED; neither changes anything",
    source: "vdcm.proto UnassignMdev",
    async run(c) {
      const device = await newDevice(c);
      const m = await newMdev(c, device, [0]);
      await expectRefusedUnchanged(unchanged(c, [device], []), () => c.vdcm.unassignMdev({ mdevUuid: randomUUID() }), Code.NOT_FOUND, "MDEV_NOT_FOUND");
      await expectRefusedUnchanged(unchanged(c, [device], []), () => c.vdcm.unassignMdev({ mdevUuid: m }), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
    },
  },
  {
    id: "vdcm.rpc.write-wq-pasid",
    statement:
      "WriteWqPasid translates the guest PASID in the mdev's set with find-by-SPID, taking one reference (vdcm/<instance>/<device>.wq<n>), and programs the HOST PASID",
    source: "DESIGN §5 VDCM (translate with find-by-SPID taking a reference, program the host PASID); vdcm.proto WriteWqPasid",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [2, 1]);
      const gp = gpasid(c);
      const a = await allocBound(c.h, vm.setId, gp);
      const { entry } = await c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: 1, gpasid: gp });
      expectEqual(
        { ...entry!, programmedAt: undefined },
        { hpasid: a.ioasid, generation: a.generation, gpasid: gp, setId: vm.setId, wqId: 1, mdevUuid: vm.mdev, state: PROGRAMMED, programmedAt: undefined },
        "WriteWqPasid's entry",
      );
      const instance = await vdcmInstanceOn(c.h, vm.setId);
      expectEqual(await vdcmReferencesIn(c.h, vm.setId), [`${a.ioasid}/${device}.wq1×1`], "VDCM's references in the set");
      const info = (await c.h.core.describe({ ioasid: a.ioasid })).info!;
      expectThat(
        info.holders.some((x) => x.holder!.role === "vdcm" && x.holder!.instance === instance && x.holder!.purpose === `${device}.wq1`),
        `a reference held by vdcm/${instance}/${device}.wq1`,
        info.holders.map((x) => `${x.holder!.role}/${x.holder!.instance}/${x.holder!.purpose}`),
        "the IOASID's holders",
      );
      const dev = (await c.vdcm.queryState({ deviceIds: [device] })).devices[0]!;
      expectEqual(
        { wq1: dev.wqs.find((w) => w.wqId === 1)?.hpasid, entries: dev.pasidEntries.map((e) => `wq${e.wqId}:${e.gpasid}->${e.hpasid} set ${e.setId}`) },
        { wq1: a.ioasid, entries: [`wq1:${gp}->${a.ioasid} set ${vm.setId}`] },
        "the device after WriteWqPasid",
      );
    },
  },
  {
    id: "vdcm.rpc.write-wq-pasid.refused",
    statement:
      "WriteWqPasid is refused as vdcm.proto says (SPID_NOT_FOUND, WQ_SHARED, WQ_NOT_FOUND, WQ_PASID_PROGRAMMED, MDEV_NOT_FOUND, MDEV_NOT_ASSIGNED, INVALID_FIELD), programming nothing and keeping no reference",
    source: "DESIGN §5 VDCM; vdcm.proto WriteWqPasid",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 2]);
      const gp = gpasid(c);
      await allocBound(c.h, vm.setId, gp);
      const spare = await newMdev(c, device, [1]);
      const cases: Array<[string, vdcm.WriteWqPasidRequest, Code, string]> = [
        ["a guest PASID the guest never bound", { mdevUuid: vm.mdev, virtualWq: 0, gpasid: NEVER_BOUND }, Code.NOT_FOUND, "SPID_NOT_FOUND"],
        ["a shared work queue", { mdevUuid: vm.mdev, virtualWq: 1, gpasid: gp }, Code.FAILED_PRECONDITION, "WQ_SHARED"],
        ["a virtual work queue the mdev does not have", { mdevUuid: vm.mdev, virtualWq: 5, gpasid: gp }, Code.NOT_FOUND, "WQ_NOT_FOUND"],
        ["an unknown mdev", { mdevUuid: randomUUID(), virtualWq: 0, gpasid: gp }, Code.NOT_FOUND, "MDEV_NOT_FOUND"],
        ["an unassigned mdev", { mdevUuid: spare, virtualWq: 0, gpasid: gp }, Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED"],
        ["guest PASID 0", { mdevUuid: vm.mdev, virtualWq: 0, gpasid: 0 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["guest PASID 2^20", { mdevUuid: vm.mdev, virtualWq: 0, gpasid: 2 ** 20 }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [what, req, code, reason] of cases) {
        await expectRefusedUnchanged(unchanged(c, [device], [vm.setId]), () => c.vdcm.writeWqPasid(req), code, reason, `WriteWqPasid of ${what}`);
      }
      await c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: 0, gpasid: gp });
      await expectRefusedUnchanged(
        unchanged(c, [device], [vm.setId]),
        () => c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: 0, gpasid: gp }),
        Code.FAILED_PRECONDITION,
        "WQ_PASID_PROGRAMMED",
        "WriteWqPasid to a work queue already programmed",
      );
    },
  },
  {
    id: "vdcm.rpc.write-wq-pasid.refused-free-pending",
    statement: "WriteWqPasid of a guest PASID whose IOASID is being freed is NOT_FOUND IOASID_FREE_PENDING, programming nothing and keeping no reference (S2)",
    source: "DESIGN §3 (no reference in FREE_PENDING), §7 S2; vdcm.proto WriteWqPasid",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      const gp = gpasid(c);
      const a = await allocBound(c.h, vm.setId, gp);
      await kitHold(c.h, vm.setId, a.ioasid, a.generation);
      await free(c.h, vm.setId, a.ioasid, a.generation);
      await expectRefusedUnchanged(
        unchanged(c, [device], [vm.setId]),
        () => c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: 0, gpasid: gp }),
        Code.NOT_FOUND,
        "IOASID_FREE_PENDING",
      );
      await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
      expectEqual(await stateOf(c.h, a.ioasid), undefined, "the IOASID once the kit released its reference (nothing else holds it)");
    },
  },
  {
    id: "vdcm.rpc.write-wq-pasid.refused-pasid-in-use",
    statement:
      "WriteWqPasid is FAILED_PRECONDITION PASID_IN_USE while another guest's entry for the host PASID is still on the device; the translation's reference is given back",
    source: "DESIGN §5 VDCM (never programmed for one guest while another guest's context for it exists); vdcm.proto WriteWqPasid",
    async run(c) {
      const device = await newDevice(c);
      const x = await newVm(c, device, [0]);
      const y = await newVm(c, device, [1]);
      const a = await programmed(c, x, 0, gpasid(c));
      // An operator force-releases what VDCM holds (its entry stays on the device), the guest frees
      // the IOASID (reclaimed at once), and the other VM is given the same host PASID.
      for (const { holder, count } of (await c.h.core.describe({ ioasid: a.ioasid })).info!.holders.filter((h) => h.holder!.role === "vdcm")) {
        for (let i = 0; i < count; i++) await c.h.core.put(core.PutRequest.fromPartial({ setId: x.setId, ioasid: a.ioasid, generation: a.generation, holder }));
      }
      await free(c.h, x.setId, a.ioasid, a.generation);
      const again = (await c.h.core.alloc(core.AllocRequest.fromPartial({ setId: y.setId, min: a.ioasid, max: a.ioasid }))).ioasid;
      const gy = gpasid(c);
      await c.h.core.attachSpid(core.AttachSpidRequest.fromPartial({ setId: y.setId, ioasid: again, spid: gy }));
      await expectRefusedUnchanged(
        unchanged(c, [device], [x.setId, y.setId]),
        () => c.vdcm.writeWqPasid({ mdevUuid: y.mdev, virtualWq: 0, gpasid: gy }),
        Code.FAILED_PRECONDITION,
        "PASID_IN_USE",
      );
      // The stale entry goes with the guest's own clear.
      await c.vdcm.clearWqPasid({ mdevUuid: x.mdev, virtualWq: 0 });
    },
  },
  {
    id: "vdcm.rpc.clear-wq-pasid",
    statement: "ClearWqPasid drains and clears the entry and releases its reference; a clear that finds nothing is cleared=false and changes nothing",
    source: "DESIGN §5 VDCM (clearing drains by host PASID, clears, puts); vdcm.proto ClearWqPasid",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      const gp = gpasid(c);
      const a = await programmed(c, vm, 0, gp);
      const res = await c.vdcm.clearWqPasid({ mdevUuid: vm.mdev, virtualWq: 0 });
      expectEqual(res, { cleared: true, hpasid: a.ioasid, gpasid: gp, generation: a.generation }, "ClearWqPasid's answer");
      expectEqual(await entriesOf(c, device), [], "the device's PASID table after the clear");
      expectEqual((await c.vdcm.queryState({ deviceIds: [device] })).devices[0]!.wqs[0]!.hpasid, 0, "the work queue's PASID after the clear");
      expectEqual(await referencesOf(c.h, a.ioasid, "vdcm"), 0, "VDCM's references after the clear");
      const before = await unchanged(c, [device], [vm.setId])();
      expectEqual(await c.vdcm.clearWqPasid({ mdevUuid: vm.mdev, virtualWq: 0 }), { cleared: false, hpasid: 0, gpasid: 0, generation: 0 }, "a second clear");
      expectEqual(await unchanged(c, [device], [vm.setId])(), before, "VDCM after a clear that found nothing");
    },
  },
  {
    id: "vdcm.rpc.clear-wq-pasid.refused",
    statement:
      "ClearWqPasid on an unknown mdev or work queue is NOT_FOUND (MDEV_NOT_FOUND, WQ_NOT_FOUND), on an unassigned mdev FAILED_PRECONDITION MDEV_NOT_ASSIGNED; none changes anything",
    source: "vdcm.proto ClearWqPasid",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      await programmed(c, vm, 0, gpasid(c));
      const spare = await newMdev(c, device, [1]);
      const cases: Array<[string, vdcm.ClearWqPasidRequest, Code, string]> = [
        ["an unknown mdev", { mdevUuid: randomUUID(), virtualWq: 0 }, Code.NOT_FOUND, "MDEV_NOT_FOUND"],
        ["a virtual work queue the mdev does not have", { mdevUuid: vm.mdev, virtualWq: 5 }, Code.NOT_FOUND, "WQ_NOT_FOUND"],
        ["an unassigned mdev", { mdevUuid: spare, virtualWq: 0 }, Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED"],
      ];
      for (const [what, req, code, reason] of cases) {
        await expectRefusedUnchanged(unchanged(c, [device], [vm.setId]), () => c.vdcm.clearWqPasid(req), code, reason, `ClearWqPasid of ${what}`);
      }
    },
  },
  {
    id: "vdcm.rpc.submit-descriptor",
    statement:
      "SubmitDescriptor runs a dedicated work queue's descriptor with its programmed host PASID and translates a shared one's (guest or host PASID); a DMA miss is a completion status; no reference outlives it",
    source: "DESIGN §5 VDCM (descriptor submission on a shared WQ translates the descriptor's PASID); vdcm.proto SubmitDescriptor",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 2]);
      const gp = gpasid(c);
      const a = await programmed(c, vm, 0, gp);
      const held = await vdcmReferencesIn(c.h, vm.setId);
      const ok = { status: vdcm.CompletionStatus.COMPLETION_STATUS_SUCCESS, bytesCompleted: 0n, faultAddress: 0n, faultGroupId: 0n };
      const run = (req: Partial<vdcm.SubmitDescriptorRequest>) =>
        c.vdcm.submitDescriptor(vdcm.SubmitDescriptorRequest.fromPartial({ mdevUuid: vm.mdev, descriptor: NOOP, ...req }));
      expectEqual(await run({ virtualWq: 0 }), { hpasid: a.ioasid, generation: a.generation, ...ok }, "a NOOP on the dedicated work queue");
      expectEqual(
        await run({ virtualWq: 1, pasid: gp, pasidSpace: GUEST }),
        { hpasid: a.ioasid, generation: a.generation, ...ok },
        "a NOOP on the shared work queue, guest PASID",
      );
      expectEqual(
        await run({ virtualWq: 1, pasid: a.ioasid, pasidSpace: HOST, generation: a.generation }),
        { hpasid: a.ioasid, generation: a.generation, ...ok },
        "a NOOP on the shared work queue, host PASID (ENQCMD translated it)",
      );
      // Nothing is mapped for the device at the IOMMU: the DMA misses, and that is how it completes.
      const fill = await run({
        virtualWq: 1,
        pasid: gp,
        pasidSpace: GUEST,
        descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_FILL, srcAddress: 0n, dstAddress: 0x40000n, size: 64n },
      });
      expectEqual(
        { hpasid: fill.hpasid, status: fill.status, bytes: fill.bytesCompleted, at: fill.faultAddress },
        { hpasid: a.ioasid, status: vdcm.CompletionStatus.COMPLETION_STATUS_DMA_FAULT, bytes: 0n, at: 0x40000n },
        "a FILL whose DMA misses",
      );
      expectEqual(await vdcmReferencesIn(c.h, vm.setId), held, "VDCM's references once the descriptors completed (as before them)");
    },
  },
  {
    id: "vdcm.rpc.submit-descriptor.dropped",
    statement:
      "an untranslatable or malformed descriptor is dropped with the error vdcm.proto names (INVALID_ARGUMENT PASID_UNTRANSLATABLE with the lookup's reason — SPID_NOT_FOUND, IOASID_NOT_FOUND, IOASID_FREE_PENDING, IOASID_NOT_IN_SET, STALE_GENERATION — in its metadata; WQ_PASID_NOT_PROGRAMMED, INVALID_FIELD…): nothing changes, no reference kept",
    source:
      "vdcm.proto SubmitDescriptor (DESIGN §5 says INVALID_ARGUMENT for every untranslatable descriptor; the proto names the lookup's own code: the kit follows the proto)",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 2]);
      const other = await newVm(c, device, [1, 2]);
      const gp = gpasid(c);
      const a = await allocBound(c.h, vm.setId, gp);
      const foreign = await allocBound(c.h, other.setId, gpasid(c));
      const gFreed = gpasid(c);
      const freed = await allocBound(c.h, vm.setId, gFreed);
      await kitHold(c.h, vm.setId, freed.ioasid, freed.generation);
      await free(c.h, vm.setId, freed.ioasid, freed.generation);
      const shared = { mdevUuid: vm.mdev, virtualWq: 1 };
      // DESIGN §5 VDCM: an untranslatable PASID is the portal's -EINVAL, the lookup's reason beside it.
      const U = "PASID_UNTRANSLATABLE";
      const cases: Array<[string, Partial<vdcm.SubmitDescriptorRequest>, Code, string, string?]> = [
        ["a guest PASID not bound in the set", { ...shared, pasid: NEVER_BOUND, pasidSpace: GUEST }, Code.INVALID_ARGUMENT, U, "SPID_NOT_FOUND"],
        ["a host PASID not allocated", { ...shared, pasid: NEVER_ALLOCATED, pasidSpace: HOST }, Code.INVALID_ARGUMENT, U, "IOASID_NOT_FOUND"],
        ["a guest PASID being freed", { ...shared, pasid: gFreed, pasidSpace: GUEST }, Code.INVALID_ARGUMENT, U, "IOASID_FREE_PENDING"],
        ["a host PASID being freed", { ...shared, pasid: freed.ioasid, pasidSpace: HOST }, Code.INVALID_ARGUMENT, U, "IOASID_FREE_PENDING"],
        ["a host PASID of another set", { ...shared, pasid: foreign.ioasid, pasidSpace: HOST }, Code.INVALID_ARGUMENT, U, "IOASID_NOT_IN_SET"],
        ["a stale generation", { ...shared, pasid: a.ioasid, generation: a.generation + 1, pasidSpace: HOST }, Code.INVALID_ARGUMENT, U, "STALE_GENERATION"],
        ["a dedicated work queue with no PASID programmed", { mdevUuid: vm.mdev, virtualWq: 0 }, Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED"],
        ["a PASID on a dedicated work queue", { mdevUuid: vm.mdev, virtualWq: 0, pasid: gp, pasidSpace: GUEST }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        ["no PASID space on a shared work queue", { ...shared, pasid: gp }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        [
          "an UNSPECIFIED op",
          { ...shared, pasid: gp, pasidSpace: GUEST, descriptor: { op: 0, srcAddress: 0n, dstAddress: 0n, size: 0n } },
          Code.INVALID_ARGUMENT,
          "INVALID_FIELD",
        ],
        [
          "a size above 2 MiB",
          {
            ...shared,
            pasid: gp,
            pasidSpace: GUEST,
            descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_FILL, srcAddress: 0n, dstAddress: 0n, size: 2n * 1024n * 1024n + 1n },
          },
          Code.INVALID_ARGUMENT,
          "INVALID_FIELD",
        ],
        ["an unknown mdev", { mdevUuid: randomUUID(), virtualWq: 1, pasid: gp, pasidSpace: GUEST }, Code.NOT_FOUND, "MDEV_NOT_FOUND"],
        ["a virtual work queue the mdev does not have", { mdevUuid: vm.mdev, virtualWq: 5, pasid: gp, pasidSpace: GUEST }, Code.NOT_FOUND, "WQ_NOT_FOUND"],
      ];
      for (const [what, req, code, reason, lookup] of cases) {
        const refusal = await expectRefusedUnchanged(
          unchanged(c, [device], [vm.setId, other.setId]),
          () => c.vdcm.submitDescriptor(vdcm.SubmitDescriptorRequest.fromPartial({ descriptor: NOOP, ...req })),
          code,
          reason,
          `a descriptor with ${what}`,
        );
        if (lookup !== undefined) expectMetadata(refusal, "lookup", lookup, `a descriptor with ${what}`);
      }
      await kitRelease(c.h, vm.setId, freed.ioasid, freed.generation);
    },
  },
  {
    id: "vdcm.rpc.query-state",
    statement: "QueryState returns the selected devices ascending by id with their mdevs; an unknown device is NOT_FOUND DEVICE_NOT_FOUND",
    source: "vdcm.proto QueryState",
    async run(c) {
      const d1 = await newDevice(c);
      const d2 = await newDevice(c);
      const m1 = await newMdev(c, d1, [2]);
      const m2 = await newMdev(c, d2, [2]);
      const st = await c.vdcm.queryState({ deviceIds: [d2, d1] });
      expectEqual(
        { devices: st.devices.map((d) => d.deviceId), mdevs: st.mdevs.map((m) => m.mdevUuid) },
        { devices: [d1, d2].sort(), mdevs: [m1, m2].sort() },
        "QueryState of two devices",
      );
      await expectRefusedUnchanged(
        unchanged(c, [d1], []),
        () => c.vdcm.queryState({ deviceIds: [d1, c.h.uniqueName("none")] }),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
      );
    },
  },
  {
    id: "vdcm.free.settled-at-ack",
    statement: "VDCM acknowledges a FREE only once every device entry using the PASID is drained and cleared (queried when its ack is seen on the bus)",
    source: "DESIGN §4.3 (acknowledgement means the context is settled), §5 VDCM (FREE: drain and clear every device entry)",
    async run(c) {
      const d1 = await newDevice(c);
      const d2 = await newDevice(c);
      const vm = await newVm(c, d1, [0]);
      const m2 = await newMdev(c, d2, [1]);
      await c.vdcm.assignMdev({ mdevUuid: m2, setId: vm.setId });
      const gp = gpasid(c);
      const a = await programmed(c, vm, 0, gp);
      await c.vdcm.writeWqPasid({ mdevUuid: m2, virtualWq: 0, gpasid: gp });
      const { seenAtAck } = await freeSeenAtAck(c, vm, a, async () => ({ [d1]: await entriesOf(c, d1), [d2]: await entriesOf(c, d2) }));
      expectEqual(seenAtAck, { [d1]: [], [d2]: [] }, "the devices' PASID tables when VDCM's FREE ack was seen");
      await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
    },
  },
  {
    id: "vdcm.free.releases-with-ack",
    statement: "VDCM's FREE ack is SETTLED and carries the release of each cleared entry's reference; it then holds none",
    source: "DESIGN §4.3 (an ack may release the reference in the same message), §5 VDCM (then ack with the reference released)",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 1]);
      const gp = gpasid(c);
      const a = await programmed(c, vm, 0, gp);
      await c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: 1, gpasid: gp });
      const { ack, delivery } = await freeSeenAtAck(c, vm, a, async () => undefined);
      const mine = ackOfFree(delivery.batch, ack, a.ioasid);
      expectEqual(
        { status: mine?.status, releases: mine?.releases.map((r) => r.purpose).sort() },
        { status: bus.AckStatus.ACK_STATUS_SETTLED, releases: [`${device}.wq0`, `${device}.wq1`] },
        "VDCM's acknowledgement of the FREE",
      );
      await eventually(
        () => referencesOf(c.h, a.ioasid, "vdcm"),
        (n) => n === 0,
        "VDCM's references released with the ack",
      );
      await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
      expectEqual(await stateOf(c.h, a.ioasid), undefined, "the IOASID once the kit released its own reference");
    },
  },
  {
    id: "vdcm.redelivery.idempotent",
    statement: "a re-delivered FREE is answered the same and has no second effect (no entry, reference or registration changes)",
    source: "DESIGN §4.5 (at-least-once; handlers idempotent by sequence)",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      const a = await programmed(c, vm, 0, gpasid(c));
      // Its acknowledgement seen: the FREE is handled.
      const { ack, delivery } = await freeSeenAtAck(c, vm, a, async () => undefined);
      const before = await unchanged(c, [device], [vm.setId])();
      const again = bus.DeliveryBatch.encode({ deliveries: delivery.batch.deliveries.map((d) => ({ ...d, attempt: d.attempt + 1 })) }).finish();
      const second = await c.h.redeliver("vdcm", await vdcmInstanceOn(c.h, vm.setId), again, delivery.headers);
      expectEqual(second.acks, ack.acks, "the answer to the re-delivered FREE");
      expectEqual(await unchanged(c, [device], [vm.setId])(), before, "VDCM after the re-delivery");
      await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
    },
  },
  {
    id: "vdcm.isolation.other-set",
    statement: "a FREE in one VM's set touches no entry or reference of another VM, even one with the same guest PASID on the same device (S3)",
    source: "DESIGN §7 S3; §5 VDCM (FREE per set)",
    async run(c) {
      const device = await newDevice(c);
      const x = await newVm(c, device, [0]);
      const y = await newVm(c, device, [1]);
      const gp = gpasid(c);
      const ax = await programmed(c, x, 0, gp);
      const ay = await programmed(c, y, 0, gp);
      const heldByY = await vdcmReferencesIn(c.h, y.setId);
      await freeSeenAtAck(c, x, ax, async () => undefined);
      await eventually(
        () => entriesOf(c, device),
        (t) => !t.includes(`wq0:${gp}->${ax.ioasid}`),
        "the freed VM's entry gone",
      );
      expectEqual(await entriesOf(c, device), [`wq1:${gp}->${ay.ioasid}`], "the device's table: the other VM's entry");
      expectEqual(await vdcmReferencesIn(c.h, y.setId), heldByY, "VDCM's references in the other VM's set (as before the FREE)");
      await kitRelease(c.h, x.setId, ax.ioasid, ax.generation);
    },
  },
  {
    id: "vdcm.isolation.foreign-pasids",
    statement:
      "a VM cannot program, submit with or clear another VM's PASIDs through its own mdev, nor take its mdev: SPID_NOT_FOUND / PASID_UNTRANSLATABLE (lookup SPID_NOT_FOUND, IOASID_NOT_IN_SET) / MDEV_BUSY, nothing changed (S3)",
    source: "DESIGN §3 (ownership), §7 S3; vdcm.proto WriteWqPasid, SubmitDescriptor",
    async run(c) {
      const device = await newDevice(c);
      const x = await newVm(c, device, [0, 2]);
      const y = await newVm(c, device, [1, 2]);
      const gx = gpasid(c);
      const ax = await programmed(c, x, 0, gx);
      const state = unchanged(c, [device], [x.setId, y.setId]);
      await expectRefusedUnchanged(
        state,
        () => c.vdcm.writeWqPasid({ mdevUuid: y.mdev, virtualWq: 0, gpasid: gx }),
        Code.NOT_FOUND,
        "SPID_NOT_FOUND",
        "the other VM writing this VM's guest PASID",
      );
      expectMetadata(
        await expectRefusedUnchanged(
          state,
          () =>
            c.vdcm.submitDescriptor(
              vdcm.SubmitDescriptorRequest.fromPartial({ mdevUuid: y.mdev, virtualWq: 1, pasid: gx, pasidSpace: GUEST, descriptor: NOOP }),
            ),
          Code.INVALID_ARGUMENT,
          "PASID_UNTRANSLATABLE",
          "the other VM submitting with this VM's guest PASID",
        ),
        "lookup",
        "SPID_NOT_FOUND",
      );
      expectMetadata(
        await expectRefusedUnchanged(
          state,
          () =>
            c.vdcm.submitDescriptor(
              vdcm.SubmitDescriptorRequest.fromPartial({ mdevUuid: y.mdev, virtualWq: 1, pasid: ax.ioasid, pasidSpace: HOST, descriptor: NOOP }),
            ),
          Code.INVALID_ARGUMENT,
          "PASID_UNTRANSLATABLE",
          "the other VM submitting with this VM's host PASID",
        ),
        "lookup",
        "IOASID_NOT_IN_SET",
      );
      await expectRefusedUnchanged(
        state,
        () => c.vdcm.assignMdev({ mdevUuid: x.mdev, setId: y.setId }),
        Code.FAILED_PRECONDITION,
        "MDEV_BUSY",
        "the other VM taking this VM's mdev",
      );
      const before = await state();
      expectEqual((await c.vdcm.clearWqPasid({ mdevUuid: y.mdev, virtualWq: 0 })).cleared, false, "the other VM's clear of its own work queue");
      expectEqual(await state(), before, "VDCM after the other VM's clear");
    },
  },
  {
    id: "vdcm.clear-after-free.harmless",
    statement: "the guest's ClearWqPasid after the FREE teardown finds nothing: cleared=false, no reference dropped, nothing changed",
    source: "DESIGN §5 VDCM; vdcm.proto ClearWqPasid (already cleared by the FREE teardown)",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      const a = await programmed(c, vm, 0, gpasid(c));
      await freeSeenAtAck(c, vm, a, async () => undefined);
      await eventually(
        () => entriesOf(c, device),
        (t) => t.length === 0,
        "the entry gone after FREE",
      );
      const state = async () => ({ vdcm: await unchanged(c, [device], [vm.setId])(), holders: (await c.h.core.describe({ ioasid: a.ioasid })).info!.holders });
      const before = await state();
      expectEqual(
        await c.vdcm.clearWqPasid({ mdevUuid: vm.mdev, virtualWq: 0 }),
        { cleared: false, hpasid: 0, gpasid: 0, generation: 0 },
        "ClearWqPasid after FREE",
      );
      expectEqual(await state(), before, "VDCM and the IOASID's holders after the late clear");
      await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
    },
  },
  {
    id: "vdcm.order.programmed-at-cpu-tier",
    statement: "while the FREE is at the CPU tier (played by the kit), VDCM's entry is still programmed and VDCM has not been delivered the FREE",
    source: "DESIGN §3 priority order, §4.1 tier order, §7 S5",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      // Registered while the set is still empty (no replay: §3).
      const cpu = await c.h.playTier(Priority.PRIORITY_CPU, { setId: vm.setId });
      const instance = await vdcmInstanceOn(c.h, vm.setId);
      try {
        const gp = gpasid(c);
        const a = await programmed(c, vm, 0, gp);
        await kitHold(c.h, vm.setId, a.ioasid, a.generation);
        await withTap(c, instance, async (tap) => {
          const seen = cpu.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, a.ioasid), async () => ({
            entries: await entriesOf(c, device),
            deliveredToVdcm: tap.seen.some((t) => t.batch.deliveries.some(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid))),
          }));
          await free(c.h, vm.setId, a.ioasid, a.generation);
          expectEqual(await seen, { entries: [`wq0:${gp}->${a.ioasid}`], deliveredToVdcm: false }, "VDCM when the FREE was at the CPU tier");
        });
        await eventually(
          () => entriesOf(c, device),
          (t) => t.length === 0,
          "the entry cleared once the CPU tier acknowledged",
        );
        await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
      } finally {
        await cpu.close();
      }
    },
  },
  {
    id: "vdcm.order.cleared-before-iommu-tier",
    statement: "when a FREE reaches the IOMMU tier (played by the kit), VDCM's entry for it is already drained and cleared (S5)",
    source: "DESIGN §3 priority order, §4.1 tier order, §7 S5 (device drained/cleared before the IOMMU entry is torn down)",
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device);
      const iommu = await c.h.playTier(Priority.PRIORITY_IOMMU, { setId: vm.setId });
      try {
        const a = await programmed(c, vm, 0, gpasid(c));
        await kitHold(c.h, vm.setId, a.ioasid, a.generation);
        const seen = iommu.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, a.ioasid), () => entriesOf(c, device));
        await free(c.h, vm.setId, a.ioasid, a.generation);
        expectEqual(await seen, [], "VDCM's entries on the device when the FREE reached the IOMMU tier");
        await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
      } finally {
        await iommu.close();
      }
    },
  },
  {
    id: "vdcm.history.records-changes",
    statement:
      "every change is recorded with the catalogue's action: vdev_write, submit (and dropped), vdev_clear with cause MDEV_CLEAR and FREE (the FREE's seq), with the IOASID, set and SPID",
    source: "DESIGN §7 (checked from recorded history); history.proto VdevWrite, VdevClear, Submit",
    async run(c) {
      const since = Date.now();
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 2]);
      const gp = gpasid(c);
      const a = await programmed(c, vm, 0, gp);
      await c.vdcm.submitDescriptor(
        vdcm.SubmitDescriptorRequest.fromPartial({ mdevUuid: vm.mdev, virtualWq: 1, pasid: gp, pasidSpace: GUEST, descriptor: NOOP }),
      );
      await expectRefused(
        c.vdcm.submitDescriptor(
          vdcm.SubmitDescriptorRequest.fromPartial({ mdevUuid: vm.mdev, virtualWq: 1, pasid: NEVER_BOUND, pasidSpace: GUEST, descriptor: NOOP }),
        ),
        Code.INVALID_ARGUMENT,
        "PASID_UNTRANSLATABLE",
      );
      await c.vdcm.clearWqPasid({ mdevUuid: vm.mdev, virtualWq: 0 });
      await c.vdcm.writeWqPasid({ mdevUuid: vm.mdev, virtualWq: 0, gpasid: gp });
      const { delivery } = await freeSeenAtAck(c, vm, a, async () => undefined);
      const seq = Number(delivery.batch.deliveries.find(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid))!.event!.seq);
      const at = `ioasid ${a.ioasid} gen ${a.generation} set ${vm.setId} spid ${gp}`;
      const want = [
        `vdev_write wq0 gpasid ${gp}: ${at}`,
        `submit wq2 NOOP SUCCESS: ${at}`,
        `submit wq2 dropped guest ${NEVER_BOUND} PASID_UNTRANSLATABLE: set ${vm.setId}`,
        `vdev_clear wq0 VDEV_CLEAR_CAUSE_MDEV_CLEAR: ${at}`,
        `vdev_write wq0 gpasid ${gp}: ${at}`,
        `vdev_clear wq0 VDEV_CLEAR_CAUSE_FREE seq ${seq}: ${at}`,
      ];
      await eventually(
        async () =>
          (await c.h.history(since - 1, "vdcm"))
            .filter((r) => r.setId === vm.setId)
            .map((r) => {
              const fields = r.ioasid === undefined ? `set ${r.setId}` : `ioasid ${r.ioasid} gen ${r.generation} set ${r.setId} spid ${r.spid}`;
              const act = r.action;
              const mine = (x: { device: string; mdev: string }) => x.device === device && x.mdev === vm.mdev;
              if (act.$case === "vdevWrite" && mine(act.value)) return `vdev_write wq${act.value.wq} gpasid ${act.value.gpasid}: ${fields}`;
              if (act.$case === "vdevClear" && mine(act.value)) {
                const cause = historyProto.vdevClearCauseToJSON(act.value.cause);
                return `vdev_clear wq${act.value.wq} ${cause}${cause === "VDEV_CLEAR_CAUSE_FREE" ? ` seq ${r.seq}` : ""}: ${fields}`;
              }
              if (act.$case === "submit" && mine(act.value)) {
                const s = act.value;
                return s.dropped
                  ? `submit wq${s.wq} dropped ${s.pasidSpace.toLowerCase()} ${s.pasid} ${s.reason}: ${fields}`
                  : `submit wq${s.wq} ${s.op.toUpperCase()} ${s.status.toUpperCase()}: ${fields}`;
              }
              return `${r.action.$case}: ${fields}`;
            }),
        (got) => JSON.stringify(got) === JSON.stringify(want),
        `history records ${show(want)}`,
      );
      await kitRelease(c.h, vm.setId, a.ioasid, a.generation);
    },
  },
  {
    id: "vdcm.restart.restores-and-catches-up",
    statement:
      "killed and restarted, VDCM comes back with its device tables and registrations, receives the FREE it missed, clears that entry and releases its reference",
    source: "DESIGN §4.4 (a dead VDCM may still have the PASID programmed: its reference keeps it), §4.5, §12 (restart)",
    needs: ["restart"],
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 1]);
      const gGone = gpasid(c);
      const gKept = gpasid(c);
      const gone = await programmed(c, vm, 0, gGone);
      const kept = await programmed(c, vm, 1, gKept);
      const before = await c.vdcm.queryState({ deviceIds: [device] });
      const regs = await vdcmRegistrationsOn(c.h, vm.setId);
      await c.h.killTarget();
      let whileDown: number;
      try {
        // Free always succeeds, VDCM down or not (L1); VDCM's reference keeps the IOASID from reuse.
        await free(c.h, vm.setId, gone.ioasid, gone.generation);
        whileDown = await referencesOf(c.h, gone.ioasid, "vdcm");
      } finally {
        // Started again whatever failed: the clauses after this one need it.
        await c.h.startTarget();
      }
      expectEqual(whileDown, 1, "VDCM's reference on the freed IOASID while VDCM was down");
      await eventually(
        () => entriesOf(c, device),
        (t) => JSON.stringify(t) === JSON.stringify([`wq1:${gKept}->${kept.ioasid}`]),
        `the restored device's table to be [wq1:${gKept}->${kept.ioasid}] once the missed FREE is handled`,
      );
      await eventually(
        () => stateOf(c.h, gone.ioasid),
        (s) => s === undefined || s.generation !== gone.generation,
        "the freed IOASID reclaimed",
      );
      const after = await c.vdcm.queryState({ deviceIds: [device] });
      expectEqual(
        { mdevs: after.mdevs, wqs: after.devices[0]?.wqs.map((w) => ({ ...w, hpasid: w.wqId === 0 ? 0 : w.hpasid })) },
        { mdevs: before.mdevs, wqs: before.devices[0]?.wqs.map((w) => ({ ...w, hpasid: w.wqId === 0 ? 0 : w.hpasid })) },
        "the restored device and mdevs",
      );
      expectEqual(await vdcmRegistrationsOn(c.h, vm.setId), regs, "VDCM's registration on the set after the restart");
      expectEqual(await vdcmReferencesIn(c.h, vm.setId), [`${kept.ioasid}/${device}.wq1×1`], "VDCM's references in the set after the restart");
    },
  },
  {
    id: "vdcm.restart.resubscribes-no-leak",
    statement: "after a restart VDCM handles new writes and FREEs on its restored mdevs, and unassigning them leaves no reference or registration behind",
    source: "DESIGN §4.5, §12 (resubscribe, nothing leaked)",
    needs: ["restart"],
    async run(c) {
      const device = await newDevice(c);
      const vm = await newVm(c, device, [0, 1]);
      const old = await programmed(c, vm, 0, gpasid(c));
      await c.h.restartTarget();
      const fresh = await programmed(c, vm, 1, gpasid(c));
      await freeSeenAtAck(c, vm, fresh, async () => undefined);
      await eventually(
        () => referencesOf(c.h, fresh.ioasid, "vdcm"),
        (n) => n === 0,
        "the FREE after the restart handled: VDCM's reference released",
      );
      expectEqual(await entriesOf(c, device), [`wq0:${old.entry.gpasid}->${old.ioasid}`], "the device's table after that FREE");
      expectEqual(await c.vdcm.unassignMdev({ mdevUuid: vm.mdev }), { clearedEntries: 1, unregistered: true }, "UnassignMdev of the restored mdev");
      expectEqual(await vdcmReferencesIn(c.h, vm.setId), [], "VDCM's references in the set after UnassignMdev");
      expectEqual(await vdcmRegistrationsOn(c.h, vm.setId), [], "VDCM's registrations on the set after UnassignMdev");
      await kitRelease(c.h, vm.setId, fresh.ioasid, fresh.generation);
    },
  },
];

/** The VDCM role's contract (DESIGN §5 "VDCM", §4, §7). */
export const vdcmSuite: RoleSuite<VdcmCtx> = {
  role: "vdcm",
  summary: "the idxd VDCM: work-queue devices, their PASID tables and mdevs assigned to VMs, kept by the guests' MMIO writes and FREE at DEVICE priority",
  target:
    "ioasid.vdcm.v1.VdcmService and grpc.health.v1 at --target; the core at IOASID_CORE_ADDRESS; the IOMMU (descriptors' DMA) at IOMMU_ADDRESS; NATS at NATS_URL",
  prepare: (h) => ({ h, vdcm: createClient(vdcm.VdcmServiceService, h.target, { deadlineMs: 10_000 }), gpasid: 100 }),
  clauses,
  close: (c) => c.vdcm.close(),
};
