import { Code, invalidField, isDomainError, reasonError } from "@ioasid/errors";

/**
 * The error reasons the IOMMU role returns (proto/ioasid/iommu/v1/iommu.proto names them per RPC;
 * proto/ioasid/errors/v1/errors.proto registers them), each with the status code it always comes
 * with (DESIGN §8: EINVAL → INVALID_ARGUMENT, ENOENT → NOT_FOUND, EEXIST → ALREADY_EXISTS, EBUSY →
 * FAILED_PRECONDITION, EPERM → PERMISSION_DENIED).
 */
export const IommuReason = {
  INVALID_FIELD: Code.INVALID_ARGUMENT,
  DEVICE_EXISTS: Code.ALREADY_EXISTS,
  DEVICE_NOT_FOUND: Code.NOT_FOUND,
  DEVICE_IN_USE: Code.FAILED_PRECONDITION,
  PASID_OUT_OF_RANGE: Code.INVALID_ARGUMENT,
  PASID_ZERO_RESERVED: Code.INVALID_ARGUMENT,
  PASID_IN_USE: Code.FAILED_PRECONDITION,
  PASID_NOT_SUPPORTED: Code.FAILED_PRECONDITION,
  DOMAIN_NOT_FOUND: Code.NOT_FOUND,
  DOMAIN_NOT_PAGING: Code.FAILED_PRECONDITION,
  DOMAIN_IN_USE: Code.FAILED_PRECONDITION,
  DOMAIN_INCOMPATIBLE: Code.FAILED_PRECONDITION,
  DOMAIN_MISMATCH: Code.FAILED_PRECONDITION,
  ATTACH_HANDLE_NOT_FOUND: Code.NOT_FOUND,
  SPID_MISMATCH: Code.FAILED_PRECONDITION,
  SPID_IN_USE: Code.INVALID_ARGUMENT,
  SVA_BOND_NOT_FOUND: Code.NOT_FOUND,
  ADDRESS_NOT_ALIGNED: Code.INVALID_ARGUMENT,
  INVALID_RANGE: Code.INVALID_ARGUMENT,
  IOVA_ALREADY_MAPPED: Code.ALREADY_EXISTS,
  STALE_GENERATION: Code.FAILED_PRECONDITION,
  IOASID_NOT_FOUND: Code.NOT_FOUND,
  IOASID_FREE_PENDING: Code.NOT_FOUND,
  IOASID_NOT_IN_SET: Code.PERMISSION_DENIED,
  // A guest bind on a host PASID whose set is not a VM's (MM token): the ownership check (issue 16).
  SET_NOT_A_VM: Code.PERMISSION_DENIED,
  FAULT_GROUP_NOT_FOUND: Code.NOT_FOUND,
  FAULT_GROUP_NOT_OWNED: Code.PERMISSION_DENIED,
  FAULT_GROUP_ALREADY_RESPONDED: Code.FAILED_PRECONDITION,
  FAULT_GROUP_INCOMPLETE: Code.FAILED_PRECONDITION,
  PRGI_IN_USE: Code.FAILED_PRECONDITION,
  GUEST_BIND_NOT_FOUND: Code.NOT_FOUND,
  FAULT_HANDLER_REPLACED: Code.ABORTED,
  // ReplaceDomain of a target with nothing attached (iommufd: replace needs an attachment).
  PASID_NOT_ATTACHED: Code.INVALID_ARGUMENT,
  // The failure injection's armed point (fail-nth; ENOMEM → RESOURCE_EXHAUSTED).
  FAULT_INJECTED: Code.RESOURCE_EXHAUSTED,
  FAULT_INJECTION_DISABLED: Code.FAILED_PRECONDITION,
  // vIOMMU objects (iommufd model, DESIGN §5; issue 16 item 3): viommu.ts.
  VIOMMU_NOT_FOUND: Code.NOT_FOUND,
  VIOMMU_IN_USE: Code.FAILED_PRECONDITION,
  VDEVICE_EXISTS: Code.ALREADY_EXISTS,
  VDEVICE_NOT_FOUND: Code.NOT_FOUND,
  VDEVICE_IN_USE: Code.FAILED_PRECONDITION,
  VEVENTQ_EXISTS: Code.ALREADY_EXISTS,
  VEVENTQ_NOT_FOUND: Code.NOT_FOUND,
} as const;
/** One of the {@link IommuReason} names. */
export type IommuReason = keyof typeof IommuReason;

/** Builds the {@link DomainError} of a reason of IommuReason, with its status code. */
export const iommuError = reasonError(IommuReason);

/** INVALID_ARGUMENT `INVALID_FIELD` naming the field (shared by every service). */
export { invalidField };

/** Core refusals meaning "that IOASID generation is gone": nothing of it is held any more. */
const GONE = ["IOASID_NOT_FOUND", "STALE_GENERATION", "SET_UNKNOWN"];

/** Whether a core refusal says the IOASID generation is gone (the driver and its fault path both ask). */
export const isGone = (err: unknown): boolean => GONE.some((r) => isDomainError(err, r));
