import { iommu } from "@ioasid/proto";
import { invalidField } from "../domain/iommu-errors.js";
import {
  AttachKind,
  DeviceFunction,
  DomainType,
  FaultReason,
  FlushCause,
  FlushScope,
  type AttachHandle,
  type DeviceSpec,
  type DeviceView,
  type DmaAccess,
  type Domain,
  type IotlbFlush,
  type Mapping,
  type PasidEntry,
  type SvaBond,
} from "../domain/iommu-hardware.js";
import { GroupState, PageResponseCode, ResponseSource, type FaultGroup } from "../domain/page-requests.js";
import type { FaultRecord } from "../domain/fault-handlers.js";
import { FailNthOperation } from "../domain/fail-nth.js";

// Translations between the wire (ts-proto types of ioasid.iommu.v1) and the domain model. An
// UNSPECIFIED or unknown enum is refused with INVALID_FIELD naming the field.

const W = iommu;

/** Domain types from the wire (UNSPECIFIED and unknown values are absent). */
export const DOMAIN_TYPES = new Map<iommu.DomainType, DomainType>([
  [W.DomainType.DOMAIN_TYPE_PAGING, DomainType.PAGING],
  [W.DomainType.DOMAIN_TYPE_SVA, DomainType.SVA],
  [W.DomainType.DOMAIN_TYPE_NESTED, DomainType.NESTED],
]);
/** Domain types to the wire. */
export const DOMAIN_TYPES_WIRE = new Map([...DOMAIN_TYPES].map(([k, v]) => [v, k]));

/** Attach kinds to the wire. */
export const ATTACH_KINDS_WIRE = new Map<AttachKind, iommu.AttachKind>([
  [AttachKind.DOMAIN, W.AttachKind.ATTACH_KIND_DOMAIN],
  [AttachKind.GPASID_BIND, W.AttachKind.ATTACH_KIND_GPASID_BIND],
  [AttachKind.SVA_BIND, W.AttachKind.ATTACH_KIND_SVA_BIND],
]);

const FLUSH_SCOPES_WIRE = new Map<FlushScope, iommu.IotlbFlushScope>([
  [FlushScope.GLOBAL, W.IotlbFlushScope.IOTLB_FLUSH_SCOPE_GLOBAL],
  [FlushScope.DOMAIN, W.IotlbFlushScope.IOTLB_FLUSH_SCOPE_DOMAIN],
  [FlushScope.PASID, W.IotlbFlushScope.IOTLB_FLUSH_SCOPE_PASID],
  [FlushScope.RANGE, W.IotlbFlushScope.IOTLB_FLUSH_SCOPE_RANGE],
]);

const FLUSH_CAUSES_WIRE = new Map<FlushCause, iommu.IotlbFlushCause>([
  [FlushCause.UNMAP, W.IotlbFlushCause.IOTLB_FLUSH_CAUSE_UNMAP],
  [FlushCause.DETACH, W.IotlbFlushCause.IOTLB_FLUSH_CAUSE_DETACH],
  [FlushCause.IOASID_FREE, W.IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE],
  [FlushCause.DEVICE_REMOVED, W.IotlbFlushCause.IOTLB_FLUSH_CAUSE_DEVICE_REMOVED],
  [FlushCause.MM_RELEASE, W.IotlbFlushCause.IOTLB_FLUSH_CAUSE_MM_RELEASE],
  [FlushCause.REPLACE, W.IotlbFlushCause.IOTLB_FLUSH_CAUSE_REPLACE],
]);

const FAULT_REASONS_WIRE = new Map<FaultReason, iommu.FaultReason>([
  [FaultReason.NO_PASID_ENTRY, W.FaultReason.FAULT_REASON_NO_PASID_ENTRY],
  [FaultReason.NOT_PRESENT, W.FaultReason.FAULT_REASON_NOT_PRESENT],
  [FaultReason.PERMISSION, W.FaultReason.FAULT_REASON_PERMISSION],
  [FaultReason.PASID_OUT_OF_RANGE, W.FaultReason.FAULT_REASON_PASID_OUT_OF_RANGE],
  [FaultReason.PRI_CREDITS_EXHAUSTED, W.FaultReason.FAULT_REASON_PRI_CREDITS_EXHAUSTED],
]);

