import type { EntryState, WqMode } from "./vdcm-model.js";

// What VDCM is given and shows: device specs, views of devices, mdevs and entries (QueryState).

/** A work queue of a device being registered. */
export interface WqSpec {
  readonly wqId: number;
  readonly mode: WqMode;
  /** Queue depth; 0 or absent = {@link DEFAULT_WQ_SIZE}. */
  readonly size?: number;
}

/** A physical device being registered. */
export interface DeviceSpec {
  readonly deviceId: string;
  readonly wqs: readonly WqSpec[];
  /** 0 or absent = {@link DEFAULT_MAX_PASID_ENTRIES}. */
  readonly maxPasidEntries?: number;
}

/** A physical work queue and its configuration, as shown outside. */
export interface WorkQueueView {
  readonly wqId: number;
  readonly mode: WqMode;
  readonly size: number;
  /** The mdevs it backs, ascending (at most one for a dedicated work queue). */
  readonly mdevUuids: readonly string[];
  /** Dedicated: the host PASID programmed in its configuration (0 = none); always 0 for shared. */
  readonly hpasid: number;
}

/** One PASID programmed into a device: the host PASID, and whose guest PASID it came from. */
export interface DevicePasidEntry {
  readonly deviceId: string;
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly setId: number;
  readonly wqId: number;
  readonly mdevUuid: string;
  readonly state: EntryState;
  readonly programmedAt: Date;
}

/** A physical device as shown outside. */
export interface DeviceView {
  readonly deviceId: string;
  /** Ascending by id. */
  readonly wqs: readonly WorkQueueView[];
  readonly maxPasidEntries: number;
  /** The device PASID table, ascending by host PASID (then work queue). */
  readonly pasidEntries: readonly DevicePasidEntry[];
}

/** A mediated device as shown outside. */
export interface MdevView {
  readonly mdevUuid: string;
  readonly parentDeviceId: string;
  /** Virtual work queue i is physical work queue `wqIds[i]`. */
  readonly wqIds: readonly number[];
  /** The set of the VM it is assigned to; 0 = unassigned. */
  readonly setId: number;
  readonly createdAt: Date;
  readonly assignedAt: Date | undefined;
}

/** A snapshot of the whole of VDCM's "hardware" (QueryState). */
export interface VdcmSnapshot {
  readonly devices: readonly DeviceView[];
  readonly mdevs: readonly MdevView[];
  readonly registeredSetIds: readonly number[];
}

/** A virtual work queue of an mdev resolved to its physical work queue. */
export interface ResolvedWq {
  readonly mdevUuid: string;
  readonly deviceId: string;
  readonly wqId: number;
  readonly mode: WqMode;
  /** The set the mdev is assigned to; 0 = unassigned. */
  readonly setId: number;
}

/**
 * A dedicated work queue held for a PASID being programmed (the guest's MMIO write is in flight:
 * VDCM is translating the guest PASID at the core). It counts against the device PASID table, and
 * is cancelled when the mdev is unassigned meanwhile.
 */
export interface WqReservation {
  readonly deviceId: string;
  readonly wqId: number;
  readonly mdevUuid: string;
  readonly setId: number;
  readonly gpasid: number;
}
