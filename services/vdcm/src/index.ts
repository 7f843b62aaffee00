/**
 * The VDCM role (idxd Virtual Device Composition Module / mdev) as a service: physical work-queue
 * devices, their device PASID tables, mdevs assigned to VMs, and the DEVICE-priority FREE handler
 * (DESIGN §5 "VDCM").
 */
export { ownRegistrations, registerOnSet, unregisterNotifier, type VdcmSubscriber } from "./domain/core-registrations.js";
export {
  assertDescriptor,
  CompletionStatus,
  DescriptorOp,
  DMA_PAGE_SIZE,
  MAX_TRANSFER_SIZE,
  runDescriptor,
  type Completion,
  type Descriptor,
  type DmaRequest,
  type DmaResult,
  type DmaTranslator,
} from "./domain/descriptor-runner.js";
export { createIommuClient, iommuDmaTranslator, TRANSLATE_DEADLINE_MS, type IommuClient } from "./adapters/iommu-adapter.js";
export type { HistoryFields, HistorySink, Holder } from "./domain/ports.js";
export { createVdcmHandlers, createVdcmServer, type CreateVdcmServerOptions } from "./adapters/server.js";
export { buildVdcmRole, type VdcmRoleOptions } from "./adapters/role.js";
export { toVdcmEvent } from "./adapters/convert.js";
export { checkInstanceOrExit, vdcmConfigSchema } from "./config.js";
export { PasidSpace, type Submission, type SubmissionResult } from "./domain/submission.js";
export type { ClearResult, IoasidEventLike, VdcmOptions } from "./domain/vdcm-options.js";
export { purposeOf, Vdcm, VDCM_ROLE } from "./domain/vdcm.js";
export { invalidField, vdcmError, VdcmReason } from "./domain/vdcm-errors.js";
export type { KeptDevice, KeptMdev, KeptPasidEntry, KeptRegistration, VdcmKeptEntry } from "./domain/vdcm-kept-entry.js";
export {
  DEFAULT_MAX_PASID_ENTRIES,
  DEFAULT_WQ_SIZE,
  EntryState,
  MAX_DEVICE_ID_LENGTH,
  MAX_GPASID,
  MAX_PASID_ENTRIES,
  MAX_WQ_SIZE,
  MAX_WQS_PER_DEVICE,
  normalizeMdevUuid,
  WqMode,
} from "./domain/vdcm-model.js";
export { VdcmState, type VdcmStateOptions } from "./domain/vdcm-state.js";
export type {
  DevicePasidEntry,
  DeviceSpec,
  DeviceView,
  MdevView,
  ResolvedWq,
  VdcmSnapshot,
  WorkQueueView,
  WqReservation,
  WqSpec,
} from "./domain/vdcm-views.js";
export { fromVdcmStateEntry, toVdcmStateEntry, VDCM_STATE_FORMAT, vdcmStateCodec } from "./adapters/vdcm-state-codec.js";
