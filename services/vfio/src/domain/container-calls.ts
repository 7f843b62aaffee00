import type { CorePort } from "@ioasid/role-kit";
import type { Container, DeviceEntry } from "./container.js";
import type { DeviceRef } from "./device-ref.js";
import type { HistoryPort, IommuPort, Scheduler, VdcmPort, VfioLog } from "./vfio-ports.js";

/**
 * What the modules that serve VfioContainers' calls (device-assignments.ts, guest-pasids.ts) need
 * of it: its ports, its tables, and the rules every call on a container follows (VfioContainers
 * implements them; they are its private helpers, handed over).
 */
export interface ContainerCalls {
  readonly core: CorePort;
  readonly iommu: IommuPort;
  readonly vdcm: VdcmPort;
  readonly history: HistoryPort;
  readonly scheduler: Scheduler;
  readonly log: VfioLog;
  /** Every container, by id. */
  readonly containers: ReadonlyMap<number, Container>;
  /** Which container each assigned device (by key) belongs to: a device serves one VM at a time. */
  readonly owners: Map<string, number>;
  /** Runs a call on a usable container (exists, not closing), tracked so that the teardown waits for it. */
  op<T>(containerId: number, fn: (c: Container) => Promise<T>): Promise<T>;
  /** The device named by a call. @throws INVALID_FIELD when there is none or its name is too long */
  requireDevice(device: DeviceRef | undefined): DeviceRef;
  /** The device's entry if it is assigned to this container. @throws DEVICE_NOT_ASSIGNED */
  assigned(c: Container, ref: DeviceRef): DeviceEntry;
  /** The VM's stage-2 paging domain, created at the IOMMU on first need. */
  stage2(c: Container): Promise<number>;
  /** Keeps the container before a call that changed it returns. */
  save(c: Container): Promise<void>;
}
