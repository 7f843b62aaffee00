import { protoStateCodec, requireField, type StateCodec } from "@ioasid/bus";
import { iommu, iommuState } from "@ioasid/proto";
import { ATTACH_KINDS_WIRE, DOMAIN_TYPES, DOMAIN_TYPES_WIRE, fromHandle, fromMapping, fromPageRequest, GROUP_STATES_WIRE, toAccess } from "./convert.js";
import { DeviceFunction, type AttachKind, type IommuKeptEntry, type KeptAttachHandle, type Mapping } from "../domain/iommu-hardware.js";
import type { GroupState, PageRequest } from "../domain/page-requests.js";
import { fromVeventqItem, fromVeventqType, toVeventqItem, veventqTypeOf } from "./viommu-convert.js";

// The IOMMU's kept entries ↔ ioasid.iommu.v1.IommuStateEntry (iommu_state.proto): the one place that
// knows both the kept tables (hardware and page-request queue) and the generated state messages, so
// iommu-hardware.ts and page-requests.ts stay free of proto types.

/** The proto message every message of the IOMMU's store holds (its format marker). */
export const IOMMU_STATE_FORMAT = `${iommuState.protobufPackage}.IommuStateEntry`;

const ATTACH_KINDS = new Map([...ATTACH_KINDS_WIRE].map(([k, v]) => [v, k]));
const GROUP_STATES = new Map([...GROUP_STATES_WIRE].map(([k, v]) => [v, k]));
const FUNCTIONS_WIRE = { PF: iommu.DeviceFunction.DEVICE_FUNCTION_PF, VF: iommu.DeviceFunction.DEVICE_FUNCTION_VF } as const satisfies Record<
  DeviceFunction,
  iommu.DeviceFunction
>;
const FUNCTIONS = new Map<iommu.DeviceFunction, DeviceFunction>([
  [iommu.DeviceFunction.DEVICE_FUNCTION_PF, DeviceFunction.PF],
  [iommu.DeviceFunction.DEVICE_FUNCTION_VF, DeviceFunction.VF],
]);

/** A kept entry as its state message. */
export function toIommuStateEntry(e: IommuKeptEntry): iommuState.IommuStateEntry {
  switch (e.kind) {
    case "device": {
      const d = e.device;
      return {
        entry: {
          $case: "device",
          value: {
            deviceId: d.deviceId,
            maxPasids: d.maxPasids,
            priCapable: d.priCapable,
            function: FUNCTIONS_WIRE[d.function],
            parentDeviceId: d.parentDeviceId,
            iommuGroup: d.iommuGroup,
            priCredits: d.priCredits,
          },
        },
      };
    }
    case "domain": {
      const d = e.domain;
      return {
        entry: {
          $case: "domain",
          value: {
            domainId: d.domainId,
            type: DOMAIN_TYPES_WIRE.get(d.type)!,
            parentDomainId: d.parentDomainId,
            guestPgtable: d.guestPgtable,
            mmToken: d.mmToken,
            implicit: d.implicit,
            mappings: d.mappings.map(fromMapping),
          },
        },
      };
    }
    case "attachHandle":
      return { entry: { $case: "attachHandle", value: toKeptHandleMessage(e.handle) } };
    case "gpasidBinding": {
      const b = e.binding;
      return {
        entry: {
          $case: "gpasidBinding",
          value: {
            hpasid: b.hpasid,
            setId: b.setId,
            generation: b.generation,
            gpasid: b.gpasid,
            refHeld: b.refHeld,
            spidAttached: b.spidAttached,
            firstStage: b.firstStage.map(fromMapping),
          },
        },
      };
    }
    case "guestMapping": {
      const g = e.guestMapping;
      return { entry: { $case: "guestMapping", value: { hpasid: g.hpasid, generation: g.generation, mapping: fromMapping(g.mapping) } } };
    }
    case "mmContext": {
      const m = e.mm;
      return {
        entry: {
          $case: "mmContext",
          value: {
            mmToken: m.mmToken,
            setId: m.setId,
            pasid: m.pasid,
            generation: m.generation,
            domainId: m.domainId,
            bonds: m.bonds.map((b) => ({ deviceId: b.deviceId, handleId: b.handleId, users: b.users })),
          },
        },
      };
    }
    case "idCounters":
      return { entry: { $case: "idCounters", value: { nextDomainId: e.nextDomainId, nextHandleId: e.nextHandleId } } };
    case "faultGroup": {
      const g = e.group;
      return {
        entry: {
          $case: "faultGroup",
          value: {
            faultGroupId: g.faultGroupId,
            deviceId: g.deviceId,
            pasid: g.pasid,
            withoutPasid: g.withoutPasid,
            prgi: g.prgi,
            requests: g.requests.map(fromPageRequest),
            // The handle as the group's first request saw it: fault reporting is not part of it.
            handle: toKeptHandleMessage({ ...g.handle, faultReporting: false }),
            state: GROUP_STATES_WIRE.get(g.state)!,
            createdAt: g.createdAt,
            deadline: g.deadline,
          },
        },
      };
    }
    case "faultGroupCounter":
      return { entry: { $case: "faultGroupCounter", value: { nextFaultGroupId: e.nextFaultGroupId } } };
    case "viommu":
      return { entry: { $case: "viommu", value: { ...e.viommu, nestedDomainIds: [...e.viommu.nestedDomainIds] } } };
    case "vdevice":
      return { entry: { $case: "vdevice", value: { ...e.vdevice } } };
    case "veventq": {
      const q = e.veventq;
      return {
        entry: {
          $case: "veventq",
          value: {
            veventqId: q.veventqId,
            viommuId: q.viommuId,
            type: fromVeventqType(q.type),
            depth: q.depth,
            nextSequence: q.nextSequence,
            lostEvents: q.lostEvents,
            items: q.items.map(fromVeventqItem),
          },
        },
      };
    }
    case "viommuIdCounter":
      return { entry: { $case: "viommuIdCounter", value: { nextObjectId: e.nextObjectId } } };
  }
}

