import type { StateChange } from "@ioasid/bus";
import { randomUUID } from "node:crypto";
import { quote } from "@ioasid/errors";
import { invalidField, vdcmError } from "./vdcm-errors.js";
import { deviceKey, entryKey, mdevKey, regKey, type VdcmKeptEntry } from "./vdcm-kept-entry.js";
import {
  DEFAULT_MAX_PASID_ENTRIES,
  DEFAULT_WQ_SIZE,
  EntryState,
  MAX_GPASID,
  MAX_PASID_ENTRIES,
  MAX_WQ_SIZE,
  MAX_WQS_PER_DEVICE,
  assertDeviceId,
  normalizeMdevUuid,
  pasidInUse,
  WqMode,
} from "./vdcm-model.js";
import type { DevicePasidEntry, DeviceSpec, DeviceView, MdevView, ResolvedWq, VdcmSnapshot, WqReservation } from "./vdcm-views.js";

// One class, kept whole (~500 lines): the device model's tables and every rule over them; its types,
// limits and kept form are beside it (vdcm-model.ts, vdcm-views.ts, vdcm-kept-entry.ts).

const MDEV_ID = /^[A-Za-z0-9._:@-]{1,64}$/;

interface Wq {
  readonly wqId: number;
  readonly mode: WqMode;
  readonly size: number;
  readonly mdevs: Set<string>;
}

interface Entry {
  readonly deviceId: string;
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly setId: number;
  readonly wqId: number;
  readonly mdevUuid: string;
  state: EntryState;
  readonly programmedAt: Date;
}

interface Device {
  readonly deviceId: string;
  readonly wqs: Map<number, Wq>;
  readonly maxPasidEntries: number;
  /** The device PASID table: one entry per programmed dedicated work queue, by work-queue id. */
  readonly entries: Map<number, Entry>;
  /** The same entries by host PASID (a FREE and the foreign-context check look them up by it). */
  readonly byHpasid: Map<number, Set<Entry>>;
  /** Work queues held for a PASID being programmed, by work-queue id. */
  readonly reservations: Map<number, WqReservation>;
}

interface Mdev {
  readonly uuid: string;
  readonly parentDeviceId: string;
  readonly wqIds: readonly number[];
  setId: number;
  readonly createdAt: Date;
  assignedAt: Date | undefined;
}

/** Options of {@link VdcmState}. */
export interface VdcmStateOptions {
  /** Generates the UUID of an mdev created without one. @default crypto.randomUUID */
  readonly newUuid?: () => string;
}

/**
 * VDCM's "hardware" and bookkeeping, pure and synchronous (DESIGN §5 "VDCM"): physical devices
 * with dedicated and shared work queues and a device PASID table, the mdevs composed from those
 * work queues and the VM (IOASID set) each is assigned to, and the sets VDCM is registered on.
 * Every method either changes the state and returns, or throws a DomainError and changes nothing.
 * The asynchronous steps around it (translation at the core, draining, releasing references) are
 * {@link Vdcm}'s.
 */
export class VdcmState {
  private readonly devices = new Map<string, Device>();
  private readonly mdevs = new Map<string, Mdev>();
  /** Registration id of VDCM's DEVICE-priority notifier on each set that has an mdev. */
  private readonly registrations = new Map<number, number>();
  private readonly newUuid: () => string;
  /** Keys of the persisted state changed since {@link takeChanges} (see {@link restore}). */
  private readonly dirty = new Set<string>();

  constructor(options: VdcmStateOptions = {}) {
    this.newUuid = options.newUuid ?? randomUUID;
  }

  // --- devices -------------------------------------------------------------------------------

