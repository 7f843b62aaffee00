// Kept whole (~650 lines): the one class whose methods share the in-flight descriptors, pending
// writes and per-mdev locks.
import type { RoleStatePort } from "@ioasid/bus";
import { Code, DomainError, isDomainError, quote } from "@ioasid/errors";
import { assertDescriptor, runDescriptor, type Completion, type Descriptor, type DmaTranslator } from "./descriptor-runner.js";
import { heldReferences, KeyedMutex, type CorePort, type HeldReference } from "@ioasid/role-kit";
import { ownRegistrations, registerOnSet, unregisterNotifier } from "./core-registrations.js";
import type { Holder, HistoryFields, HistorySink, VdcmHistoryAction, VdevClearCause } from "./ports.js";
import { fromCoreError, invalidField, untranslatable, vdcmError } from "./vdcm-errors.js";
import { PasidSpace, type Submission, type SubmissionResult } from "./submission.js";
import type { ClearResult, IoasidEventLike, VdcmOptions } from "./vdcm-options.js";
import type { VdcmKeptEntry } from "./vdcm-kept-entry.js";
import { EntryState, MAX_GPASID, normalizeMdevUuid, pasidInUse, WqMode } from "./vdcm-model.js";
import { VdcmState } from "./vdcm-state.js";
import type { DevicePasidEntry, DeviceSpec, DeviceView, MdevView, ResolvedWq, VdcmSnapshot } from "./vdcm-views.js";

/** The holder role of every reference VDCM takes, and its subscriber name at the core. */
export const VDCM_ROLE = "vdcm";

/** A descriptor on its way through a work queue (it keeps its PASID's context live on the device). */
interface InFlight {
  readonly setId: number;
  readonly mdevUuid: string;
  readonly deviceId: string;
  readonly wqId: number;
  /** Unknown while the descriptor's PASID is being translated. */
  hpasid: number | undefined;
  generation: number;
  readonly done: Promise<void>;
  end(): void;
}

/** An MMIO write in progress: its reference may be taken before a FREE and its entry written after. */
interface PendingWrite {
  readonly setId: number;
  readonly done: Promise<void>;
}

/** A core call whose outcome is unknown: the core may or may not have applied it. */
function isIndeterminate(err: unknown): boolean {
  const e = DomainError.from(err);
  return e.code === Code.UNAVAILABLE || e.code === Code.DEADLINE_EXCEEDED || e.code === Code.CANCELLED || e.code === Code.UNKNOWN;
}

/**
 * The VDCM role (DESIGN §5 "VDCM"; ioasid.rst "VDCM PASID Programming"): emulates the mdevs'
 * virtual registers on top of {@link VdcmState}, keeps the device PASID table in step with the
 * IOASID life cycle, and handles FREE at DEVICE priority.
 *
 * - mdev_write(gpasid) → find_by_spid(gpasid) taking a reference → vdev_write(hpasid)
 *   (life-cycle table steps 8–11, refcount 4);
 * - mdev_clear(gpasid) → drain by host PASID → vdev_clear(hpasid) → ioasid_put() (steps 14–16);
 * - FREE → drain and clear every entry using the PASID, then acknowledge releasing those
 *   references (misbehaving-guest table steps 21/24);
 * - descriptors on shared work queues translate their PASID; untranslatable ones are dropped.
 *
 * Writes, clears and the teardown of one mdev are serialized per mdev; different mdevs and the
 * FREE handler run concurrently, and every step that reads and writes the tables is synchronous.
 */
