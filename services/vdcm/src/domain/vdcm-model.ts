import { quote } from "@ioasid/errors";
import { invalidField, vdcmError } from "./vdcm-errors.js";

// The closed sets, limits and id rules of VDCM's device model (vdcm-state.ts is the model itself).

/** How a work queue is shared (idxd WQ mode). */
export const WqMode = {
  /** One client; its PASID is programmed in the work-queue configuration. */
  DEDICATED: "DEDICATED",
  /** Many clients submit with ENQCMD; each descriptor carries its PASID. */
  SHARED: "SHARED",
} as const;
export type WqMode = (typeof WqMode)[keyof typeof WqMode];

/** Where a device PASID entry is in its life. */
export const EntryState = {
  /** The device issues DMA with this PASID. */
  PROGRAMMED: "PROGRAMMED",
  /** Being drained before it is cleared (clear, unassign or FREE in progress): no new descriptor. */
  DRAINING: "DRAINING",
} as const;
export type EntryState = (typeof EntryState)[keyof typeof EntryState];

/** Queue depth given to a work queue registered with size 0. */
export const DEFAULT_WQ_SIZE = 32;
/** Largest queue depth accepted. */
export const MAX_WQ_SIZE = 65_535;
/** Device PASID table capacity given to a device registered with 0. */
export const DEFAULT_MAX_PASID_ENTRIES = 1024;
/** Largest device PASID table accepted (one entry per 20-bit PASID). */
export const MAX_PASID_ENTRIES = 1 << 20;
/** Most work queues one device may have. */
export const MAX_WQS_PER_DEVICE = 1024;
/**
 * Longest device id: the id is also the start of the reference purposes VDCM takes
 * (`<device>.wq<n>[.desc]`), and a core holder purpose is at most 128 characters.
 */
export const MAX_DEVICE_ID_LENGTH = 100;
/** Largest guest PASID (SPID): 20 bits (DESIGN §3); 0 is the guest's RID_PASID and never programmed. */
export const MAX_GPASID = 0xfffff;

const DEVICE_ID = /^[A-Za-z0-9._:@-]+$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * The canonical form of an mdev id: a UUID in lower case (mdevs are named by UUID, compared
 * whatever the case); any other id (1..64 of letters, digits and `._:@-`, accepted for tools that
 * name mdevs otherwise) as it is.
 */
export function normalizeMdevUuid(mdevUuid: string): string {
  return UUID.test(mdevUuid) ? mdevUuid.toLowerCase() : mdevUuid;
}

/** FAILED_PRECONDITION `PASID_IN_USE`: another guest's context for the host PASID is on the device. */
export function pasidInUse(deviceId: string, hpasid: number, foreign: { readonly setId: number; readonly generation: number }) {
  return vdcmError(
    "PASID_IN_USE",
    `device ${deviceId} still has a context for host PASID ${hpasid} of set ${foreign.setId} (generation ${foreign.generation}); it must be cleared first`,
  );
}

/**
 * Validates a device id: 1..{@link MAX_DEVICE_ID_LENGTH} of letters, digits and `._:@-` (it
 * becomes part of reference purposes).
 * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD`
 */
export function assertDeviceId(deviceId: string, field: string): void {
  if (deviceId.length === 0) throw invalidField(field, `${field} is required`);
  if (deviceId.length > MAX_DEVICE_ID_LENGTH || !DEVICE_ID.test(deviceId)) {
    throw invalidField(field, `${field} ${quote(deviceId)} must be 1..${MAX_DEVICE_ID_LENGTH} of letters, digits and ._:@-`);
  }
}
