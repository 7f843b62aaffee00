import { requireField } from "@ioasid/bus";
import { iommu } from "@ioasid/proto";
import { invalidField } from "../domain/iommu-errors.js";
import { FaultReason } from "../domain/iommu-hardware.js";
import { VeventqType, type Vdevice, type Veventq, type VeventqItem, type Viommu } from "../domain/viommu.js";
import { fromAccess, fromFaultReason, toAccess } from "./convert.js";

// Translations between the wire (ioasid.iommu.v1 vIOMMU messages) and the vIOMMU model
// (domain/viommu.ts), for the service and for the kept state.

const VEVENTQ_TYPES = new Map<iommu.VeventqType, VeventqType>([[iommu.VeventqType.VEVENTQ_TYPE_DMA_FAULT, VeventqType.DMA_FAULT]]);
const VEVENTQ_TYPES_WIRE = new Map([...VEVENTQ_TYPES].map(([k, v]) => [v, k]));
const FAULT_REASONS = new Map(Object.values(FaultReason).map((r) => [fromFaultReason(r), r]));

/** Wire vEVENTQ type → domain, or undefined when UNSPECIFIED or unknown. */
export function veventqTypeOf(t: iommu.VeventqType): VeventqType | undefined {
  return VEVENTQ_TYPES.get(t);
}

/** Wire vEVENTQ type → domain. @throws INVALID_FIELD `type` */
export function toVeventqType(t: iommu.VeventqType): VeventqType {
  const d = veventqTypeOf(t);
  if (d === undefined) throw invalidField("type", "type is required: DMA_FAULT");
  return d;
}

/** Domain vEVENTQ type → wire. */
export function fromVeventqType(t: VeventqType): iommu.VeventqType {
  return VEVENTQ_TYPES_WIRE.get(t)!;
}

/** Domain vIOMMU → wire. */
export function fromViommu(v: Viommu): iommu.Viommu {
  return {
    viommuId: v.viommuId,
    deviceId: v.deviceId,
    parentDomainId: v.parentDomainId,
    owner: v.owner,
    nestedDomainIds: [...v.nestedDomainIds],
    vdeviceCount: v.vdeviceCount,
    veventqCount: v.veventqCount,
    createdAt: v.createdAt,
  };
}

/** Domain vdevice → wire. */
export function fromVdevice(d: Vdevice): iommu.Vdevice {
  return { vdeviceId: d.vdeviceId, viommuId: d.viommuId, deviceId: d.deviceId, virtId: d.virtId };
}

/** Domain vEVENTQ → wire. */
export function fromVeventq(q: Veventq): iommu.Veventq {
  return {
    veventqId: q.veventqId,
    viommuId: q.viommuId,
    type: fromVeventqType(q.type),
    depth: q.depth,
    queuedEvents: q.queuedEvents,
    nextSequence: q.nextSequence,
    lostEvents: q.lostEvents,
  };
}

/** Domain vEVENTQ item → wire. */
export function fromVeventqItem(it: VeventqItem): iommu.VeventqItem {
  if (it.kind === "lostEvents") return { item: { $case: "lostEvents", value: { firstSequence: it.firstSequence, count: it.count } } };
  const e = it.event;
  return {
    item: {
      $case: "event",
      value: {
        sequence: e.sequence,
        virtId: e.virtId,
        pasid: e.pasid,
        withoutPasid: e.withoutPasid,
        address: e.address,
        access: fromAccess(e.access),
        reason: fromFaultReason(e.reason),
        at: e.at,
      },
    },
  };
}

/**
 * Wire vEVENTQ item → domain (the kept state's).
 * @throws Error when its kind, reason or time is missing (the store refuses it at start)
 */
export function toVeventqItem(m: iommu.VeventqItem): VeventqItem {
  const item = requireField(m.item, "VeventqItem.item");
  if (item.$case === "lostEvents") return { kind: "lostEvents", firstSequence: item.value.firstSequence, count: item.value.count };
  const e = item.value;
  return {
    kind: "event",
    event: {
      sequence: e.sequence,
      virtId: e.virtId,
      pasid: e.pasid,
      withoutPasid: e.withoutPasid,
      address: e.address,
      access: toAccess(e.access),
      reason: requireField(FAULT_REASONS.get(e.reason), "Vevent.reason"),
      at: requireField(e.at, "Vevent.at"),
    },
  };
}