export class Vdcm {
  /** The "hardware" tables. */
  readonly state: VdcmState;
  readonly instance: string;
  private readonly core: CorePort;
  private readonly dma: DmaTranslator;
  private readonly history: HistorySink | undefined;
  private readonly now: () => Date;
  private readonly log: NonNullable<VdcmOptions["log"]>;
  private readonly putAttempts: number;
  /** Releases deferred while the core was unreachable, retried by {@link retryPendingPuts}. */
  private readonly pendingPuts: Array<{ setId: number; ioasid: number; holder: Holder; generation: number; why: string }> = [];
  private readonly locks = new KeyedMutex();
  private readonly inFlight = new Set<InFlight>();
  /**
   * Sets where a reference may have been taken without its answer (a find-by-SPID or get whose
   * answer was lost): {@link retryPendingPuts} releases there what no entry or descriptor backs.
   */
  private readonly sweepSets = new Set<number>();
  private readonly pendingWrites = new Set<PendingWrite>();
  /** Entries being drained and cleared, by `<device>/<wq>`: settles once the entry is gone. */
  private readonly clearing = new Map<string, Promise<void>>();

  constructor(options: VdcmOptions) {
    this.state = options.state ?? new VdcmState();
    this.instance = options.instance;
    this.core = options.core;
    this.dma = options.dma;
    this.history = options.history;
    this.now = options.now ?? (() => new Date());
    this.log = options.log ?? (() => undefined);
    this.putAttempts = options.putAttempts ?? 3;
    this.store = options.store;
  }

  private readonly store: RoleStatePort<VdcmKeptEntry> | undefined;
  /** Every store write issued so far has settled (or one failed) once this does. */
  private written: Promise<void> = Promise.resolve();

  /**
   * Writes what changed in the tables to the store (before a reply, an acknowledgement or a put),
   * and resolves once that write and every earlier one are kept. A caller with no change of its
   * own still waits: what it read may be another call's change still on its way to the store
   * (chaos soak, seed 21: a FREE found an entry already cleared by an mdev_clear whose write then
   * failed, and was acknowledged on a clear that was never kept).
   */
  private persist(): Promise<void> {
    const changes = this.state.takeChanges();
    if (this.store !== undefined && changes.length > 0) {
      const write = this.store.write(changes);
      this.written = Promise.all([this.written, write]).then(() => undefined);
    }
    return this.written;
  }

  // --- devices and mdevs ---------------------------------------------------------------------

  /** RegisterDevice. @see VdcmState.registerDevice */
  async registerDevice(spec: DeviceSpec): Promise<DeviceView> {
    const d = this.state.registerDevice(spec);
    await this.persist();
    return d;
  }

  /** RemoveDevice (no mdev may use it: an mdev's PASIDs are cleared when it is unassigned). @see VdcmState.removeDevice */
  async removeDevice(deviceId: string): Promise<void> {
    this.state.removeDevice(deviceId);
    await this.persist();
  }

  /** CreateMdev. @see VdcmState.createMdev */
  async createMdev(parentDeviceId: string, mdevUuid: string, wqIds: readonly number[]): Promise<MdevView> {
    const m = this.state.createMdev(parentDeviceId, mdevUuid, wqIds, this.now());
    await this.persist();
    return m;
  }

  /** DestroyMdev (only unassigned, so it has no programmed PASID). @see VdcmState.destroyMdev */
  async destroyMdev(mdevUuid: string): Promise<void> {
    await this.locks.run(mdevKey(mdevUuid), async () => {
      this.state.destroyMdev(mdevUuid);
      await this.persist();
    });
  }

  /**
   * AssignMdev: gives the mdev to the VM whose IOASID set is `setId`. The first mdev of a set
   * registers VDCM's notifier on the set at DEVICE priority for FREE ("KVM and VDCM shall use
   * notification priority IOASID_PRIO_CPU and IOASID_PRIO_DEVICE"; "notifier blocks shall be
   * registered on the IOASID set such that only events from the matching VM are received").
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND` / `SET_NOT_FOUND`; ALREADY_EXISTS
   *   `MDEV_ALREADY_ASSIGNED`; FAILED_PRECONDITION `MDEV_BUSY` / `SET_NOT_EMPTY` (the core refuses
   *   a registration on a set that already has IOASIDs: there is no replay)
   */
  async assignMdev(mdevUuid: string, setId: number): Promise<{ readonly mdev: MdevView; readonly registered: boolean }> {
    return this.locks.run(mdevKey(mdevUuid), () =>
      this.locks.run(setKey(setId), async () => {
        this.state.checkAssign(mdevUuid, setId);
        let registered = false;
        if (this.state.registrationOf(setId) === undefined) {
          let registrationId: number;
          try {
            registrationId = await registerOnSet(this.core, this.subscriber, setId);
          } catch (err) {
            throw fromCoreError(err);
          }
          this.state.setRegistration(setId, registrationId);
          registered = true;
        }
        const mdev = this.state.assignMdev(mdevUuid, setId, this.now());
        await this.persist();
        return { mdev, registered };
      }),
    );
  }

