import { DomainError, Code } from "@ioasid/errors";
import { events, history as h } from "@ioasid/proto";

/**
 * One step of the recorded history (proto `ioasid.history.v1.HistoryRecord`): what a component
 * did to an IOASID or to its own "hardware", as one case of the closed catalogue `action`. The
 * timeline (the kernel document's column table), the invariant checker and every verdict read it.
 */
export type HistoryRecord = h.HistoryRecord;

/** The action of a record: one case of the catalogue (`{ $case: "vmcsUpdate", value: {…} }`). */
export type HistoryAction = NonNullable<HistoryRecord["action"]>;

/** The name of a catalogue case, camelCase (`"vmcsUpdate"`); {@link actionName} gives the kernel's. */
export type HistoryActionCase = HistoryAction["$case"];

/** The typed fields of one catalogue case. */
export type HistoryActionValue<C extends HistoryActionCase> = Extract<HistoryAction, { $case: C }>["value"];

/**
 * What a recorder is given: a case of the catalogue and its fields, the ones left out taking their
 * proto defaults. A case outside the catalogue does not type-check (the catalogue is closed).
 */
export type HistoryActionInput = {
  [C in HistoryActionCase]: { readonly $case: C; readonly value: Partial<HistoryActionValue<C>> };
}[HistoryActionCase];

/** What a history record carries besides its time, component and action. */
export type HistoryFields = Partial<
  Pick<HistoryRecord, "ioasid" | "generation" | "setId" | "spid" | "refcount" | "seq" | "recovered" | "publisherSeq" | "incarnation" | "opSeq" | "after">
>;

/** A record whose action is given: every record read back or built here is one. */
export type TypedHistoryRecord<C extends HistoryActionCase = HistoryActionCase> = HistoryRecord & { readonly action: Extract<HistoryAction, { $case: C }> };

interface FromPartial<T> {
  fromPartial(object: Partial<T>): T;
}

/**
 * The message of each case: builds a case's value from the fields given. Typed over every case, so
 * a case added to the catalogue without its message here does not compile.
 */
const ACTION_MESSAGES: { readonly [C in HistoryActionCase]: FromPartial<HistoryActionValue<C>> } = {
  ioasidNotify: h.IoasidNotify,
  ioasidGet: h.ReferenceChange,
  ioasidPut: h.ReferenceChange,
  ioasidRegisterNotifier: h.NotifierRegistration,
  ioasidRegisterNotifierMm: h.NotifierRegistration,
  deliveryMissed: h.DeliveryMissed,
  deliveryAcked: h.DeliveryAcked,
  iommuProbeDevice: h.ProbeDevice,
  iommuReleaseDevice: h.ReleaseDevice,
  domainAlloc: h.DomainAlloc,
  domainFree: h.DomainFree,
  attachDevice: h.AttachHandle,
  attachDevicePasid: h.AttachHandle,
  detachDevice: h.AttachHandle,
  detachDevicePasid: h.AttachHandle,
  replaceGroupDomain: h.DomainReplace,
  replaceDevicePasid: h.DomainReplace,
  pasidEntrySet: h.PasidEntry,
  teardownPasid: h.PasidEntry,
  iotlbFlush: h.IotlbFlush,
  bindAdopted: h.BindAdopted,
  bindDropped: h.BindDropped,
  iommuNbHandler: h.NotifierHandled,
  svaBindDevice: h.SvaBond,
  svaUnbindDevice: h.SvaBond,
  mmRelease: h.MmRelease,
  iommuMap: h.DomainMap,
  iommuUnmap: h.DomainUnmap,
  guestMap: h.GuestMap,
  guestUnmap: h.GuestUnmap,
  iopfCreditsExhausted: h.IopfCreditsExhausted,
  iopfGroup: h.IopfGroup,
  bindGpasid: h.GpasidBind,
  unbindGpasid: h.GpasidUnbind,
  pageResponse: h.PageResponse,
  dmaFault: h.DmaFault,
  containerOpen: h.ContainerOpen,
  sessionAttach: h.ContainerRef,
  containerClose: h.ContainerClose,
  containerRelease: h.ContainerRef,
  deviceAssign: h.DeviceAssign,
  deviceUnassign: h.DeviceUnassign,
  vcmdAlloc: h.ContainerRef,
  vcmdFree: h.VcmdFree,
  vfioMapDma: h.VfioMapDma,
  vfioUnmapDma: h.VfioUnmapDma,
  viommuAlloc: h.ViommuAlloc,
  viommuDestroy: h.ViommuDestroy,
  vdeviceAlloc: h.VdeviceAlloc,
  vdeviceDestroy: h.VdeviceDestroy,
  veventqAlloc: h.VeventqAlloc,
  veventqDestroy: h.VeventqDestroy,
  faultSessionLost: h.FaultGroupRef,
  iopfNoHandler: h.IopfNoHandler,
  iopfRelay: h.IopfRelay,
  kvmCreateVm: h.KvmCreateVm,
  kvmRestoreVm: h.KvmRestoreVm,
  kvmDestroyVm: h.KvmDestroyVm,
  vmcsUpdate: h.VmcsUpdate,
  enqcmd: h.Enqcmd,
  kvmOrphanRelease: h.KvmOrphanRelease,
  vdevWrite: h.VdevWrite,
  vdevClear: h.VdevClear,
  submit: h.Submit,
  forceRelease: h.ForceRelease,
  allocatorChange: h.AllocatorChange,
  streamAdmin: h.StreamAdmin,
  chaosOp: h.ChaosOp,
  chaosFault: h.ChaosFault,
  chaosHeal: h.ChaosHeal,
  chaosNote: h.ChaosNote,
};

