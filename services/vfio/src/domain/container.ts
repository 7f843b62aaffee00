import type { CloseResult } from "./container-teardown.js";
import type { DeviceRef } from "./device-ref.js";
import type { HostRange } from "./host-memory-pool.js";

/** Where a container is in its life (vfio.proto `ContainerState`). */
export const ContainerState = {
  /** Opened; waiting for the VMM's Session stream until the grace period runs out. */
  AWAITING_SESSION: "AWAITING_SESSION",
  /** The Session stream is attached. */
  ACTIVE: "ACTIVE",
  /** Being torn down: every call naming it is refused with CONTAINER_CLOSING. */
  CLOSING: "CLOSING",
} as const;
export type ContainerState = (typeof ContainerState)[keyof typeof ContainerState];

/** Why a container was closed (vfio.proto `CloseReason`). */
export const CloseReason = {
  /** The VMM called CloseContainer (clean exit). */
  CLOSED: "CLOSED",
  /** The Session stream ended from the VMM's side: exit, crash (kill -9) or lost connection. */
  SESSION_ENDED: "SESSION_ENDED",
  /** No Session stream attached within the grace period. */
  SESSION_NEVER_ATTACHED: "SESSION_NEVER_ATTACHED",
  /** VFIO itself is stopping: its containers do not outlive it. */
  SERVICE_STOPPED: "SERVICE_STOPPED",
  /** VFIO came back after a crash: the sessions of its containers ended with it (the crashed-guest path). */
  SERVICE_RESTARTED: "SERVICE_RESTARTED",
} as const;
export type CloseReason = (typeof CloseReason)[keyof typeof CloseReason];

/** Where a device is in its assignment to a container. */
export type DeviceEntryState = "assigning" | "assigned" | "unassigning";

/** A device of a container, as VFIO tracks it. */
export interface DeviceEntry {
  readonly ref: DeviceRef;
  readonly key: string;
  state: DeviceEntryState;
  /** For an mdev: its parent (known once VDCM assigned it); "" for a physical device. */
  parentDeviceId: string;
  assignedAt: number;
  /**
   * A physical device whose requests without PASID translate through a NESTED domain over the
   * stage 2 (ReplaceDeviceDomain): that domain and the guest's table; undefined while it is the stage 2.
   */
  nested?: NestedDomain | undefined;
}

/**
 * A NESTED domain over the container's stage 2 that a device's requests without PASID translate
 * through (ReplaceDeviceDomain): its id, the guest's first-stage table, and the container's vIOMMU
 * it was allocated on (absent: none).
 */
export interface NestedDomain {
  readonly domainId: number;
  readonly guestPgtable: bigint;
  readonly viommuId?: number | undefined;
}

/** A vdevice of a container's vIOMMU: the guest-visible id of one of its physical devices. */
export interface VdeviceEntry {
  readonly id: number;
  /** The physical device (kind "device"). */
  readonly device: DeviceRef;
  readonly virtId: bigint;
}

/** An event queue (DMA faults) of a container's vIOMMU. */
export interface VeventqEntry {
  readonly id: number;
  readonly depth: number;
}

/**
 * A vIOMMU a container allocated at the IOMMU (iommufd model, DESIGN §5), with the vdevices and
 * event queues made on it through the container: the container's alone, torn down with it.
 */
export interface ViommuEntry {
  readonly id: number;
  /** The assigned physical device it was allocated through (names the IOMMU instance). */
  readonly device: DeviceRef;
  /** The container's stage 2, which it holds a reference on at the IOMMU. */
  readonly parentDomainId: number;
  /** Wall-clock ms since the epoch. */
  readonly createdAt: number;
  readonly vdevices: Map<number, VdeviceEntry>;
  readonly veventqs: Map<number, VeventqEntry>;
}

/** A guest bind made through a container. */
export interface BindRecord {
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly deviceKey: string;
  readonly handleId: bigint;
}

/**
 * One VM's container as VFIO holds it in memory (shared by VfioContainers and its teardown,
 * snapshot and store modules; never exported from the workspace).
 */
export interface Container {
  readonly id: number;
  readonly setId: number;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly quota: number;
  readonly openedAt: number;
  /** SHA-256 of the container's capability (container-capability.ts); empty for one kept before capabilities. */
  readonly capabilityDigest: Uint8Array;
  /**
   * The host memory given to the container, ascending by address (host-memory-pool.ts): MapDma maps
   * only inside it. It goes back to VFIO's pool when the container is released.
   */
  readonly guestMemory: readonly HostRange[];
  state: ContainerState;
  sessionDeadline: number | undefined;
  cancelGrace: (() => void) | undefined;
  sessionAttached: boolean;
  /** Resolves the Session lease's `closed`. */
  notifySession: ((reason: CloseReason) => void) | undefined;
  readonly devices: Map<string, DeviceEntry>;
  /** Guest binds made through this container, by `${hpasid}/${deviceKey}`. */
  readonly binds: Map<string, BindRecord>;
  /** The container's vIOMMUs by id (container-viommus.ts): destroyed before the stage 2 is freed. */
  readonly viommus: Map<number, ViommuEntry>;
  /** The VM's stage-2 paging domain at the IOMMU, created with the first need. */
  stage2: Promise<number> | undefined;
  /** Calls in progress on the container: the teardown waits for them before it unassigns devices. */
  readonly inflight: Set<Promise<unknown>>;
  /** The close in progress (until the IOASIDs are freed); undefined before, or after a failed attempt. */
  closing: Promise<CloseResult> | undefined;
  /** The release phase (devices unassigned, domain freed, container forgotten). */
  released: Promise<void> | undefined;
}

/** The physical device a guest PASID entry is programmed on: the device, or an mdev's parent. */
export function bindTarget(entry: DeviceEntry): string {
  return entry.ref.kind === "device" ? entry.ref.id : entry.parentDeviceId;
}