  /**
   * UnassignMdev: every PASID programmed through the mdev is drained and cleared and its reference
   * released; the last mdev of a set withdraws VDCM's registration.
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND`; FAILED_PRECONDITION `MDEV_NOT_ASSIGNED`
   */
  async unassignMdev(mdevUuid: string): Promise<{ readonly clearedEntries: number; readonly unregistered: boolean }> {
    return this.locks.run(mdevKey(mdevUuid), async () => {
      if (mdevUuid === "") throw invalidField("mdev_uuid", "mdev_uuid is required");
      const mdev = this.state.getMdev(mdevUuid);
      if (mdev === undefined) throw vdcmError("MDEV_NOT_FOUND", `no mdev ${quote(mdevUuid)}`);
      if (mdev.setId === 0) throw vdcmError("MDEV_NOT_ASSIGNED", `mdev ${mdev.mdevUuid} is not assigned to a VM`);
      const setId = mdev.setId;
      let clearedEntries = 0;
      // Entries only come from writes, serialized with this call: one pass sees them all.
      for (const entry of this.state.entriesOfMdev(mdev.mdevUuid)) {
        if (await this.teardownEntry(entry, "unassign")) {
          await this.release(entry, purposeOf(entry.deviceId, entry.wqId));
          clearedEntries++;
        }
      }
      // Descriptors the VM submitted through the mdev's shared work queues complete before it goes.
      await this.drain((f) => f.mdevUuid === mdev.mdevUuid);
      const unregistered = await this.locks.run(setKey(setId), async () => {
        const registrationId = this.state.registrationOf(setId);
        const last = this.state.mdevCountOfSet(setId) === 1 && registrationId !== undefined;
        if (last) await unregisterNotifier(this.core, registrationId);
        this.state.unassignMdev(mdev.mdevUuid);
        if (last) this.state.dropRegistration(setId);
        await this.persist();
        return last;
      });
      return { clearedEntries, unregistered };
    });
  }

  // --- the virtual registers -----------------------------------------------------------------

  /**
   * WriteWqPasid, the guest's mdev_write(gpasid) to a dedicated virtual work queue: translates the
   * guest PASID with find_by_spid() taking a reference (life-cycle step 10) — a PASID the guest
   * never allocated or bound, or one being freed, fails there and nothing is programmed ("an
   * illegal guest PASID programming would fail in obtaining reference of the matching host
   * IOASID") — then programs the host PASID into the device (vdev_write, step 11).
   * @throws DomainError those of {@link VdcmState.reserveWq} and {@link VdcmState.programWq};
   *   NOT_FOUND `SPID_NOT_FOUND` / `IOASID_FREE_PENDING` / `SET_NOT_FOUND`
   */
  async writeWqPasid(mdevUuid: string, virtualWq: number, gpasid: number): Promise<DevicePasidEntry> {
    return this.locks.run(mdevKey(mdevUuid), async () => {
      const reservation = this.state.reserveWq(mdevUuid, virtualWq, gpasid);
      const pending = this.beginPendingWrite(reservation.setId);
      try {
        const holder = this.holder(purposeOf(reservation.deviceId, reservation.wqId));
        let t;
        try {
          t = await this.core.findBySpid(reservation.setId, gpasid, holder);
        } catch (err) {
          this.state.releaseReservation(reservation);
          // The core may have taken the reference and lost the answer (chaos seed 8): nobody would
          // hold it, and the IOASID would stay FREE_PENDING after its FREE.
          if (isIndeterminate(err)) this.sweepSets.add(reservation.setId);
          throw fromCoreError(err, "gpasid");
        }
        let entry: DevicePasidEntry;
        try {
          // DESIGN §5: never program a PASID for one guest while another guest's context for it
          // (an entry, or a descriptor in flight) still exists on the device.
          const foreign = this.foreignInFlight(reservation.deviceId, t.ioasid, reservation.setId, t.generation);
          if (foreign !== undefined) throw pasidInUse(reservation.deviceId, t.ioasid, foreign);
          entry = this.state.programWq(reservation, t.ioasid, t.generation, this.now());
        } catch (err) {
          this.state.releaseReservation(reservation);
          await this.putQuietly(reservation.setId, t.ioasid, holder, t.generation, "write refused");
          throw err;
        }
        // Recorded when the device is programmed; kept before the guest is told.
        this.record({ $case: "vdevWrite", value: { ...where(entry), gpasid } }, entry, { refcount: t.refcount });
        await this.persist();
        return entry;
      } finally {
        pending.end();
      }
    });
  }

