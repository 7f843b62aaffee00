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

/** Holders already checked, by role, instance and purpose: their keys, made once. */
const checked = new Map<string, Map<string, Map<string, string>>>();
let checkedCount = 0;
/**
 * Holders remembered at most; past it the memory starts over (instances come and go: `vm-<id>`). A
 * crowd of 1,000 guests names a few thousand holders; each entry is a short string and a map slot.
 */
const CHECKED_MAX = 65_536;

/**
 * {@link toHolderKey} of a holder {@link assertHolder} accepts, checked and made once per holder:
 * every reference taken or dropped names its holder (a crashed guest's teardown drops four per
 * PASID), and profiled at 1,000 IOASIDs in flight (issue 15) the three pattern tests, the key's
 * concatenation and the hashing of that fresh string were most of the model's time per release.
 * The key returned for a holder is the same string each time, its hash computed once.
 * @throws DomainError INVALID_ARGUMENT `HOLDER_INVALID`, as {@link assertHolder}
 */
export function checkedHolderKey(holder: Holder | undefined): string {
  if (holder === undefined) return assertHolder(holder) as never; // throws HOLDER_INVALID
  // Each field read once: what is checked is what the key is made of.
  const { role, instance, purpose } = holder;
  const known = checked.get(role)?.get(instance)?.get(purpose);
  if (known !== undefined) return known;
  const copy = { role, instance, purpose };
  assertHolder(copy);
  const key = toHolderKey(copy);
  if (checkedCount >= CHECKED_MAX) {
    checked.clear();
    checkedCount = 0;
  }
  let byInstance = checked.get(role);
  if (byInstance === undefined) checked.set(role, (byInstance = new Map()));
  let byPurpose = byInstance.get(instance);
  if (byPurpose === undefined) byInstance.set(instance, (byPurpose = new Map()));
  byPurpose.set(purpose, key);
  checkedCount++;
  return key;
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
      // Not a string at all (a caller without types): said as its type, not quoted (quote needs a string).
      const shown = typeof v === "string" ? quote(v) : `of type ${typeof v}`;
      throw coreError("HOLDER_INVALID", `holder ${field} ${shown} is invalid: use 1..${MAX_NAME_LENGTH} letters, digits or ._:@-`);
    }
  }
  if (holder.role === OWNER_ROLE) {
    throw coreError("HOLDER_INVALID", `holder role "${OWNER_ROLE}" is reserved for the allocation reference`);
  }
}
