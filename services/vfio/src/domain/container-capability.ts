import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { vfioError } from "./vfio-errors.js";

/** Length of a container capability, in bytes (256 bits: never guessed, never brute-forced). */
export const CAPABILITY_BYTES = 32;

/** A new container's capability and what VFIO keeps of it. */
export interface IssuedCapability {
  /** The secret, answered once by OpenContainer; VFIO does not keep it. */
  readonly capability: Uint8Array;
  /** Its SHA-256 digest: what VFIO keeps (in memory and in its role state) to check it. */
  readonly digest: Uint8Array;
}

/**
 * Issues a container's capability: {@link CAPABILITY_BYTES} bytes from the system CSPRNG
 * (DESIGN §3 "Authority is a capability, not a name": a VMM's VFIO session is its capability, and
 * an id being guessable must never be enough).
 */
export function issueCapability(): IssuedCapability {
  const capability = randomBytes(CAPABILITY_BYTES);
  return { capability, digest: capabilityDigest(capability) };
}

/**
 * The digest VFIO keeps of a capability: SHA-256. A plain hash, not a slow KDF, is enough because
 * the secret has 256 bits of entropy; keeping the digest rather than the secret means whoever reads
 * VFIO's kept state (the role-state stream) cannot present it.
 */
export function capabilityDigest(capability: Uint8Array): Uint8Array {
  return createHash("sha256").update(capability).digest();
}

/**
 * Checks a presented capability against the container's digest, in constant time (both sides are
 * SHA-256 digests, so `timingSafeEqual` always compares 32 bytes, whatever was presented).
 * @param presented the capability the call carried; undefined when it carried none
 * @throws DomainError PERMISSION_DENIED `CAPABILITY_MISSING` (none carried) or
 *   `CAPABILITY_NOT_FOR_CONTAINER` (malformed, another container's, or the container kept none)
 */
export function assertCapability(containerId: number, digest: Uint8Array, presented: Uint8Array | undefined): void {
  if (presented === undefined) {
    throw vfioError(
      "CAPABILITY_MISSING",
      `container ${containerId} is reached only with its capability (request metadata ioasid-vfio-capability, from OpenContainer)`,
    );
  }
  const given = capabilityDigest(presented);
  // A container kept before capabilities existed has an empty digest: nothing matches it.
  const ok = digest.length === given.length && timingSafeEqual(digest, given);
  if (!ok) throw vfioError("CAPABILITY_NOT_FOR_CONTAINER", `the capability presented is not container ${containerId}'s`);
}
