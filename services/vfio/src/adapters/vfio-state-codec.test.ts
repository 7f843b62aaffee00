import { describe, expect, it } from "vitest";
import { vfioState } from "@ioasid/proto";
import type { VfioKeptEntry } from "../domain/vfio-kept-entry.js";
import { VFIO_STATE_FORMAT, vfioStateCodec } from "./vfio-state-codec.js";

// Every field of every kind, none at its default: a field the codec forgets comes back different.
const entries: VfioKeptEntry[] = [
  {
    kind: "container",
    id: 3,
    setId: 4,
    mmToken: 0xffff_ffff_ffff_fff0n,
    vmName: "guest",
    quota: 16,
    openedAt: 1_700_000_000_001,
    devices: [
      { ref: { kind: "device", id: "0000:6a:01.0" }, parentDeviceId: "", assignedAt: 1_700_000_000_002 },
      // Replaced to a nested domain (ReplaceDeviceDomain): a restarted VFIO detaches and frees it.
      { ref: { kind: "device", id: "0000:6a:03.0" }, parentDeviceId: "", assignedAt: 1_700_000_000_005, nested: { domainId: 11, guestPgtable: 0x9000n } },
      // Nested on the container's vIOMMU (ReplaceDeviceDomain with viommu_id).
      {
        ref: { kind: "device", id: "0000:6a:04.0" },
        parentDeviceId: "",
        assignedAt: 1_700_000_000_006,
        nested: { domainId: 13, guestPgtable: 0xa000n, viommuId: 12 },
      },
      { ref: { kind: "mdev", id: "m1" }, parentDeviceId: "0000:6a:02.0", assignedAt: 1_700_000_000_003 },
    ],
    stage2: 9,
    capabilityDigest: new Uint8Array(32).fill(7),
    guestMemory: [
      { paddr: 0x1_0000_0000n, size: 0x4000_0000n },
      { paddr: 0xffff_ffff_ffff_f000n, size: 0x1000n },
    ],
    // A restarted VFIO destroys them (queues, vdevices, vIOMMU) before it frees the stage 2.
    viommus: [
      {
        id: 12,
        device: { kind: "device", id: "0000:6a:01.0" },
        parentDomainId: 9,
        createdAt: 1_700_000_000_007,
        vdevices: [{ id: 14, device: { kind: "device", id: "0000:6a:04.0" }, virtId: 0xffff_ffff_ffff_fffen }],
        veventqs: [{ id: 15, depth: 64 }],
      },
    ],
  },
  {
    kind: "container",
    id: 4,
    setId: 5,
    mmToken: 1n,
    vmName: "",
    quota: 0,
    openedAt: 1_700_000_000_004,
    devices: [],
    stage2: undefined,
    capabilityDigest: new Uint8Array(0),
    guestMemory: [],
    viommus: [],
  },
  { kind: "containerCounter", nextContainerId: 5 },
];

describe("vfioStateCodec", () => {
  it("round-trips every field of every kind of kept entry through ioasid.vfio.v1.VfioStateEntry", () => {
    for (const e of entries) expect(vfioStateCodec.decode(vfioStateCodec.encode(e))).toEqual(e);
    expect(VFIO_STATE_FORMAT).toBe("ioasid.vfio.v1.VfioStateEntry");
  });

  it("refuses an entry without its kind, or a device without its reference", () => {
    expect(() => vfioStateCodec.decode(new Uint8Array([]))).toThrow("VfioStateEntry.entry is missing");
    const noRef = vfioState.VfioStateEntry.encode({
      entry: {
        $case: "container",
        value: vfioState.KeptContainer.fromPartial({ containerId: 1, openedAt: new Date(1), devices: [{ assignedAt: new Date(2) }] }),
      },
    }).finish();
    expect(() => vfioStateCodec.decode(noRef)).toThrow("AssignedDevice.device is missing");
  });
});
