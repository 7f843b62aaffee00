import { Code, invalidField, reasonError } from "@ioasid/errors";

/**
 * The reasons VFIO itself refuses a call with, and the status code each always comes with
 * (proto/ioasid/vfio/v1/vfio.proto; names from proto/ioasid/errors/v1/errors.proto). Reasons the
 * core, the IOMMU or VDCM return pass through unchanged, except where {@link VfioReason} renames
 * them into the VFIO contract's words (see `device-assignments.ts`).
 */
export const VfioReason = {
  INVALID_FIELD: Code.INVALID_ARGUMENT,
  // A stage-2 mapping's shape, checked before the domain is created (dma-mapping.ts).
  ADDRESS_NOT_ALIGNED: Code.INVALID_ARGUMENT,
  INVALID_RANGE: Code.INVALID_ARGUMENT,
  CONTAINER_NOT_FOUND: Code.NOT_FOUND,
  CONTAINER_CLOSING: Code.FAILED_PRECONDITION,
  SESSION_ALREADY_ATTACHED: Code.ALREADY_EXISTS,
  DEVICE_ALREADY_ASSIGNED: Code.ALREADY_EXISTS,
  DEVICE_BUSY: Code.FAILED_PRECONDITION,
  DEVICE_NOT_ASSIGNED: Code.FAILED_PRECONDITION,
  SET_NOT_EMPTY: Code.FAILED_PRECONDITION,
  // DESIGN §5 Faults: a VMM's answer naming a group its container was never given — unknown, another
  // container's, or answered and forgotten — is the fault fd's -EINVAL for an unknown cookie; it
  // tells the caller nothing of other VMs' groups (was NOT_FOUND / PERMISSION_DENIED NOT_OWNED).
  FAULT_GROUP_NOT_GIVEN: Code.INVALID_ARGUMENT,
  FAULT_GROUP_ALREADY_RESPONDED: Code.FAILED_PRECONDITION,
  FAULT_WATCHER_REPLACED: Code.ABORTED,
  // DESIGN §3: naming another VM's container without that VM's capability is PERMISSION_DENIED —
  // a missing capability too (the fd the VMM does not hold), not UNAUTHENTICATED: the caller's
  // connection may well be authenticated (mTLS); what it lacks is authority over this container.
  CAPABILITY_MISSING: Code.PERMISSION_DENIED,
  CAPABILITY_NOT_FOR_CONTAINER: Code.PERMISSION_DENIED,
  // Issue 14 item 3: MapDma maps only host memory given to the container (host-memory-pool.ts).
  // The pool running out is ENOSPC (RESOURCE_EXHAUSTED); mapping memory that is not yours is
  // EPERM (PERMISSION_DENIED), as VFIO_IOMMU_MAP_DMA of pages the caller cannot pin would be.
  HOST_MEMORY_EXHAUSTED: Code.RESOURCE_EXHAUSTED,
  HOST_MEMORY_NOT_GIVEN: Code.PERMISSION_DENIED,
  // Issue 16: a vIOMMU object is named only through the container that allocated it. Another
  // container's id is NOT_FOUND like one never allocated (container-viommus.ts): a VM learns
  // nothing of other VMs' objects, as the fault fd tells nothing of other VMs' groups.
  VIOMMU_NOT_FOUND: Code.NOT_FOUND,
  VDEVICE_NOT_FOUND: Code.NOT_FOUND,
  VEVENTQ_NOT_FOUND: Code.NOT_FOUND,
  // DestroyViommu while a device of the container translates through a nested domain on it (the
  // IOMMU refuses the same, EBUSY; VFIO says which device to replace away first).
  VIOMMU_IN_USE: Code.FAILED_PRECONDITION,
} as const satisfies Record<string, Code>;
export type VfioReason = keyof typeof VfioReason;

/** Builds the {@link DomainError} of a reason of VfioReason, with its status code. */
export const vfioError = reasonError(VfioReason);

/** INVALID_ARGUMENT `INVALID_FIELD` naming the field (shared by every service). */
export { invalidField };
