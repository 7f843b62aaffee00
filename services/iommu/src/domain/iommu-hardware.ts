// Kept whole (issue 12: one cohesive thing, ~920 lines): one class over one set of tables whose
// invariants (PASID entries ↔ attach handles, attach counts, guest binds' devices, mm bonds, the
// dirty keys) every mutation keeps together; its vocabulary (iommu-hardware-model.ts), page-table
// arithmetic (io-page-table.ts), persistence and row views (hardware-tables.ts) are cut out beside it.
import type { StateChange } from "@ioasid/bus";
import { quote } from "@ioasid/errors";
import { iommuError, invalidField } from "./iommu-errors.js";
import {
  AttachKind,
  DEFAULT_PRI_CREDITS,
  DeviceFunction,
  DomainType,
  FaultReason,
  FlushCause,
  FlushScope,
  IOTLB_FLUSH_LOG_SIZE,
  MAX_NAME_LENGTH,
  MAX_OWNER_DATA,
  MAX_PASIDS,
  RID_PASID,
  type AttachDomainSpec,
  type AttachHandle,
  type Changed,
  type DetachDomainSpec,
  type DeviceSpec,
  type DeviceView,
  type Domain,
  type DomainSpec,
  type GpasidBinding,
  type GpasidEntrySpec,
  type HardwareChange,
  type IommuHardwareKeptEntry,
  type IommuKeptEntry,
  type IommuSnapshot,
  type IotlbFlush,
  type Mapping,
  type MmContext,
  type ReplaceDomainSpec,
  type Replaced,
  type SvaBond,
  type TranslateResult,
  type TranslateSpec,
} from "./iommu-hardware-model.js";
import {
  emptyTables,
  keptEntryOf,
  bondView,
  deviceView,
  domainView,
  entryView,
  guestMappingKey,
  loadTables,
  snapshotHandle,
  type BondState,
  type DeviceState,
  type DomainState,
  type HandleState,
  type HardwareTables,
} from "./hardware-tables.js";
import { allows, findMapping, insertMapping, removeMappings } from "./io-page-table.js";

// The modelled VT-d hardware and the driver's own tables (DESIGN §1 "iommu", §5 "IOMMU"): devices
// and their PASID tables, domains with their I/O page tables, attach handles, the guest PASID binds
// (the kernel's intel_svm per host PASID), the native SVA mm contexts, and the IOTLB flush log.
// Pure and synchronous: no I/O. Every mutation either succeeds whole or throws before changing
// anything, and returns the hardware changes it made so the caller can record them in the history.

export * from "./iommu-hardware-model.js";

const NAME = /^[\x21-\x7e]+$/;

/**
 * The IOMMU's "hardware" and driver tables. Methods validate first and mutate only when nothing can
 * fail any more; mutations return the {@link HardwareChange}s made.
 *
 * @example
 * const hw = new IommuHardware();
 * hw.registerDevice({ deviceId: "0000:6a:01.0", maxPasids: 1 << 20, priCapable: true, function: "PF", parentDeviceId: "", iommuGroup: 1, priCredits: 0 });
 */
export class IommuHardware {
  /** The kept tables (hardware-tables.ts reads and rebuilds them for the store). */
  readonly #t: HardwareTables = emptyTables();
  readonly #flushes: IotlbFlush[] = [];
  #nextFlushSeq = 1n;
  readonly #now: () => Date;
  /** Keys of the kept state changed since {@link takeChanges} (see {@link restore}). */
  readonly #dirty = new Set<string>();

  /** @param options.now clock of handle and flush timestamps (tests). */
  constructor(options: { now?: () => Date } = {}) {
    this.#now = options.now ?? (() => new Date());
  }

  // ---- devices ----

