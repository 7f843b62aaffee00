import type { HistoryActionInput, HistorySink as BusHistorySink } from "@ioasid/bus";
import { events, history, kvm as kvmProto } from "@ioasid/proto";
import { GpCause } from "../domain/ia32-pasid.js";
import { KvmEventType, type KvmEvent } from "../domain/kvm-event.js";
import { VmcsClearCause, VmcsUpdateKind, type HistorySink, type KvmHistoryAction } from "../domain/kvm-history.js";
import type { EnqcmdResult } from "../domain/kvm.js";
import type { VmSnapshot } from "../domain/vm-snapshot.js";

// KVM's conversions between the domain and the wire (DESIGN §2: the domain knows no proto).

const REGISTRATION_STATE = {
  PENDING: kvmProto.RegistrationState.REGISTRATION_STATE_PENDING,
  ACTIVE: kvmProto.RegistrationState.REGISTRATION_STATE_ACTIVE,
} as const;

const GP_CAUSE = {
  [GpCause.PASID_NOT_VALID]: kvmProto.GpCause.GP_CAUSE_PASID_NOT_VALID,
  [GpCause.RESERVED_BITS]: kvmProto.GpCause.GP_CAUSE_RESERVED_BITS,
  [GpCause.NO_TRANSLATION]: kvmProto.GpCause.GP_CAUSE_NO_TRANSLATION,
} as const;

const EVENT_TYPE: ReadonlyMap<events.EventType, KvmEventType> = new Map([
  [events.EventType.EVENT_TYPE_BIND, KvmEventType.BIND],
  [events.EventType.EVENT_TYPE_UNBIND, KvmEventType.UNBIND],
  [events.EventType.EVENT_TYPE_FREE, KvmEventType.FREE],
]);

/** A bus event as the KVM domain sees it. */
export function toKvmEvent(e: events.IoasidEvent): KvmEvent {
  return { seq: e.seq, type: EVENT_TYPE.get(e.type) ?? KvmEventType.OTHER, ioasid: e.ioasid, generation: e.generation, spid: e.spid, setId: e.setId };
}

/** A VM snapshot on the wire. */
export function toVm(s: VmSnapshot): kvmProto.Vm {
  return kvmProto.Vm.fromPartial({
    vmId: s.vmId,
    mmToken: s.mmToken,
    vmName: s.vmName,
    vcpuCount: s.vcpuCount,
    registration: REGISTRATION_STATE[s.registration],
    setId: s.setId,
    translations: s.translations.map((t) => ({
      gpasid: t.gpasid,
      hpasid: t.hpasid,
      generation: t.generation,
      bindEventSeq: t.bindSeq,
      installedAt: t.installedAt,
    })),
    referencesHeld: s.referencesHeld,
    createdAt: s.createdAt,
  });
}

/** An ENQCMD outcome on the wire. */
export function toEnqcmdResponse(r: EnqcmdResult): kvmProto.EnqcmdResponse {
  return r.outcome === "TRANSLATED"
    ? kvmProto.EnqcmdResponse.fromPartial({
        outcome: kvmProto.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED,
        gpasid: r.gpasid,
        hpasid: r.hpasid,
        generation: r.generation,
      })
    : kvmProto.EnqcmdResponse.fromPartial({ outcome: kvmProto.EnqcmdOutcome.ENQCMD_OUTCOME_GP, gpasid: r.gpasid, gpCause: GP_CAUSE[r.cause] });
}

const VMCS_UPDATE_KIND = {
  [VmcsUpdateKind.INSTALL]: history.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL,
  [VmcsUpdateKind.CLEAR]: history.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR,
} as const satisfies Record<VmcsUpdateKind, history.VmcsUpdateKind>;

const VMCS_CLEAR_CAUSE = {
  [VmcsClearCause.UNBIND]: history.VmcsClearCause.VMCS_CLEAR_CAUSE_UNBIND,
  [VmcsClearCause.FREE]: history.VmcsClearCause.VMCS_CLEAR_CAUSE_FREE,
  [VmcsClearCause.REPLACED]: history.VmcsClearCause.VMCS_CLEAR_CAUSE_REPLACED,
  [VmcsClearCause.VM_DESTROYED]: history.VmcsClearCause.VMCS_CLEAR_CAUSE_VM_DESTROYED,
  [VmcsClearCause.RECONCILE]: history.VmcsClearCause.VMCS_CLEAR_CAUSE_RECONCILE,
} as const satisfies Record<VmcsClearCause, history.VmcsClearCause>;

/** A KVM history action in the catalogue's words (ioasid.history.v1): `vmcsUpdate`'s kind and cause become its enums. */
export function toHistoryAction(a: KvmHistoryAction): HistoryActionInput {
  if (a.$case !== "vmcsUpdate") return a;
  const { kind, gpasid, hpasid, cause } = a.value;
  return { $case: "vmcsUpdate", value: { kind: VMCS_UPDATE_KIND[kind], gpasid, hpasid, ...(cause === undefined ? {} : { cause: VMCS_CLEAR_CAUSE[cause] }) } };
}

/** The domain's history sink over a bus one (a HistoryRecorder behind the role's history gate). */
export function toHistorySink(sink: Pick<BusHistorySink, "record">): HistorySink {
  return { record: (action, fields) => sink.record(toHistoryAction(action), fields) };
}