const RESPONSE_CODES = new Map<iommu.PageResponseCode, PageResponseCode>([
  [W.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS, PageResponseCode.SUCCESS],
  [W.PageResponseCode.PAGE_RESPONSE_CODE_INVALID, PageResponseCode.INVALID],
  [W.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE, PageResponseCode.FAILURE],
]);
const RESPONSE_CODES_WIRE = new Map([...RESPONSE_CODES].map(([k, v]) => [v, k]));

const RESPONSE_SOURCES_WIRE = new Map<ResponseSource, iommu.PageResponseSource>([
  [ResponseSource.HANDLER, W.PageResponseSource.PAGE_RESPONSE_SOURCE_HANDLER],
  [ResponseSource.NO_HANDLER, W.PageResponseSource.PAGE_RESPONSE_SOURCE_NO_HANDLER],
  [ResponseSource.DETACH, W.PageResponseSource.PAGE_RESPONSE_SOURCE_DETACH],
  [ResponseSource.DEVICE_REMOVED, W.PageResponseSource.PAGE_RESPONSE_SOURCE_DEVICE_REMOVED],
  [ResponseSource.IOASID_FREED, W.PageResponseSource.PAGE_RESPONSE_SOURCE_IOASID_FREED],
  [ResponseSource.TIMEOUT, W.PageResponseSource.PAGE_RESPONSE_SOURCE_TIMEOUT],
  [ResponseSource.CREDITS_EXHAUSTED, W.PageResponseSource.PAGE_RESPONSE_SOURCE_CREDITS_EXHAUSTED],
  [ResponseSource.REPLACE, W.PageResponseSource.PAGE_RESPONSE_SOURCE_REPLACE],
]);

/** Fault group states to the wire. */
export const GROUP_STATES_WIRE = new Map<GroupState, iommu.FaultGroupState>([
  [GroupState.PARTIAL, W.FaultGroupState.FAULT_GROUP_STATE_PARTIAL],
  [GroupState.PENDING, W.FaultGroupState.FAULT_GROUP_STATE_PENDING],
  [GroupState.RESPONDED, W.FaultGroupState.FAULT_GROUP_STATE_RESPONDED],
]);

/** Wire page response code → domain. @throws INVALID_FIELD `code` */
export function toResponseCode(c: iommu.PageResponseCode): PageResponseCode {
  const d = RESPONSE_CODES.get(c);
  if (d === undefined) throw invalidField("code", "code is required: SUCCESS, INVALID or FAILURE");
  return d;
}

/** Domain page response code → wire. */
export function fromResponseCode(c: PageResponseCode | undefined): iommu.PageResponseCode {
  return c === undefined ? W.PageResponseCode.PAGE_RESPONSE_CODE_UNSPECIFIED : RESPONSE_CODES_WIRE.get(c)!;
}

/** Domain response source → wire. */
export function fromResponseSource(s: ResponseSource | undefined): iommu.PageResponseSource {
  return s === undefined ? W.PageResponseSource.PAGE_RESPONSE_SOURCE_UNSPECIFIED : RESPONSE_SOURCES_WIRE.get(s)!;
}

/** Domain page request → wire (in a fault group, and in the IOMMU's kept state). */
export function fromPageRequest(r: FaultGroup["requests"][number]): iommu.PageRequest {
  return {
    deviceId: r.deviceId,
    pasid: r.pasid,
    withoutPasid: r.withoutPasid,
    address: r.address,
    access: fromAccess(r.access),
    prgi: r.prgi,
    lastRequest: r.lastRequest,
    receivedAt: r.receivedAt,
  };
}

