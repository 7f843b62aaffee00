import { decodeVfioCapability, VFIO_CAPABILITY_METADATA, type CallContext } from "@ioasid/grpc-kit";

/** Stands for a capability that was sent but does not decode: no container's digest matches it. */
const MALFORMED = new Uint8Array(0);

/**
 * The capability a VfioService call carries in its metadata ({@link VFIO_CAPABILITY_METADATA}, hex):
 * undefined when the call carries none (CAPABILITY_MISSING), an empty array when the value is
 * malformed or sent more than once (refused as CAPABILITY_NOT_FOR_CONTAINER: no digest matches it).
 */
export function capabilityOf(metadata: CallContext["metadata"]): Uint8Array | undefined {
  const values = metadata.get(VFIO_CAPABILITY_METADATA);
  if (values.length === 0) return undefined;
  const [only] = values;
  if (values.length > 1 || typeof only !== "string") return MALFORMED;
  return decodeVfioCapability(only) ?? MALFORMED;
}
