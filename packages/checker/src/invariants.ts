/** The invariants of DESIGN §7, by id, with the sentence that states each. */
export const INVARIANTS = {
  S1: "an IOASID is reclaimed only at zero references and never allocated while referenced",
  S2: "nothing raises a reference in FREE_PENDING",
  S3: "no call on behalf of one VM changes another's IOASIDs, SPIDs, handles or device entries",
  S4: "an SPID maps to at most one IOASID per set",
  S5: "per IOASID teardown order: KVM entry cleared → device drained/cleared → IOMMU entry torn down and flushed → faults answered → references released → reclaim",
  S6: "quota conservation: available + Σ quotas = capacity (less the reserved PASID 0), and in-use ≤ quota",
  S7: "every page-request group gets exactly one response (safety half: never more than one)",
  S8: "exactly one event per transition",
  S9: "a PASID is never live in a device, VMCS table or IOMMU PASID table after its IOASID was reclaimed",
  L1: "free returns promptly whatever the subscribers do",
  L2: "once every component is up, every IOASID of a crashed guest is reclaimed within a bound",
  L3: "every page request is eventually answered",
  L4: "pending registrations activate when their set appears",
} as const;

/** S1…S9, L1…L4. */
export type InvariantId = keyof typeof INVARIANTS;

/** Every invariant id, in DESIGN order. */
export const INVARIANT_IDS = Object.keys(INVARIANTS) as InvariantId[];