  /**
   * Makes a physical device available for composition, with an empty device PASID table.
   * @throws DomainError ALREADY_EXISTS `DEVICE_EXISTS`; INVALID_ARGUMENT `INVALID_FIELD`
   */
  registerDevice(spec: DeviceSpec): DeviceView {
    assertDeviceId(spec.deviceId, "device_id");
    if (spec.wqs.length === 0) throw invalidField("wqs", "a device needs at least one work queue");
    if (spec.wqs.length > MAX_WQS_PER_DEVICE) throw invalidField("wqs", `a device has at most ${MAX_WQS_PER_DEVICE} work queues`);
    const maxPasidEntries = spec.maxPasidEntries === undefined || spec.maxPasidEntries === 0 ? DEFAULT_MAX_PASID_ENTRIES : spec.maxPasidEntries;
    if (!Number.isInteger(maxPasidEntries) || maxPasidEntries < 1 || maxPasidEntries > MAX_PASID_ENTRIES) {
      throw invalidField("max_pasid_entries", `max_pasid_entries ${maxPasidEntries} is outside 1..${MAX_PASID_ENTRIES}`);
    }
    const wqs = new Map<number, Wq>();
    for (const w of spec.wqs) {
      if (!Number.isInteger(w.wqId) || w.wqId < 0 || w.wqId > 0xffffffff) throw invalidField("wqs.wq_id", `work-queue id ${w.wqId} is not a uint32`);
      if (wqs.has(w.wqId)) throw invalidField("wqs.wq_id", `work-queue id ${w.wqId} appears twice`);
      if (w.mode !== WqMode.DEDICATED && w.mode !== WqMode.SHARED) {
        throw invalidField("wqs.mode", `work queue ${w.wqId} needs a mode: DEDICATED or SHARED`);
      }
      const size = w.size === undefined || w.size === 0 ? DEFAULT_WQ_SIZE : w.size;
      if (!Number.isInteger(size) || size < 1 || size > MAX_WQ_SIZE)
        throw invalidField("wqs.size", `work queue ${w.wqId} size ${size} is outside 1..${MAX_WQ_SIZE}`);
      wqs.set(w.wqId, { wqId: w.wqId, mode: w.mode, size, mdevs: new Set() });
    }
    if (this.devices.has(spec.deviceId)) throw vdcmError("DEVICE_EXISTS", `device ${spec.deviceId} is already registered`);
    const device: Device = { deviceId: spec.deviceId, wqs, maxPasidEntries, entries: new Map(), reservations: new Map(), byHpasid: new Map() };
    this.devices.set(device.deviceId, device);
    this.dirty.add(deviceKey(device.deviceId));
    return this.viewDevice(device);
  }

  /**
   * Withdraws a physical device that no mdev uses.
   * @throws DomainError NOT_FOUND `DEVICE_NOT_FOUND`; FAILED_PRECONDITION `DEVICE_IN_USE`
   */
  removeDevice(deviceId: string): void {
    const device = this.requireDevice(deviceId);
    const users = [...this.mdevs.values()].filter((m) => m.parentDeviceId === deviceId).map((m) => m.uuid);
    if (users.length > 0) throw vdcmError("DEVICE_IN_USE", `device ${deviceId} still backs mdevs ${users.sort().join(", ")}: destroy them first`);
    // No mdev means no programmed PASID (entries belong to assigned mdevs only).
    this.devices.delete(device.deviceId);
    this.dirty.add(deviceKey(device.deviceId));
  }

  // --- mdevs ---------------------------------------------------------------------------------

  /**
   * Composes an mdev from work queues of one device: virtual work queue i is `wqIds[i]`. A
   * dedicated work queue backs at most one mdev; a shared one may back several.
   * @throws DomainError NOT_FOUND `DEVICE_NOT_FOUND` / `WQ_NOT_FOUND`; ALREADY_EXISTS `MDEV_EXISTS`;
   *   FAILED_PRECONDITION `WQ_IN_USE`; INVALID_ARGUMENT `INVALID_FIELD`
   */
  createMdev(parentDeviceId: string, mdevUuid: string, wqIds: readonly number[], now: Date): MdevView {
    if (parentDeviceId.length === 0) throw invalidField("parent_device_id", "parent_device_id is required");
    const uuid = normalizeMdevUuid(mdevUuid === "" ? this.newUuid() : mdevUuid);
    if (!MDEV_ID.test(uuid)) {
      throw invalidField("mdev_uuid", `mdev_uuid ${quote(mdevUuid)} is not a UUID (or 1..64 of letters, digits and ._:@-; empty to get a UUID)`);
    }
    if (wqIds.length === 0) throw invalidField("wq_ids", "an mdev needs at least one work queue");
    if (new Set(wqIds).size !== wqIds.length) throw invalidField("wq_ids", "a work queue appears twice in wq_ids");
    const device = this.requireDevice(parentDeviceId);
    for (const id of wqIds) {
      const wq = device.wqs.get(id);
      if (wq === undefined) throw vdcmError("WQ_NOT_FOUND", `device ${parentDeviceId} has no work queue ${id}`);
      if (wq.mode === WqMode.DEDICATED && wq.mdevs.size > 0) {
        throw vdcmError("WQ_IN_USE", `dedicated work queue ${id} of ${parentDeviceId} already backs mdev ${[...wq.mdevs][0]}`);
      }
    }
    if (this.mdevs.has(uuid)) throw vdcmError("MDEV_EXISTS", `mdev ${uuid} already exists`);
    const mdev: Mdev = { uuid, parentDeviceId, wqIds: [...wqIds], setId: 0, createdAt: now, assignedAt: undefined };
    this.mdevs.set(uuid, mdev);
    for (const id of wqIds) device.wqs.get(id)!.mdevs.add(uuid);
    this.dirty.add(mdevKey(uuid));
    return viewMdev(mdev);
  }

