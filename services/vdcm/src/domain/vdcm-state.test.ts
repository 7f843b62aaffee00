import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { DEFAULT_MAX_PASID_ENTRIES, DEFAULT_WQ_SIZE, EntryState, WqMode } from "./vdcm-model.js";
import { VdcmState } from "./vdcm-state.js";
import type { DeviceSpec } from "./vdcm-views.js";

const T0 = new Date("2025-01-01T00:00:00Z");
const M1 = "11111111-1111-4111-8111-111111111111";
const M2 = "22222222-2222-4222-8222-222222222222";
const M3 = "33333333-3333-4333-8333-333333333333";

const DSA: DeviceSpec = {
  deviceId: "0000:6a:01.0",
  wqs: [
    { wqId: 0, mode: WqMode.DEDICATED },
    { wqId: 1, mode: WqMode.DEDICATED },
    { wqId: 2, mode: WqMode.SHARED, size: 128 },
  ],
  maxPasidEntries: 2,
};

function refused(fn: () => unknown, code: number, reason: string, field?: string): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(DomainError);
  const e = err as DomainError;
  expect({ code: e.code, reason: e.reason }).toEqual({ code, reason });
  if (field !== undefined) expect(e.metadata.field).toBe(field);
}

/** A state with the DSA device, mdev M1 on wq 0 + shared wq 2 assigned to set 7, M2 on wq 1 assigned to set 8. */
function twoVms(): VdcmState {
  const s = new VdcmState();
  s.registerDevice(DSA);
  s.createMdev(DSA.deviceId, M1, [0, 2], T0);
  s.createMdev(DSA.deviceId, M2, [1, 2], T0);
  s.assignMdev(M1, 7, T0);
  s.assignMdev(M2, 8, T0);
  return s;
}

