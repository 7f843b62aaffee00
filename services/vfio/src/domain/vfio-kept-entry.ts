import { ContainerState, type Container, type NestedDomain, type ViommuEntry } from "./container.js";
import { deviceKey, type DeviceRef } from "./device-ref.js";
import type { HostRange } from "./host-memory-pool.js";

/** A container as VFIO keeps it in its store (what closing it after a restart needs): `ctr/<id>`. */
export interface KeptContainer {
  readonly kind: "container";
  readonly id: number;
  readonly setId: number;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly quota: number;
  /** Unix ms. */
  readonly openedAt: number;
  /** Assigned devices (assignments in progress are not kept); `assignedAt` in unix ms. */
  readonly devices: readonly {
    readonly ref: DeviceRef;
    readonly parentDeviceId: string;
    readonly assignedAt: number;
    /** ReplaceDeviceDomain's nested domain, when the device translates through one. */
    readonly nested?: NestedDomain | undefined;
  }[];
  /** The stage-2 domain; undefined while there is none. */
  readonly stage2: number | undefined;
  /** SHA-256 of the container's capability, so a restarted VFIO still accepts it; empty when kept before capabilities. */
  readonly capabilityDigest: Uint8Array;
  /** The host memory given to the container, so a restarted VFIO gives it to nobody else first; empty when kept before host memory was given. */
  readonly guestMemory: readonly HostRange[];
  /** Its vIOMMUs with their vdevices and event queues, so a restarted VFIO destroys them before it frees the stage 2; empty when kept before vIOMMUs. */
  readonly viommus?: readonly KeptViommu[] | undefined;
}

/** A vIOMMU of a container, as kept. */
export interface KeptViommu {
  readonly id: number;
  readonly device: DeviceRef;
  readonly parentDomainId: number;
  /** Unix ms. */
  readonly createdAt: number;
  readonly vdevices: readonly { readonly id: number; readonly device: DeviceRef; readonly virtId: bigint }[];
  readonly veventqs: readonly { readonly id: number; readonly depth: number }[];
}

/** The next container id, as kept: `next`. */
export interface KeptContainerCounter {
  readonly kind: "containerCounter";
  readonly nextContainerId: number;
}

/** One entry of VFIO's kept state (ioasid.vfio.v1.VfioStateEntry; adapters/vfio-state-codec.ts converts). */
export type VfioKeptEntry = KeptContainer | KeptContainerCounter;

/**
 * The container a kept one comes back as after a restart: no session, to be closed as a crashed
 * guest. `guestMemory` is what the pool could take back of the kept ranges (all of them, unless the
 * pool was made smaller or the kept state contradicts itself).
 */
export function restoredContainer(v: KeptContainer, guestMemory: readonly HostRange[]): Container {
  const c: Container = {
    id: v.id,
    setId: v.setId,
    mmToken: v.mmToken,
    vmName: v.vmName,
    quota: v.quota,
    openedAt: v.openedAt,
    capabilityDigest: v.capabilityDigest,
    guestMemory,
    state: ContainerState.AWAITING_SESSION,
    sessionDeadline: undefined,
    cancelGrace: undefined,
    sessionAttached: false,
    notifySession: undefined,
    devices: new Map(),
    binds: new Map(),
    viommus: new Map((v.viommus ?? []).map((x) => [x.id, restoredViommu(x)])),
    stage2: v.stage2 === undefined ? undefined : Promise.resolve(v.stage2),
    inflight: new Set(),
    closing: undefined,
    released: undefined,
  };
  for (const d of v.devices) {
    const ref: DeviceRef = { kind: d.ref.kind, id: d.ref.id };
    const k = deviceKey(ref);
    c.devices.set(k, { ref, key: k, state: "assigned", parentDeviceId: d.parentDeviceId, assignedAt: d.assignedAt, nested: d.nested });
  }
  return c;
}

function restoredViommu(v: KeptViommu): ViommuEntry {
  return {
    id: v.id,
    device: v.device,
    parentDomainId: v.parentDomainId,
    createdAt: v.createdAt,
    vdevices: new Map(v.vdevices.map((d) => [d.id, { id: d.id, device: d.device, virtId: d.virtId }])),
    veventqs: new Map(v.veventqs.map((q) => [q.id, { id: q.id, depth: q.depth }])),
  };
}

/** The container as kept (its stage-2 domain resolved by the caller): assignments in progress are not kept. */
export function keptContainer(c: Container, stage2: number | undefined): KeptContainer {
  return {
    kind: "container",
    id: c.id,
    setId: c.setId,
    mmToken: c.mmToken,
    vmName: c.vmName,
    quota: c.quota,
    openedAt: c.openedAt,
    devices: [...c.devices.values()]
      .filter((d) => d.state !== "assigning")
      .map((d) => ({ ref: d.ref, parentDeviceId: d.parentDeviceId, assignedAt: d.assignedAt, ...(d.nested === undefined ? {} : { nested: d.nested }) })),
    stage2,
    capabilityDigest: c.capabilityDigest,
    guestMemory: c.guestMemory,
    viommus: [...c.viommus.values()].map((v) => ({
      id: v.id,
      device: v.device,
      parentDomainId: v.parentDomainId,
      createdAt: v.createdAt,
      vdevices: [...v.vdevices.values()],
      veventqs: [...v.veventqs.values()],
    })),
  };
}
