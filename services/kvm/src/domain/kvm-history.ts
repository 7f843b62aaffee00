import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";

/** What a `vmcs_update` record says happened to the VMCS PASID translation table. */
export const VmcsUpdateKind = { INSTALL: "INSTALL", CLEAR: "CLEAR" } as const;
export type VmcsUpdateKind = (typeof VmcsUpdateKind)[keyof typeof VmcsUpdateKind];

/** Why an entry was cleared from the VMCS PASID translation table. */
export const VmcsClearCause = {
  /** The guest PASID was unbound (UNBIND). */
  UNBIND: "UNBIND",
  /** The IOASID was freed (FREE). */
  FREE: "FREE",
  /** A later BIND of the guest PASID replaced it. */
  REPLACED: "REPLACED",
  /** The VM was destroyed (ioasid.rst rule 4). */
  VM_DESTROYED: "VM_DESTROYED",
  /** A restored VM's reference is no longer recorded by the core (reconcile). */
  RECONCILE: "RECONCILE",
} as const;
export type VmcsClearCause = (typeof VmcsClearCause)[keyof typeof VmcsClearCause];

/** One change of a VM's VMCS PASID translation table, in the domain's words (`cause` only on CLEAR). */
export interface VmcsUpdate {
  readonly kind: VmcsUpdateKind;
  readonly gpasid: number;
  readonly hpasid: number;
  readonly cause?: VmcsClearCause;
}

/**
 * What KVM records: a case of the history catalogue, except `vmcsUpdate`, whose kind and cause are
 * the domain's closed sets (DESIGN §2: domain code knows no proto; adapters/convert.ts maps them to
 * ioasid.history.v1).
 */
export type KvmHistoryAction = Exclude<HistoryActionInput, { readonly $case: "vmcsUpdate" }> | { readonly $case: "vmcsUpdate"; readonly value: VmcsUpdate };

/** Where a VM's history records go (the bus HistoryRecorder, through the adapter, in production). */
export interface HistorySink {
  record(action: KvmHistoryAction, fields?: HistoryFields): void;
}
