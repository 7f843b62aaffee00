/** The VFIO role: the VMM-facing API (containers, sessions, guest PASIDs, binds), its ports and gRPC server. */
export {
  DEFAULT_GUEST_MEMORY_SIZE,
  DEFAULT_HOST_MEMORY,
  MAX_SESSION_GRACE_MS,
  MAX_VM_NAME,
  VfioContainers,
  type OpenContainerSpec,
  type OpenedContainer,
  type SessionLease,
  type VfioContainersOptions,
} from "./domain/vfio-containers.js";
export { CloseReason, ContainerState } from "./domain/container.js";
export { MAX_GPASID, type GuestPasidBind, type GuestPasidUnbind } from "./domain/guest-pasids.js";
export { describeDevice, MAX_DEVICE_NAME, type DeviceRef } from "./domain/device-ref.js";
export {
  assertGuestMemorySize,
  assertHostRangeGiven,
  HOST_PAGE_SIZE,
  HostMemoryPool,
  type HostMemoryOptions,
  type HostRange,
} from "./domain/host-memory-pool.js";
export { type AssignedDeviceInfo, type ContainerSnapshot, type GuestPasidInfo } from "./domain/container-snapshot.js";
export { type CloseResult } from "./domain/container-teardown.js";
export { type KeptContainer, type KeptContainerCounter, type VfioKeptEntry } from "./domain/vfio-kept-entry.js";
export { fromVfioStateEntry, toVfioStateEntry, VFIO_STATE_FORMAT, vfioStateCodec } from "./adapters/vfio-state-codec.js";
export { invalidField, VfioReason, vfioError } from "./domain/vfio-errors.js";
export {
  realScheduler,
  setExists,
  type GpasidBind,
  type GpasidUnbind,
  type HistoryFields,
  type HistoryPort,
  type IommuPort,
  type Scheduler,
  type VdcmPort,
  type VfioLog,
} from "./domain/vfio-ports.js";
export {
  createGuestPagesPort,
  createIommuFaultPort,
  createIommuPort,
  createVdcmPort,
  type GuestPagesPort,
  type IommuClient,
  type VdcmClient,
} from "./adapters/grpc-ports.js";
export { FaultRelay, type FaultRelayOptions, type IommuFaultPort, type PageResponseCode } from "./domain/fault-relay.js";
export { vfioConfigProblems, vfioConfigSchema } from "./config.js";
export { createVfioHandlers, createVfioServer, SESSION_KEEPALIVE, startVfioServer, type StartVfioServerOptions } from "./adapters/server.js";
export { fromDeviceRef, toDeviceRef } from "./adapters/convert.js";
