import { protoStateCodec, requireField, type StateCodec } from "@ioasid/bus";
import { vfioState, type vfio } from "@ioasid/proto";
import { fromDeviceRef, fromHostRange, toDeviceRef, toHostRange } from "./convert.js";
import type { KeptViommu, VfioKeptEntry } from "../domain/vfio-kept-entry.js";

// VFIO's kept entries ↔ ioasid.vfio.v1.VfioStateEntry (vfio_state.proto): the one place that knows
// both the kept containers and the generated state messages, so the domain stays free of
// proto types.

/** The proto message every message of VFIO's store holds (its format marker). */
export const VFIO_STATE_FORMAT = `${vfioState.protobufPackage}.VfioStateEntry`;

/** A kept entry as its state message. */
export function toVfioStateEntry(e: VfioKeptEntry): vfioState.VfioStateEntry {
  switch (e.kind) {
    case "container":
      return {
        entry: {
          $case: "container",
          value: {
            containerId: e.id,
            setId: e.setId,
            mmToken: e.mmToken,
            vmName: e.vmName,
            quota: e.quota,
            openedAt: new Date(e.openedAt),
            devices: e.devices.map((d) => ({
              device: toDeviceRef(d.ref),
              parentDeviceId: d.parentDeviceId,
              assignedAt: new Date(d.assignedAt),
              nestedDomainId: d.nested?.domainId ?? 0,
              guestPgtable: d.nested?.guestPgtable ?? 0n,
              viommuId: d.nested?.viommuId ?? 0,
            })),
            // Domain ids are never 0: 0 says "no stage-2 domain".
            stage2DomainId: e.stage2 ?? 0,
            capabilityDigest: Buffer.from(e.capabilityDigest),
            guestMemory: e.guestMemory.map(toHostRange),
            viommus: (e.viommus ?? []).map(toViommu),
          },
        },
      };
    case "containerCounter":
      return { entry: { $case: "containerCounter", value: { nextContainerId: e.nextContainerId } } };
  }
}

/**
 * A state message as the kept entry it holds.
 * @throws Error when its kind, a device or a required time is missing (the store refuses it at start)
 */
export function fromVfioStateEntry(m: vfioState.VfioStateEntry): VfioKeptEntry {
  const entry = requireField(m.entry, "VfioStateEntry.entry");
  switch (entry.$case) {
    case "container": {
      const c = entry.value;
      return {
        kind: "container",
        id: c.containerId,
        setId: c.setId,
        mmToken: c.mmToken,
        vmName: c.vmName,
        quota: c.quota,
        openedAt: requireField(c.openedAt, "KeptContainer.opened_at").getTime(),
        devices: c.devices.map((d) => ({
          ref: requireField(fromDeviceRef(d.device), "AssignedDevice.device"),
          parentDeviceId: d.parentDeviceId,
          assignedAt: requireField(d.assignedAt, "AssignedDevice.assigned_at").getTime(),
          ...(d.nestedDomainId === 0
            ? {}
            : { nested: { domainId: d.nestedDomainId, guestPgtable: d.guestPgtable, ...(d.viommuId === 0 ? {} : { viommuId: d.viommuId }) } }),
        })),
        stage2: c.stage2DomainId === 0 ? undefined : c.stage2DomainId,
        capabilityDigest: new Uint8Array(c.capabilityDigest),
        guestMemory: c.guestMemory.map(fromHostRange),
        viommus: c.viommus.map(fromViommu),
      };
    }
    case "containerCounter":
      return { kind: "containerCounter", nextContainerId: entry.value.nextContainerId };
  }
}

/** A kept vIOMMU as the wire's Viommu (vfio.proto, also QueryState's view). */
function toViommu(v: KeptViommu): vfio.Viommu {
  return {
    viommuId: v.id,
    device: toDeviceRef(v.device),
    parentDomainId: v.parentDomainId,
    vdevices: v.vdevices.map((d) => ({ vdeviceId: d.id, device: toDeviceRef(d.device), virtId: d.virtId })),
    veventqs: v.veventqs.map((q) => ({ veventqId: q.id, depth: q.depth })),
    createdAt: new Date(v.createdAt),
  };
}

/** The wire's Viommu as kept. @throws Error when a device or the creation time is missing */
function fromViommu(v: vfio.Viommu): KeptViommu {
  return {
    id: v.viommuId,
    device: requireField(fromDeviceRef(v.device), "Viommu.device"),
    parentDomainId: v.parentDomainId,
    createdAt: requireField(v.createdAt, "Viommu.created_at").getTime(),
    vdevices: v.vdevices.map((d) => ({ id: d.vdeviceId, device: requireField(fromDeviceRef(d.device), "Vdevice.device"), virtId: d.virtId })),
    veventqs: v.veventqs.map((q) => ({ id: q.veventqId, depth: q.depth })),
  };
}

/** VFIO's kept entries as ioasid.vfio.v1.VfioStateEntry bytes (its RoleState and MemoryRoleState). */
export const vfioStateCodec: StateCodec<VfioKeptEntry> = protoStateCodec(VFIO_STATE_FORMAT, vfioState.VfioStateEntry, toVfioStateEntry, fromVfioStateEntry);
