/**
 * The IA32_PASID MSR as ENQCMD reads it (Intel SDM, ENQCMD; DESIGN §5 "KVM"): bit 31 says the
 * PASID is valid, bits 30:20 are reserved and must be 0, bits 19:0 hold the (guest) PASID.
 */
export const Ia32Pasid = {
  /** Bit 31: the PASID field is valid. */
  VALID: 0x8000_0000,
  /** Bits 30:20: reserved, must be 0. */
  RESERVED_MASK: 0x7ff0_0000,
  /** Bits 19:0: the PASID (20 bits). */
  PASID_MASK: 0x000f_ffff,
} as const;

/** Why an ENQCMD raises #GP in the guest (the proto's GpCause without its prefix). */
export const GpCause = {
  /** IA32_PASID bit 31 (valid) is clear. */
  PASID_NOT_VALID: "PASID_NOT_VALID",
  /** IA32_PASID has reserved bits (30:20) set. */
  RESERVED_BITS: "RESERVED_BITS",
  /** The VM's VMCS PASID translation table has no entry for the guest PASID. */
  NO_TRANSLATION: "NO_TRANSLATION",
} as const;
export type GpCause = (typeof GpCause)[keyof typeof GpCause];

/** An IA32_PASID value taken apart: the guest PASID, and the #GP cause when it is unusable. */
export type DecodedIa32Pasid =
  | { readonly ok: true; readonly gpasid: number }
  | { readonly ok: false; readonly gpasid: number; readonly cause: typeof GpCause.PASID_NOT_VALID | typeof GpCause.RESERVED_BITS };

/**
 * Takes a vCPU's IA32_PASID value (a uint32) apart. The guest PASID (bits 19:0) is returned
 * whatever the outcome; the valid bit is checked before the reserved bits, the order ENQCMD
 * checks them in.
 *
 * @example
 * decodeIa32Pasid(0x8000_0065); // { ok: true, gpasid: 101 }
 * decodeIa32Pasid(0x0000_0065); // { ok: false, gpasid: 101, cause: "PASID_NOT_VALID" }
 */
export function decodeIa32Pasid(value: number): DecodedIa32Pasid {
  const gpasid = value & Ia32Pasid.PASID_MASK;
  if ((value & Ia32Pasid.VALID) === 0) return { ok: false, gpasid, cause: GpCause.PASID_NOT_VALID };
  if ((value & Ia32Pasid.RESERVED_MASK) !== 0) return { ok: false, gpasid, cause: GpCause.RESERVED_BITS };
  return { ok: true, gpasid };
}

/** The IA32_PASID value a guest writes to use `gpasid` (valid bit set). */
export function toIa32Pasid(gpasid: number): number {
  return (Ia32Pasid.VALID | (gpasid & Ia32Pasid.PASID_MASK)) >>> 0;
}
