/**
 * The pick-one decisions of DESIGN §3, as constants (the kernel sources disagree; these are ours).
 */

/** Default size of the IOASID namespace: 2^20, the 20-bit PCIe PASID. */
export const DEFAULT_CAPACITY = 1 << 20;

/** PASID 0 is RID_PASID (DMA without PASID): reserved, never allocated from any set. */
export const RID_PASID = 0;

/** The invalid IOASID (`INVALID_IOASID` in the kernel): `ioasid_t` is uint32. */
export const INVALID_IOASID = 0xffffffff;

/**
 * Largest capacity the model accepts: 2^24. Per-IOASID state is kept in dense arrays (about 17
 * bytes per ID of capacity); PCIe PASIDs and SMMU SubstreamIDs are at most 20 bits.
 */
export const MAX_CAPACITY = 1 << 24;

/** Largest SPID (guest PASID): 20 bits, whatever the host's capacity; SPID 0 is the guest's RID_PASID. */
export const MAX_SPID = 0xfffff;

/** Largest private data attached to one IOASID, in bytes. */
export const MAX_PRIVATE_DATA_BYTES = 1024;

/** Most IOASIDs one batch allocation takes. */
export const MAX_BATCH_ALLOC = 65_536;

/** Longest role, instance or purpose string of a reference holder or subscriber. */
export const MAX_NAME_LENGTH = 128;

/**
 * Notifier priority, i.e. call order of a FREE: higher number first (ioasid.rst "Ordering"):
 * quiesce submission (KVM, CPU), then the device (VDCM, DEVICE), then the IOMMU context (IOMMU).
 */
export const Priority = {
  LAST: 0,
  IOMMU: 1,
  DEVICE: 2,
  CPU: 3,
} as const;
export type Priority = (typeof Priority)[keyof typeof Priority];

/** Kind of token an IOASID set is created with; a token is unique within its type. */
export const TokenType = {
  /** An opaque u64 (the kernel's IOASID_SET_TYPE_NULL, renamed NONE in review). */
  NONE: "NONE",
  /** The VM's address-space id (the kernel's mm_struct): KVM registers by it before the set exists. */
  MM: "MM",
} as const;
export type TokenType = (typeof TokenType)[keyof typeof TokenType];

/** State of an allocated IOASID. A reclaimed IOASID has no state: it is back in the pool. */
export const IoasidState = {
  ACTIVE: "ACTIVE",
  /** Freed, references outstanding: no new reference can be taken (ioasid.rst "Reference counting"). */
  FREE_PENDING: "FREE_PENDING",
} as const;
export type IoasidState = (typeof IoasidState)[keyof typeof IoasidState];

/**
 * IOASID events, each the by-product of exactly one state transition (ioasid.rst "Level
 * Sensitivity"). RECLAIM is ours: it is recorded in the event log for tools and history, and never
 * delivered to notifier subscribers (its scope is empty).
 */
export const EventType = {
  ALLOC: "ALLOC",
  FREE: "FREE",
  BIND: "BIND",
  UNBIND: "UNBIND",
  SET_ALLOC: "SET_ALLOC",
  SET_FREE: "SET_FREE",
  RECLAIM: "RECLAIM",
} as const;
export type EventType = (typeof EventType)[keyof typeof EventType];

/** Which notifier chains an event goes to (DESIGN §3 "Events"). */
export const EVENT_SCOPES: Readonly<Record<EventType, { readonly global: boolean; readonly set: boolean }>> = {
  ALLOC: { global: false, set: true },
  FREE: { global: true, set: true },
  BIND: { global: false, set: true },
  UNBIND: { global: false, set: true },
  SET_ALLOC: { global: true, set: false },
  SET_FREE: { global: true, set: false },
  RECLAIM: { global: false, set: false },
};
