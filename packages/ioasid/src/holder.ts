import { MAX_NAME_LENGTH } from "./constants.js";
import { quote } from "@ioasid/errors";
import { coreError } from "./reasons.js";

/**
 * Who holds a reference to an IOASID: references are counted per named holder, not anonymously,
 * so "who still holds IOASID 201?" has an answer and a restarted component can reconcile
 * (DESIGN §3 "References").
 */
export interface Holder {
  /** The role: "kvm", "vdcm", "iommu", … */
  readonly role: string;
  /** Which instance of the role: "vm-7", "idxd0", … */
  readonly instance: string;
  /** What the reference is for: "vmcs", "wq0", "bind:dev3", … */
  readonly purpose: string;
}

/** The role name the allocation reference is shown under; no caller may use it. */
export const OWNER_ROLE = "set-owner";

const NAME = /^[A-Za-z0-9._:@-]+$/;

/** Canonical string key of a holder: `role/instance/purpose`. */
export function toHolderKey(holder: Holder): string {
  return `${holder.role}/${holder.instance}/${holder.purpose}`;
}

/** Parses a key made by {@link toHolderKey}. */
export function fromHolderKey(key: string): Holder {
  const [role = "", instance = "", purpose = ""] = key.split("/");
  return { role, instance, purpose };
}

/**
 * Checks a caller-supplied holder: three non-empty names of letters, digits and `._:@-`, at most
 * {@link MAX_NAME_LENGTH} each, and not the reserved owner role.
 * @throws DomainError INVALID_ARGUMENT `HOLDER_INVALID`
 */
export function assertHolder(holder: Holder | undefined): asserts holder is Holder {
  if (holder === undefined) throw coreError("HOLDER_INVALID", "a reference holder (role, instance, purpose) is required");
  for (const field of ["role", "instance", "purpose"] as const) {
    const v = holder[field];
    if (typeof v !== "string" || v.length === 0 || v.length > MAX_NAME_LENGTH || !NAME.test(v)) {
      throw coreError("HOLDER_INVALID", `holder ${field} ${quote(v)} is invalid: use 1..${MAX_NAME_LENGTH} letters, digits or ._:@-`);
    }
  }
  if (holder.role === OWNER_ROLE) {
    throw coreError("HOLDER_INVALID", `holder role "${OWNER_ROLE}" is reserved for the allocation reference`);
  }
}