  /**
   * Plugs a PCI function in with an empty PASID table.
   * @throws INVALID_FIELD, PASID_OUT_OF_RANGE (`maxPasids` above 2^20), DEVICE_EXISTS, DEVICE_NOT_FOUND (a VF's PF)
   */
  registerDevice(spec: DeviceSpec): DeviceView {
    assertName("device_id", spec.deviceId);
    if (spec.maxPasids > MAX_PASIDS) {
      throw iommuError("PASID_OUT_OF_RANGE", `max_pasids ${spec.maxPasids} is above 2^20 (20-bit PASIDs)`);
    }
    if (spec.function === DeviceFunction.PF && spec.parentDeviceId !== "") {
      throw invalidField("parent_device_id", "a PF has no parent device: leave parent_device_id empty");
    }
    if (spec.function === DeviceFunction.VF) assertName("parent_device_id", spec.parentDeviceId);
    if (this.#t.devices.has(spec.deviceId)) throw iommuError("DEVICE_EXISTS", `device ${spec.deviceId} is already registered`);
    if (spec.function === DeviceFunction.VF) {
      const pf = this.#t.devices.get(spec.parentDeviceId);
      if (pf === undefined) throw iommuError("DEVICE_NOT_FOUND", `the PF ${spec.parentDeviceId} of VF ${spec.deviceId} is not registered`);
      if (pf.spec.function !== DeviceFunction.PF) {
        throw invalidField("parent_device_id", `${spec.parentDeviceId} is a VF: a VF's parent must be a PF`);
      }
    }
    const stored: DeviceSpec = { ...spec, priCredits: spec.priCredits === 0 ? DEFAULT_PRI_CREDITS : spec.priCredits };
    this.#t.devices.set(spec.deviceId, { spec: stored, entries: new Map() });
    this.#dirty.add(`dev/${spec.deviceId}`);
    return deviceView(this.#t, this.#t.devices.get(spec.deviceId)!);
  }

  /**
   * Unplugs a device: every handle on it is torn down (entries cleared, IOTLB/DevTLB flushed);
   * guest binds lose the device from their {@link GpasidBinding} (the caller releases what the
   * last device held) and SVA bonds are dropped (the mm keeps its PASID).
   * @returns the handles torn down
   * @throws DEVICE_NOT_FOUND, DEVICE_IN_USE (a registered VF names it as its PF)
   */
  removeDevice(deviceId: string): Changed<AttachHandle[]> {
    const dev = this.#device(deviceId);
    for (const other of this.#t.devices.values()) {
      if (other.spec.parentDeviceId === deviceId) {
        throw iommuError("DEVICE_IN_USE", `device ${deviceId} is the PF of VF ${other.spec.deviceId}: remove the VF first`);
      }
    }
    const changes: HardwareChange[] = [];
    const torn: AttachHandle[] = [];
    for (const handleId of [...dev.entries.values()]) {
      torn.push(this.#teardownHandle(this.#t.handles.get(handleId)!, FlushCause.DEVICE_REMOVED, changes));
    }
    this.#t.devices.delete(deviceId);
    this.#dirty.add(`dev/${deviceId}`);
    return { result: torn, changes };
  }

  /** The device, or undefined. */
  device(deviceId: string): DeviceView | undefined {
    const dev = this.#t.devices.get(deviceId);
    return dev === undefined ? undefined : deviceView(this.#t, dev);
  }

  /** @throws DEVICE_NOT_FOUND */
  assertDevice(deviceId: string): DeviceSpec {
    return this.#device(deviceId).spec;
  }

  // ---- domains ----

  /**
   * Creates an unattached domain.
   * @throws INVALID_FIELD, DOMAIN_NOT_FOUND / DOMAIN_NOT_PAGING (a nested domain's parent)
   */
  createDomain(spec: DomainSpec): Domain {
    this.#checkDomainSpec(spec);
    return domainView(this.#addDomain(spec, false));
  }

  /**
   * Destroys a domain nothing uses.
   * @throws DOMAIN_NOT_FOUND, DOMAIN_IN_USE (attached, or the parent of a nested domain)
   */
  freeDomain(domainId: number): void {
    const d = this.#domain(domainId);
    if (d.attachCount > 0) throw iommuError("DOMAIN_IN_USE", `domain ${domainId} is attached ${d.attachCount} time(s): detach it first`);
    for (const other of this.#t.domains.values()) {
      if (other.parentDomainId === domainId) {
        throw iommuError("DOMAIN_IN_USE", `domain ${domainId} is the parent of nested domain ${other.domainId}`);
      }
    }
    this.#t.domains.delete(domainId);
    this.#dirty.add(`dom/${domainId}`);
  }

  /** The domain, or undefined. */
  domain(domainId: number): Domain | undefined {
    const d = this.#t.domains.get(domainId);
    return d === undefined ? undefined : domainView(d);
  }

  // ---- attach handles ----

  /**
   * Checks everything {@link attachDomain} checks, without changing anything.
   * @throws see {@link attachDomain}
   */
  checkAttachDomain(spec: AttachDomainSpec): void {
    const dev = this.#device(spec.deviceId);
    const d = this.#domain(spec.domainId);
    if (d.type === DomainType.SVA) {
      throw iommuError("DOMAIN_INCOMPATIBLE", `domain ${spec.domainId} is an SVA domain: bind the mm with SvaBind`);
    }
    assertOwner(spec.owner, spec.ownerData);
    const key = this.#targetKey(dev, spec.pasid, spec.withoutPasid);
    const taken = dev.entries.get(key);
    if (taken !== undefined) {
      throw iommuError("PASID_IN_USE", `${describeTarget(spec.deviceId, spec.pasid, spec.withoutPasid)} already has attach handle ${taken}`);
    }
  }

  /**
   * Attaches a PAGING or NESTED domain at a PASID, or to the requests without PASID (RID_PASID),
   * creating the attach handle with the owner's data.
   * @throws DEVICE_NOT_FOUND, DOMAIN_NOT_FOUND, DOMAIN_INCOMPATIBLE (SVA), PASID_ZERO_RESERVED,
   *   PASID_OUT_OF_RANGE, PASID_IN_USE, INVALID_FIELD
   */
  attachDomain(spec: AttachDomainSpec): Changed<AttachHandle> {
    this.checkAttachDomain(spec);
    const changes: HardwareChange[] = [];
    const handle = this.#install(
      {
        kind: AttachKind.DOMAIN,
        domainId: spec.domainId,
        deviceId: spec.deviceId,
        pasid: spec.withoutPasid ? RID_PASID : spec.pasid,
        withoutPasid: spec.withoutPasid,
        owner: spec.owner,
        ownerData: spec.ownerData,
        setId: 0,
        gpasid: 0,
        generation: spec.generation,
      },
      changes,
    );
    return { result: handle, changes };
  }

  /**
   * The handle made by AttachDomain at a target, checked against the expected domain.
   * @throws DEVICE_NOT_FOUND, ATTACH_HANDLE_NOT_FOUND, DOMAIN_MISMATCH, INVALID_FIELD,
   *   PASID_ZERO_RESERVED, PASID_OUT_OF_RANGE
   */
  findDomainAttachment(spec: DetachDomainSpec): AttachHandle {
    const dev = this.#device(spec.deviceId);
    const key = this.#targetKey(dev, spec.pasid, spec.withoutPasid);
    const handleId = dev.entries.get(key);
    const where = describeTarget(spec.deviceId, spec.pasid, spec.withoutPasid);
    if (handleId === undefined) throw iommuError("ATTACH_HANDLE_NOT_FOUND", `nothing is attached at ${where}`);
    const h = this.#t.handles.get(handleId)!;
    if (h.kind !== AttachKind.DOMAIN) {
      const undo = h.kind === AttachKind.GPASID_BIND ? "UnbindGpasid" : "SvaUnbind";
      throw iommuError("DOMAIN_MISMATCH", `${where} holds a ${h.kind} handle, not an AttachDomain one: use ${undo}`);
    }
    if (h.domainId !== spec.domainId) {
      throw iommuError("DOMAIN_MISMATCH", `${where} has domain ${h.domainId} attached, not domain ${spec.domainId}`);
    }
    return snapshotHandle(h);
  }

  /**
   * Removes an AttachDomain attachment: the entry is torn down and the IOTLB/DevTLB flushed.
   * @throws see {@link findDomainAttachment}
   */
  detachDomain(spec: DetachDomainSpec): Changed<AttachHandle> {
    const h = this.findDomainAttachment(spec);
    const changes: HardwareChange[] = [];
    this.#teardownHandle(this.#t.handles.get(h.handleId)!, FlushCause.DETACH, changes);
    return { result: h, changes };
  }

  /**
   * Checks everything {@link replaceDomain} checks, without changing anything.
   * @returns the attachment that would be replaced
   * @throws see {@link replaceDomain}
   */
  checkReplaceDomain(spec: ReplaceDomainSpec): AttachHandle {
    const dev = this.#device(spec.deviceId);
    const d = this.#domain(spec.domainId);
    if (d.type === DomainType.SVA) {
      throw iommuError("DOMAIN_INCOMPATIBLE", `domain ${spec.domainId} is an SVA domain: bind the mm with SvaBind`);
    }
    assertOwner(spec.owner, spec.ownerData);
    const key = this.#targetKey(dev, spec.pasid, spec.withoutPasid);
    const where = describeTarget(spec.deviceId, spec.pasid, spec.withoutPasid);
    const handleId = dev.entries.get(key);
    // iommufd: a replace needs an attachment to replace (IOMMU_HWPT_REPLACE of an unattached
    // PASID is -EINVAL); attaching is AttachDomain's job.
    if (handleId === undefined) throw iommuError("PASID_NOT_ATTACHED", `nothing is attached at ${where}: attach a domain with AttachDomain first`);
    const h = this.#t.handles.get(handleId)!;
    if (h.kind !== AttachKind.DOMAIN) {
      const undo = h.kind === AttachKind.GPASID_BIND ? "UnbindGpasid" : "SvaUnbind";
      throw iommuError("DOMAIN_MISMATCH", `${where} holds a ${h.kind} handle, not an AttachDomain one: use ${undo}`);
    }
    if (spec.oldDomainId !== 0 && h.domainId !== spec.oldDomainId) {
      throw iommuError("DOMAIN_MISMATCH", `${where} has domain ${h.domainId} attached, not domain ${spec.oldDomainId}`);
    }
    return snapshotHandle(h);
  }

  /**
   * Replaces the domain of an AttachDomain attachment in one step: the entry is rewritten to the
   * new domain under a new handle (there is no moment with neither domain), then the old domain's
   * cached translations for the target are flushed (cause REPLACE). The new handle takes `spec`'s
   * owner, owner data and generation (the caller passes the old handle's generation when it had
   * one). The domain already attached: nothing changes and `replaced` is undefined.
   * @throws DEVICE_NOT_FOUND, DOMAIN_NOT_FOUND, DOMAIN_INCOMPATIBLE (SVA), PASID_ZERO_RESERVED,
   *   PASID_OUT_OF_RANGE, PASID_NOT_ATTACHED, DOMAIN_MISMATCH, INVALID_FIELD
   */
  replaceDomain(spec: ReplaceDomainSpec): Changed<Replaced> {
    const old = this.checkReplaceDomain(spec);
    if (old.domainId === spec.domainId) return { result: { handle: old, replaced: undefined }, changes: [] };
    const h = this.#t.handles.get(old.handleId)!;
    const changes: HardwareChange[] = [];
    this.#t.handles.delete(h.handleId);
    this.#dirty.add(`h/${h.handleId}`);
    this.#t.domains.get(h.domainId)!.attachCount--;
    const handle = this.#install(
      {
        kind: AttachKind.DOMAIN,
        domainId: spec.domainId,
        deviceId: h.deviceId,
        pasid: h.pasid,
        withoutPasid: h.withoutPasid,
        owner: spec.owner,
        ownerData: spec.ownerData,
        setId: 0,
        gpasid: 0,
        generation: spec.generation,
      },
      changes,
    );
    changes.push(
      this.#flush({
        scope: h.withoutPasid ? FlushScope.DOMAIN : FlushScope.PASID,
        cause: FlushCause.REPLACE,
        domainId: h.domainId,
        pasid: h.pasid,
        deviceId: h.deviceId,
        deviceTlb: true,
        address: 0n,
        size: 0n,
      }),
    );
    return { result: { handle, replaced: snapshotHandle(h) }, changes };
  }

  /** The handle programmed at a device's PASID (or RID_PASID), or undefined. */
  handleAt(deviceId: string, pasid: number, withoutPasid = false): AttachHandle | undefined {
    const id = this.#t.devices.get(deviceId)?.entries.get(withoutPasid ? RID_PASID : pasid);
    return id === undefined ? undefined : snapshotHandle(this.#t.handles.get(id)!);
  }

  // ---- guest PASID binds ----

  /** The bind state of a host PASID, or undefined. The object is live: the driver updates its flags. */
  binding(hpasid: number): GpasidBinding | undefined {
    return this.#t.bindings.get(hpasid);
  }

  /** Starts tracking a guest bind of `hpasid` (no device yet, nothing held). */
  createBinding(b: { hpasid: number; setId: number; generation: number; gpasid: number }): GpasidBinding {
    const existing = this.#t.bindings.get(b.hpasid);
    if (existing !== undefined) return existing;
    const created = this.#watchBinding({ ...b, devices: new Set(), refHeld: false, spidAttached: false, firstStage: [] });
    this.#t.bindings.set(b.hpasid, created);
    this.#dirty.add(`bind/${b.hpasid}`);
    return created;
  }

  /** Forgets a bind state that has no device left. */
  deleteBinding(hpasid: number): void {
    const b = this.#t.bindings.get(hpasid);
    if (b !== undefined && b.devices.size === 0) {
      this.#t.bindings.delete(hpasid);
      // Its ranges are deleted with it (a range whose bind is gone is also dropped at a start).
      for (const m of b.firstStage) this.#dirty.add(guestMappingKey(hpasid, m.iova));
      this.#dirty.add(`bind/${hpasid}`);
    }
  }

  /**
   * Checks everything {@link installGpasidEntry} checks, without changing anything; with
   * `ignoreTaken`, all but whether the PASID is taken (which must not be told before ownership is
   * checked: it would let one guest probe another's binds).
   * @throws see {@link installGpasidEntry}
   */
  checkGpasidEntry(spec: GpasidEntrySpec, options: { ignoreTaken?: boolean } = {}): void {
    const dev = this.#device(spec.deviceId);
    const key = this.#targetKey(dev, spec.hpasid, false);
    assertOwner(spec.owner, spec.ownerData);
    this.#resolveParent(dev, spec.parentDomainId);
    if (options.ignoreTaken === true) return;
    const taken = dev.entries.get(key);
    if (taken !== undefined) {
      throw iommuError("PASID_IN_USE", `device ${spec.deviceId} already has an entry at PASID ${spec.hpasid} (handle ${taken})`);
    }
  }

  /**
   * Programs the NESTED PASID entry of a guest bind on one device (first stage: the guest's page
   * table; second stage: the parent PAGING domain) under an implicit nested domain, and adds the
   * device to the bind state, which must exist ({@link createBinding}).
   * @throws DEVICE_NOT_FOUND, PASID_ZERO_RESERVED, PASID_OUT_OF_RANGE, PASID_IN_USE, DOMAIN_NOT_FOUND,
   *   DOMAIN_NOT_PAGING, INVALID_FIELD
   */
  installGpasidEntry(spec: GpasidEntrySpec): Changed<AttachHandle> {
    const binding = this.#t.bindings.get(spec.hpasid);
    if (binding === undefined) throw new Error(`no bind state for PASID ${spec.hpasid}`);
    this.checkGpasidEntry(spec);
    const dev = this.#device(spec.deviceId);
    const parent = this.#resolveParent(dev, spec.parentDomainId);
    const nested = this.#addDomain({ type: DomainType.NESTED, parentDomainId: parent.domainId, guestPgtable: spec.guestPgtable, mmToken: 0n }, true);
    const changes: HardwareChange[] = [];
    const handle = this.#install(
      {
        kind: AttachKind.GPASID_BIND,
        domainId: nested.domainId,
        deviceId: spec.deviceId,
        pasid: spec.hpasid,
        withoutPasid: false,
        owner: spec.owner,
        ownerData: spec.ownerData,
        setId: binding.setId,
        gpasid: binding.gpasid,
        generation: binding.generation,
      },
      changes,
    );
    binding.devices.add(spec.deviceId);
    return { result: handle, changes };
  }

  /**
   * Tears down the guest bind entry of `hpasid` on one device (flush cause DETACH) and removes the
   * device from the bind state (kept, even when empty, for the caller to release).
   * @returns the handle, or undefined when the device has no bind entry for it
   */
  removeGpasidEntry(hpasid: number, deviceId: string): Changed<AttachHandle | undefined> {
    const dev = this.#t.devices.get(deviceId);
    const id = dev?.entries.get(hpasid);
    const h = id === undefined || hpasid === RID_PASID ? undefined : this.#t.handles.get(id);
    if (h === undefined || h.kind !== AttachKind.GPASID_BIND) return { result: undefined, changes: [] };
    const changes: HardwareChange[] = [];
    return { result: this.#teardownHandle(h, FlushCause.DETACH, changes), changes };
  }

  /**
   * The FREE teardown of an IOASID (DESIGN §5 "IOMMU"; ioasid.rst misbehaving steps 22/25): every
   * entry programmed for this PASID at this generation, on every device — guest binds, checked
   * domain attachments and SVA bonds — is torn down with its IOTLB/DevTLB flush. Entries attached
   * unchecked (generation 0) are not the IOASID's and stay. Idempotent: a second call finds nothing.
   * @returns the handles torn down
   */
  teardownIoasid(pasid: number, generation: number): Changed<AttachHandle[]> {
    const changes: HardwareChange[] = [];
    const torn: AttachHandle[] = [];
    if (pasid === RID_PASID || generation === 0) return { result: torn, changes };
    for (const dev of this.#t.devices.values()) {
      const id = dev.entries.get(pasid);
      if (id === undefined) continue;
      const h = this.#t.handles.get(id)!;
      if (h.generation !== generation) continue;
      // Fault reporting is off from the moment the free is seen until the entry is gone
      // (ioasid.rst: "IOMMU driver shall disable fault reporting after free and before unbind").
      h.faultReporting = false;
      this.#dirty.add(`h/${h.handleId}`);
      torn.push(this.#teardownHandle(h, FlushCause.IOASID_FREE, changes));
    }
    return { result: torn, changes };
  }

  /**
   * True when the IOMMU has anything for this IOASID generation: a guest bind state, an mm whose
   * PASID it is, or an entry programmed for it on some device (what a FREE must tear down).
   */
  hasIoasidState(pasid: number, generation: number): boolean {
    if (pasid === RID_PASID || generation === 0) return false;
    if (this.#t.bindings.get(pasid)?.generation === generation) return true;
    for (const mm of this.#t.mms.values()) if (mm.pasid === pasid && mm.generation === generation) return true;
    for (const dev of this.#t.devices.values()) {
      const id = dev.entries.get(pasid);
      if (id !== undefined && this.#t.handles.get(id)!.generation === generation) return true;
    }
    return false;
  }

  // ---- native SVA ----

  /** The mm context, or undefined. */
  mm(mmToken: bigint): MmContext | undefined {
    const m = this.#t.mms.get(mmToken);
    return m === undefined ? undefined : { mmToken: m.mmToken, setId: m.setId, pasid: m.pasid, generation: m.generation };
  }

  /** Every mm context whose PASID is `pasid`. */
  mmsWithPasid(pasid: number): MmContext[] {
    return [...this.#t.mms.values()].filter((m) => m.pasid === pasid).map((m) => this.mm(m.mmToken)!);
  }

  /** Records an mm and the PASID allocated for it. */
  addMm(ctx: MmContext): void {
    if (!this.#t.mms.has(ctx.mmToken)) this.#t.mms.set(ctx.mmToken, { ...ctx, domainId: 0, bonds: new Map() });
    this.#dirty.add(`mm/${ctx.mmToken}`);
  }

  /** Forgets an mm whose bonds are all gone. */
  deleteMm(mmToken: bigint): void {
    const m = this.#t.mms.get(mmToken);
    if (m !== undefined && m.bonds.size === 0) {
      this.#t.mms.delete(mmToken);
      this.#dirty.add(`mm/${mmToken}`);
    }
  }

  /**
   * Checks everything {@link svaBind} checks for a device and a PASID, without changing anything.
   * @throws DEVICE_NOT_FOUND, PASID_NOT_SUPPORTED, PASID_OUT_OF_RANGE, PASID_IN_USE, INVALID_FIELD
   */
  checkSvaBind(deviceId: string, mmToken: bigint, pasid: number | undefined, owner: string, ownerData: Uint8Array): void {
    const dev = this.#device(deviceId);
    assertOwner(owner, ownerData);
    // max_pasids 1 leaves only PASID 0 (RID_PASID): no PASID to bind an mm at.
    if (dev.spec.maxPasids <= 1) throw iommuError("PASID_NOT_SUPPORTED", `device ${deviceId} has no PASID capability: it cannot do SVA`);
    if (pasid === undefined) return;
    if (pasid >= dev.spec.maxPasids) {
      throw iommuError("PASID_OUT_OF_RANGE", `the mm's PASID ${pasid} is not below max_pasids ${dev.spec.maxPasids} of device ${deviceId}`);
    }
    const bond = this.#t.mms.get(mmToken)?.bonds.get(deviceId);
    const taken = dev.entries.get(pasid);
    if (taken !== undefined && taken !== bond?.handleId) {
      throw iommuError("PASID_IN_USE", `device ${deviceId} already has another attachment at the mm's PASID ${pasid}`);
    }
  }

  /**
   * Binds an mm (which must be known: {@link addMm}) to a device: a new bond programs the mm's
   * PASID with the mm's SVA domain (created with its first bond); an existing bond gains a user.
   * @throws see {@link checkSvaBind}
   */
  svaBind(deviceId: string, mmToken: bigint, owner: string, ownerData: Uint8Array): Changed<SvaBond> {
    const mm = this.#t.mms.get(mmToken);
    if (mm === undefined) throw new Error(`mm ${mmToken} is not known`);
    this.checkSvaBind(deviceId, mmToken, mm.pasid, owner, ownerData);
    const existing = mm.bonds.get(deviceId);
    if (existing !== undefined) {
      existing.users++;
      this.#dirty.add(`mm/${mmToken}`);
      return { result: bondView(mm, deviceId, existing), changes: [] };
    }
    if (mm.domainId === 0) mm.domainId = this.#addDomain({ type: DomainType.SVA, parentDomainId: 0, guestPgtable: 0n, mmToken }, true).domainId;
    const changes: HardwareChange[] = [];
    const handle = this.#install(
      {
        kind: AttachKind.SVA_BIND,
        domainId: mm.domainId,
        deviceId,
        pasid: mm.pasid,
        withoutPasid: false,
        owner,
        ownerData,
        setId: 0,
        gpasid: 0,
        generation: mm.generation,
      },
      changes,
    );
    const bond: BondState = { handleId: handle.handleId, users: 1 };
    mm.bonds.set(deviceId, bond);
    this.#dirty.add(`mm/${mmToken}`);
    return { result: bondView(mm, deviceId, bond), changes };
  }

  /**
   * Drops one user of a bond; the last one tears its entry down (flush cause DETACH). The mm keeps
   * its PASID.
   * @returns the users left
   * @throws DEVICE_NOT_FOUND, SVA_BOND_NOT_FOUND
   */
  svaUnbind(deviceId: string, mmToken: bigint): Changed<number> {
    this.#device(deviceId);
    const mm = this.#t.mms.get(mmToken);
    const bond = mm?.bonds.get(deviceId);
    if (mm === undefined || bond === undefined) throw iommuError("SVA_BOND_NOT_FOUND", `mm ${mmToken} is not bound to device ${deviceId}`);
    if (bond.users > 1) {
      bond.users--;
      this.#dirty.add(`mm/${mmToken}`);
      return { result: bond.users, changes: [] };
    }
    const changes: HardwareChange[] = [];
    this.#teardownHandle(this.#t.handles.get(bond.handleId)!, FlushCause.DETACH, changes);
    return { result: 0, changes };
  }

  /**
   * Tears down every bond an mm still has (the process exited before its driver unbound; flush
   * cause MM_RELEASE).
   * @returns how many bonds were torn down
   */
  releaseMmBonds(mmToken: bigint): Changed<number> {
    const mm = this.#t.mms.get(mmToken);
    const changes: HardwareChange[] = [];
    if (mm === undefined) return { result: 0, changes };
    let torn = 0;
    for (const bond of [...mm.bonds.values()]) {
      this.#teardownHandle(this.#t.handles.get(bond.handleId)!, FlushCause.MM_RELEASE, changes);
      torn++;
    }
    return { result: torn, changes };
  }

  // ---- I/O page tables ----

  /**
   * Maps a page-aligned IOVA range of a PAGING domain.
   * @throws DOMAIN_NOT_FOUND, DOMAIN_NOT_PAGING, ADDRESS_NOT_ALIGNED, INVALID_RANGE, INVALID_FIELD,
   *   IOVA_ALREADY_MAPPED
   */
  map(domainId: number, m: Mapping): void {
    const d = this.#pagingDomain(domainId);
    d.mappings = insertMapping(d.mappings, m, `domain ${domainId}`);
    this.#dirty.add(`dom/${domainId}`);
  }

  /**
   * Unmaps every page of a PAGING domain inside a page-aligned range (splitting mappings that
   * straddle its ends) and flushes the range on every device the domain is reachable through
   * (attached directly, or as the second stage of a nested entry). Unmapping nothing flushes nothing.
   * @returns bytes unmapped
   * @throws DOMAIN_NOT_FOUND, DOMAIN_NOT_PAGING, ADDRESS_NOT_ALIGNED, INVALID_RANGE
   */
  unmap(domainId: number, iova: bigint, size: bigint): Changed<bigint> {
    const d = this.#pagingDomain(domainId);
    const { kept, unmapped } = removeMappings(d.mappings, iova, size);
    const changes: HardwareChange[] = [];
    if (unmapped === 0n) return { result: 0n, changes };
    d.mappings = kept;
    this.#dirty.add(`dom/${domainId}`);
    for (const h of this.#t.handles.values()) {
      const hd = this.#t.domains.get(h.domainId)!;
      if (hd.domainId !== domainId && hd.parentDomainId !== domainId) continue;
      changes.push(this.#rangeFlush(h, iova, size));
    }
    return { result: unmapped, changes };
  }

  /**
   * Installs pages in the first-stage (guest) page table of the guest bind of `hpasid` (guest
   * virtual → guest physical); the bind state must exist.
   * @throws GUEST_BIND_NOT_FOUND, ADDRESS_NOT_ALIGNED, INVALID_RANGE, IOVA_ALREADY_MAPPED, INVALID_FIELD
   */
  mapGuest(hpasid: number, m: Mapping): void {
    const b = this.#guestBinding(hpasid);
    // In place, not through the bind's watcher: the new range alone is written (its own key), not
    // the bind with its whole table — a fault's answer cost as much as the pages mapped (issue 15).
    insertMapping(b.firstStage, m, `the guest page table of PASID ${hpasid}`);
    this.#dirty.add(guestMappingKey(hpasid, m.iova));
  }

  /**
   * Removes pages from the first-stage table of the guest bind of `hpasid` and flushes the range on
   * every device bound at it.
   * @returns bytes unmapped
   * @throws GUEST_BIND_NOT_FOUND, ADDRESS_NOT_ALIGNED, INVALID_RANGE
   */
  unmapGuest(hpasid: number, iova: bigint, size: bigint): Changed<bigint> {
    const b = this.#guestBinding(hpasid);
    const { kept, unmapped } = removeMappings(b.firstStage, iova, size);
    const changes: HardwareChange[] = [];
    if (unmapped === 0n) return { result: 0n, changes };
    // Every range the unmap touched, and the piece left after its end: a key each (written or deleted).
    const end = iova + size;
    for (const m of b.firstStage) if (m.iova < end && m.iova + m.size > iova) this.#dirty.add(guestMappingKey(hpasid, m.iova));
    for (const m of kept) if (m.iova === end) this.#dirty.add(guestMappingKey(hpasid, m.iova));
    // The same array, refilled (not assigned through the bind's watcher, not spread: a table may be large).
    b.firstStage.length = 0;
    for (const m of kept) b.firstStage.push(m);
    for (const deviceId of b.devices) {
      const id = this.#t.devices.get(deviceId)?.entries.get(hpasid);
      const h = id === undefined ? undefined : this.#t.handles.get(id);
      if (h !== undefined) changes.push(this.#rangeFlush(h, iova, size));
    }
    return { result: unmapped, changes };
  }

  #guestBinding(hpasid: number): GpasidBinding {
    const b = this.#t.bindings.get(hpasid);
    if (b === undefined) throw iommuError("GUEST_BIND_NOT_FOUND", `host PASID ${hpasid} has no guest bind`);
    return b;
  }

  #rangeFlush(h: HandleState, iova: bigint, size: bigint): HardwareChange {
    return this.#flush({
      scope: FlushScope.RANGE,
      cause: FlushCause.UNMAP,
      domainId: h.domainId,
      pasid: h.pasid,
      deviceId: h.deviceId,
      deviceTlb: true,
      address: iova,
      size,
    });
  }

  /**
   * One DMA translation through the device's PASID table. PAGING: the domain's mappings; NESTED:
   * the guest's first stage (the bind's pages, {@link mapGuest}) then the parent's mappings; SVA:
   * the process page table is not modelled: the address translates to itself. A miss (a
   * first-stage miss for NESTED) on a PRI-capable device is a MISS: the caller raises a page
   * request under the handle; any other miss is a NOT_PRESENT fault, and a mapping without the
   * access asked for a PERMISSION fault.
   * @throws DEVICE_NOT_FOUND, INVALID_FIELD
   */
  translate(t: TranslateSpec): TranslateResult {
    const dev = this.#device(t.deviceId);
    if (!t.access.read && !t.access.write) throw invalidField("access", "a DMA request asks for read or write access");
    if (t.withoutPasid) {
      if (t.pasid !== 0) throw invalidField("pasid", "pasid must be 0 for a request without PASID");
      if (t.access.execute || t.access.privileged) throw invalidField("access", "execute and privileged access need a PASID");
    } else {
      if (t.pasid === RID_PASID) throw invalidField("pasid", "PASID 0 is RID_PASID: send the request without_pasid");
      if (t.pasid >= dev.spec.maxPasids) return { outcome: "FAULT", reason: FaultReason.PASID_OUT_OF_RANGE, handleId: 0n };
    }
    const id = dev.entries.get(t.withoutPasid ? RID_PASID : t.pasid);
    if (id === undefined) return { outcome: "FAULT", reason: FaultReason.NO_PASID_ENTRY, handleId: 0n };
    const h = this.#t.handles.get(id)!;
    const d = this.#t.domains.get(h.domainId)!;
    if (d.type === DomainType.SVA) return { outcome: "TRANSLATED", outputAddress: t.address, handleId: id };
    const miss = (): TranslateResult =>
      dev.spec.priCapable ? { outcome: "MISS", handle: snapshotHandle(h) } : { outcome: "FAULT", reason: FaultReason.NOT_PRESENT, handleId: id };
    let address = t.address;
    let table = d;
    if (d.type === DomainType.NESTED) {
      table = this.#t.domains.get(d.parentDomainId)!;
      // First stage: the guest's page table of a guest bind (none for an explicit nested attach:
      // there it translates guest virtual = guest physical).
      const b = h.kind === AttachKind.GPASID_BIND ? this.#t.bindings.get(h.pasid) : undefined;
      if (b !== undefined) {
        const first = findMapping(b.firstStage, address);
        if (first === undefined) return miss();
        if (!allows(first.access, t.access)) return { outcome: "FAULT", reason: FaultReason.PERMISSION, handleId: id };
        address = first.paddr + (address - first.iova);
      }
      const m = findMapping(table.mappings, address);
      // A second-stage miss is the host's (its stage 2 is pinned): never a page request.
      if (m === undefined) return { outcome: "FAULT", reason: FaultReason.NOT_PRESENT, handleId: id };
      if (!allows(m.access, t.access)) return { outcome: "FAULT", reason: FaultReason.PERMISSION, handleId: id };
      return { outcome: "TRANSLATED", outputAddress: m.paddr + (address - m.iova), handleId: id };
    }
    const m = findMapping(table.mappings, address);
    if (m === undefined) return miss();
    if (!allows(m.access, t.access)) return { outcome: "FAULT", reason: FaultReason.PERMISSION, handleId: id };
    return { outcome: "TRANSLATED", outputAddress: m.paddr + (address - m.iova), handleId: id };
  }

  /** The handle with this id, or undefined. */
  handle(handleId: bigint): AttachHandle | undefined {
    const h = this.#t.handles.get(handleId);
    return h === undefined ? undefined : snapshotHandle(h);
  }

  /** Whether faults under a handle are reported (off once a FREE started tearing its PASID down). */
  faultReporting(handleId: bigint): boolean {
    return this.#t.handles.get(handleId)?.faultReporting ?? false;
  }

  // ---- persistence ----

  /**
   * What changed since the last call, as key → value (undefined: deleted), for the role's state
   * store: devices, domains (with their mappings), attach handles (the PASID tables follow from
   * them), guest binds (with their first-stage tables and what is held in the core), mm contexts
   * and the id counters. The IOTLB flush log is not kept.
   */
  /** Whether a change is waiting for {@link takeChanges}. */
  hasChanges(): boolean {
    return this.#dirty.size > 0;
  }

  takeChanges(): StateChange<IommuHardwareKeptEntry>[] {
    const out: StateChange<IommuHardwareKeptEntry>[] = [];
    for (const key of this.#dirty) out.push({ key, value: keptEntryOf(this.#t, key) });
    this.#dirty.clear();
    return out;
  }

  /** Hardware rebuilt from what {@link takeChanges} wrote. */
  static restore(saved: ReadonlyMap<string, IommuKeptEntry>, options: { now?: () => Date } = {}): IommuHardware {
    const hw = new IommuHardware(options);
    const rewrite = loadTables(hw.#t, saved, (b) => hw.#watchBinding(b));
    hw.#dirty.clear();
    for (const key of rewrite) hw.#dirty.add(key);
    return hw;
  }

  /** A bind state whose flags and first stage mark it changed when the driver sets them. */
  #watchBinding(b: GpasidBinding): GpasidBinding {
    const dirty = this.#dirty;
    return new Proxy(b, {
      set(target, prop, value) {
        (target as unknown as Record<string | symbol, unknown>)[prop] = value;
        dirty.add(`bind/${target.hpasid}`);
        return true;
      },
    });
  }

  /** Every guest bind state (after a restart, to reconcile with the core). */
  bindings(): GpasidBinding[] {
    return [...this.#t.bindings.values()];
  }

  /** Every mm context. */
  mms(): MmContext[] {
    return [...this.#t.mms.keys()].map((t) => this.mm(t)!);
  }

  // ---- state ----

  /**
   * A consistent snapshot: the selected devices (all when `deviceIds` is empty) with their PASID
   * tables, every domain, the selected devices' handles and bonds, and the last `maxFlushes` IOTLB
   * flush records, oldest first.
   * @throws DEVICE_NOT_FOUND (a selected device is not registered)
   */
  snapshot(deviceIds: readonly string[] = [], maxFlushes = 0): IommuSnapshot {
    for (const id of deviceIds) this.#device(id);
    const selected = deviceIds.length === 0 ? [...this.#t.devices.keys()] : [...new Set(deviceIds)];
    selected.sort();
    const chosen = new Set(selected);
    const handles = [...this.#t.handles.values()].filter((h) => chosen.has(h.deviceId)).map(snapshotHandle);
    handles.sort((a, b) => (a.handleId < b.handleId ? -1 : 1));
    const bonds: SvaBond[] = [];
    for (const mm of this.#t.mms.values()) {
      for (const [deviceId, bond] of mm.bonds) if (chosen.has(deviceId)) bonds.push(bondView(mm, deviceId, bond));
    }
    return {
      devices: selected.map((id) => deviceView(this.#t, this.#t.devices.get(id)!)),
      domains: [...this.#t.domains.values()].sort((a, b) => a.domainId - b.domainId).map((d) => domainView(d)),
      handles,
      bonds,
      flushes: maxFlushes <= 0 ? [] : this.#flushes.slice(-Math.min(maxFlushes, IOTLB_FLUSH_LOG_SIZE)),
    };
  }

  // ---- internals ----

  #device(deviceId: string): DeviceState {
    if (deviceId === "") throw invalidField("device_id", "device_id is required");
    const dev = this.#t.devices.get(deviceId);
    if (dev === undefined) throw iommuError("DEVICE_NOT_FOUND", `device ${quote(deviceId)} is not registered`);
    return dev;
  }

  #domain(domainId: number): DomainState {
    if (domainId === 0) throw invalidField("domain_id", "domain_id is required");
    const d = this.#t.domains.get(domainId);
    if (d === undefined) throw iommuError("DOMAIN_NOT_FOUND", `domain ${domainId} does not exist`);
    return d;
  }

  #pagingDomain(domainId: number): DomainState {
    const d = this.#domain(domainId);
    if (d.type !== DomainType.PAGING) throw iommuError("DOMAIN_NOT_PAGING", `domain ${domainId} is ${d.type}, not PAGING`);
    return d;
  }

  /** The PASID table key of a target (RID_PASID for requests without PASID), after its checks. */
  #targetKey(dev: DeviceState, pasid: number, withoutPasid: boolean): number {
    if (withoutPasid) {
      if (pasid !== 0) throw invalidField("pasid", "pasid must be 0 when without_pasid is set");
      return RID_PASID;
    }
    // PASID 0 is RID_PASID (VT-d scalable mode): never a PASID attach target.
    if (pasid === RID_PASID) throw iommuError("PASID_ZERO_RESERVED", "PASID 0 is RID_PASID: attach with without_pasid instead");
    if (pasid >= dev.spec.maxPasids) {
      throw iommuError("PASID_OUT_OF_RANGE", `PASID ${pasid} is not below max_pasids ${dev.spec.maxPasids} of device ${dev.spec.deviceId}`);
    }
    return pasid;
  }

  #resolveParent(dev: DeviceState, parentDomainId: number): DomainState {
    let parent: DomainState;
    if (parentDomainId === 0) {
      const rid = dev.entries.get(RID_PASID);
      if (rid === undefined) {
        throw iommuError("DOMAIN_NOT_FOUND", `device ${dev.spec.deviceId} has no domain attached without PASID: name parent_domain_id`);
      }
      parent = this.#t.domains.get(this.#t.handles.get(rid)!.domainId)!;
    } else {
      parent = this.#domain(parentDomainId);
    }
    if (parent.type !== DomainType.PAGING) {
      throw iommuError("DOMAIN_NOT_PAGING", `the second stage of a nested entry must be a PAGING domain; domain ${parent.domainId} is ${parent.type}`);
    }
    return parent;
  }

  #checkDomainSpec(spec: DomainSpec): void {
    switch (spec.type) {
      case DomainType.PAGING:
        if (spec.parentDomainId !== 0) throw invalidField("parent_domain_id", "only a NESTED domain has a parent");
        if (spec.guestPgtable !== 0n) throw invalidField("guest_pgtable", "only a NESTED domain has a guest page table");
        if (spec.mmToken !== 0n) throw invalidField("mm_token", "only an SVA domain has an mm");
        return;
      case DomainType.SVA:
        if (spec.mmToken === 0n) throw invalidField("mm_token", "an SVA domain needs the mm_token of its process");
        if (spec.parentDomainId !== 0) throw invalidField("parent_domain_id", "only a NESTED domain has a parent");
        if (spec.guestPgtable !== 0n) throw invalidField("guest_pgtable", "only a NESTED domain has a guest page table");
        return;
      case DomainType.NESTED: {
        if (spec.parentDomainId === 0) throw invalidField("parent_domain_id", "a NESTED domain needs its PAGING parent");
        if (spec.guestPgtable === 0n) throw invalidField("guest_pgtable", "a NESTED domain needs the guest's first-stage page table");
        if (spec.mmToken !== 0n) throw invalidField("mm_token", "only an SVA domain has an mm");
        const parent = this.#domain(spec.parentDomainId);
        if (parent.type !== DomainType.PAGING) {
          throw iommuError("DOMAIN_NOT_PAGING", `the parent of a nested domain must be PAGING; domain ${parent.domainId} is ${parent.type}`);
        }
        return;
      }
      default:
        throw invalidField("type", "type is required: PAGING, SVA or NESTED");
    }
  }

  #addDomain(spec: DomainSpec, implicit: boolean): DomainState {
    const d: DomainState = {
      domainId: this.#t.nextDomainId++,
      type: spec.type,
      parentDomainId: spec.parentDomainId,
      guestPgtable: spec.guestPgtable,
      mmToken: spec.mmToken,
      implicit,
      attachCount: 0,
      mappings: [],
    };
    this.#t.domains.set(d.domainId, d);
    this.#dirty.add(`dom/${d.domainId}`);
    this.#dirty.add("ids");
    return d;
  }

  #install(h: Omit<HandleState, "handleId" | "createdAt" | "faultReporting">, changes: HardwareChange[]): AttachHandle {
    const state: HandleState = {
      ...h,
      ownerData: Uint8Array.from(h.ownerData),
      handleId: this.#t.nextHandleId++,
      createdAt: this.#now(),
      faultReporting: true,
    };
    this.#t.handles.set(state.handleId, state);
    this.#dirty.add(`h/${state.handleId}`);
    this.#dirty.add("ids");
    this.#t.devices.get(h.deviceId)!.entries.set(h.pasid, state.handleId);
    this.#t.domains.get(h.domainId)!.attachCount++;
    changes.push({ kind: "pasidEntrySet", deviceId: h.deviceId, entry: entryView(this.#t, state) });
    return snapshotHandle(state);
  }

  /** Clears a handle's entry, flushes, and drops what only it used (implicit domain, bind device, bond). */
  #teardownHandle(h: HandleState, cause: FlushCause, changes: HardwareChange[]): AttachHandle {
    const entry = entryView(this.#t, h);
    this.#t.devices.get(h.deviceId)?.entries.delete(h.pasid);
    this.#t.handles.delete(h.handleId);
    this.#dirty.add(`h/${h.handleId}`);
    const d = this.#t.domains.get(h.domainId)!;
    d.attachCount--;
    changes.push({ kind: "teardownPasid", deviceId: h.deviceId, entry, cause });
    changes.push(
      this.#flush({
        scope: h.withoutPasid ? FlushScope.DOMAIN : FlushScope.PASID,
        cause,
        domainId: h.domainId,
        pasid: h.pasid,
        deviceId: h.deviceId,
        deviceTlb: true,
        address: 0n,
        size: 0n,
      }),
    );
    if (h.kind === AttachKind.GPASID_BIND) this.#t.bindings.get(h.pasid)?.devices.delete(h.deviceId);
    if (h.kind === AttachKind.SVA_BIND) {
      const mm = this.#t.mms.get(d.mmToken);
      mm?.bonds.delete(h.deviceId);
      if (mm !== undefined && mm.bonds.size === 0) mm.domainId = 0;
      if (mm !== undefined) this.#dirty.add(`mm/${mm.mmToken}`);
    }
    if (d.implicit && d.attachCount === 0) {
      this.#t.domains.delete(d.domainId);
      this.#dirty.add(`dom/${d.domainId}`);
    }
    return snapshotHandle(h);
  }

  #flush(f: Omit<IotlbFlush, "seq" | "flushedAt">): HardwareChange {
    const flush: IotlbFlush = { ...f, seq: this.#nextFlushSeq++, flushedAt: this.#now() };
    this.#flushes.push(flush);
    // Trimmed in halves, not one at a time: a splice per flush once full moved the whole log every
    // time (a third of the IOMMU's busy time in a 200-guest crowd's teardown, issue 15).
    if (this.#flushes.length >= 2 * IOTLB_FLUSH_LOG_SIZE) this.#flushes.splice(0, this.#flushes.length - IOTLB_FLUSH_LOG_SIZE);
    return { kind: "iotlbFlush", flush };
  }
}

function describeTarget(deviceId: string, pasid: number, withoutPasid: boolean): string {
  return withoutPasid ? `device ${deviceId} (requests without PASID)` : `device ${deviceId} PASID ${pasid}`;
}

function assertName(field: string, value: string): void {
  if (value === "") throw invalidField(field, `${field} is required`);
  if (value.length > MAX_NAME_LENGTH || !NAME.test(value)) {
    throw invalidField(field, `${field} must be 1..${MAX_NAME_LENGTH} printable characters without spaces`);
  }
}

function assertOwner(owner: string, ownerData: Uint8Array): void {
  assertName("owner", owner);
  if (ownerData.length > MAX_OWNER_DATA) throw invalidField("owner_data", `owner_data is limited to ${MAX_OWNER_DATA} bytes`);
}
