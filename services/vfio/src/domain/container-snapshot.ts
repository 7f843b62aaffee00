import { isDomainError } from "@ioasid/errors";
import { IoasidState, type IoasidInfo } from "@ioasid/ioasid";
import type { CorePort } from "@ioasid/role-kit";
import type { Container, ContainerState, NestedDomain } from "./container.js";
import { viommuInfo, type ViommuInfo } from "./container-viommus.js";
import type { DeviceRef } from "./device-ref.js";
import type { HostRange } from "./host-memory-pool.js";

/** A device as assigned to a container. */
export interface AssignedDeviceInfo {
  readonly device: DeviceRef;
  /** For an mdev: its parent physical device; "" for a physical device. */
  readonly parentDeviceId: string;
  /** Wall-clock ms since the epoch. */
  readonly assignedAt: number;
  /** ReplaceDeviceDomain's nested domain, when the device translates through one. */
  readonly nested?: NestedDomain | undefined;
}

/** A host PASID of the container's set, with VFIO's view of its guest binds. */
export interface GuestPasidInfo {
  readonly hpasid: number;
  readonly generation: number;
  /** The guest PASID (SPID) bound to it; 0 when none. */
  readonly gpasid: number;
  /** Devices (as the VMM named them) it is bound on through this VFIO. */
  readonly boundDevices: readonly DeviceRef[];
  readonly freePending: boolean;
}

/** One container as QueryState shows it. */
export interface ContainerSnapshot {
  readonly containerId: number;
  readonly setId: number;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly quota: number;
  readonly state: ContainerState;
  readonly devices: readonly AssignedDeviceInfo[];
  readonly pasids: readonly GuestPasidInfo[];
  /** Wall-clock ms since the epoch. */
  readonly openedAt: number;
  /** AWAITING_SESSION: when the container is closed if no Session attaches. */
  readonly sessionDeadline: number | undefined;
  /** The host memory given to the container, ascending by address. */
  readonly guestMemory: readonly HostRange[];
  /** Its vIOMMUs with their vdevices and event queues, ascending by id. */
  readonly viommus: readonly ViommuInfo[];
}

/** One container as QueryState shows it: the set's IOASIDs as the core has them, with the binds made through this VFIO. */
export async function snapshotContainer(core: CorePort, c: Container): Promise<ContainerSnapshot> {
  let ioasids: readonly IoasidInfo[] = [];
  try {
    ioasids = await core.listIoasids(c.setId);
  } catch (err) {
    // A closing container's set may be gone already.
    if (!isDomainError(err, "SET_UNKNOWN")) throw err;
  }
  const pasids = [...ioasids]
    .sort((a, b) => a.ioasid - b.ioasid)
    .map((i) => ({
      hpasid: i.ioasid,
      generation: i.generation,
      gpasid: i.spid,
      boundDevices: [...c.binds.values()]
        .filter((b) => b.hpasid === i.ioasid && b.generation === i.generation)
        .map((b) => c.devices.get(b.deviceKey)?.ref)
        .filter((d): d is DeviceRef => d !== undefined),
      freePending: i.state === IoasidState.FREE_PENDING,
    }));
  return {
    containerId: c.id,
    setId: c.setId,
    mmToken: c.mmToken,
    vmName: c.vmName,
    quota: c.quota,
    state: c.state,
    devices: [...c.devices.values()]
      .filter((d) => d.state !== "assigning")
      .map((d) => ({ device: d.ref, parentDeviceId: d.parentDeviceId, assignedAt: d.assignedAt, nested: d.nested })),
    pasids,
    openedAt: c.openedAt,
    sessionDeadline: c.sessionDeadline,
    guestMemory: c.guestMemory,
    viommus: [...c.viommus.values()].sort((a, b) => a.id - b.id).map(viommuInfo),
  };
}
