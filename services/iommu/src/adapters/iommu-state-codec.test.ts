import { describe, expect, it } from "vitest";
import { iommuState } from "@ioasid/proto";
import { AttachKind, DeviceFunction, DomainType, FaultReason, type AttachHandle, type IommuKeptEntry } from "../domain/iommu-hardware.js";
import { VeventqType } from "../domain/viommu.js";
import { IOMMU_STATE_FORMAT, iommuStateCodec } from "./iommu-state-codec.js";
import { GroupState } from "../domain/page-requests.js";

const RW = { read: true, write: true, execute: true, privileged: true };
const handle: AttachHandle = {
  handleId: (1n << 63n) + 9n,
  kind: AttachKind.GPASID_BIND,
  domainId: 5,
  deviceId: "0000:6a:01.0",
  pasid: 201,
  withoutPasid: true,
  owner: "vfio/vfio-1",
  ownerData: new Uint8Array([1, 2, 3]),
  setId: 4,
  gpasid: 101,
  generation: 2,
  createdAt: new Date(1_700_000_000_001),
};
const mapping = { iova: 0xffff_ffff_ffff_f000n, paddr: 0x1234_5000n, size: 0x2000n, access: RW };

// Every field of every kind, none at its default: a field the codec forgets comes back different.
const entries: IommuKeptEntry[] = [
  {
    kind: "device",
    device: {
      deviceId: "0000:6a:01.1",
      maxPasids: 64,
      priCapable: true,
      function: DeviceFunction.VF,
      parentDeviceId: "0000:6a:01.0",
      iommuGroup: 7,
      priCredits: 8,
    },
  },
  {
    kind: "domain",
    domain: {
      domainId: 5,
      type: DomainType.NESTED,
      parentDomainId: 3,
      guestPgtable: 0xffff_0000_0000_1000n,
      mmToken: 0xffff_ffff_ffff_fff1n,
      implicit: true,
      mappings: [mapping],
    },
  },
  { kind: "attachHandle", handle: { ...handle, faultReporting: true } },
  { kind: "gpasidBinding", binding: { hpasid: 201, setId: 4, generation: 2, gpasid: 101, refHeld: true, spidAttached: true, firstStage: [mapping] } },
  {
    kind: "mmContext",
    mm: {
      mmToken: 0xffff_ffff_ffff_fff2n,
      setId: 4,
      pasid: 300,
      generation: 3,
      domainId: 6,
      bonds: [{ deviceId: "d0", handleId: (1n << 62n) + 1n, users: 2 }],
    },
  },
  { kind: "idCounters", nextDomainId: 77, nextHandleId: (1n << 60n) + 3n },
  {
    kind: "guestMapping",
    guestMapping: {
      hpasid: 0xfffff,
      generation: 0xffff_fffe,
      mapping: { iova: 0xffff_ffff_ffff_f000n, paddr: (1n << 63n) + 0x1000n, size: 0x1000n, access: RW },
    },
  },
  {
    kind: "faultGroup",
    group: {
      faultGroupId: (1n << 61n) + 4n,
      deviceId: "0000:6a:01.0",
      pasid: 201,
      withoutPasid: true,
      prgi: 511,
      requests: [
        {
          deviceId: "0000:6a:01.0",
          pasid: 201,
          withoutPasid: true,
          address: 0xffff_ffff_ffff_e000n,
          access: RW,
          prgi: 511,
          lastRequest: true,
          receivedAt: new Date(1_700_000_000_002),
        },
      ],
      handle,
      state: GroupState.PENDING,
      createdAt: new Date(1_700_000_000_003),
      deadline: new Date(1_700_000_000_004),
    },
  },
  { kind: "faultGroupCounter", nextFaultGroupId: (1n << 59n) + 5n },
  {
    kind: "viommu",
    viommu: { viommuId: 9, deviceId: "0000:6a:01.0", parentDomainId: 3, owner: "vfio/vfio-1", nestedDomainIds: [5, 8], createdAt: new Date(1_700_000_000_005) },
  },
  { kind: "vdevice", vdevice: { vdeviceId: 10, viommuId: 9, deviceId: "0000:6a:01.0", virtId: (1n << 63n) + 6n } },
  {
    kind: "veventq",
    veventq: {
      veventqId: 11,
      viommuId: 9,
      type: VeventqType.DMA_FAULT,
      depth: 4096,
      nextSequence: (1n << 58n) + 7n,
      lostEvents: 3n,
      items: [
        {
          kind: "event",
          event: {
            sequence: 4n,
            virtId: (1n << 63n) + 6n,
            pasid: 201,
            withoutPasid: true,
            address: 0xffff_ffff_ffff_d000n,
            access: RW,
            reason: FaultReason.PERMISSION,
            at: new Date(1_700_000_000_006),
          },
        },
        { kind: "lostEvents", firstSequence: 5n, count: 3n },
      ],
    },
  },
  { kind: "viommuIdCounter", nextObjectId: 12 },
];

describe("iommuStateCodec", () => {
  it("round-trips every field of every kind of kept entry through ioasid.iommu.v1.IommuStateEntry", () => {
    for (const e of entries) expect(iommuStateCodec.decode(iommuStateCodec.encode(e))).toEqual(e);
    expect(IOMMU_STATE_FORMAT).toBe("ioasid.iommu.v1.IommuStateEntry");
  });

  it("refuses an entry without its kind, an enum left UNSPECIFIED (a domain's type, a vEVENTQ's type), or a fault group without its handle", () => {
    expect(() => iommuStateCodec.decode(new Uint8Array([]))).toThrow("IommuStateEntry.entry is missing");
    const noType = iommuState.IommuStateEntry.encode({ entry: { $case: "domain", value: iommuState.KeptDomain.fromPartial({ domainId: 1 }) } }).finish();
    expect(() => iommuStateCodec.decode(noType)).toThrow("KeptDomain.type is missing");
    const noHandle = iommuState.IommuStateEntry.encode({
      entry: { $case: "faultGroup", value: iommuState.KeptFaultGroup.fromPartial({ faultGroupId: 1n }) },
    }).finish();
    expect(() => iommuStateCodec.decode(noHandle)).toThrow("KeptFaultGroup.handle is missing");
    const noQueueType = iommuState.IommuStateEntry.encode({
      entry: { $case: "veventq", value: iommuState.KeptVeventq.fromPartial({ veventqId: 1 }) },
    }).finish();
    expect(() => iommuStateCodec.decode(noQueueType)).toThrow("KeptVeventq.type is missing");
  });
});
