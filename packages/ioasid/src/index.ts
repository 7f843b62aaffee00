/**
 * The IOASID domain model of DESIGN §3: pure and synchronous, no I/O.
 */
export {
  DEFAULT_CAPACITY,
  EVENT_SCOPES,
  EventType,
  INVALID_IOASID,
  IoasidState,
  MAX_BATCH_ALLOC,
  MAX_CAPACITY,
  MAX_NAME_LENGTH,
  MAX_PRIVATE_DATA_BYTES,
  MAX_SPID,
  Priority,
  RID_PASID,
  TokenType,
} from "./constants.js";
export { CoreReason, coreError } from "./reasons.js";
export { assertHolder, fromHolderKey, OWNER_ROLE, toHolderKey, type Holder } from "./holder.js";
export { IdBitmap } from "./id-bitmap.js";
export {
  IoasidSpace,
  type Allocation,
  type CustomAllocator,
  type FreeResult,
  type HolderCount,
  type IoasidEvent,
  type IoasidInfo,
  type IoasidSpaceOptions,
  type PutResult,
  type RegisterOptions,
  type Registration,
  type RegistrationScope,
  type SetInfo,
  type SetToken,
  type SpaceCensus,
  type SpaceState,
  type SpaceStats,
  type Subscriber,
} from "./ioasid-space.js";