  /**
   * ClearWqPasid, the guest's mdev_clear(gpasid) (life-cycle step 14): drains the work queue by
   * host PASID, clears the device entry (vdev_clear, step 15), then releases the reference
   * (ioasid_put, step 16). Nothing programmed — cleared twice, or cleared by the FREE teardown
   * first — is `cleared: false`.
   * @throws DomainError NOT_FOUND `MDEV_NOT_FOUND` / `WQ_NOT_FOUND`; FAILED_PRECONDITION `MDEV_NOT_ASSIGNED`
   */
  async clearWqPasid(mdevUuid: string, virtualWq: number): Promise<ClearResult> {
    return this.locks.run(mdevKey(mdevUuid), async () => {
      const wq = this.state.resolveAssignedWq(mdevUuid, virtualWq);
      const entry = this.state.entryAt(wq.deviceId, wq.wqId);
      if (entry === undefined || entry.mdevUuid !== wq.mdevUuid) return { cleared: false, entry: undefined };
      if (!(await this.teardownEntry(entry, "mdev_clear"))) return { cleared: false, entry: undefined };
      await this.release(entry, purposeOf(entry.deviceId, entry.wqId));
      return { cleared: true, entry };
    });
  }

  /**
   * SubmitDescriptor: runs one descriptor to completion. On a dedicated work queue it runs with
   * the programmed host PASID. On a shared one its PASID is translated — a guest PASID through
   * the mdev's set (find_by_spid), a host PASID (ENQCMD already translated it) checked to belong to
   * the set and be live — with a reference held while it runs; an untranslatable descriptor is
   * dropped with the error and nothing reaches the device.
   * @throws DomainError see SubmitDescriptor in vdcm.proto
   */
  async submitDescriptor(s: Submission): Promise<SubmissionResult> {
    const wq = this.state.resolveAssignedWq(s.mdevUuid, s.virtualWq);
    const descriptor = s.descriptor;
    assertDescriptor(descriptor);
    if (wq.mode === WqMode.DEDICATED) {
      if (s.pasid !== 0) throw invalidField("pasid", "a dedicated work queue uses its programmed PASID: pasid must be 0");
      const entry = this.state.entryAt(wq.deviceId, wq.wqId);
      if (entry === undefined || entry.state !== EntryState.PROGRAMMED) {
        throw vdcmError("WQ_PASID_NOT_PROGRAMMED", `virtual work queue ${s.virtualWq} of mdev ${wq.mdevUuid} has no PASID programmed`);
      }
      const flight = this.beginInFlight(wq, entry.hpasid, entry.generation);
      try {
        const completion = await runDescriptor(this.dma, wq.deviceId, entry.hpasid, descriptor);
        this.recordSubmit(wq, entry.hpasid, entry.generation, entry.gpasid, descriptor, completion);
        return { hpasid: entry.hpasid, generation: entry.generation, ...completion };
      } finally {
        flight.end();
      }
    }
    if (s.pasidSpace !== PasidSpace.GUEST && s.pasidSpace !== PasidSpace.HOST) {
      throw invalidField("pasid_space", "a shared work queue needs the descriptor's PASID space: GUEST or HOST");
    }
    if (s.pasid === 0) throw invalidField("pasid", "a shared work queue needs the descriptor's PASID (non-zero)");
    if (s.pasidSpace === PasidSpace.GUEST && s.pasid > MAX_GPASID) throw invalidField("pasid", `guest PASID ${s.pasid} is outside 1..${MAX_GPASID}`);
    // In flight from before the translation: a FREE arriving meanwhile waits for it (its reference
    // may be taken just before the free).
    const flight = this.beginInFlight(wq, undefined, 0);
    try {
      const holder = this.holder(`${purposeOf(wq.deviceId, wq.wqId)}.desc`);
      let hpasid: number;
      let generation: number;
      try {
        if (s.pasidSpace === PasidSpace.GUEST) {
          ({ ioasid: hpasid, generation } = await this.core.findBySpid(wq.setId, s.pasid, holder));
        } else {
          // Checked to belong to the mdev's set and be live, then held while the descriptor runs.
          ({ generation } = await this.core.find(wq.setId, s.pasid, s.generation));
          hpasid = s.pasid;
          await this.core.get(wq.setId, hpasid, holder, generation);
        }
      } catch (err) {
        if (isIndeterminate(err)) this.sweepSets.add(wq.setId);
        const e = untranslatable(fromCoreError(err, "pasid"), s.pasid);
        this.recordDropped(wq, s, e);
        throw e;
      }
      try {
        const foreign = this.state.foreignContext(wq.deviceId, hpasid, wq.setId, generation) ?? this.foreignInFlight(wq.deviceId, hpasid, wq.setId, generation);
        if (foreign !== undefined) {
          const e = pasidInUse(wq.deviceId, hpasid, foreign);
          this.recordDropped(wq, s, e);
          throw e;
        }
        flight.hpasid = hpasid;
        flight.generation = generation;
        const completion = await runDescriptor(this.dma, wq.deviceId, hpasid, descriptor);
        this.recordSubmit(wq, hpasid, generation, s.pasidSpace === PasidSpace.GUEST ? s.pasid : undefined, descriptor, completion);
        return { hpasid, generation, ...completion };
      } finally {
        await this.putQuietly(wq.setId, hpasid, holder, generation, "descriptor done");
      }
    } finally {
      flight.end();
    }
  }

