import { MemoryRoleState } from "@ioasid/bus";
import type { IommuKeptEntry } from "../domain/iommu-hardware.js";
import { iommuStateCodec } from "./iommu-state-codec.js";

/**
 * An in-memory store of the IOMMU's kept state, written through the real state codec: what the
 * domain's unit tests restart from (domain code takes the store as a port; this is one adapter).
 */
export function memoryIommuState(): MemoryRoleState<IommuKeptEntry> {
  return new MemoryRoleState(iommuStateCodec);
}