  /**
   * Removes an unassigned mdev (its work queues go back to the device).
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND`; FAILED_PRECONDITION `MDEV_ASSIGNED`
   */
  destroyMdev(mdevUuid: string): void {
    const mdev = this.requireMdev(mdevUuid);
    if (mdev.setId !== 0) throw vdcmError("MDEV_ASSIGNED", `mdev ${mdev.uuid} is assigned to set ${mdev.setId}: unassign it first`);
    const device = this.devices.get(mdev.parentDeviceId);
    for (const id of mdev.wqIds) device?.wqs.get(id)?.mdevs.delete(mdev.uuid);
    this.mdevs.delete(mdev.uuid);
    this.dirty.add(mdevKey(mdev.uuid));
  }

  /** The mdev, or undefined. */
  getMdev(mdevUuid: string): MdevView | undefined {
    const m = this.mdevs.get(normalizeMdevUuid(mdevUuid));
    return m === undefined ? undefined : viewMdev(m);
  }

  /**
   * Checks that the mdev can be assigned to `setId`, without changing anything.
   * @returns whether this would be the first mdev of the set (VDCM then registers on it)
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND`; ALREADY_EXISTS `MDEV_ALREADY_ASSIGNED`;
   *   FAILED_PRECONDITION `MDEV_BUSY`; INVALID_ARGUMENT `INVALID_FIELD` (set 0)
   */
  checkAssign(mdevUuid: string, setId: number): { readonly firstOfSet: boolean } {
    if (setId === 0) throw invalidField("set_id", "set_id is required (set ids are never 0)");
    const mdev = this.requireMdev(mdevUuid);
    if (mdev.setId === setId) throw vdcmError("MDEV_ALREADY_ASSIGNED", `mdev ${mdev.uuid} is already assigned to set ${setId}`);
    if (mdev.setId !== 0) throw vdcmError("MDEV_BUSY", `mdev ${mdev.uuid} is assigned to another VM (set ${mdev.setId})`);
    return { firstOfSet: this.mdevCountOfSet(setId) === 0 };
  }

  /**
   * Assigns the mdev to a VM's set (after {@link checkAssign} and, for the first mdev of the set,
   * the registration).
   */
  assignMdev(mdevUuid: string, setId: number, now: Date): MdevView {
    this.checkAssign(mdevUuid, setId);
    const mdev = this.requireMdev(mdevUuid);
    mdev.setId = setId;
    mdev.assignedAt = now;
    this.dirty.add(mdevKey(mdev.uuid));
    return viewMdev(mdev);
  }

  /**
   * Takes the mdev away from its VM. Its device PASID entries must have been cleared first.
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND`; FAILED_PRECONDITION `MDEV_NOT_ASSIGNED`
   */
  unassignMdev(mdevUuid: string): MdevView {
    const mdev = this.requireAssigned(mdevUuid);
    if (this.entriesOfMdev(mdev.uuid).length > 0) throw new Error(`mdev ${mdev.uuid} still has programmed PASIDs`);
    this.cancelReservations(mdev.uuid);
    mdev.setId = 0;
    mdev.assignedAt = undefined;
    this.dirty.add(mdevKey(mdev.uuid));
    return viewMdev(mdev);
  }

  /** Mdevs assigned to the set. */
  mdevCountOfSet(setId: number): number {
    let n = 0;
    for (const m of this.mdevs.values()) if (m.setId === setId) n++;
    return n;
  }