  // --- the IOASID notifier -------------------------------------------------------------------

  /**
   * The DEVICE-priority notifier handler (vdcm_nb_handler, misbehaving-guest table steps 21/24):
   * on FREE, drains and clears every device entry using the PASID (vdev_clear_wk(hpasid)) and
   * returns the purposes of the references those entries held, released with the
   * acknowledgement. Descriptors in flight with the PASID are drained too (they release their own
   * references). Idempotent: a redelivered FREE finds nothing left and releases nothing.
   */
  async onIoasidEvent(event: IoasidEventLike): Promise<{ readonly release: string[] }> {
    if (event.type !== "FREE") return { release: [] };
    // A write whose find_by_spid() won the race with the free programs its entry after this
    // delivery started: let writes in progress on the set settle first, so it is cleared too.
    await Promise.all([...this.pendingWrites].filter((w) => w.setId === event.setId).map((w) => w.done));
    const release: string[] = [];
    await Promise.all(
      this.state.entriesForIoasid(event.setId, event.ioasid, event.generation).map(async (entry) => {
        if (await this.teardownEntry(entry, "FREE", event.seq)) release.push(purposeOf(entry.deviceId, entry.wqId));
      }),
    );
    await this.drain((f) => f.setId === event.setId && (f.hpasid === undefined || f.hpasid === event.ioasid));
    // Acknowledged on what is kept: an entry found cleared may be another call's clear in flight.
    await this.persist();
    return { release };
  }

  // --- reconciliation ------------------------------------------------------------------------

