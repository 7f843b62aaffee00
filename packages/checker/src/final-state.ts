/**
 * What the chaos runner reads once every fault is healed and the run has settled: the core's
 * ListSets / ListIoasids (with holders) and GetStats, and each role's QueryState tables, reduced to
 * what the invariants need. Every list is optional except the namespace figures; a missing list
 * means "not read", and the rules that need it say so in the verdict's notes.
 */
export interface FinalState {
  /** When it was read, ms since the epoch. */
  readonly ts?: number;
  /** Size of the IOASID namespace (the core's capacity). */
  readonly capacity: number;
  /**
   * IDs that no set can ever get: PASID 0 (RID_PASID) is reserved, so the quota pool is
   * capacity − 1 (README "Quota accounting counts allocatable IDs"). @default 1
   */
  readonly reserved?: number;
  /** Quota not promised to any set. */
  readonly available: number;
  /** Every set. */
  readonly sets: readonly FinalSet[];
  /** Every IOASID not reclaimed (ACTIVE and FREE_PENDING), when read. */
  readonly ioasids?: readonly FinalIoasid[];
  /** Every table entry the roles still have that names an IOASID, when read. */
  readonly liveEntries?: readonly LiveEntry[];
  /** Page-request groups the IOMMU still has outstanding (unanswered), when read. */
  readonly faultGroups?: readonly OutstandingFaultGroup[];
  /** The core's notifier registrations, when read. */
  readonly registrations?: readonly FinalRegistration[];
}

/** One IOASID set at the end of the run. */
export interface FinalSet {
  readonly setId: number;
  /** The quota it holds (after "0 means all that is available" was resolved). */
  readonly quota: number;
  /** IOASIDs of the set not reclaimed. */
  readonly inUse: number;
  /** Its MM token (decimal), for token-type MM sets. */
  readonly mmToken?: string;
}

/** One IOASID not reclaimed at the end of the run. */
export interface FinalIoasid {
  readonly ioasid: number;
  readonly generation: number;
  readonly setId: number;
  readonly state: "ACTIVE" | "FREE_PENDING";
  readonly refcount: number;
  /** Its SPID (guest PASID), 0 or absent when none. */
  readonly spid?: number;
  /** Holder keys `role/instance/purpose`. */
  readonly holders?: readonly string[];
}

/** A role's table entry naming an IOASID (a VMCS translation, a device PASID entry, an IOMMU PASID entry). */
export interface LiveEntry {
  /** "kvm", "vdcm" or "iommu". */
  readonly role: string;
  readonly instance?: string;
  readonly ioasid: number;
  /** Its generation when the role keeps it. */
  readonly generation?: number;
  /** Where the entry is ("vm 1 gpasid 101", "device idxd0 wq 1"). */
  readonly where: string;
}

/** A page-request group the IOMMU has not answered. */
export interface OutstandingFaultGroup {
  readonly faultGroupId: string;
  readonly instance?: string;
  readonly ioasid?: number;
  readonly generation?: number;
}

/** A notifier registration of the core. */
export interface FinalRegistration {
  /** Subscriber name ("kvm") and instance ("vm-1"). */
  readonly subscriber: string;
  readonly instance: string;
  /** The MM token (decimal) of a registration by MM token. */
  readonly mmToken?: string;
  readonly active: boolean;
  /** The set it is attached to (0 while pending or global). */
  readonly setId: number;
}