/** Every case of the catalogue. */
export const HISTORY_ACTION_CASES: readonly HistoryActionCase[] = Object.keys(ACTION_MESSAGES) as HistoryActionCase[];

/** The full value of an action given in part (unset fields take their proto defaults). */
export function completeAction(action: HistoryActionInput): HistoryAction {
  const fns = ACTION_MESSAGES[action.$case] as FromPartial<unknown>;
  return { $case: action.$case, value: fns.fromPartial(action.value) } as HistoryAction;
}

/** The numeric fields a record takes from its {@link HistoryFields} as they are. */
const NUMBER_FIELDS = ["ioasid", "generation", "setId", "spid", "refcount", "seq", "publisherSeq", "opSeq"] as const;

/** Builds one record: `who` did `action` at `ts`, about what `fields` name. */
export function createHistoryRecord(
  who: { readonly role: string; readonly instance: string },
  action: HistoryActionInput,
  fields: HistoryFields = {},
  ts: number = performance.timeOrigin + performance.now(),
): TypedHistoryRecord {
  const rec: HistoryRecord = { ts, role: who.role, instance: who.instance, recovered: false, incarnation: "", after: [], action: completeAction(action) };
  for (const k of NUMBER_FIELDS) if (fields[k] !== undefined) rec[k] = fields[k];
  if (fields.recovered === true) rec.recovered = true;
  if (fields.incarnation !== undefined) rec.incarnation = fields.incarnation;
  if (fields.after !== undefined && fields.after.length > 0) rec.after = fields.after.map((l) => ({ ...l }));
  return rec as TypedHistoryRecord;
}

/**
 * The action's name as the timeline shows it: the catalogue field's name, in the kernel's words
 * (`vmcs_update`, `ioasid_get`, `ioasid_notify`).
 */
export function actionName(r: HistoryRecord | HistoryAction | HistoryActionCase): string {
  const c = typeof r === "string" ? r : "$case" in r ? r.$case : r.action?.$case;
  return c === undefined ? "(no action)" : c.replace(/[A-Z]/g, (ch) => `_${ch.toLowerCase()}`);
}

/** The model's name of an event type ("ALLOC", "FREE", …). */
export function eventTypeName(type: events.EventType): string {
  // Asked for every delivery a role handles (its metrics) and every event recorded: remembered.
  let name = EVENT_TYPE_NAMES.get(type);
  if (name === undefined) EVENT_TYPE_NAMES.set(type, (name = events.eventTypeToJSON(type).replace(/^EVENT_TYPE_/, "")));
  return name;
}
const EVENT_TYPE_NAMES = new Map<events.EventType, string>();