  /**
   * The physical work queue behind virtual work queue `virtualWq` of an mdev.
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND` / `WQ_NOT_FOUND`
   */
  resolveWq(mdevUuid: string, virtualWq: number): ResolvedWq {
    const mdev = this.requireMdev(mdevUuid);
    const wqId = mdev.wqIds[virtualWq];
    if (wqId === undefined) {
      throw vdcmError("WQ_NOT_FOUND", `mdev ${mdev.uuid} has no virtual work queue ${virtualWq} (it has ${mdev.wqIds.length})`);
    }
    const wq = this.requireDevice(mdev.parentDeviceId).wqs.get(wqId)!;
    return { mdevUuid: mdev.uuid, deviceId: mdev.parentDeviceId, wqId, mode: wq.mode, setId: mdev.setId };
  }

  /**
   * The physical work queue behind a virtual work queue of an assigned mdev.
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND` / `WQ_NOT_FOUND`; FAILED_PRECONDITION `MDEV_NOT_ASSIGNED`
   */
  resolveAssignedWq(mdevUuid: string, virtualWq: number): ResolvedWq {
    const wq = this.resolveWq(mdevUuid, virtualWq);
    if (wq.setId === 0) throw vdcmError("MDEV_NOT_ASSIGNED", `mdev ${wq.mdevUuid} is not assigned to a VM`);
    return wq;
  }

  // --- registrations -------------------------------------------------------------------------

  /** VDCM's registration on the set, if it has one. */
  registrationOf(setId: number): number | undefined {
    return this.registrations.get(setId);
  }

  /** Records VDCM's registration on a set. */
  setRegistration(setId: number, registrationId: number): void {
    this.registrations.set(setId, registrationId);
    this.dirty.add(regKey(setId));
  }

  /** Forgets VDCM's registration on a set. */
  dropRegistration(setId: number): void {
    this.registrations.delete(setId);
    this.dirty.add(regKey(setId));
  }

  // --- the device PASID table ----------------------------------------------------------------

  /**
   * Holds a dedicated work queue for the guest's MMIO write of `gpasid` (VDCM PASID Programming):
   * the checks that need no translation, done before a reference is taken.
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND` / `WQ_NOT_FOUND`; FAILED_PRECONDITION
   *   `MDEV_NOT_ASSIGNED` / `WQ_SHARED` / `WQ_PASID_PROGRAMMED`; RESOURCE_EXHAUSTED
   *   `DEVICE_PASID_TABLE_FULL`; INVALID_ARGUMENT `INVALID_FIELD` (gpasid)
   */
  reserveWq(mdevUuid: string, virtualWq: number, gpasid: number): WqReservation {
    const wq = this.resolveAssignedWq(mdevUuid, virtualWq);
    if (wq.mode === WqMode.SHARED) {
      throw vdcmError("WQ_SHARED", `virtual work queue ${virtualWq} of mdev ${wq.mdevUuid} is shared: each descriptor carries its PASID`);
    }
    if (!Number.isInteger(gpasid) || gpasid < 1 || gpasid > MAX_GPASID) {
      throw invalidField("gpasid", `guest PASID ${gpasid} is outside 1..${MAX_GPASID}`);
    }
    const device = this.requireDevice(wq.deviceId);
    const programmed = device.entries.get(wq.wqId);
    if (programmed !== undefined || device.reservations.has(wq.wqId)) {
      throw vdcmError(
        "WQ_PASID_PROGRAMMED",
        programmed === undefined
          ? `virtual work queue ${virtualWq} of mdev ${wq.mdevUuid} is being programmed`
          : `virtual work queue ${virtualWq} of mdev ${wq.mdevUuid} already has PASID ${programmed.gpasid} programmed: clear it first`,
      );
    }
    if (device.entries.size + device.reservations.size >= device.maxPasidEntries) {
      throw vdcmError("DEVICE_PASID_TABLE_FULL", `the PASID table of device ${device.deviceId} is full (${device.maxPasidEntries} entries)`);
    }
    const reservation: WqReservation = { deviceId: wq.deviceId, wqId: wq.wqId, mdevUuid: wq.mdevUuid, setId: wq.setId, gpasid };
    device.reservations.set(wq.wqId, reservation);
    return reservation;
  }

  /** Whether the reservation still holds (not cancelled by an unassignment, not released). */
  isReserved(reservation: WqReservation): boolean {
    return this.devices.get(reservation.deviceId)?.reservations.get(reservation.wqId) === reservation;
  }