/** Domain fault group → wire. */
export function fromFaultGroup(g: FaultGroup): iommu.FaultGroup {
  return {
    faultGroupId: g.faultGroupId,
    deviceId: g.deviceId,
    pasid: g.pasid,
    withoutPasid: g.withoutPasid,
    prgi: g.prgi,
    requests: g.requests.map(fromPageRequest),
    handleId: g.handleId,
    domainId: g.domainId,
    owner: g.owner,
    ownerData: toBuffer(g.ownerData),
    setId: g.setId,
    gpasid: g.gpasid,
    state: GROUP_STATES_WIRE.get(g.state)!,
    responseCode: fromResponseCode(g.responseCode),
    responseSource: fromResponseSource(g.responseSource),
    createdAt: g.createdAt,
    deadline: g.deadline,
    respondedAt: g.respondedAt,
  };
}

/** Domain fault record → wire. */
export function fromFaultRecord(f: FaultRecord): iommu.FaultRecord {
  return {
    faultId: f.faultId,
    deviceId: f.deviceId,
    pasid: f.pasid,
    withoutPasid: f.withoutPasid,
    address: f.address,
    access: fromAccess(f.access),
    reason: fromFaultReason(f.reason),
    handleId: f.handleId,
    owner: f.owner,
    ownerData: toBuffer(f.ownerData),
    setId: f.setId,
    gpasid: f.gpasid,
    at: f.at,
  };
}

/** Wire domain type → domain. @throws INVALID_FIELD `type` */
export function toDomainType(t: iommu.DomainType): DomainType {
  const d = DOMAIN_TYPES.get(t);
  if (d === undefined) throw invalidField("type", "type is required: PAGING, SVA or NESTED");
  return d;
}

/** A RegisterDeviceRequest → the device spec. @throws INVALID_FIELD `function` */
export function toDeviceSpec(req: iommu.RegisterDeviceRequest): DeviceSpec {
  let fn: DeviceFunction;
  if (req.function === W.DeviceFunction.DEVICE_FUNCTION_PF) fn = DeviceFunction.PF;
  else if (req.function === W.DeviceFunction.DEVICE_FUNCTION_VF) fn = DeviceFunction.VF;
  else throw invalidField("function", "function is required: PF or VF");
  return {
    deviceId: req.deviceId,
    maxPasids: req.maxPasids,
    priCapable: req.priCapable,
    function: fn,
    parentDeviceId: req.parentDeviceId,
    iommuGroup: req.iommuGroup,
    priCredits: req.priCredits,
  };
}

/** Wire access (absent: none) → domain. */
export function toAccess(a: iommu.DmaAccess | undefined): DmaAccess {
  return { read: a?.read ?? false, write: a?.write ?? false, execute: a?.execute ?? false, privileged: a?.privileged ?? false };
}

/** Bytes of a wire bytes field. */
export function toBytes(b: Uint8Array | undefined): Uint8Array {
  return b === undefined ? new Uint8Array(0) : Uint8Array.from(b);
}

const toBuffer = (b: Uint8Array): Buffer => Buffer.from(b.buffer, b.byteOffset, b.byteLength);

/** Domain PASID entry → wire. */
export function fromPasidEntry(e: PasidEntry): iommu.PasidEntry {
  return {
    pasid: e.pasid,
    withoutPasid: e.withoutPasid,
    domainId: e.domainId,
    domainType: DOMAIN_TYPES_WIRE.get(e.domainType)!,
    handleId: e.handleId,
    setId: e.setId,
    gpasid: e.gpasid,
    generation: e.generation,
    faultReporting: e.faultReporting,
  };
}