describe("VdcmState devices", () => {
  it("registers a device with its work queues, defaults and an empty PASID table", () => {
    const s = new VdcmState();
    const d = s.registerDevice({
      deviceId: "dsa0",
      wqs: [
        { wqId: 3, mode: WqMode.SHARED },
        { wqId: 1, mode: WqMode.DEDICATED, size: 8 },
      ],
    });
    expect(d).toEqual({
      deviceId: "dsa0",
      wqs: [
        { wqId: 1, mode: WqMode.DEDICATED, size: 8, mdevUuids: [], hpasid: 0 },
        { wqId: 3, mode: WqMode.SHARED, size: DEFAULT_WQ_SIZE, mdevUuids: [], hpasid: 0 },
      ],
      maxPasidEntries: DEFAULT_MAX_PASID_ENTRIES,
      pasidEntries: [],
    });
  });

  it("refuses bad device specs with INVALID_FIELD naming the field, and changes nothing", () => {
    const s = new VdcmState();
    refused(() => s.registerDevice({ deviceId: "", wqs: DSA.wqs }), Code.INVALID_ARGUMENT, "INVALID_FIELD", "device_id");
    refused(() => s.registerDevice({ deviceId: "dsa 0", wqs: DSA.wqs }), Code.INVALID_ARGUMENT, "INVALID_FIELD", "device_id");
    refused(() => s.registerDevice({ deviceId: "x".repeat(101), wqs: DSA.wqs }), Code.INVALID_ARGUMENT, "INVALID_FIELD", "device_id");
    refused(() => s.registerDevice({ deviceId: "dsa0", wqs: [] }), Code.INVALID_ARGUMENT, "INVALID_FIELD", "wqs");
    refused(
      () =>
        s.registerDevice({
          deviceId: "dsa0",
          wqs: [
            { wqId: 1, mode: WqMode.SHARED },
            { wqId: 1, mode: WqMode.DEDICATED },
          ],
        }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
      "wqs.wq_id",
    );
    refused(
      () => s.registerDevice({ deviceId: "dsa0", wqs: [{ wqId: 1, mode: undefined as unknown as WqMode }] }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
      "wqs.mode",
    );
    refused(
      () => s.registerDevice({ deviceId: "dsa0", wqs: [{ wqId: 1, mode: WqMode.SHARED, size: 70_000 }] }),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
      "wqs.size",
    );
    refused(() => s.registerDevice({ ...DSA, maxPasidEntries: (1 << 20) + 1 }), Code.INVALID_ARGUMENT, "INVALID_FIELD", "max_pasid_entries");
    expect(s.snapshot().devices).toEqual([]);
  });

  it("refuses a device registered twice (DEVICE_EXISTS)", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    refused(() => s.registerDevice(DSA), Code.ALREADY_EXISTS, "DEVICE_EXISTS");
  });

  it("removes a device only when no mdev uses it", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    s.createMdev(DSA.deviceId, M1, [0], T0);
    refused(() => s.removeDevice(DSA.deviceId), Code.FAILED_PRECONDITION, "DEVICE_IN_USE");
    s.destroyMdev(M1);
    s.removeDevice(DSA.deviceId);
    refused(() => s.removeDevice(DSA.deviceId), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
  });
});

describe("VdcmState mdevs", () => {
  it("composes mdevs: a dedicated work queue backs one mdev, a shared one several", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    const m = s.createMdev(DSA.deviceId, M1.toUpperCase(), [0, 2], T0);
    expect(m).toEqual({ mdevUuid: M1, parentDeviceId: DSA.deviceId, wqIds: [0, 2], setId: 0, createdAt: T0, assignedAt: undefined });
    refused(() => s.createMdev(DSA.deviceId, M2, [0], T0), Code.FAILED_PRECONDITION, "WQ_IN_USE");
    s.createMdev(DSA.deviceId, M2, [1, 2], T0);
    expect(s.snapshot().devices[0]!.wqs.map((w) => w.mdevUuids)).toEqual([[M1], [M2], [M1, M2]]);
  });

  it("refuses bad compositions and changes nothing", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    s.createMdev(DSA.deviceId, M1, [2], T0);
    const before = s.snapshot();
    refused(() => s.createMdev("nope", M2, [0], T0), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    refused(() => s.createMdev(DSA.deviceId, M2, [9], T0), Code.NOT_FOUND, "WQ_NOT_FOUND");
    refused(() => s.createMdev(DSA.deviceId, M1, [0], T0), Code.ALREADY_EXISTS, "MDEV_EXISTS");
    refused(() => s.createMdev(DSA.deviceId, "not a uuid", [0], T0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "mdev_uuid");
    refused(() => s.createMdev(DSA.deviceId, "m".repeat(65), [0], T0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "mdev_uuid");
    refused(() => s.createMdev(DSA.deviceId, M2, [], T0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "wq_ids");
    refused(() => s.createMdev(DSA.deviceId, M2, [0, 0], T0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "wq_ids");
    refused(() => s.createMdev("", M2, [0], T0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "parent_device_id");
    expect(s.snapshot()).toEqual(before);
  });

  it("generates a UUID for an mdev created without one, and accepts a plain name", () => {
    const s = new VdcmState({ newUuid: () => M3 });
    s.registerDevice(DSA);
    expect(s.createMdev(DSA.deviceId, "", [0], T0).mdevUuid).toBe(M3);
    expect(s.createMdev(DSA.deviceId, "mdev-7", [2], T0).mdevUuid).toBe("mdev-7");
    expect(s.getMdev(M3.toUpperCase())?.mdevUuid).toBe(M3);
    expect(s.getMdev("MDEV-7")).toBeUndefined();
  });

  it("assigns an mdev to one VM: MDEV_ALREADY_ASSIGNED for the same set, MDEV_BUSY for another", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    s.createMdev(DSA.deviceId, M1, [0], T0);
    expect(s.checkAssign(M1, 7)).toEqual({ firstOfSet: true });
    s.assignMdev(M1, 7, T0);
    refused(() => s.assignMdev(M1, 7, T0), Code.ALREADY_EXISTS, "MDEV_ALREADY_ASSIGNED");
    refused(() => s.assignMdev(M1, 8, T0), Code.FAILED_PRECONDITION, "MDEV_BUSY");
    refused(() => s.assignMdev(M1, 0, T0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "set_id");
    refused(() => s.destroyMdev(M1), Code.FAILED_PRECONDITION, "MDEV_ASSIGNED");
    s.createMdev(DSA.deviceId, M2, [1], T0);
    expect(s.checkAssign(M2, 7)).toEqual({ firstOfSet: false });
    s.unassignMdev(M1);
    refused(() => s.unassignMdev(M1), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
    s.destroyMdev(M1);
    refused(() => s.destroyMdev(M1), Code.NOT_FOUND, "MDEV_NOT_FOUND");
  });
});

describe("VdcmState device PASID table", () => {
  it("programs a reserved dedicated work queue with the host PASID", () => {
    const s = twoVms();
    const r = s.reserveWq(M1, 0, 101);
    const e = s.programWq(r, 201, 1, T0);
    expect(e).toEqual({
      deviceId: DSA.deviceId,
      hpasid: 201,
      generation: 1,
      gpasid: 101,
      setId: 7,
      wqId: 0,
      mdevUuid: M1,
      state: EntryState.PROGRAMMED,
      programmedAt: T0,
    });
    const d = s.snapshot().devices[0]!;
    expect(d.wqs[0]!.hpasid).toBe(201);
    expect(d.pasidEntries).toEqual([e]);
  });

  it("refuses writes the hardware cannot take, and changes nothing", () => {
    const s = twoVms();
    s.programWq(s.reserveWq(M1, 0, 101), 201, 1, T0);
    const before = s.snapshot();
    refused(() => s.reserveWq(M1, 1, 101), Code.FAILED_PRECONDITION, "WQ_SHARED");
    refused(() => s.reserveWq(M1, 2, 101), Code.NOT_FOUND, "WQ_NOT_FOUND");
    refused(() => s.reserveWq(M1, 0, 102), Code.FAILED_PRECONDITION, "WQ_PASID_PROGRAMMED");
    refused(() => s.reserveWq(M2, 0, 0), Code.INVALID_ARGUMENT, "INVALID_FIELD", "gpasid");
    refused(() => s.reserveWq(M2, 0, 1 << 20), Code.INVALID_ARGUMENT, "INVALID_FIELD", "gpasid");
    refused(() => s.reserveWq(M3, 0, 101), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    expect(s.snapshot()).toEqual(before);
  });

  it("refuses a write to an unassigned mdev (MDEV_NOT_ASSIGNED)", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    s.createMdev(DSA.deviceId, M1, [0], T0);
    refused(() => s.reserveWq(M1, 0, 101), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
  });

  it("counts writes in progress against the device PASID table (DEVICE_PASID_TABLE_FULL)", () => {
    const s = new VdcmState();
    s.registerDevice({ ...DSA, wqs: [0, 1, 3].map((wqId) => ({ wqId, mode: WqMode.DEDICATED })) });
    s.createMdev(DSA.deviceId, M1, [0, 1, 3], T0);
    s.assignMdev(M1, 7, T0);
    s.programWq(s.reserveWq(M1, 0, 101), 201, 1, T0);
    const pending = s.reserveWq(M1, 1, 102);
    refused(() => s.reserveWq(M1, 2, 103), Code.RESOURCE_EXHAUSTED, "DEVICE_PASID_TABLE_FULL");
    s.releaseReservation(pending);
    s.reserveWq(M1, 2, 103);
  });

  it("never programs a PASID while another guest's context for it is on the device (PASID_IN_USE)", () => {
    const s = twoVms();
    s.programWq(s.reserveWq(M1, 0, 101), 201, 1, T0);
    const r = s.reserveWq(M2, 0, 555);
    refused(() => s.programWq(r, 201, 2, T0), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(s.snapshot().devices[0]!.pasidEntries.map((e) => e.setId)).toEqual([7]);
    // An earlier generation of the same set's IOASID is a stale context too.
    expect(s.foreignContext(DSA.deviceId, 201, 7, 2)).toMatchObject({ setId: 7, generation: 1 });
    expect(s.foreignContext(DSA.deviceId, 201, 7, 1)).toBeUndefined();
  });

  it("lets one guest program the same host PASID in two of its work queues", () => {
    const s = new VdcmState();
    s.registerDevice(DSA);
    s.createMdev(DSA.deviceId, M1, [0], T0);
    s.createMdev(DSA.deviceId, M2, [1], T0);
    s.assignMdev(M1, 7, T0);
    s.assignMdev(M2, 7, T0);
    s.programWq(s.reserveWq(M1, 0, 101), 201, 1, T0);
    s.programWq(s.reserveWq(M2, 0, 101), 201, 1, T0);
    expect(s.entriesForIoasid(7, 201, 1).map((e) => e.wqId)).toEqual([0, 1]);
    expect(s.entriesForIoasid(7, 201, 2)).toEqual([]);
  });

  it("drains, then clears, an entry exactly once", () => {
    const s = twoVms();
    const e = s.programWq(s.reserveWq(M1, 0, 101), 201, 1, T0);
    expect(s.beginDrain(DSA.deviceId, 0, e)).toBe(true);
    expect(s.entryAt(DSA.deviceId, 0)!.state).toBe(EntryState.DRAINING);
    expect(s.beginDrain(DSA.deviceId, 0, e)).toBe(false);
    expect(s.clearEntry(DSA.deviceId, 0, e)).toBe(true);
    expect(s.clearEntry(DSA.deviceId, 0, e)).toBe(false);
    expect(s.snapshot().devices[0]!.wqs[0]!.hpasid).toBe(0);
  });

  it("cancels a write in progress when its mdev is unassigned", () => {
    const s = twoVms();
    const r = s.reserveWq(M1, 0, 101);
    s.unassignMdev(M1);
    expect(s.isReserved(r)).toBe(false);
    refused(() => s.programWq(r, 201, 1, T0), Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
  });
});

describe("VdcmState snapshot", () => {
  it("selects devices with their mdevs, sorted, and refuses an unknown one", () => {
    const s = twoVms();
    s.registerDevice({ deviceId: "0000:00:01.0", wqs: [{ wqId: 0, mode: WqMode.SHARED }] });
    s.setRegistration(8, 2);
    s.setRegistration(7, 1);
    const all = s.snapshot();
    expect(all.devices.map((d) => d.deviceId)).toEqual(["0000:00:01.0", DSA.deviceId]);
    expect(all.mdevs.map((m) => m.mdevUuid)).toEqual([M1, M2]);
    expect(all.registeredSetIds).toEqual([7, 8]);
    expect(s.snapshot(["0000:00:01.0"]).mdevs).toEqual([]);
    refused(() => s.snapshot(["nope"]), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
  });
});