  /** Gives a reserved work queue back (the write failed). Harmless when already cancelled. */
  releaseReservation(reservation: WqReservation): void {
    const device = this.devices.get(reservation.deviceId);
    if (device?.reservations.get(reservation.wqId) === reservation) device.reservations.delete(reservation.wqId);
  }

  /**
   * Another guest's context for `hpasid` on the device: an entry programmed by another set, or by
   * an earlier generation of the IOASID (DESIGN §5: a PASID is never programmed for one guest
   * while another guest's context for it still exists on the device).
   */
  foreignContext(deviceId: string, hpasid: number, setId: number, generation: number): DevicePasidEntry | undefined {
    const device = this.devices.get(deviceId);
    if (device === undefined) return undefined;
    for (const e of device.byHpasid.get(hpasid) ?? []) {
      if (e.setId !== setId || e.generation !== generation) return viewEntry(e);
    }
    return undefined;
  }

  /**
   * Programs the host PASID the reservation's guest PASID translated to into the device PASID
   * table and the work queue (vdev_write(hpasid)).
   * @throws DomainError FAILED_PRECONDITION `MDEV_NOT_ASSIGNED` (unassigned meanwhile) /
   *   `PASID_IN_USE` (another guest's context for it exists on the device)
   */
  programWq(reservation: WqReservation, hpasid: number, generation: number, now: Date): DevicePasidEntry {
    if (!this.isReserved(reservation)) throw vdcmError("MDEV_NOT_ASSIGNED", `mdev ${reservation.mdevUuid} was unassigned while its PASID was programmed`);
    const foreign = this.foreignContext(reservation.deviceId, hpasid, reservation.setId, generation);
    if (foreign !== undefined) throw pasidInUse(reservation.deviceId, hpasid, foreign);
    const device = this.requireDevice(reservation.deviceId);
    device.reservations.delete(reservation.wqId);
    const entry: Entry = {
      deviceId: device.deviceId,
      hpasid,
      generation,
      gpasid: reservation.gpasid,
      setId: reservation.setId,
      wqId: reservation.wqId,
      mdevUuid: reservation.mdevUuid,
      state: EntryState.PROGRAMMED,
      programmedAt: now,
    };
    device.entries.set(entry.wqId, entry);
    let same = device.byHpasid.get(hpasid);
    if (same === undefined) device.byHpasid.set(hpasid, (same = new Set()));
    same.add(entry);
    this.dirty.add(entryKey(entry.deviceId, entry.wqId));
    return viewEntry(entry);
  }

  /** The entry programmed in a physical work queue, if any. */
  entryAt(deviceId: string, wqId: number): DevicePasidEntry | undefined {
    const e = this.devices.get(deviceId)?.entries.get(wqId);
    return e === undefined ? undefined : viewEntry(e);
  }

  /**
   * Starts draining an entry (no new descriptor uses it from now on).
   * @returns false when the entry is gone or already draining (someone else clears it)
   */
  beginDrain(deviceId: string, wqId: number, expected: DevicePasidEntry): boolean {
    const e = this.devices.get(deviceId)?.entries.get(wqId);
    if (e === undefined || !sameEntry(e, expected) || e.state !== EntryState.PROGRAMMED) return false;
    e.state = EntryState.DRAINING;
    return true;
  }

  /**
   * Clears a drained entry from the device PASID table and the work queue (vdev_clear(hpasid)).
   * @returns false when it was not there
   */
  clearEntry(deviceId: string, wqId: number, expected: DevicePasidEntry): boolean {
    const device = this.devices.get(deviceId);
    const e = device?.entries.get(wqId);
    if (device === undefined || e === undefined || !sameEntry(e, expected)) return false;
    device.entries.delete(wqId);
    const same = device.byHpasid.get(e.hpasid);
    same?.delete(e);
    if (same?.size === 0) device.byHpasid.delete(e.hpasid);
    this.dirty.add(entryKey(deviceId, wqId));
    return true;
  }

  /** Every entry programmed through the mdev. */
  entriesOfMdev(mdevUuid: string): DevicePasidEntry[] {
    const mdev = this.mdevs.get(mdevUuid);
    if (mdev === undefined) return [];
    const device = this.devices.get(mdev.parentDeviceId);
    if (device === undefined) return [];
    return [...device.entries.values()].filter((e) => e.mdevUuid === mdev.uuid).map(viewEntry);
  }

