/**
 * What VFIO's container logic needs from the outside world, as small interfaces: the IOMMU, VDCM,
 * the history and time (the IOASID core is the roles' one `CorePort`, from @ioasid/role-kit).
 * `main.ts` gives it the gRPC-backed ones (`adapters/grpc-ports.ts`); unit tests give it
 * in-memory fakes and the testkit's `InProcessCore`. Every method may throw a DomainError (the
 * other service's refusal, or UNAVAILABLE/DEADLINE_EXCEEDED when it cannot be reached).
 */
import { isDomainError } from "@ioasid/errors";
import type { CorePort } from "@ioasid/role-kit";
import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";

/**
 * Whether the set still exists at the core (GetSet by id): false once it is destroyed
 * (SET_NOT_FOUND) — every IOASID of a freed set reclaimed.
 */
export async function setExists(core: CorePort, setId: number): Promise<boolean> {
  try {
    await core.getSet(setId);
    return true;
  } catch (err) {
    if (isDomainError(err, "SET_NOT_FOUND")) return false;
    throw err;
  }
}

/** A bind_gpasid request to the IOMMU. */
export interface GpasidBind {
  readonly setId: number;
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  /** The physical device the PASID entry is programmed on (an mdev's parent). */
  readonly deviceId: string;
  readonly guestPgtable: bigint;
  /** The container's stage-2 paging domain (second stage of the nested entry). */
  readonly parentDomainId: number;
  /** VFIO's data in the attach handle (container and device), returned with fault groups. */
  readonly ownerData: Uint8Array;
}

/** An unbind_gpasid request to the IOMMU. */
export interface GpasidUnbind {
  readonly setId: number;
  readonly hpasid: number;
  readonly generation: number;
  /** 0: do not check it. */
  readonly gpasid: number;
  readonly deviceId: string;
}

/**
 * The IOMMU, as VFIO uses it: the VM's stage-2 domain, device attachment, guest PASID binds and
 * the VM's vIOMMU objects ({@link ViommuPort}).
 */
export interface IommuPort extends ViommuPort {
  /** CreateDomain(PAGING): the VM's stage 2 (GPA → HPA). @returns its domain id */
  createStage2Domain(): Promise<number>;
  /** FreeDomain; refuses with FAILED_PRECONDITION `DOMAIN_IN_USE` while something still uses it. */
  freeDomain(domainId: number): Promise<void>;
  /**
   * Refuses as {@link IommuPort.attachDevice} would for the device alone — not registered
   * (`DEVICE_NOT_FOUND`), or a domain already attached to its requests without PASID
   * (`PASID_IN_USE`) — and changes nothing: checked before the VM's stage-2 domain is created.
   */
  checkDevice(deviceId: string): Promise<void>;
  /** AttachDomain of the stage-2 domain to the device's requests without PASID (its RID). */
  attachDevice(domainId: number, deviceId: string): Promise<void>;
  /** DetachDomain of the stage-2 domain from the device's requests without PASID. */
  detachDevice(domainId: number, deviceId: string): Promise<void>;
  /** CreateDomain(NESTED): the guest's first-stage table over the stage 2. @returns its domain id */
  createNestedDomain(parentDomainId: number, guestPgtable: bigint): Promise<number>;
  /** ReplaceDomain of the device's requests without PASID, from `oldDomainId` to `domainId`. @returns fault groups answered */
  replaceDevice(oldDomainId: number, domainId: number, deviceId: string): Promise<number>;
  /** BindGpasid. */
  bindGpasid(bind: GpasidBind): Promise<{ readonly handleId: bigint; readonly firstBind: boolean }>;
  /** UnbindGpasid: `unbound` false when there was nothing to unbind. */
  unbindGpasid(unbind: GpasidUnbind): Promise<{ readonly unbound: boolean; readonly lastUnbind: boolean }>;
  /** Map of a range of the stage-2 domain. */
  map(domainId: number, m: DmaMapping): Promise<void>;
  /** Unmap of a range of the stage-2 domain. @returns bytes unmapped */
  unmap(domainId: number, iova: bigint, size: bigint): Promise<bigint>;
}

/** A range of guest physical memory mapped to host memory. */
export interface DmaMapping {
  readonly iova: bigint;
  readonly paddr: bigint;
  readonly size: bigint;
  readonly access: { readonly read: boolean; readonly write: boolean; readonly execute: boolean; readonly privileged: boolean };
}

