/**
 * The KVM role (DESIGN §5 "KVM"): per VM, the VMCS PASID translation table ENQCMD consults, kept in
 * step with the VM's IOASIDs by notifier events; served as ioasid.kvm.v1.KvmService.
 */
export { KVM_SUBSCRIBER, VMCS_PURPOSE, vmInstance, type HolderReference, type RegistrationStatus } from "./domain/holder-reference.js";
export { decodeIa32Pasid, GpCause, Ia32Pasid, toIa32Pasid, type DecodedIa32Pasid } from "./domain/ia32-pasid.js";
export { invalidField, kvmError, KvmReason } from "./domain/kvm-error.js";
export { KVM_EVENT_TYPES, KvmEventType, type EventSubscription, type KvmEvent, type KvmEventHandler, type NotifierPort } from "./domain/kvm-event.js";
export { VmcsClearCause, VmcsUpdateKind, type HistorySink, type KvmHistoryAction, type VmcsUpdate } from "./domain/kvm-history.js";
export { type KeptVm, type KeptVmcsEntry, type KvmKeptEntry } from "./domain/kvm-kept-entry.js";
export { DEFAULT_MAX_RELEASE_ATTEMPTS, type KvmLogLevel, type KvmOptions } from "./domain/kvm-options.js";
export { Kvm, KVM_MAX_VCPUS, MAX_VM_NAME_LENGTH, type CreateVmSpec, type DestroyVmResult, type EnqcmdResult } from "./domain/kvm.js";
export { type VmSnapshot } from "./domain/vm-snapshot.js";
export { VmcsPasidTable, type InstallOutcome, type PasidTranslation } from "./domain/vmcs-pasid-table.js";
export { getReference, holdsReference, kvmRegistrations, orphanReferences, putReference, registerVm, vmReferences } from "./domain/kvm-core-calls.js";
export { toEnqcmdResponse, toHistoryAction, toHistorySink, toKvmEvent, toVm } from "./adapters/convert.js";
export { fromKvmStateEntry, KVM_STATE_FORMAT, kvmStateCodec, toKvmStateEntry } from "./adapters/kvm-state-codec.js";
export { createNotifierPort } from "./adapters/notifier-port.js";
export { kvmConfigSchema } from "./config.js";
export { buildKvmRole, createKvmHandlers, type KvmRoleOptions } from "./adapters/server.js";
