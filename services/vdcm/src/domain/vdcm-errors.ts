import { Code, DomainError, invalidField, reasonError } from "@ioasid/errors";

/**
 * Every reason VdcmService answers with, and the status code it always comes with (the names are
 * `ErrorReason` values of proto/ioasid/errors/v1/errors.proto; each RPC's comment in
 * proto/ioasid/vdcm/v1/vdcm.proto says which it returns). Core reasons that VDCM passes through
 * from find-by-SPID and get (`SPID_NOT_FOUND`, `IOASID_FREE_PENDING`, …) keep the core's code.
 */
export const VdcmReason = {
  INVALID_FIELD: Code.INVALID_ARGUMENT,
  DEVICE_EXISTS: Code.ALREADY_EXISTS,
  DEVICE_NOT_FOUND: Code.NOT_FOUND,
  DEVICE_IN_USE: Code.FAILED_PRECONDITION,
  WQ_NOT_FOUND: Code.NOT_FOUND,
  WQ_IN_USE: Code.FAILED_PRECONDITION,
  WQ_SHARED: Code.FAILED_PRECONDITION,
  WQ_PASID_PROGRAMMED: Code.FAILED_PRECONDITION,
  WQ_PASID_NOT_PROGRAMMED: Code.FAILED_PRECONDITION,
  MDEV_EXISTS: Code.ALREADY_EXISTS,
  MDEV_NOT_FOUND: Code.NOT_FOUND,
  MDEV_ASSIGNED: Code.FAILED_PRECONDITION,
  MDEV_ALREADY_ASSIGNED: Code.ALREADY_EXISTS,
  MDEV_BUSY: Code.FAILED_PRECONDITION,
  MDEV_NOT_ASSIGNED: Code.FAILED_PRECONDITION,
  SET_NOT_FOUND: Code.NOT_FOUND,
  SET_NOT_EMPTY: Code.FAILED_PRECONDITION,
  PASID_IN_USE: Code.FAILED_PRECONDITION,
  DEVICE_PASID_TABLE_FULL: Code.RESOURCE_EXHAUSTED,
  PASID_UNTRANSLATABLE: Code.INVALID_ARGUMENT,
} as const satisfies Record<string, Code>;
export type VdcmReason = keyof typeof VdcmReason;

/** Builds the {@link DomainError} of a reason of VdcmReason, with its status code. */
export const vdcmError = reasonError(VdcmReason);

/** INVALID_ARGUMENT `INVALID_FIELD` naming the field (shared by every service). */
export { invalidField };

/**
 * A core failure as VDCM answers it: the set named by an mdev no longer exists → NOT_FOUND
 * `SET_NOT_FOUND`; a PASID out of range → INVALID_FIELD naming the request field; anything else
 * (SPID_NOT_FOUND, IOASID_FREE_PENDING, IOASID_NOT_IN_SET, STALE_GENERATION, UNAVAILABLE…) as is.
 */
export function fromCoreError(err: unknown, field?: string): DomainError {
  const e = DomainError.from(err);
  if (e.reason === "SET_UNKNOWN") return vdcmError("SET_NOT_FOUND", e.message);
  if (field !== undefined && (e.reason === "IOASID_OUT_OF_RANGE" || e.reason === "SPID_OUT_OF_RANGE")) return invalidField(field, e.message);
  return e;
}

/** The core's refusals of a shared-work-queue descriptor's PASID lookup (the PASID does not translate for this guest). */
const UNTRANSLATABLE = new Set(["SPID_NOT_FOUND", "IOASID_NOT_FOUND", "IOASID_FREE_PENDING", "IOASID_NOT_IN_SET", "STALE_GENERATION"]);

/**
 * A shared-work-queue descriptor whose PASID the lookup refused, as the portal answers it: dropped
 * with INVALID_ARGUMENT `PASID_UNTRANSLATABLE` — the ENQCMD/MOVDIR portal's -EINVAL, the descriptor
 * being malformed for this guest whatever the lookup's own reason (DESIGN §5 VDCM), which the
 * ErrorInfo metadata `lookup` names. Other failures (the mdev's set gone, the core unreachable, a
 * PASID out of range) keep their own answer.
 */
export function untranslatable(e: DomainError, pasid: number): DomainError {
  if (!UNTRANSLATABLE.has(e.reason)) return e;
  return vdcmError("PASID_UNTRANSLATABLE", `PASID ${pasid} does not translate for this guest (${e.reason}): the descriptor is dropped`, { lookup: e.reason });
}
