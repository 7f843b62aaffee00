import { vfio } from "@ioasid/proto";
import type { CloseReason, ContainerState } from "../domain/container.js";
import type { ContainerSnapshot } from "../domain/container-snapshot.js";
import type { VdeviceEntry } from "../domain/container.js";
import type { ViommuInfo } from "../domain/container-viommus.js";
import type { VeventqItem } from "../domain/vfio-ports.js";
import type { DeviceRef } from "../domain/device-ref.js";
import type { HostRange } from "../domain/host-memory-pool.js";
import type { FaultRelay, PageResponseCode, RelayedGroup } from "../domain/fault-relay.js";

// VFIO's wire conversions (vfio.proto ↔ the domain's types): the one place that knows both, so the
// domain stays free of proto types (DESIGN §2 "One role skeleton"). The gRPC handlers (server.ts)
// and the store codec (vfio-state-codec.ts) use them.

/** The wire's page response codes as the domain's (the unspecified zero is absent: a missing code). */
export const RESPONSE_CODES = new Map<vfio.PageResponseCode, PageResponseCode>([
  [vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS, "SUCCESS"],
  [vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID, "INVALID"],
  [vfio.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE, "FAILURE"],
]);
/** The domain's page response codes as the wire's. */
export const RESPONSE_CODES_WIRE = new Map([...RESPONSE_CODES].map(([k, v]) => [v, k]));

/** A fault group relayed to a VMM, as WatchFaults sends it. */
export function toFaultGroup(g: RelayedGroup): vfio.FaultGroup {
  return {
    faultGroupId: g.faultGroupId,
    device: toDeviceRef(g.device),
    hpasid: g.hpasid,
    gpasid: g.gpasid,
    prgi: g.prgi,
    requests: g.requests.map((r) => ({ address: r.address, access: r.access, lastRequest: r.lastRequest })),
    createdAt: g.createdAt,
    deadline: g.deadline,
  };
}

/** The domain's container states as the wire's. */
const CONTAINER_STATES: Readonly<Record<ContainerState, vfio.ContainerState>> = {
  AWAITING_SESSION: vfio.ContainerState.CONTAINER_STATE_AWAITING_SESSION,
  ACTIVE: vfio.ContainerState.CONTAINER_STATE_ACTIVE,
  CLOSING: vfio.ContainerState.CONTAINER_STATE_CLOSING,
};

/** The domain's close reasons as the wire's. */
export const CLOSE_REASONS: Readonly<Record<CloseReason, vfio.CloseReason>> = {
  CLOSED: vfio.CloseReason.CLOSE_REASON_CLOSED,
  SESSION_ENDED: vfio.CloseReason.CLOSE_REASON_SESSION_ENDED,
  SESSION_NEVER_ATTACHED: vfio.CloseReason.CLOSE_REASON_SESSION_NEVER_ATTACHED,
  SERVICE_STOPPED: vfio.CloseReason.CLOSE_REASON_SERVICE_STOPPED,
  SERVICE_RESTARTED: vfio.CloseReason.CLOSE_REASON_SERVICE_RESTARTED,
};

/** The domain's device from the wire's oneof (undefined when neither is set). */
export function fromDeviceRef(ref: vfio.DeviceRef | undefined): DeviceRef | undefined {
  const r = ref?.ref;
  if (r === undefined) return undefined;
  return r.$case === "deviceId" ? { kind: "device", id: r.value } : { kind: "mdev", id: r.value };
}

/** The wire's device oneof from the domain's. */
export function toDeviceRef(ref: DeviceRef): vfio.DeviceRef {
  return { ref: ref.kind === "device" ? { $case: "deviceId", value: ref.id } : { $case: "mdevUuid", value: ref.id } };
}

/** A range of host memory as the wire's HostRange. */
export function toHostRange(r: HostRange): vfio.HostRange {
  return { paddr: r.paddr, size: r.size };
}

/** The wire's HostRange as the domain's. */
export function fromHostRange(r: vfio.HostRange): HostRange {
  return { paddr: r.paddr, size: r.size };
}

/** A container as QueryState shows it, with the fault relay's view of its groups. */
export function toContainer(s: ContainerSnapshot, faults: FaultRelay): vfio.Container {
  return vfio.Container.fromPartial({
    containerId: s.containerId,
    setId: s.setId,
    mmToken: s.mmToken,
    vmName: s.vmName,
    quota: s.quota,
    state: CONTAINER_STATES[s.state],
    devices: s.devices.map((d) => ({
      device: toDeviceRef(d.device),
      parentDeviceId: d.parentDeviceId,
      assignedAt: new Date(d.assignedAt),
      nestedDomainId: d.nested?.domainId ?? 0,
      guestPgtable: d.nested?.guestPgtable ?? 0n,
      viommuId: d.nested?.viommuId ?? 0,
    })),
    pasids: s.pasids.map((p) => ({
      hpasid: p.hpasid,
      generation: p.generation,
      gpasid: p.gpasid,
      boundDevices: p.boundDevices.map(toDeviceRef),
      freePending: p.freePending,
    })),
    pendingFaultGroups: faults.pendingFor(s.containerId).map(toFaultGroup),
    faultWatcherAttached: faults.watching(s.containerId),
    openedAt: new Date(s.openedAt),
    sessionDeadline: s.sessionDeadline === undefined ? undefined : new Date(s.sessionDeadline),
    guestMemory: s.guestMemory.map(toHostRange),
    viommus: s.viommus.map(toViommuView),
  });
}

/** A container's vIOMMU as the wire's Viommu (AllocViommu, QueryState). */
export function toViommuView(v: ViommuInfo): vfio.Viommu {
  return {
    viommuId: v.viommuId,
    device: toDeviceRef(v.device),
    parentDomainId: v.parentDomainId,
    vdevices: v.vdevices.map(toVdeviceView),
    veventqs: v.veventqs.map((q) => ({ veventqId: q.id, depth: q.depth })),
    createdAt: new Date(v.createdAt),
  };
}

/** A container's vdevice as the wire's Vdevice. */
export function toVdeviceView(d: VdeviceEntry): vfio.Vdevice {
  return { vdeviceId: d.id, device: toDeviceRef(d.device), virtId: d.virtId };
}

/** An item of an event queue as the wire's VeventqItem: events and LOST_EVENTS markers as the IOMMU queued them. */
export function toVeventqItem(it: VeventqItem): vfio.VeventqItem {
  if (it.kind === "lostEvents") return { item: { $case: "lostEvents", value: { firstSequence: it.firstSequence, count: it.count } } };
  return {
    item: {
      $case: "event",
      value: {
        sequence: it.sequence,
        virtId: it.virtId,
        pasid: it.pasid,
        withoutPasid: it.withoutPasid,
        address: it.address,
        access: it.access,
        reason: it.reason,
        at: it.at,
      },
    },
  };
}
