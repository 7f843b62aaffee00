import { MemoryRoleState } from "@ioasid/bus";
import type { VdcmKeptEntry } from "../domain/vdcm-kept-entry.js";
import { vdcmStateCodec } from "./vdcm-state-codec.js";

/**
 * An in-memory store of VDCM's kept state, written through the real state codec: what the domain's
 * unit tests restart from (domain code takes the store as a port; this is one adapter).
 */
export function memoryVdcmState(): MemoryRoleState<VdcmKeptEntry> {
  return new MemoryRoleState(vdcmStateCodec);
}
