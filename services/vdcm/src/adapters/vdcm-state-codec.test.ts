import { describe, expect, it } from "vitest";
import { vdcmState } from "@ioasid/proto";
import type { VdcmKeptEntry } from "../domain/vdcm-kept-entry.js";
import { WqMode } from "../domain/vdcm-model.js";
import { VdcmState } from "../domain/vdcm-state.js";
import { VDCM_STATE_FORMAT, vdcmStateCodec } from "./vdcm-state-codec.js";

// Every field of every kind, none at its default: a field the codec forgets comes back different.
const entries: VdcmKeptEntry[] = [
  {
    kind: "device",
    deviceId: "0000:6a:01.0",
    maxPasidEntries: 64,
    wqs: [
      { wqId: 0, mode: WqMode.DEDICATED, size: 16 },
      { wqId: 3, mode: WqMode.SHARED, size: 128 },
    ],
  },
  {
    kind: "mdev",
    mdevUuid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    parentDeviceId: "0000:6a:01.0",
    wqIds: [3, 0],
    setId: 4,
    createdAt: new Date(1_700_000_000_001),
    assignedAt: new Date(1_700_000_000_002),
  },
  { kind: "mdev", mdevUuid: "m2", parentDeviceId: "0000:6a:01.0", wqIds: [3], setId: 0, createdAt: new Date(1_700_000_000_003), assignedAt: undefined },
  {
    kind: "pasidEntry",
    deviceId: "0000:6a:01.0",
    wqId: 0,
    hpasid: 201,
    generation: 2,
    gpasid: 101,
    setId: 4,
    mdevUuid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    programmedAt: new Date(1_700_000_000_004),
  },
  { kind: "registration", setId: 4, registrationId: 17 },
];

describe("vdcmStateCodec", () => {
  it("round-trips every field of every kind of kept entry through ioasid.vdcm.v1.VdcmStateEntry", () => {
    for (const e of entries) expect(vdcmStateCodec.decode(vdcmStateCodec.encode(e))).toEqual(e);
    expect(VDCM_STATE_FORMAT).toBe("ioasid.vdcm.v1.VdcmStateEntry");
  });

  it("brings a VdcmState back whole from its encoded changes", () => {
    const st = new VdcmState();
    st.registerDevice({
      deviceId: "dsa0",
      wqs: [
        { wqId: 0, mode: WqMode.DEDICATED },
        { wqId: 1, mode: WqMode.SHARED, size: 8 },
      ],
      maxPasidEntries: 4,
    });
    st.createMdev("dsa0", "m1", [0, 1], new Date(1000));
    st.assignMdev("m1", 4, new Date(2000));
    st.setRegistration(4, 9);
    st.programWq(st.reserveWq("m1", 0, 101), 201, 1, new Date(3000));
    const saved = new Map(st.takeChanges().map((c) => [c.key, vdcmStateCodec.decode(vdcmStateCodec.encode(c.value!))]));
    expect(VdcmState.restore(saved).snapshot()).toEqual(st.snapshot());
  });

  it("refuses an entry without its kind, a work queue without its mode, or an entry without its time", () => {
    expect(() => vdcmStateCodec.decode(new Uint8Array([]))).toThrow("VdcmStateEntry.entry is missing");
    const noMode = vdcmState.VdcmStateEntry.encode({
      entry: { $case: "device", value: vdcmState.KeptDevice.fromPartial({ deviceId: "d", wqs: [{ wqId: 1 }] }) },
    }).finish();
    expect(() => vdcmStateCodec.decode(noMode)).toThrow("KeptWorkQueue.mode is missing");
    const noTime = vdcmState.VdcmStateEntry.encode({
      entry: { $case: "pasidEntry", value: vdcmState.KeptDevicePasidEntry.fromPartial({ deviceId: "d" }) },
    }).finish();
    expect(() => vdcmStateCodec.decode(noTime)).toThrow("KeptDevicePasidEntry.programmed_at is missing");
  });
});
