/** The VFIO role: the VMM-facing API (containers, sessions, guest PASIDs, binds), its ports and gRPC server. */
export {
  CloseReason,
  ContainerState,
  describeDevice,
  MAX_DEVICE_NAME,
  MAX_GPASID,
  MAX_SESSION_GRACE_MS,
  MAX_VM_NAME,
  VfioContainers,
  type AssignedDeviceInfo,
  type CloseResult,
  type ContainerSnapshot,
  type DeviceRef,
  type GuestPasidBind,
  type GuestPasidInfo,
  type GuestPasidUnbind,
  type KeptContainer,
  type KeptContainerCounter,
  type OpenContainerSpec,
  type OpenedContainer,
  type SessionLease,
  type VfioContainersOptions,
  type VfioKeptEntry,
} from "./domain/vfio-containers.js";
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
export { createIommuPort, createVdcmPort, type IommuClient, type VdcmClient } from "./adapters/grpc-ports.js";
export { createVfioHandlers, createVfioServer, SESSION_KEEPALIVE, startVfioServer, type StartVfioServerOptions } from "./adapters/server.js";
export { fromDeviceRef, toDeviceRef } from "./adapters/convert.js";
