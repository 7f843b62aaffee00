import type { HistoryActionCase } from "@ioasid/bus";
import type { PageRequestKeptEntry } from "./page-requests.js";
import type { ViommuKeptEntry } from "./viommu.js";

// The modelled VT-d hardware's vocabulary: its limits, closed sets, table entries, the specs its
// mutations take and the entries it keeps (iommu-hardware.ts is the tables and their rules).

/** Bytes of a page: every IOVA, physical address and size of Map/Unmap is a multiple of it. */
export const PAGE_SIZE = 4096n;
/** Most PASIDs a device may support (20-bit PASID). */
export const MAX_PASIDS = 1 << 20;
/** PASID 0 is RID_PASID: the entry used by requests without PASID, never a PASID attach target. */
export const RID_PASID = 0;
/** Page-request credits of a device that registers with 0. */
export const DEFAULT_PRI_CREDITS = 32;
/** IOTLB flush records kept for QueryState. */
export const IOTLB_FLUSH_LOG_SIZE = 1024;
/** Longest device id or owner. */
export const MAX_NAME_LENGTH = 128;
/** Largest owner data stored in a handle, in bytes. */
export const MAX_OWNER_DATA = 4096;

/** Kind of translation a domain provides. */
export const DomainType = { PAGING: "PAGING", SVA: "SVA", NESTED: "NESTED" } as const;
export type DomainType = (typeof DomainType)[keyof typeof DomainType];

/** How an attach handle was created. */
export const AttachKind = { DOMAIN: "DOMAIN", GPASID_BIND: "GPASID_BIND", SVA_BIND: "SVA_BIND" } as const;
export type AttachKind = (typeof AttachKind)[keyof typeof AttachKind];

/** PCI physical or virtual (SR-IOV) function. */
export const DeviceFunction = { PF: "PF", VF: "VF" } as const;
export type DeviceFunction = (typeof DeviceFunction)[keyof typeof DeviceFunction];

/** Granularity of an IOTLB invalidation. */
export const FlushScope = { GLOBAL: "GLOBAL", DOMAIN: "DOMAIN", PASID: "PASID", RANGE: "RANGE" } as const;
export type FlushScope = (typeof FlushScope)[keyof typeof FlushScope];

/** Why an IOTLB invalidation was needed. */
export const FlushCause = {
  UNMAP: "UNMAP",
  DETACH: "DETACH",
  IOASID_FREE: "IOASID_FREE",
  DEVICE_REMOVED: "DEVICE_REMOVED",
  MM_RELEASE: "MM_RELEASE",
  REPLACE: "REPLACE",
} as const;
export type FlushCause = (typeof FlushCause)[keyof typeof FlushCause];

/** Why a DMA translation faulted. */
export const FaultReason = {
  NO_PASID_ENTRY: "NO_PASID_ENTRY",
  NOT_PRESENT: "NOT_PRESENT",
  PERMISSION: "PERMISSION",
  PASID_OUT_OF_RANGE: "PASID_OUT_OF_RANGE",
  PRI_CREDITS_EXHAUSTED: "PRI_CREDITS_EXHAUSTED",
} as const;
export type FaultReason = (typeof FaultReason)[keyof typeof FaultReason];

/** Access a DMA request asks for, or a mapping grants. */
export interface DmaAccess {
  readonly read: boolean;
  readonly write: boolean;
  readonly execute: boolean;
  readonly privileged: boolean;
}

/** A PCI function as registered. */
export interface DeviceSpec {
  readonly deviceId: string;
  /** Valid PASIDs are 1..maxPasids-1; 0 = no PASID capability. */
  readonly maxPasids: number;
  readonly priCapable: boolean;
  readonly function: DeviceFunction;
  /** The PF of a VF; empty for a PF. */
  readonly parentDeviceId: string;
  readonly iommuGroup: number;
  /** Page-request credits; 0 = {@link DEFAULT_PRI_CREDITS}. */
  readonly priCredits: number;
}

/** A device and its PASID table (ascending by PASID; RID_PASID first). */
export interface DeviceView extends DeviceSpec {
  readonly pasidEntries: readonly PasidEntry[];
}

/** One programmed entry of a device's PASID table. */
export interface PasidEntry {
  /** The PASID; 0 with `withoutPasid` for the RID_PASID entry. */
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly domainId: number;
  readonly domainType: DomainType;
  readonly handleId: bigint;
  /** Guest bind: the guest's set; 0 otherwise. */
  readonly setId: number;
  /** Guest bind: the guest PASID (SPID); 0 otherwise. */
  readonly gpasid: number;
  /** Generation of the IOASID when programmed; 0 when unchecked. */
  readonly generation: number;
  /** Whether faults under the entry are reported. */
  readonly faultReporting: boolean;
}