/** The event type of a name ("FREE"). */
export function eventTypeOf(name: string): events.EventType {
  let type = EVENT_TYPES.get(name);
  if (type === undefined) {
    type = events.eventTypeFromJSON(`EVENT_TYPE_${name}`);
    if (type !== events.EventType.UNRECOGNIZED) EVENT_TYPES.set(name, type); // the model's names only
  }
  return type;
}
const EVENT_TYPES = new Map<string, events.EventType>();

/** The event a record reports ("ALLOC", "FREE", …) when it is an `ioasid_notify`, else undefined. */
export function eventOf(r: HistoryRecord): string | undefined {
  return r.action?.$case === "ioasidNotify" ? eventTypeName(r.action.value.type) : undefined;
}

/**
 * A record's step in one word, as traces and violations name it: the event an `ioasid_notify`
 * reports (`event:FREE`), else the catalogue's name ({@link actionName}).
 */
export function stepLabel(r: HistoryRecord): string {
  const e = eventOf(r);
  return e === undefined ? actionName(r) : `event:${e}`;
}

/** `a.$case === c`, narrowing the record. */
export function isAction<C extends HistoryActionCase>(r: HistoryRecord, c: C): r is TypedHistoryRecord<C> {
  return r.action?.$case === c;
}

const hex = (n: bigint | number) => `0x${n.toString(16)}`;

const VMCS_CLEAR_CAUSE: Record<h.VmcsClearCause, string> = {
  [h.VmcsClearCause.VMCS_CLEAR_CAUSE_UNSPECIFIED]: "?",
  [h.VmcsClearCause.VMCS_CLEAR_CAUSE_UNBIND]: "UNBIND",
  [h.VmcsClearCause.VMCS_CLEAR_CAUSE_FREE]: "FREE",
  [h.VmcsClearCause.VMCS_CLEAR_CAUSE_REPLACED]: "replaced by a later BIND",
  [h.VmcsClearCause.VMCS_CLEAR_CAUSE_VM_DESTROYED]: "VM destroyed",
  [h.VmcsClearCause.VMCS_CLEAR_CAUSE_RECONCILE]: "its reference is gone: restart reconcile",
  [h.VmcsClearCause.UNRECOGNIZED]: "?",
};

/** The words of a work queue's clear cause, as the VDCM says them. */
export const VDEV_CLEAR_CAUSE: Record<h.VdevClearCause, string> = {
  [h.VdevClearCause.VDEV_CLEAR_CAUSE_UNSPECIFIED]: "?",
  [h.VdevClearCause.VDEV_CLEAR_CAUSE_MDEV_CLEAR]: "mdev_clear",
  [h.VdevClearCause.VDEV_CLEAR_CAUSE_UNASSIGN]: "unassign",
  [h.VdevClearCause.VDEV_CLEAR_CAUSE_FREE]: "FREE",
  [h.VdevClearCause.VDEV_CLEAR_CAUSE_RECONCILE]: "reconcile",
  [h.VdevClearCause.UNRECOGNIZED]: "?",
};

/** The phase of a chaos operation in Jepsen's words ("invoke", "ok", "fail", "info"). */
export function chaosPhaseName(p: h.ChaosPhase): string {
  return h
    .chaosPhaseToJSON(p)
    .replace(/^CHAOS_PHASE_/, "")
    .toLowerCase();
}

/**
 * What a record says besides its name and IOASID fields, in the words the component uses: the
 * timeline's text, the checker's trace and the chaos report all show this. Undefined when the
 * action has nothing more to say (an event). One exhaustive switch over the catalogue: a case
 * added without its words does not compile.
 */