  /** Every entry, on every device, using this IOASID of this set at this generation (a FREE). */
  entriesForIoasid(setId: number, hpasid: number, generation: number): DevicePasidEntry[] {
    const out: DevicePasidEntry[] = [];
    for (const d of this.devices.values()) {
      for (const e of d.byHpasid.get(hpasid) ?? []) if (e.setId === setId && e.generation === generation) out.push(viewEntry(e));
    }
    return out;
  }

  // --- persistence ---------------------------------------------------------------------------

  /**
   * What changed since the last call, as key → value (undefined: deleted), for the role's state
   * store: devices, mdevs, programmed entries and registrations. Reservations and drains in
   * progress are not kept (a restart ends them: the entry is back to PROGRAMMED).
   */
  /** Whether a change is waiting for {@link takeChanges}. */
  hasChanges(): boolean {
    return this.dirty.size > 0;
  }

  takeChanges(): StateChange<VdcmKeptEntry>[] {
    const out: StateChange<VdcmKeptEntry>[] = [];
    for (const key of this.dirty) out.push({ key, value: this.valueOf(key) });
    this.dirty.clear();
    return out;
  }

  /**
   * A state rebuilt from what {@link takeChanges} wrote (the saved keys of a role's state store).
   * Unknown keys are ignored; an entry whose device is gone is dropped.
   */
  static restore(saved: ReadonlyMap<string, VdcmKeptEntry>, options: VdcmStateOptions = {}): VdcmState {
    const st = new VdcmState(options);
    const kept = [...saved.values()];
    for (const v of kept) {
      if (v.kind !== "device") continue;
      const wqs = new Map<number, Wq>(v.wqs.map((w) => [w.wqId, { wqId: w.wqId, mode: w.mode, size: w.size, mdevs: new Set<string>() }]));
      st.devices.set(v.deviceId, {
        deviceId: v.deviceId,
        wqs,
        maxPasidEntries: v.maxPasidEntries,
        entries: new Map(),
        reservations: new Map(),
        byHpasid: new Map(),
      });
    }
    for (const v of kept) {
      if (v.kind !== "mdev") continue;
      const device = st.devices.get(v.parentDeviceId);
      if (device === undefined) continue;
      st.mdevs.set(v.mdevUuid, {
        uuid: v.mdevUuid,
        parentDeviceId: v.parentDeviceId,
        wqIds: [...v.wqIds],
        setId: v.setId,
        createdAt: v.createdAt,
        assignedAt: v.assignedAt,
      });
      for (const id of v.wqIds) device.wqs.get(id)?.mdevs.add(v.mdevUuid);
    }
    for (const v of kept) {
      if (v.kind !== "pasidEntry") continue;
      const device = st.devices.get(v.deviceId);
      if (device === undefined) continue;
      const entry: Entry = {
        deviceId: v.deviceId,
        hpasid: v.hpasid,
        generation: v.generation,
        gpasid: v.gpasid,
        setId: v.setId,
        wqId: v.wqId,
        mdevUuid: v.mdevUuid,
        state: EntryState.PROGRAMMED,
        programmedAt: v.programmedAt,
      };
      device.entries.set(entry.wqId, entry);
      let same = device.byHpasid.get(entry.hpasid);
      if (same === undefined) device.byHpasid.set(entry.hpasid, (same = new Set()));
      same.add(entry);
    }
    for (const v of kept) if (v.kind === "registration") st.registrations.set(v.setId, v.registrationId);
    return st;
  }