  /**
   * Reconciles with the core after a (re)start, against the tables restored from the store (empty
   * when none is kept): every reference this instance holds that no programmed entry backs is
   * released (a descriptor's, or one left by a crash between a clear and its put); an entry whose
   * reference the core no longer records (force-released by an operator, or its set gone) is
   * drained and cleared, so nothing stays live on a device for an IOASID that may be reused (S9);
   * registrations are kept for sets that still have an mdev and withdrawn otherwise. Entries still
   * backed stay: their FREE, if it came while VDCM was down, is delivered again now (at-least-once),
   * and clears them — so a crashed VDCM keeps such an IOASID from being reclaimed until it returns
   * and clears the device (DESIGN §4.4).
   * @returns references released, registrations withdrawn, entries cleared
   */
  async reconcile(): Promise<{ readonly released: number; readonly unregistered: number; readonly cleared: number }> {
    const own = await ownRegistrations(this.core, this.subscriber);
    let unregistered = 0;
    for (const r of own) {
      if (this.state.registrationOf(r.setId) === r.registrationId && this.state.mdevCountOfSet(r.setId) > 0) continue;
      await unregisterNotifier(this.core, r.registrationId);
      if (this.state.registrationOf(r.setId) === r.registrationId) this.state.dropRegistration(r.setId);
      unregistered++;
    }
    const snap = this.state.snapshot();
    const entries = snap.devices.flatMap((d) => d.pasidEntries);
    const sets = new Set([...own.map((r) => r.setId), ...entries.map((e) => e.setId), ...snap.mdevs.map((m) => m.setId)].filter((s) => s !== 0));
    let released = 0;
    let cleared = 0;
    for (const setId of sets) {
      let held: HeldReference[];
      try {
        held = await heldReferences(this.core, setId, { role: VDCM_ROLE, instance: this.instance });
      } catch (err) {
        if (!isDomainError(err, "SET_UNKNOWN")) throw err;
        held = [];
      }
      const backed = new Set<string>();
      for (const h of held) {
        const entry = entries.find(
          (e) => e.setId === h.setId && e.hpasid === h.ioasid && e.generation === h.generation && purposeOf(e.deviceId, e.wqId) === h.purpose,
        );
        const keep = entry === undefined ? 0 : 1;
        if (entry !== undefined) backed.add(`${entry.deviceId}/${entry.wqId}`);
        for (let i = keep; i < h.count; i++) {
          if (await this.putQuietly(h.setId, h.ioasid, this.holder(h.purpose), h.generation, "reconcile after restart")) released++;
        }
      }
      for (const e of entries.filter((x) => x.setId === setId && !backed.has(`${x.deviceId}/${x.wqId}`))) {
        if (await this.teardownEntry(e, "reconcile")) cleared++;
      }
    }
    await this.persist();
    return { released, unregistered, cleared };
  }

  // --- QueryState ----------------------------------------------------------------------------

  /** QueryState. @see VdcmState.snapshot */
  snapshot(deviceIds: readonly string[] = []): VdcmSnapshot {
    return this.state.snapshot(deviceIds);
  }

  // --- internals -----------------------------------------------------------------------------

  /**
   * Drains and clears one entry. Exactly one caller owns the teardown of an entry (and so the
   * release of its reference); any other waits for that teardown to finish.
   * @returns true when this caller drained and cleared it
   */
  private async teardownEntry(entry: DevicePasidEntry, cause: VdevClearCause, seq?: number): Promise<boolean> {
    const key = `${entry.deviceId}/${entry.wqId}`;
    if (!this.state.beginDrain(entry.deviceId, entry.wqId, entry)) {
      await this.clearing.get(key);
      return false;
    }
    let settle!: () => void;
    this.clearing.set(key, new Promise<void>((resolve) => (settle = resolve)));
    try {
      // Drain by host PASID: every descriptor using it on this work queue completes first.
      await this.drain((f) => f.deviceId === entry.deviceId && f.wqId === entry.wqId && f.hpasid === entry.hpasid);
      this.state.clearEntry(entry.deviceId, entry.wqId, entry);
      this.record({ $case: "vdevClear", value: { ...where(entry), cause } }, entry, seq === undefined ? {} : { seq });
      // Kept cleared before the reference goes (a restart then releases a reference left over).
      await this.persist();
      return true;
    } finally {
      this.clearing.delete(key);
      settle();
    }
  }