export function describeAction(r: HistoryRecord): string | undefined {
  const a = r.action;
  if (a === undefined) return undefined;
  switch (a.$case) {
    case "ioasidNotify":
      return undefined;
    case "ioasidGet":
    case "ioasidPut": {
      const x = a.value.holder;
      return `${x?.role ?? ""}/${x?.instance ?? ""}/${x?.purpose ?? ""}`;
    }
    case "ioasidRegisterNotifier":
    case "ioasidRegisterNotifierMm": {
      const v = a.value;
      const s = v.scope;
      const scope = s === undefined || s.$case === "global" ? "global" : s.$case === "scopeSetId" ? `set ${s.value}` : `mm ${s.value}`;
      return `${v.subscriber}/${v.instance} ${scope} priority ${v.priority}${v.pending ? " (pending)" : ""}`;
    }
    case "deliveryMissed":
      return `${a.value.subscriber}/${a.value.instance} ${eventTypeName(a.value.type)}`;
    case "deliveryAcked": {
      const v = a.value;
      return `${v.subscriber}/${v.instance} ${eventTypeName(v.type)}${v.releases.length === 0 ? "" : ` releases ${v.releases.join(",")}`}${v.late ? " (late)" : ""}`;
    }
    case "iommuProbeDevice": {
      const v = a.value;
      return `device ${v.device} ${v.function} max_pasids ${v.maxPasids} group ${v.iommuGroup}`;
    }
    case "iommuReleaseDevice":
      return `device ${a.value.device}: ${a.value.handles} handle(s) torn down, ${a.value.answeredFaultGroups} fault group(s) answered INVALID`;
    case "domainAlloc":
      return `domain ${a.value.domain} ${a.value.domainType}`;
    case "domainFree":
      return `domain ${a.value.domain}`;
    case "attachDevice":
    case "attachDevicePasid":
    case "detachDevice":
    case "detachDevicePasid":
      return `device ${a.value.device} handle ${a.value.handle} domain ${a.value.domain} owner ${a.value.owner}`;
    case "replaceGroupDomain":
    case "replaceDevicePasid": {
      const v = a.value;
      const n = v.answeredFaultGroups;
      return `device ${v.device} domain ${v.oldDomain} → ${v.domain} (handle ${v.oldHandle} → ${v.handle}) owner ${v.owner}${n > 0 ? `, ${n} fault group(s) answered INVALID` : ""}`;
    }
    case "pasidEntrySet":
      return `device ${a.value.device} handle ${a.value.handle} domain ${a.value.domain} ${a.value.domainType}`;
    case "teardownPasid":
      return `device ${a.value.device} handle ${a.value.handle} domain ${a.value.domain} ${a.value.domainType} (${a.value.cause})`;
    case "iotlbFlush": {
      const f = a.value;
      return `${f.scope} ${f.cause} domain ${f.domain} device ${f.device}${f.devtlb ? " +devtlb" : ""}${f.scope === "RANGE" ? ` ${hex(f.address)}+${hex(f.size)}` : ""}`;
    }
    case "bindAdopted":
      return a.value.keptWithoutReference ? "reference the core recorded for a bind kept without it" : "reference held before a restart";
    case "bindDropped":
      return "after a restart: the core no longer records this bind's reference";
    case "iommuNbHandler": {
      const v = a.value;
      const n = v.tornDown;
      return `${eventTypeName(v.type)}: ${n} entr${n === 1 ? "y" : "ies"} torn down${v.drainedFaultGroups > 0 ? `, ${v.drainedFaultGroups} fault group(s) drained` : ""}${v.bindReferenceReleased ? ", bind reference released" : ""}`;
    }
    case "svaBindDevice":
    case "svaUnbindDevice":
      return `device ${a.value.device} mm ${a.value.mmToken} users ${a.value.users}`;
    case "mmRelease":
      return `mm ${a.value.mmToken}: ${a.value.bonds} bond(s) torn down, PASID freed`;
    case "iommuMap":
      return `domain ${a.value.domain} iova ${hex(a.value.iova)} size ${hex(a.value.size)}`;
    case "iommuUnmap":
      return `domain ${a.value.domain} iova ${hex(a.value.iova)} size ${hex(a.value.size)}: ${hex(a.value.unmapped)} unmapped`;
    case "guestMap":
      return `gva ${hex(a.value.gva)} gpa ${hex(a.value.gpa)} size ${hex(a.value.size)}`;
    case "guestUnmap":
      return `gva ${hex(a.value.gva)} size ${hex(a.value.size)}: ${hex(a.value.unmapped)} unmapped`;
    case "iopfCreditsExhausted": {
      const v = a.value;
      return `device ${v.device} ${hex(v.address)}: no page-request credit left${v.answeredGroup === undefined ? "" : `, group ${v.answeredGroup} answered INVALID`}`;
    }
    case "iopfGroup": {
      const v = a.value;
      return `group ${v.group} device ${v.device} prgi ${v.prgi}: ${v.requests} request(s) → ${v.owner}`;
    }
    case "bindGpasid": {
      const v = a.value;
      return v.container === undefined
        ? `device ${v.device} handle ${v.handle}${v.first ? " first bind" : ""}`
        : `container ${v.container} ${v.deviceKind} ${v.device} handle ${v.handle}${v.first ? " first" : ""}`;
    }
    case "unbindGpasid": {
      const v = a.value;
      return v.container === undefined
        ? `device ${v.device} handle ${v.handle}${v.last ? " last unbind" : ""}`
        : `container ${v.container} ${v.deviceKind} ${v.device}${v.unassign ? " (unassign)" : ""}${v.last ? " last" : ""}`;
    }
    case "pageResponse": {
      const v = a.value;
      return v.container === undefined
        ? `group ${v.group} device ${v.device} prgi ${v.prgi}: ${v.code} (${v.source})`
        : `container ${v.container} group ${v.group}: ${v.code}`;
    }
    case "dmaFault": {
      const v = a.value;
      if (v.container !== undefined) return `container ${v.container} ${v.reason} ${hex(v.address)}${v.noHandler ? ": no watcher" : ""}`;
      const outcome = v.suppressed !== undefined ? `suppressed (${v.suppressed})` : v.noHandler ? "no handler" : `reported to ${v.reportedTo}`;
      return `device ${v.device} ${hex(v.address)} ${v.reason}: ${outcome}`;
    }
    case "containerOpen": {
      const v = a.value;
      const memory = v.guestMemory.map((r) => `${hex(r.paddr)}+${hex(r.size)}`).join(",");
      return `container ${v.container} mm_token ${v.mmToken} quota ${v.quota}${v.vmName === "" ? "" : ` vm ${v.vmName}`} grace ${v.graceMs}ms${memory === "" ? "" : ` hpa ${memory}`}`;
    }
    case "sessionAttach":
    case "containerRelease":
    case "vcmdAlloc":
      return `container ${a.value.container}`;
    case "containerClose": {
      const v = a.value;
      return `container ${v.container} reason ${v.reason} freed ${v.freed}${v.unassigning === 0 ? "" : ` unassigning ${v.unassigning}`}`;
    }
    case "deviceAssign": {
      const v = a.value;
      return `container ${v.container} ${v.deviceKind} ${v.device}${v.parent === "" ? "" : ` on ${v.parent}`}`;
    }
    case "deviceUnassign": {
      const v = a.value;
      return `container ${v.container} ${v.deviceKind} ${v.device}${v.teardown ? " (teardown)" : ` unbound ${v.unbound}`}`;
    }
    case "vcmdFree":
      return `container ${a.value.container} ${a.value.outcome}`;
    case "vfioMapDma":
      return `container ${a.value.container} gpa ${hex(a.value.gpa)} -> hpa ${hex(a.value.hpa)} size ${hex(a.value.size)}`;
    case "vfioUnmapDma":
      return `container ${a.value.container} gpa ${hex(a.value.gpa)} size ${hex(a.value.size)}`;
    case "viommuAlloc":
      return `container ${a.value.container} viommu ${a.value.viommu} via ${a.value.device} over domain ${a.value.parentDomain}`;
    case "viommuDestroy":
      return `container ${a.value.container} viommu ${a.value.viommu}${a.value.teardown ? " (teardown)" : ""}`;
    case "vdeviceAlloc":
      return `container ${a.value.container} viommu ${a.value.viommu} vdevice ${a.value.vdevice} ${a.value.device} virt_id ${hex(a.value.virtId)}`;
    case "vdeviceDestroy": {
      const v = a.value;
      return `container ${v.container} viommu ${v.viommu} vdevice ${v.vdevice}${v.teardown ? " (teardown)" : v.unassign ? " (unassign)" : ""}`;
    }
    case "veventqAlloc":
      return `container ${a.value.container} viommu ${a.value.viommu} veventq ${a.value.veventq} depth ${a.value.depth}`;
    case "veventqDestroy":
      return `container ${a.value.container} viommu ${a.value.viommu} veventq ${a.value.veventq}${a.value.teardown ? " (teardown)" : ""}`;
    case "faultSessionLost":
      return `container ${a.value.container} group ${a.value.group}: the VMM went away, answered INVALID`;
    case "iopfNoHandler":
      return `group ${a.value.group}: ${a.value.why}, answered FAILURE`;
    case "iopfRelay":
      return `container ${a.value.container} group ${a.value.group}: ${a.value.requests} request(s)`;
    case "kvmCreateVm": {
      const v = a.value;
      return `mm token ${v.mmToken}, ${v.vcpus} vCPU(s), registration ${v.registration} ${v.active ? "ACTIVE" : "PENDING"}`;
    }
    case "kvmRestoreVm":
      return `VM ${a.value.vmId} back after a KVM restart with ${a.value.translations} translation(s)`;
    case "kvmDestroyVm": {
      const v = a.value;
      return v.earlierRegistration === undefined
        ? `${v.cleared} translation(s) cleared, ${v.dropped} reference(s) dropped`
        : `VM of an earlier KVM process: registration ${v.earlierRegistration} withdrawn, ${v.dropped} reference(s) dropped`;
    }
    case "vmcsUpdate": {
      const v = a.value;
      return v.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL
        ? `install gpasid ${v.gpasid} → hpasid ${v.hpasid}`
        : `clear gpasid ${v.gpasid} → hpasid ${v.hpasid} (${VMCS_CLEAR_CAUSE[v.cause]})`;
    }
    case "enqcmd": {
      const v = a.value;
      const msr = `0x${(v.ia32Pasid >>> 0).toString(16).padStart(8, "0")}`;
      return `vcpu ${v.vcpu} ia32_pasid ${msr}: ${v.translated ? `TRANSLATED gpasid ${v.gpasid} → hpasid ${v.hpasid}` : `#GP ${v.gpCause}, nothing submitted`}`;
    }
    case "kvmOrphanRelease":
      return `${r.instance}/${a.value.purpose}: the VM is gone`;
    case "vdevWrite":
      return `device ${a.value.device} wq ${a.value.wq} mdev ${a.value.mdev} mdev_write(${a.value.gpasid})`;
    case "vdevClear":
      return `device ${a.value.device} wq ${a.value.wq} mdev ${a.value.mdev} ${VDEV_CLEAR_CAUSE[a.value.cause]}`;
    case "submit": {
      const v = a.value;
      const where = `device ${v.device} wq ${v.wq} mdev ${v.mdev}`;
      return v.dropped
        ? `${where}: dropped, ${v.pasidSpace} PASID ${v.pasid} untranslatable (${v.reason})`
        : `${where}: ${v.op} ${v.status} (${v.bytes} bytes)`;
    }
    case "forceRelease": {
      const v = a.value;
      const refs = v.references.map((x) => `${x.ioasid}/${x.generation} set ${x.setId} ${x.purpose} ×${x.count}`).join(", ");
      const by = [v.operator === "" ? undefined : `by ${v.operator}`, v.onBehalfOf === "" ? undefined : `for ${v.onBehalfOf}`]
        .filter((x) => x !== undefined)
        .join(" ");
      return `holder ${v.holder}: ${v.reason}${refs === "" ? "" : ` (${refs})`}${by === "" ? "" : ` ${by}`}`;
    }
    case "allocatorChange": {
      const v = a.value;
      const what = v.registered ? `registered allocator ${v.name} at ${v.address}` : `unregistered allocator ${v.name}`;
      return `${v.operator} ${what}${v.reason === "" ? "" : `: ${v.reason}`}${v.onBehalfOf === "" ? "" : ` (for ${v.onBehalfOf})`}`;
    }
    case "streamAdmin": {
      const v = a.value;
      return `${v.api} ${v.stream} by ${v.user === "" ? "an operator credential" : `user ${v.user}`}: ${v.ok ? "done" : `refused (${v.error})`}`;
    }
    case "chaosOp": {
      const v = a.value;
      return `${chaosPhaseName(v.phase)} ${v.op} op ${v.opId}${v.vm === undefined ? "" : ` vm ${v.vm}`}${v.latencyMs === undefined ? "" : ` (${v.latencyMs} ms)`}${v.error === undefined ? "" : ` ${v.error}`}`;
    }
    case "chaosFault": {
      const v = a.value;
      const extras = [
        v.faultId === undefined ? undefined : `fault ${v.faultId}`,
        v.link === undefined ? undefined : `link ${v.link}`,
        v.latencyMs === undefined ? undefined : `latency ${v.latencyMs} ms`,
        v.jitterMs === undefined ? undefined : `jitter ${v.jitterMs} ms`,
        v.probability === undefined ? undefined : `p ${v.probability}`,
        v.cause === undefined ? undefined : `cause ${v.cause}`,
        v.node === undefined ? undefined : `node ${v.node}`,
      ].filter((x) => x !== undefined);
      return `${v.fault} ${v.target}${extras.length === 0 ? "" : ` (${extras.join(", ")})`}`;
    }
    case "chaosHeal":
      return a.value.faultId === undefined ? "heal all" : `heal fault ${a.value.faultId}`;
    case "chaosNote":
      return a.value.note;
  }
}