/** Domain device → wire, with its outstanding page requests. */
export function fromDevice(d: DeviceView, outstandingPageRequests = 0): iommu.Device {
  return {
    deviceId: d.deviceId,
    maxPasids: d.maxPasids,
    priCapable: d.priCapable,
    function: d.function === DeviceFunction.PF ? W.DeviceFunction.DEVICE_FUNCTION_PF : W.DeviceFunction.DEVICE_FUNCTION_VF,
    parentDeviceId: d.parentDeviceId,
    iommuGroup: d.iommuGroup,
    priCredits: d.priCredits,
    outstandingPageRequests,
    pasidEntries: d.pasidEntries.map(fromPasidEntry),
  };
}

/** Domain access → wire. */
export function fromAccess(a: DmaAccess): iommu.DmaAccess {
  return { read: a.read, write: a.write, execute: a.execute, privileged: a.privileged };
}

/** Domain mapping → wire. */
export function fromMapping(m: Mapping): iommu.Mapping {
  return { iova: m.iova, paddr: m.paddr, size: m.size, access: fromAccess(m.access) };
}

/** Domain domain → wire, with the vIOMMU a NESTED domain was allocated on (0 or absent: none). */
export function fromDomain(d: Domain & { readonly viommuId?: number }): iommu.Domain {
  return {
    domainId: d.domainId,
    type: DOMAIN_TYPES_WIRE.get(d.type)!,
    parentDomainId: d.parentDomainId,
    guestPgtable: d.guestPgtable,
    mmToken: d.mmToken,
    attachCount: d.attachCount,
    mappings: d.mappings.map(fromMapping),
    viommuId: d.viommuId ?? 0,
  };
}

/** Domain handle → wire. */
export function fromHandle(h: AttachHandle, outstandingFaultGroups = 0): iommu.AttachHandle {
  return {
    handleId: h.handleId,
    kind: ATTACH_KINDS_WIRE.get(h.kind)!,
    domainId: h.domainId,
    deviceId: h.deviceId,
    pasid: h.pasid,
    withoutPasid: h.withoutPasid,
    owner: h.owner,
    ownerData: toBuffer(h.ownerData),
    setId: h.setId,
    gpasid: h.gpasid,
    generation: h.generation,
    outstandingFaultGroups,
    createdAt: h.createdAt,
  };
}

/** Domain SVA bond → wire. */
export function fromBond(b: SvaBond): iommu.SvaBond {
  return { deviceId: b.deviceId, mmToken: b.mmToken, pasid: b.pasid, handleId: b.handleId, domainId: b.domainId, users: b.users };
}

/** Domain IOTLB flush → wire. */
export function fromFlush(f: IotlbFlush): iommu.IotlbFlush {
  return {
    seq: f.seq,
    scope: FLUSH_SCOPES_WIRE.get(f.scope)!,
    cause: FLUSH_CAUSES_WIRE.get(f.cause)!,
    domainId: f.domainId,
    pasid: f.pasid,
    deviceId: f.deviceId,
    deviceTlb: f.deviceTlb,
    address: f.address,
    size: f.size,
    flushedAt: f.flushedAt,
  };
}

/** Domain fault reason → wire. */
export function fromFaultReason(r: FaultReason): iommu.FaultReason {
  return FAULT_REASONS_WIRE.get(r)!;
}

const FAIL_NTH_OPERATIONS = new Map<iommu.FailureInjectionOperation, FailNthOperation>([
  [W.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_ATTACH, FailNthOperation.ATTACH],
  [W.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_REPLACE, FailNthOperation.REPLACE],
  [W.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_DETACH, FailNthOperation.DETACH],
  [W.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_BIND, FailNthOperation.BIND],
  [W.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_UNBIND, FailNthOperation.UNBIND],
]);

/** An InjectFailure operation from the wire. @throws INVALID_FIELD when unspecified or unknown */
export function toFailNthOperation(op: iommu.FailureInjectionOperation): FailNthOperation {
  const o = FAIL_NTH_OPERATIONS.get(op);
  if (o === undefined) throw invalidField("operation", "operation is required: ATTACH, REPLACE, DETACH, BIND or UNBIND");
  return o;
}