/** VDCM, as VFIO uses it: giving mdevs to a VM's set and taking them back. */
export interface VdcmPort {
  /** AssignMdev to the set (VDCM registers on the set with the first mdev). @returns the mdev's parent device */
  assignMdev(mdevUuid: string, setId: number): Promise<{ readonly parentDeviceId: string }>;
  /** UnassignMdev: its programmed PASIDs are drained and cleared. */
  unassignMdev(mdevUuid: string): Promise<{ readonly clearedEntries: number }>;
}

export type { HistoryFields };

/** Where VFIO's history records go (fire and forget): an action of the catalogue and what it is about. */
export interface HistoryPort {
  record(action: HistoryActionInput, fields?: HistoryFields): void;
}

/** Timers, replaceable in tests. */
export interface Scheduler {
  /** Wall-clock ms since the epoch. */
  now(): number;
  /** Runs `fn` after `ms`; the returned function cancels it. */
  after(ms: number, fn: () => void): () => void;
  /** Resolves after `ms`. */
  sleep(ms: number): Promise<void>;
}

/** The real {@link Scheduler} (timers do not keep the process alive). */
export const realScheduler: Scheduler = {
  now: () => Date.now(),
  after: (ms, fn) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return () => clearTimeout(t);
  },
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};

/** The log lines the container logic writes (a pino Logger fits). */
export interface VfioLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

/** One item read from a vIOMMU's event queue: a DMA fault as the guest sees it, or a LOST_EVENTS marker. */
export type VeventqItem =
  | {
      readonly kind: "event";
      readonly sequence: bigint;
      /** The faulting device's virt_id (never the host's device id). */
      readonly virtId: bigint;
      readonly pasid: number;
      readonly withoutPasid: boolean;
      readonly address: bigint;
      readonly access: { readonly read: boolean; readonly write: boolean; readonly execute: boolean; readonly privileged: boolean };
      /** As the IOMMU names it, e.g. "FAULT_REASON_NOT_PRESENT". */
      readonly reason: string;
      readonly at: Date;
    }
  | { readonly kind: "lostEvents"; readonly firstSequence: bigint; readonly count: bigint };

/**
 * The IOMMU's vIOMMU objects, as VFIO uses them for its containers (iommufd model, DESIGN §5):
 * ids are the IOMMU's (one id space for vIOMMUs, vdevices and event queues).
 */
export interface ViommuPort {
  /** AllocViommu over the container's stage 2, through a device of the IOMMU instance. @returns its id */
  allocViommu(deviceId: string, parentDomainId: number): Promise<number>;
  /** DestroyViommu; VIOMMU_IN_USE while it has vdevices, event queues or nested domains. */
  destroyViommu(viommuId: number): Promise<void>;
  /** AllocVdevice. @returns its id */
  allocVdevice(viommuId: number, deviceId: string, virtId: bigint): Promise<number>;
  /** DestroyVdevice; VDEVICE_IN_USE while a nested attachment uses it. */
  destroyVdevice(vdeviceId: number): Promise<void>;
  /** AllocVeventq of type DMA_FAULT. @returns its id */
  allocVeventq(viommuId: number, depth: number): Promise<number>;
  /** DestroyVeventq. */
  destroyVeventq(veventqId: number): Promise<void>;
  /** ReadVeventq: up to `maxItems` (0 = all) items, oldest first, taken off the queue. */
  readVeventq(veventqId: number, maxItems: number): Promise<VeventqItem[]>;
  /** CreateDomain(NESTED) allocated on a vIOMMU (its parent is the vIOMMU's). @returns its domain id */
  createViommuNestedDomain(viommuId: number, guestPgtable: bigint): Promise<number>;
  /**
   * The vIOMMUs the IOMMU has over a parent domain, with their vdevices and event queues
   * (QueryState; reads only): what a container's teardown destroys even if VFIO died before it
   * kept them.
   */
  viommusOver(parentDomainId: number): Promise<IommuViommu[]>;
}

/** A vIOMMU as the IOMMU has it (ViommuPort.viommusOver). */
export interface IommuViommu {
  readonly id: number;
  readonly deviceId: string;
  readonly vdevices: readonly { readonly id: number; readonly deviceId: string; readonly virtId: bigint }[];
  readonly veventqs: readonly { readonly id: number; readonly depth: number }[];
}
