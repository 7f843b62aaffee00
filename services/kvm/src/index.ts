/**
 * The KVM role (DESIGN §5 "KVM"): per VM, the VMCS PASID translation table ENQCMD consults, kept in
 * step with the VM's IOASIDs by notifier events; served as ioasid.kvm.v1.KvmService.
 */
export { decodeIa32Pasid, GpCause, Ia32Pasid, toIa32Pasid, type DecodedIa32Pasid } from "./domain/ia32-pasid.js";
export { invalidField, kvmError, KvmReason } from "./domain/kvm-error.js";
export {
  DEFAULT_MAX_RELEASE_ATTEMPTS,
  getReference,
  holdsReference,
  Kvm,
  KVM_MAX_VCPUS,
  KVM_EVENT_TYPES,
  KVM_SUBSCRIBER,
  kvmRegistrations,
  KvmEventType,
  MAX_VM_NAME_LENGTH,
  orphanReferences,
  putReference,
  registerVm,
  VMCS_PURPOSE,
  vmInstance,
  vmReferences,
  type CreateVmSpec,
  type DestroyVmResult,
  type EnqcmdResult,
  type EventSubscription,
  type HistorySink,
  type HolderReference,
  type KeptVm,
  type KeptVmcsEntry,
  type KvmKeptEntry,
  type KvmEvent,
  type KvmEventHandler,
  type KvmLogLevel,
  type KvmOptions,
  type NotifierPort,
  type RegistrationStatus,
  type VmSnapshot,
} from "./domain/kvm.js";
export { fromKvmStateEntry, KVM_STATE_FORMAT, kvmStateCodec, toKvmStateEntry } from "./adapters/kvm-state-codec.js";
export {
  createKvmHandlers,
  createNotifierPort,
  buildKvmRole,
  KVM_EVENTS,
  toEnqcmdResponse,
  toKvmEvent,
  toVm,
  type KvmRoleOptions,
} from "./adapters/server.js";
export { VmcsPasidTable, type InstallOutcome, type PasidTranslation } from "./domain/vmcs-pasid-table.js";