  private valueOf(key: string): VdcmKeptEntry | undefined {
    const [kind, ...rest] = key.split("/");
    const id = rest.join("/");
    switch (kind) {
      case "dev": {
        const d = this.devices.get(id);
        if (d === undefined) return undefined;
        return {
          kind: "device",
          deviceId: d.deviceId,
          maxPasidEntries: d.maxPasidEntries,
          wqs: [...d.wqs.values()].map((w) => ({ wqId: w.wqId, mode: w.mode, size: w.size })),
        };
      }
      case "mdev": {
        const m = this.mdevs.get(id);
        if (m === undefined) return undefined;
        return {
          kind: "mdev",
          mdevUuid: m.uuid,
          parentDeviceId: m.parentDeviceId,
          wqIds: [...m.wqIds],
          setId: m.setId,
          createdAt: m.createdAt,
          assignedAt: m.assignedAt,
        };
      }
      case "entry": {
        const slash = id.lastIndexOf("/");
        const e = this.devices.get(id.slice(0, slash))?.entries.get(Number(id.slice(slash + 1)));
        if (e === undefined) return undefined;
        return {
          kind: "pasidEntry",
          deviceId: e.deviceId,
          wqId: e.wqId,
          hpasid: e.hpasid,
          generation: e.generation,
          gpasid: e.gpasid,
          setId: e.setId,
          mdevUuid: e.mdevUuid,
          programmedAt: e.programmedAt,
        };
      }
      case "reg": {
        const registrationId = this.registrations.get(Number(id));
        return registrationId === undefined ? undefined : { kind: "registration", setId: Number(id), registrationId };
      }
      default:
        return undefined;
    }
  }

  // --- views ---------------------------------------------------------------------------------

  /**
   * The selected devices (all when `deviceIds` is empty), their mdevs and the registered sets.
   * @throws DomainError NOT_FOUND `DEVICE_NOT_FOUND` (a device named is not registered)
   */
  snapshot(deviceIds: readonly string[] = []): VdcmSnapshot {
    const selected = deviceIds.length === 0 ? [...this.devices.values()] : [...new Set(deviceIds)].map((id) => this.requireDevice(id));
    selected.sort((a, b) => compare(a.deviceId, b.deviceId));
    const ids = new Set(selected.map((d) => d.deviceId));
    const mdevs = [...this.mdevs.values()].filter((m) => ids.has(m.parentDeviceId)).sort((a, b) => compare(a.uuid, b.uuid));
    return {
      devices: selected.map((d) => this.viewDevice(d)),
      mdevs: mdevs.map(viewMdev),
      registeredSetIds: [...this.registrations.keys()].sort((a, b) => a - b),
    };
  }

  private viewDevice(d: Device): DeviceView {
    return {
      deviceId: d.deviceId,
      wqs: [...d.wqs.values()]
        .sort((a, b) => a.wqId - b.wqId)
        .map((w) => ({
          wqId: w.wqId,
          mode: w.mode,
          size: w.size,
          mdevUuids: [...w.mdevs].sort(compare),
          hpasid: d.entries.get(w.wqId)?.hpasid ?? 0,
        })),
      maxPasidEntries: d.maxPasidEntries,
      pasidEntries: [...d.entries.values()].sort((a, b) => a.hpasid - b.hpasid || a.wqId - b.wqId).map(viewEntry),
    };
  }

  private cancelReservations(mdevUuid: string): void {
    for (const d of this.devices.values()) {
      for (const [wqId, r] of d.reservations) if (r.mdevUuid === mdevUuid) d.reservations.delete(wqId);
    }
  }

  private requireDevice(deviceId: string): Device {
    const d = this.devices.get(deviceId);
    if (d === undefined) throw vdcmError("DEVICE_NOT_FOUND", `no device ${quote(deviceId)} is registered`);
    return d;
  }

  private requireMdev(mdevUuid: string): Mdev {
    if (mdevUuid.length === 0) throw invalidField("mdev_uuid", "mdev_uuid is required");
    const m = this.mdevs.get(normalizeMdevUuid(mdevUuid));
    if (m === undefined) throw vdcmError("MDEV_NOT_FOUND", `no mdev ${quote(mdevUuid)}`);
    return m;
  }

  private requireAssigned(mdevUuid: string): Mdev {
    const m = this.requireMdev(mdevUuid);
    if (m.setId === 0) throw vdcmError("MDEV_NOT_ASSIGNED", `mdev ${m.uuid} is not assigned to a VM`);
    return m;
  }
}

function sameEntry(e: Entry, x: DevicePasidEntry): boolean {
  return e.hpasid === x.hpasid && e.generation === x.generation && e.setId === x.setId && e.mdevUuid === x.mdevUuid;
}

function viewEntry(e: Entry): DevicePasidEntry {
  return { ...e };
}

function viewMdev(m: Mdev): MdevView {
  return { mdevUuid: m.uuid, parentDeviceId: m.parentDeviceId, wqIds: [...m.wqIds], setId: m.setId, createdAt: m.createdAt, assignedAt: m.assignedAt };
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