/**
 * The refusal of a history that is not in this catalogue's format: records written before the
 * typed catalogue (JSON), or a record whose action this reader does not know.
 */
export function historyFormatError(where: string, why: string): DomainError {
  return new DomainError(Code.FAILED_PRECONDITION, "HISTORY_FORMAT_UNSUPPORTED", `${where}: ${why}`);
}

/**
 * A record read back: refused (never skipped) when its action is unset or not in this catalogue.
 * @throws DomainError FAILED_PRECONDITION `HISTORY_FORMAT_UNSUPPORTED`
 */
export function checkHistoryRecord(r: HistoryRecord, where: string): TypedHistoryRecord {
  if (r.action === undefined || !(r.action.$case in ACTION_MESSAGES)) {
    throw historyFormatError(where, `a ${r.role}/${r.instance} record at ${r.ts} has no action this catalogue knows (written by a newer version, or corrupt)`);
  }
  return r as TypedHistoryRecord;
}

/** One record as a line of a history.jsonl file (the proto3 JSON mapping). */
export function historyRecordToJson(r: HistoryRecord): string {
  return JSON.stringify(h.HistoryRecord.toJSON(r));
}

/**
 * Reads a history.jsonl file's text (one record a line, the proto3 JSON mapping).
 * @throws DomainError FAILED_PRECONDITION `HISTORY_FORMAT_UNSUPPORTED` for a line of the old
 * format (an `action` string) or a record whose action is unset or unknown
 */
export function parseHistoryJsonl(text: string, file = "history.jsonl"): TypedHistoryRecord[] {
  const out: TypedHistoryRecord[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === "") continue;
    const where = `${file}:${i + 1}`;
    let o: unknown;
    try {
      o = JSON.parse(line);
    } catch {
      throw historyFormatError(where, "not JSON");
    }
    if (o !== null && typeof o === "object" && typeof (o as { action?: unknown }).action === "string") {
      throw historyFormatError(
        where,
        "a record of the old format (an action string with a free-text detail), from before the typed history catalogue: record the run again",
      );
    }
    out.push(checkHistoryRecord(h.HistoryRecord.fromJSON(o), where));
  }
  return out;
}