/**
 * A state message as the kept entry it holds.
 * @throws Error when its kind, an enum or a required field is missing (the store refuses it at start)
 */
export function fromIommuStateEntry(m: iommuState.IommuStateEntry): IommuKeptEntry {
  const entry = requireField(m.entry, "IommuStateEntry.entry");
  switch (entry.$case) {
    case "device": {
      const d = entry.value;
      return {
        kind: "device",
        device: {
          deviceId: d.deviceId,
          maxPasids: d.maxPasids,
          priCapable: d.priCapable,
          function: requireField(FUNCTIONS.get(d.function), "KeptDevice.function"),
          parentDeviceId: d.parentDeviceId,
          iommuGroup: d.iommuGroup,
          priCredits: d.priCredits,
        },
      };
    }
    case "domain": {
      const d = entry.value;
      return {
        kind: "domain",
        domain: {
          domainId: d.domainId,
          type: requireField(DOMAIN_TYPES.get(d.type), "KeptDomain.type"),
          parentDomainId: d.parentDomainId,
          guestPgtable: d.guestPgtable,
          mmToken: d.mmToken,
          implicit: d.implicit,
          mappings: d.mappings.map(toMapping),
        },
      };
    }
    case "attachHandle":
      return { kind: "attachHandle", handle: fromKeptHandleMessage(entry.value, "KeptAttachHandle") };
    case "gpasidBinding": {
      const b = entry.value;
      return {
        kind: "gpasidBinding",
        binding: {
          hpasid: b.hpasid,
          setId: b.setId,
          generation: b.generation,
          gpasid: b.gpasid,
          refHeld: b.refHeld,
          spidAttached: b.spidAttached,
          firstStage: b.firstStage.map(toMapping),
        },
      };
    }
    case "guestMapping": {
      const v = entry.value;
      return {
        kind: "guestMapping",
        guestMapping: { hpasid: v.hpasid, generation: v.generation, mapping: toMapping(requireField(v.mapping, "KeptGuestMapping.mapping")) },
      };
    }
    case "mmContext": {
      const v = entry.value;
      return {
        kind: "mmContext",
        mm: {
          mmToken: v.mmToken,
          setId: v.setId,
          pasid: v.pasid,
          generation: v.generation,
          domainId: v.domainId,
          bonds: v.bonds.map((b) => ({ deviceId: b.deviceId, handleId: b.handleId, users: b.users })),
        },
      };
    }
    case "idCounters":
      return { kind: "idCounters", nextDomainId: entry.value.nextDomainId, nextHandleId: entry.value.nextHandleId };
    case "faultGroup": {
      const g = entry.value;
      const { faultReporting: _unused, ...handle } = fromKeptHandleMessage(requireField(g.handle, "KeptFaultGroup.handle"), "KeptFaultGroup.handle");
      return {
        kind: "faultGroup",
        group: {
          faultGroupId: g.faultGroupId,
          deviceId: g.deviceId,
          pasid: g.pasid,
          withoutPasid: g.withoutPasid,
          prgi: g.prgi,
          requests: g.requests.map((r): PageRequest => ({
            deviceId: r.deviceId,
            pasid: r.pasid,
            withoutPasid: r.withoutPasid,
            address: r.address,
            access: toAccess(r.access),
            prgi: r.prgi,
            lastRequest: r.lastRequest,
            receivedAt: requireField(r.receivedAt, "PageRequest.received_at"),
          })),
          handle,
          state: requireField(GROUP_STATES.get(g.state), "KeptFaultGroup.state") as GroupState,
          createdAt: requireField(g.createdAt, "KeptFaultGroup.created_at"),
          deadline: requireField(g.deadline, "KeptFaultGroup.deadline"),
        },
      };
    }
    case "faultGroupCounter":
      return { kind: "faultGroupCounter", nextFaultGroupId: entry.value.nextFaultGroupId };
    case "viommu": {
      const v = entry.value;
      return {
        kind: "viommu",
        viommu: {
          viommuId: v.viommuId,
          deviceId: v.deviceId,
          parentDomainId: v.parentDomainId,
          owner: v.owner,
          nestedDomainIds: [...v.nestedDomainIds],
          createdAt: requireField(v.createdAt, "KeptViommu.created_at"),
        },
      };
    }
    case "vdevice": {
      const d = entry.value;
      return { kind: "vdevice", vdevice: { vdeviceId: d.vdeviceId, viommuId: d.viommuId, deviceId: d.deviceId, virtId: d.virtId } };
    }
    case "veventq": {
      const q = entry.value;
      return {
        kind: "veventq",
        veventq: {
          veventqId: q.veventqId,
          viommuId: q.viommuId,
          type: requireField(veventqTypeOf(q.type), "KeptVeventq.type"),
          depth: q.depth,
          nextSequence: q.nextSequence,
          lostEvents: q.lostEvents,
          items: q.items.map(toVeventqItem),
        },
      };
    }
    case "viommuIdCounter":
      return { kind: "viommuIdCounter", nextObjectId: entry.value.nextObjectId };
  }
}

