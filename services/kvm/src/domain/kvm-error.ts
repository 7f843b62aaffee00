import { Code, invalidField, reasonError } from "@ioasid/errors";

/**
 * Every reason KvmService refuses a call with, and its status code (DESIGN §8; the names are
 * `ErrorReason` values of proto/ioasid/errors/v1/errors.proto, as proto/ioasid/kvm/v1/kvm.proto
 * assigns them to its RPCs). SET_NOT_EMPTY and transport failures (UNAVAILABLE,
 * DEADLINE_EXCEEDED) come from ioasid-core and pass through unchanged.
 */
export const KvmReason = {
  /** A required field is missing or malformed; metadata `field` names it. */
  INVALID_FIELD: Code.INVALID_ARGUMENT,
  /** `vcpu` is not below the VM's vCPU count. */
  VCPU_OUT_OF_RANGE: Code.INVALID_ARGUMENT,
  /** No VM with that id. */
  VM_NOT_FOUND: Code.NOT_FOUND,
  /** A VM with that MM token exists. */
  VM_EXISTS: Code.ALREADY_EXISTS,
} as const satisfies Record<string, Code>;
export type KvmReason = keyof typeof KvmReason;

/** Builds the {@link DomainError} of a reason of KvmReason, with its status code. */
export const kvmError = reasonError(KvmReason);

/** INVALID_ARGUMENT `INVALID_FIELD` naming the field (shared by every service). */
export { invalidField };
