import type { HistorySink as BusHistorySink } from "@ioasid/bus";
import { events, history, vdcm } from "@ioasid/proto";
import type { HistorySink, VdevClearCause } from "../domain/ports.js";
import type { IoasidEventLike } from "../domain/vdcm-options.js";
import { DescriptorOp, type CompletionStatus, type Descriptor } from "../domain/descriptor-runner.js";
import { PasidSpace } from "../domain/submission.js";
import { WqMode, type EntryState } from "../domain/vdcm-model.js";
import type { DevicePasidEntry, DeviceView, MdevView, WqSpec } from "../domain/vdcm-views.js";

// Wire ↔ domain for VdcmService: enums both ways, views to messages. An UNSPECIFIED (or unknown)
// wire enum becomes undefined and the domain refuses it with INVALID_FIELD.

/** Work-queue modes from the wire (UNSPECIFIED and unknown values are absent). */
export const WQ_MODE_FROM_WIRE = new Map<number, WqMode>([
  [vdcm.WqMode.WQ_MODE_DEDICATED, WqMode.DEDICATED],
  [vdcm.WqMode.WQ_MODE_SHARED, WqMode.SHARED],
]);
/** Work-queue modes to the wire. */
export const WQ_MODE_TO_WIRE = { DEDICATED: vdcm.WqMode.WQ_MODE_DEDICATED, SHARED: vdcm.WqMode.WQ_MODE_SHARED } as const;
const OP_FROM_WIRE = new Map<number, DescriptorOp>([
  [vdcm.DescriptorOp.DESCRIPTOR_OP_NOOP, DescriptorOp.NOOP],
  [vdcm.DescriptorOp.DESCRIPTOR_OP_MEMMOVE, DescriptorOp.MEMMOVE],
  [vdcm.DescriptorOp.DESCRIPTOR_OP_FILL, DescriptorOp.FILL],
]);
const SPACE_FROM_WIRE = new Map<number, PasidSpace>([
  [vdcm.PasidSpace.PASID_SPACE_GUEST, PasidSpace.GUEST],
  [vdcm.PasidSpace.PASID_SPACE_HOST, PasidSpace.HOST],
]);
const STATUS_TO_WIRE = {
  SUCCESS: vdcm.CompletionStatus.COMPLETION_STATUS_SUCCESS,
  PAGE_REQUEST: vdcm.CompletionStatus.COMPLETION_STATUS_PAGE_REQUEST,
  DMA_FAULT: vdcm.CompletionStatus.COMPLETION_STATUS_DMA_FAULT,
} as const satisfies Record<CompletionStatus, vdcm.CompletionStatus>;
const ENTRY_STATE_TO_WIRE = {
  PROGRAMMED: vdcm.DevicePasidEntryState.DEVICE_PASID_ENTRY_STATE_PROGRAMMED,
  DRAINING: vdcm.DevicePasidEntryState.DEVICE_PASID_ENTRY_STATE_DRAINING,
} as const satisfies Record<EntryState, vdcm.DevicePasidEntryState>;

/** Work-queue specs from the wire (an UNSPECIFIED mode stays undefined: refused by the domain). */
export function toWqSpecs(wqs: readonly vdcm.WqSpec[]): WqSpec[] {
  return wqs.map((w) => ({ wqId: w.wqId, mode: WQ_MODE_FROM_WIRE.get(w.mode) as WqMode, size: w.size }));
}

/** A descriptor from the wire (an UNSPECIFIED op stays undefined: refused by the domain). */
export function toDescriptor(d: vdcm.Descriptor | undefined): Descriptor | undefined {
  if (d === undefined) return undefined;
  return { op: OP_FROM_WIRE.get(d.op) as DescriptorOp, srcAddress: d.srcAddress, dstAddress: d.dstAddress, size: d.size };
}

/** A PASID space from the wire; undefined for UNSPECIFIED. */
export function toPasidSpace(s: vdcm.PasidSpace): PasidSpace | undefined {
  return SPACE_FROM_WIRE.get(s);
}

/** A completion status to the wire. */
export function fromCompletionStatus(s: CompletionStatus): vdcm.CompletionStatus {
  return STATUS_TO_WIRE[s];
}

/** A device PASID entry to the wire. */
export function fromEntry(e: DevicePasidEntry): vdcm.DevicePasidEntry {
  return {
    hpasid: e.hpasid,
    generation: e.generation,
    gpasid: e.gpasid,
    setId: e.setId,
    wqId: e.wqId,
    mdevUuid: e.mdevUuid,
    state: ENTRY_STATE_TO_WIRE[e.state],
    programmedAt: e.programmedAt,
  };
}

/** A device to the wire. */
export function fromDevice(d: DeviceView): vdcm.Device {
  return {
    deviceId: d.deviceId,
    wqs: d.wqs.map((w) => ({ wqId: w.wqId, mode: WQ_MODE_TO_WIRE[w.mode], size: w.size, mdevUuids: [...w.mdevUuids], hpasid: w.hpasid })),
    maxPasidEntries: d.maxPasidEntries,
    pasidEntries: d.pasidEntries.map(fromEntry),
  };
}

/** An mdev to the wire. */
export function fromMdev(m: MdevView): vdcm.Mdev {
  return {
    mdevUuid: m.mdevUuid,
    parentDeviceId: m.parentDeviceId,
    wqIds: [...m.wqIds],
    setId: m.setId,
    createdAt: m.createdAt,
    assignedAt: m.assignedAt,
  };
}

/** The catalogue's word for each teardown cause of a device PASID entry. */
const VDEV_CLEAR_CAUSE_TO_WIRE: Readonly<Record<VdevClearCause, history.VdevClearCause>> = {
  mdev_clear: history.VdevClearCause.VDEV_CLEAR_CAUSE_MDEV_CLEAR,
  unassign: history.VdevClearCause.VDEV_CLEAR_CAUSE_UNASSIGN,
  FREE: history.VdevClearCause.VDEV_CLEAR_CAUSE_FREE,
  reconcile: history.VdevClearCause.VDEV_CLEAR_CAUSE_RECONCILE,
};

/** VDCM's history sink over a bus one (a HistoryRecorder behind the role's history gate): a clear's cause in the catalogue's words. */
export function toHistorySink(sink: Pick<BusHistorySink, "record">): HistorySink {
  return {
    record: (action, fields) =>
      sink.record(
        action.$case === "vdevClear" ? { $case: "vdevClear", value: { ...action.value, cause: VDEV_CLEAR_CAUSE_TO_WIRE[action.value.cause] } } : action,
        fields,
      ),
  };
}

/** A delivered IOASID event as VDCM's model reads it (it registers for FREE; anything else is named by its wire name). */
export function toVdcmEvent(e: events.IoasidEvent): IoasidEventLike {
  return {
    type: e.type === events.EventType.EVENT_TYPE_FREE ? "FREE" : events.eventTypeToJSON(e.type),
    seq: Number(e.seq),
    ioasid: e.ioasid,
    generation: e.generation,
    setId: e.setId,
    spid: e.spid,
  };
}