function toKeptHandleMessage(h: KeptAttachHandle): iommuState.KeptAttachHandle {
  // The service's AttachHandle less what is derived (outstanding groups), plus fault reporting.
  const { outstandingFaultGroups: _derived, ...wire } = fromHandle(h);
  return { ...wire, faultReporting: h.faultReporting };
}

function fromKeptHandleMessage(h: iommuState.KeptAttachHandle, what: string): KeptAttachHandle {
  return {
    handleId: h.handleId,
    kind: requireField(ATTACH_KINDS.get(h.kind), `${what}.kind`) as AttachKind,
    domainId: h.domainId,
    deviceId: h.deviceId,
    pasid: h.pasid,
    withoutPasid: h.withoutPasid,
    owner: h.owner,
    ownerData: Uint8Array.from(h.ownerData),
    setId: h.setId,
    gpasid: h.gpasid,
    generation: h.generation,
    createdAt: requireField(h.createdAt, `${what}.created_at`),
    faultReporting: h.faultReporting,
  };
}

function toMapping(m: iommu.Mapping): Mapping {
  return { iova: m.iova, paddr: m.paddr, size: m.size, access: toAccess(m.access) };
}

/** The IOMMU's kept entries as ioasid.iommu.v1.IommuStateEntry bytes (its RoleState and MemoryRoleState). */
export const iommuStateCodec: StateCodec<IommuKeptEntry> = protoStateCodec(
  IOMMU_STATE_FORMAT,
  iommuState.IommuStateEntry,
  toIommuStateEntry,
  fromIommuStateEntry,
);