/** One mapped range of a paging domain. */
export interface Mapping {
  readonly iova: bigint;
  readonly paddr: bigint;
  readonly size: bigint;
  readonly access: DmaAccess;
}

/** A translation context. */
export interface Domain {
  readonly domainId: number;
  readonly type: DomainType;
  /** NESTED: the PAGING second stage. */
  readonly parentDomainId: number;
  /** NESTED: GPA of the guest's first-stage page table. */
  readonly guestPgtable: bigint;
  /** SVA: the mm whose page table is shared. */
  readonly mmToken: bigint;
  readonly attachCount: number;
  /** PAGING: ascending by IOVA. */
  readonly mappings: readonly Mapping[];
  /** Created by BindGpasid/SvaBind for one handle or mm, and destroyed with it. */
  readonly implicit: boolean;
}

/** The association of a domain with a device or one of its PASIDs (iommu_attach_handle). */
export interface AttachHandle {
  readonly handleId: bigint;
  readonly kind: AttachKind;
  readonly domainId: number;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly owner: string;
  readonly ownerData: Uint8Array;
  readonly setId: number;
  readonly gpasid: number;
  readonly generation: number;
  readonly createdAt: Date;
}

/** A native SVA bond of an mm to a device. */
export interface SvaBond {
  readonly deviceId: string;
  readonly mmToken: bigint;
  readonly pasid: number;
  readonly handleId: bigint;
  readonly domainId: number;
  readonly users: number;
}

/** One IOTLB (and DevTLB) invalidation. */
export interface IotlbFlush {
  readonly seq: bigint;
  readonly scope: FlushScope;
  readonly cause: FlushCause;
  readonly domainId: number;
  readonly pasid: number;
  readonly deviceId: string;
  readonly deviceTlb: boolean;
  readonly address: bigint;
  readonly size: bigint;
  readonly flushedAt: Date;
}

/**
 * A guest PASID bound on one or more devices (the kernel's intel_svm of a host PASID): which set
 * and generation it belongs to, its SPID, the devices it is programmed on, and what the IOMMU holds
 * for it in the core. Only the first device bind takes the reference and attaches the SPID (the
 * core then emits BIND); only the last unbind detaches it (UNBIND) (ioasid.rst, "KVM PASID
 * Translation Table Updates", rule 1). The last unbind keeps the reference and this record: the
 * IOASID's FREE releases the reference (the "Guest IOASID Life Cycle" table, steps 22–23), and a
 * rebind meanwhile attaches the SPID again without taking a second one. The driver updates
 * `refHeld`/`spidAttached` as its core calls succeed.
 */
export interface GpasidBinding {
  readonly hpasid: number;
  readonly setId: number;
  readonly generation: number;
  readonly gpasid: number;
  /** Devices with a programmed entry for it. */
  readonly devices: Set<string>;
  /** The IOMMU holds its "bind" reference on the IOASID. */
  refHeld: boolean;
  /**
   * refHeld was set for a get whose answer was lost: the core may not have applied it. Asked
   * before the reference is relied on (in memory only: a restart's reconcile asks the core anyway).
   */
  refUncertain?: boolean;
  /** The SPID is attached in the core (by this IOMMU). */
  spidAttached: boolean;
  /** The guest's first-stage page table (guest virtual → guest physical), ascending by IOVA. */
  firstStage: Mapping[];
}

/** A host process address space known to native SVA: its set and its one PASID. */
export interface MmContext {
  readonly mmToken: bigint;
  readonly setId: number;
  readonly pasid: number;
  readonly generation: number;
}

/**
 * A change to the modelled hardware, for the history: each kind is the history catalogue's action
 * that records it (ioasid.history.v1), so the two cannot drift apart.
 */
export type HardwareChange =
  | { readonly kind: Extract<HistoryActionCase, "pasidEntrySet">; readonly deviceId: string; readonly entry: PasidEntry }
  | { readonly kind: Extract<HistoryActionCase, "teardownPasid">; readonly deviceId: string; readonly entry: PasidEntry; readonly cause: FlushCause }
  | { readonly kind: Extract<HistoryActionCase, "iotlbFlush">; readonly flush: IotlbFlush };

/** What a mutation did: its result and the hardware changes. */
export interface Changed<T> {
  readonly result: T;
  readonly changes: readonly HardwareChange[];
}

/** What AttachDomain asks for. */
export interface AttachDomainSpec {
  readonly domainId: number;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  /** Generation of the IOASID `pasid`, already checked by the caller; 0 = unchecked. */
  readonly generation: number;
  readonly owner: string;
  readonly ownerData: Uint8Array;
}