  /** Releases the reference a cleared entry held (ioasid_put). */
  private async release(entry: DevicePasidEntry, purpose: string): Promise<void> {
    await this.putQuietly(entry.setId, entry.hpasid, this.holder(purpose), entry.generation, "entry cleared");
  }

  /**
   * Drops a reference; a failure is logged, never thrown (the hardware state it protected is already
   * gone). Retried while the core is unreachable.
   * @returns whether the reference was dropped
   */
  private async putQuietly(setId: number, ioasid: number, holder: Holder, generation: number, why: string): Promise<boolean> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.core.put(setId, ioasid, holder, generation);
        return true;
      } catch (err) {
        const e = DomainError.from(err);
        const transient = e.code === Code.UNAVAILABLE || e.code === Code.DEADLINE_EXCEEDED;
        if (!transient) {
          this.log("warn", "reference not released", { setId, ioasid, generation, holder, why, reason: e.reason, message: e.message });
          return false;
        }
        if (attempt >= this.putAttempts) {
          // Nothing of this reference is programmed any more: it must go, or the IOASID stays
          // FREE_PENDING for good (chaos seed 7: an mdev_clear's put lost while the core was down).
          this.pendingPuts.push({ setId, ioasid, holder, generation, why });
          this.log("warn", "reference release deferred: the core is unreachable", { setId, ioasid, generation, holder, why, reason: e.reason });
          return false;
        }
      }
    }
  }

  /** Whether {@link retryPendingPuts} has work: deferred puts, or sets to sweep. */
  get pendingPutCount(): number {
    return this.pendingPuts.length + this.sweepSets.size;
  }

  /**
   * Releases in each set to sweep every reference of this instance that no programmed entry backs,
   * once nothing is in progress there (no write being made, no descriptor running).
   */
  private async sweepUnbacked(): Promise<void> {
    for (const setId of [...this.sweepSets]) {
      const busy = () => [...this.pendingWrites].some((w) => w.setId === setId) || [...this.inFlight].some((f) => f.setId === setId);
      if (busy()) continue;
      let held: HeldReference[];
      try {
        held = await heldReferences(this.core, setId, { role: VDCM_ROLE, instance: this.instance });
      } catch (err) {
        if (isDomainError(err, "SET_UNKNOWN")) this.sweepSets.delete(setId);
        continue;
      }
      if (busy()) continue; // something began meanwhile: next round
      this.sweepSets.delete(setId);
      const entries = this.state.snapshot().devices.flatMap((d) => d.pasidEntries);
      for (const h of held) {
        const backed = entries.some(
          (e) => e.setId === h.setId && e.hpasid === h.ioasid && e.generation === h.generation && purposeOf(e.deviceId, e.wqId) === h.purpose,
        )
          ? 1
          : 0;
        for (let i = backed; i < h.count; i++) {
          if (await this.putQuietly(h.setId, h.ioasid, this.holder(h.purpose), h.generation, "taken by a call whose answer was lost")) {
            this.log("info", "released a reference no entry backs", { setId: h.setId, ioasid: h.ioasid, generation: h.generation, purpose: h.purpose });
          }
        }
      }
    }
  }

  /**
   * Retries the releases deferred while the core was unreachable, until each is made or refused
   * (already dropped, IOASID gone). The service calls it on a timer.
   * @returns releases still deferred
   */
  async retryPendingPuts(): Promise<number> {
    await this.sweepUnbacked();
    const batch = this.pendingPuts.splice(0);
    for (const p of batch) {
      try {
        await this.core.put(p.setId, p.ioasid, p.holder, p.generation);
        this.log("info", "deferred reference released", { setId: p.setId, ioasid: p.ioasid, generation: p.generation, holder: p.holder, why: p.why });
      } catch (err) {
        const e = DomainError.from(err);
        if (e.code === Code.UNAVAILABLE || e.code === Code.DEADLINE_EXCEEDED) this.pendingPuts.push(p);
        else
          this.log("warn", "deferred reference release refused (nothing to drop)", {
            setId: p.setId,
            ioasid: p.ioasid,
            generation: p.generation,
            holder: p.holder,
            reason: e.reason,
          });
      }
    }
    return this.pendingPuts.length + this.sweepSets.size;
  }

  private async drain(match: (f: InFlight) => boolean): Promise<void> {
    await Promise.all([...this.inFlight].filter(match).map((f) => f.done));
  }

  /** A descriptor in flight on the device with another guest's context for `hpasid`. */
  private foreignInFlight(deviceId: string, hpasid: number, setId: number, generation: number): InFlight | undefined {
    for (const f of this.inFlight) {
      if (f.deviceId === deviceId && f.hpasid === hpasid && (f.setId !== setId || f.generation !== generation)) return f;
    }
    return undefined;
  }

  private beginInFlight(wq: ResolvedWq, hpasid: number | undefined, generation: number): InFlight {
    let end!: () => void;
    const done = new Promise<void>((resolve) => (end = resolve));
    const flight: InFlight = {
      setId: wq.setId,
      mdevUuid: wq.mdevUuid,
      deviceId: wq.deviceId,
      wqId: wq.wqId,
      hpasid,
      generation,
      done,
      end: () => {
        this.inFlight.delete(flight);
        end();
      },
    };
    this.inFlight.add(flight);
    return flight;
  }

  private beginPendingWrite(setId: number): { end(): void } {
    let end!: () => void;
    const w: PendingWrite = { setId, done: new Promise<void>((resolve) => (end = resolve)) };
    this.pendingWrites.add(w);
    return {
      end: () => {
        this.pendingWrites.delete(w);
        end();
      },
    };
  }

  private holder(purpose: string): Holder {
    return { role: VDCM_ROLE, instance: this.instance, purpose };
  }

  /** VDCM's notifier subscriber at the core. */
  private get subscriber(): { readonly name: string; readonly instance: string } {
    return { name: VDCM_ROLE, instance: this.instance };
  }

  private record(action: VdcmHistoryAction, entry: DevicePasidEntry, fields: HistoryFields): void {
    this.history?.record(action, { ioasid: entry.hpasid, generation: entry.generation, setId: entry.setId, spid: entry.gpasid, ...fields });
  }

  private recordSubmit(wq: ResolvedWq, hpasid: number, generation: number, gpasid: number | undefined, d: Descriptor, c: Completion): void {
    this.history?.record(
      { $case: "submit", value: { device: wq.deviceId, wq: wq.wqId, mdev: wq.mdevUuid, op: String(d.op), status: String(c.status), bytes: c.bytesCompleted } },
      { ioasid: hpasid, generation, setId: wq.setId, ...(gpasid === undefined ? {} : { spid: gpasid }) },
    );
  }

  private recordDropped(wq: ResolvedWq, s: Submission, err: DomainError): void {
    this.history?.record(
      {
        $case: "submit",
        value: { device: wq.deviceId, wq: wq.wqId, mdev: wq.mdevUuid, dropped: true, pasidSpace: s.pasidSpace ?? "", pasid: s.pasid, reason: err.reason },
      },
      { setId: wq.setId },
    );
  }
}

/** The purpose of the reference a dedicated work queue's programmed PASID holds: `<device>.wq<n>`. */
export function purposeOf(deviceId: string, wqId: number): string {
  return `${deviceId}.wq${wqId}`;
}

function mdevKey(mdevUuid: string): string {
  return `mdev:${normalizeMdevUuid(mdevUuid)}`;
}

function setKey(setId: number): string {
  return `set:${setId}`;
}

/** The work queue of an entry, as its history records name it. */
function where(e: DevicePasidEntry): { device: string; wq: number; mdev: string } {
  return { device: e.deviceId, wq: e.wqId, mdev: e.mdevUuid };
}