/** What ReplaceDomain asks for: the target, the new domain and the new handle's owner. */
export interface ReplaceDomainSpec extends AttachDomainSpec {
  /** The domain expected to be attached now; 0 = whichever is. */
  readonly oldDomainId: number;
}

/** What a replace did: the new handle, and the one it replaced (undefined when nothing changed). */
export interface Replaced {
  readonly handle: AttachHandle;
  readonly replaced: AttachHandle | undefined;
}

/** Where DetachDomain looks. */
export interface DetachDomainSpec {
  readonly domainId: number;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
}

/** The NESTED entry a guest bind programs. */
export interface GpasidEntrySpec {
  readonly deviceId: string;
  readonly hpasid: number;
  /** 0 = the PAGING domain attached to the device's requests without PASID. */
  readonly parentDomainId: number;
  readonly guestPgtable: bigint;
  readonly owner: string;
  readonly ownerData: Uint8Array;
}

/** What CreateDomain asks for. */
export interface DomainSpec {
  readonly type: DomainType;
  readonly parentDomainId: number;
  readonly guestPgtable: bigint;
  readonly mmToken: bigint;
}

/** One DMA translation request. */
export interface TranslateSpec {
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly address: bigint;
  readonly access: DmaAccess;
}

/** What a DMA translation produced. */
export type TranslateResult =
  | { readonly outcome: "TRANSLATED"; readonly outputAddress: bigint; readonly handleId: bigint }
  /** A miss on a PRI-capable device: a page request is due under `handle`. */
  | { readonly outcome: "MISS"; readonly handle: AttachHandle }
  | { readonly outcome: "FAULT"; readonly reason: FaultReason; readonly handleId: bigint };

/** A consistent snapshot of the IOMMU's state. */
export interface IommuSnapshot {
  readonly devices: readonly DeviceView[];
  readonly domains: readonly Domain[];
  readonly handles: readonly AttachHandle[];
  readonly bonds: readonly SvaBond[];
  readonly flushes: readonly IotlbFlush[];
}

/** A domain as the IOMMU keeps it (its attach count follows from the kept handles). */
export interface KeptDomain {
  readonly domainId: number;
  readonly type: DomainType;
  readonly parentDomainId: number;
  readonly guestPgtable: bigint;
  readonly mmToken: bigint;
  readonly implicit: boolean;
  readonly mappings: readonly Mapping[];
}

/** An attach handle as the IOMMU keeps it: one programmed PASID table entry. */
export interface KeptAttachHandle extends AttachHandle {
  readonly faultReporting: boolean;
}

/** A guest bind state as the IOMMU keeps it (its devices follow from the kept GPASID_BIND handles). */
export interface KeptGpasidBinding {
  readonly hpasid: number;
  readonly setId: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly refHeld: boolean;
  readonly spidAttached: boolean;
  /** Written empty (each range is a {@link KeptGuestMapping}); read from state written before that. */
  readonly firstStage: readonly Mapping[];
}

/** An SVA mm context as the IOMMU keeps it, with its bonds. */
export interface KeptMmContext extends MmContext {
  /** 0 while it has no bond. */
  readonly domainId: number;
  readonly bonds: readonly { readonly deviceId: string; readonly handleId: bigint; readonly users: number }[];
}

/**
 * One range of a guest bind's first-stage table, kept under a key of its own (`gp/<hpasid>/<iova>`):
 * a MapGuestPages writes it alone, not the bind's whole table (issue 15).
 */
export interface KeptGuestMapping {
  readonly hpasid: number;
  /** The bind's generation: a range left by an older bind of the PASID is not applied to a newer one. */
  readonly generation: number;
  readonly mapping: Mapping;
}

/**
 * One entry of the hardware tables as the IOMMU keeps them in its store, under `dev/<id>`,
 * `dom/<id>`, `h/<id>`, `bind/<hpasid>`, `gp/<hpasid>/<iova>`, `mm/<token>` and `ids`.
 */
export type IommuHardwareKeptEntry =
  | { readonly kind: "device"; readonly device: DeviceSpec }
  | { readonly kind: "domain"; readonly domain: KeptDomain }
  | { readonly kind: "attachHandle"; readonly handle: KeptAttachHandle }
  | { readonly kind: "gpasidBinding"; readonly binding: KeptGpasidBinding }
  | { readonly kind: "guestMapping"; readonly guestMapping: KeptGuestMapping }
  | { readonly kind: "mmContext"; readonly mm: KeptMmContext }
  | { readonly kind: "idCounters"; readonly nextDomainId: number; readonly nextHandleId: bigint };

/** One entry of the IOMMU's kept state (ioasid.iommu.v1.IommuStateEntry; iommu-state-codec.ts converts). */
export type IommuKeptEntry = IommuHardwareKeptEntry | PageRequestKeptEntry | ViommuKeptEntry;
