import type { StateChange } from "@ioasid/bus";
import { quote } from "@ioasid/errors";
import { iommuError, invalidField } from "./iommu-errors.js";
import { DomainType, MAX_NAME_LENGTH, type DmaAccess, type Domain, type FaultReason } from "./iommu-hardware-model.js";

// The vIOMMU objects of the iommufd model (DESIGN §5 "iommufd model"; issue 16 item 3): a VM's
// virtual IOMMU over a parent PAGING domain (IOMMUFD_OBJ_VIOMMU), its vdevices (the guest-visible
// virt_id of a physical device, IOMMUFD_OBJ_VDEVICE) and its event queues of a fixed depth
// (IOMMUFD_OBJ_VEVENTQ), plus which NESTED domains were allocated on which vIOMMU. Pure and
// synchronous like the hardware tables beside it: every method validates first and changes
// nothing when it throws. What it needs of the hardware (devices, domains, attachments) it asks
// through a {@link ViommuHardwareView}, so IommuHardware keeps no vIOMMU rule.

/** Most unread events a vEVENTQ may hold. */
export const MAX_VEVENTQ_DEPTH = 4096;

/** Kind of events a vEVENTQ carries (one queue per type per vIOMMU). */
export const VeventqType = { DMA_FAULT: "DMA_FAULT" } as const;
export type VeventqType = (typeof VeventqType)[keyof typeof VeventqType];

/** A VM's virtual IOMMU. */
export interface Viommu {
  readonly viommuId: number;
  /** The device it was allocated through (names the IOMMU instance; not held). */
  readonly deviceId: string;
  /** The PAGING domain it holds a reference on. */
  readonly parentDomainId: number;
  readonly owner: string;
  /** NESTED domains allocated on it, ascending. */
  readonly nestedDomainIds: readonly number[];
  readonly vdeviceCount: number;
  readonly veventqCount: number;
  readonly createdAt: Date;
}

/** The guest-visible id of a physical device in one vIOMMU. */
export interface Vdevice {
  readonly vdeviceId: number;
  readonly viommuId: number;
  readonly deviceId: string;
  readonly virtId: bigint;
}

/** A vIOMMU's event queue, without its items. */
export interface Veventq {
  readonly veventqId: number;
  readonly viommuId: number;
  readonly type: VeventqType;
  readonly depth: number;
  /** Unread events queued (markers not counted). */
  readonly queuedEvents: number;
  /** The sequence number of the next event (the first is 1). */
  readonly nextSequence: bigint;
  /** Events dropped since the queue was allocated. */
  readonly lostEvents: bigint;
}

/** A DMA fault as the guest sees it: the device by its virt_id, never the host's id. */
export interface Vevent {
  readonly sequence: bigint;
  readonly virtId: bigint;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly address: bigint;
  readonly access: DmaAccess;
  readonly reason: FaultReason;
  readonly at: Date;
}

/** One item of a vEVENTQ: an event, or the LOST_EVENTS marker of a gap. */
export type VeventqItem =
  { readonly kind: "event"; readonly event: Vevent } | { readonly kind: "lostEvents"; readonly firstSequence: bigint; readonly count: bigint };

/** A DMA fault to report (a FaultRecord of the fault path, less what the guest must not see). */
export type VeventFault = Omit<Vevent, "sequence" | "virtId"> & { readonly deviceId: string };

/** What the vIOMMU rules ask of the hardware tables (IommuHardware answers, wrapped by the driver). */
export interface ViommuHardwareView {
  /** @throws INVALID_FIELD (empty), DEVICE_NOT_FOUND */
  assertDevice(deviceId: string): unknown;
  domain(domainId: number): Pick<Domain, "type"> | undefined;
  /** Every attach handle's device and domain. */
  attachments(): Iterable<{ readonly deviceId: string; readonly domainId: number }>;
}

/** A vIOMMU as kept (its vdevices and queues are kept under their own keys). */
export interface KeptViommu {
  readonly viommuId: number;
  readonly deviceId: string;
  readonly parentDomainId: number;
  readonly owner: string;
  readonly nestedDomainIds: readonly number[];
  readonly createdAt: Date;
}

/** A vEVENTQ as kept, with its unread items. */
export interface KeptVeventq extends Omit<Veventq, "queuedEvents"> {
  readonly items: readonly VeventqItem[];
}

/** One entry of the vIOMMU objects as the IOMMU keeps them: `viommu/<id>`, `vdev/<id>`, `veq/<id>`, `vids`. */
export type ViommuKeptEntry =
  | { readonly kind: "viommu"; readonly viommu: KeptViommu }
  | { readonly kind: "vdevice"; readonly vdevice: Vdevice }
  | { readonly kind: "veventq"; readonly veventq: KeptVeventq }
  | { readonly kind: "viommuIdCounter"; readonly nextObjectId: number };

interface ViommuState {
  readonly viommuId: number;
  readonly deviceId: string;
  readonly parentDomainId: number;
  readonly owner: string;
  readonly nested: Set<number>;
  readonly createdAt: Date;
}

type ItemState = { kind: "event"; event: Vevent } | { kind: "lostEvents"; firstSequence: bigint; count: bigint };

interface VeventqState {
  readonly veventqId: number;
  readonly viommuId: number;
  readonly type: VeventqType;
  readonly depth: number;
  nextSequence: bigint;
  lostEvents: bigint;
  queuedEvents: number;
  readonly items: ItemState[];
}

const NAME = /^[\x21-\x7e]+$/;

/**
 * The vIOMMUs, vdevices and vEVENTQs of the IOMMU, and the NESTED domains allocated on each
 * vIOMMU. Dependencies follow iommufd's object references: a vIOMMU holds its parent domain; a
 * nested domain, a vdevice and a vEVENTQ hold their vIOMMU; a nested attachment holds the vdevice
 * of its device. Destroying something still held is refused (FAILED_PRECONDITION).
 *
 * @example
 * const v = new ViommuTable();
 * const viommu = v.allocViommu({ deviceId: "0000:6a:01.0", parentDomainId: 1, owner: "vfio/vfio-1" }, hw);
 * v.allocVdevice({ viommuId: viommu.viommuId, deviceId: "0000:6a:01.0", virtId: 0x10n }, hw);
 */
export class ViommuTable {
  readonly #viommus = new Map<number, ViommuState>();
  readonly #vdevices = new Map<number, Vdevice>();
  readonly #veventqs = new Map<number, VeventqState>();
  /** NESTED domain → the vIOMMU it was allocated on. */
  readonly #domainViommu = new Map<number, number>();
  /** vIOMMUs, vdevices and vEVENTQs share one id space, as iommufd's objects do. */
  #nextId = 1;
  readonly #now: () => Date;
  readonly #dirty = new Set<string>();

  /** @param options.now clock of creation and event timestamps (tests). */
  constructor(options: { now?: () => Date } = {}) {
    this.#now = options.now ?? (() => new Date());
  }

  // ---- vIOMMUs ----

  /**
   * Allocates a vIOMMU over a PAGING parent domain (IOMMU_VIOMMU_ALLOC). The device only names the
   * IOMMU instance: it is checked, not held.
   * @throws INVALID_FIELD, DEVICE_NOT_FOUND, DOMAIN_NOT_FOUND, DOMAIN_NOT_PAGING
   */
  allocViommu(spec: { deviceId: string; parentDomainId: number; owner: string }, hw: ViommuHardwareView): Viommu {
    hw.assertDevice(spec.deviceId);
    if (spec.parentDomainId === 0) throw invalidField("parent_domain_id", "parent_domain_id is required: the VM's stage-2 PAGING domain");
    assertName("owner", spec.owner);
    const parent = hw.domain(spec.parentDomainId);
    if (parent === undefined) throw iommuError("DOMAIN_NOT_FOUND", `domain ${spec.parentDomainId} does not exist`);
    // Only a stage-2 I/O page table can be nested under (iommufd: the parent must be a paging
    // HWPT allocated as a nest parent).
    if (parent.type !== DomainType.PAGING) {
      throw iommuError("DOMAIN_NOT_PAGING", `a vIOMMU's parent must be a PAGING domain; domain ${spec.parentDomainId} is ${parent.type}`);
    }
    const v: ViommuState = {
      viommuId: this.#takeId(),
      deviceId: spec.deviceId,
      parentDomainId: spec.parentDomainId,
      owner: spec.owner,
      nested: new Set(),
      createdAt: this.#now(),
    };
    this.#viommus.set(v.viommuId, v);
    this.#dirty.add(`viommu/${v.viommuId}`);
    return this.#viommuView(v);
  }

  /**
   * Destroys a vIOMMU nothing holds any more; its reference on the parent domain goes with it.
   * @throws VIOMMU_NOT_FOUND, VIOMMU_IN_USE (vdevices, vEVENTQs or nested domains remain)
   */
  destroyViommu(viommuId: number): void {
    const v = this.#viommu(viommuId);
    const view = this.#viommuView(v);
    // iommufd refuses (-EBUSY) to destroy an object others still reference.
    if (view.vdeviceCount > 0 || view.veventqCount > 0 || view.nestedDomainIds.length > 0) {
      throw iommuError(
        "VIOMMU_IN_USE",
        `vIOMMU ${viommuId} still has ${view.vdeviceCount} vdevice(s), ${view.veventqCount} vEVENTQ(s) and ${view.nestedDomainIds.length} nested domain(s): destroy them first`,
      );
    }
    this.#viommus.delete(viommuId);
    this.#dirty.add(`viommu/${viommuId}`);
  }

  /** The vIOMMU, or undefined. */
  viommu(viommuId: number): Viommu | undefined {
    const v = this.#viommus.get(viommuId);
    return v === undefined ? undefined : this.#viommuView(v);
  }

  // ---- nested domains on a vIOMMU ----

  /**
   * The parent a NESTED domain allocated on `viommuId` gets: the vIOMMU's. A `parentDomainId`
   * given as well must name it.
   * @throws INVALID_FIELD, VIOMMU_NOT_FOUND
   */
  nestedParent(viommuId: number, type: string, parentDomainId: number): number {
    if (type !== DomainType.NESTED) throw invalidField("viommu_id", "only a NESTED domain is allocated on a vIOMMU");
    const v = this.#viommu(viommuId);
    if (parentDomainId !== 0 && parentDomainId !== v.parentDomainId) {
      throw invalidField("parent_domain_id", `a domain on vIOMMU ${viommuId} nests under its parent ${v.parentDomainId}, not ${parentDomainId}`);
    }
    return v.parentDomainId;
  }

  /** Records a NESTED domain allocated on a vIOMMU (after {@link nestedParent} and the hardware's createDomain). */
  addNestedDomain(viommuId: number, domainId: number): void {
    this.#viommu(viommuId).nested.add(domainId);
    this.#domainViommu.set(domainId, viommuId);
    this.#dirty.add(`viommu/${viommuId}`);
  }

  /** The vIOMMU a NESTED domain was allocated on; 0 when none. */
  domainViommu(domainId: number): number {
    return this.#domainViommu.get(domainId) ?? 0;
  }

  /**
   * Refuses to free a domain a vIOMMU holds as its parent (FreeDomain; the hardware checks the
   * rest).
   * @throws DOMAIN_IN_USE
   */
  assertDomainFreeable(domainId: number): void {
    for (const v of this.#viommus.values()) {
      if (v.parentDomainId === domainId) {
        throw iommuError("DOMAIN_IN_USE", `domain ${domainId} is the parent of vIOMMU ${v.viommuId}: destroy the vIOMMU first`);
      }
    }
  }

  /** Forgets a freed domain (a NESTED domain no longer holds its vIOMMU). */
  forgetDomain(domainId: number): void {
    const viommuId = this.#domainViommu.get(domainId);
    if (viommuId === undefined) return;
    this.#domainViommu.delete(domainId);
    this.#viommus.get(viommuId)?.nested.delete(domainId);
    this.#dirty.add(`viommu/${viommuId}`);
  }

  /**
   * A NESTED domain of a vIOMMU may be attached to a device only when the device has a vdevice in
   * that vIOMMU: the guest names the device by its virt_id in its invalidations and events, so
   * without one it could not (iommufd: the vdevice must exist before the nested attach). Other
   * domains pass.
   * @throws VDEVICE_NOT_FOUND
   */
  checkNestedAttach(domainId: number, deviceId: string): void {
    const viommuId = this.#domainViommu.get(domainId);
    if (viommuId === undefined) return;
    if (this.#vdeviceOf(viommuId, deviceId) === undefined) {
      throw iommuError(
        "VDEVICE_NOT_FOUND",
        `device ${quote(deviceId)} has no vdevice in vIOMMU ${viommuId}, which nested domain ${domainId} was allocated on: allocate one first`,
      );
    }
  }

  // ---- vdevices ----

  /**
   * Gives a device its guest-visible id in a vIOMMU (IOMMU_VDEVICE_ALLOC).
   * @throws VIOMMU_NOT_FOUND, INVALID_FIELD, DEVICE_NOT_FOUND, VDEVICE_EXISTS (the virt_id is taken
   *   in the vIOMMU, or the device has a vdevice in it)
   */
  allocVdevice(spec: { viommuId: number; deviceId: string; virtId: bigint }, hw: ViommuHardwareView): Vdevice {
    this.#viommu(spec.viommuId);
    hw.assertDevice(spec.deviceId);
    for (const d of this.#vdevices.values()) {
      if (d.viommuId !== spec.viommuId) continue;
      // One virt_id names one device per vIOMMU (iommufd: xa_cmpxchg on the vIOMMU's vdevs, -EEXIST).
      if (d.virtId === spec.virtId) {
        throw iommuError("VDEVICE_EXISTS", `vIOMMU ${spec.viommuId} already has virt_id ${spec.virtId} (vdevice ${d.vdeviceId}, device ${d.deviceId})`);
      }
      if (d.deviceId === spec.deviceId) {
        throw iommuError("VDEVICE_EXISTS", `device ${spec.deviceId} already has vdevice ${d.vdeviceId} (virt_id ${d.virtId}) in vIOMMU ${spec.viommuId}`);
      }
    }
    const vdev: Vdevice = { vdeviceId: this.#takeId(), viommuId: spec.viommuId, deviceId: spec.deviceId, virtId: spec.virtId };
    this.#vdevices.set(vdev.vdeviceId, vdev);
    this.#dirty.add(`vdev/${vdev.vdeviceId}`);
    return vdev;
  }

  /**
   * Destroys a vdevice no nested attachment uses.
   * @throws VDEVICE_NOT_FOUND, VDEVICE_IN_USE
   */
  destroyVdevice(vdeviceId: number, hw: ViommuHardwareView): void {
    const vdev = this.#vdevices.get(vdeviceId);
    if (vdev === undefined) throw iommuError("VDEVICE_NOT_FOUND", `vdevice ${vdeviceId} does not exist`);
    const nested = this.#viommus.get(vdev.viommuId)?.nested ?? new Set<number>();
    for (const a of hw.attachments()) {
      if (a.deviceId === vdev.deviceId && nested.has(a.domainId)) {
        throw iommuError("VDEVICE_IN_USE", `nested domain ${a.domainId} of vIOMMU ${vdev.viommuId} is attached to device ${vdev.deviceId}: detach it first`);
      }
    }
    this.#vdevices.delete(vdeviceId);
    this.#dirty.add(`vdev/${vdeviceId}`);
  }

  /**
   * Destroys every vdevice of a removed device (the kernel destroys a vdevice when its device is
   * unbound from iommufd). Call after the device's attachments were torn down.
   * @returns how many
   */
  removeDevice(deviceId: string): number {
    let n = 0;
    for (const d of [...this.#vdevices.values()]) {
      if (d.deviceId !== deviceId) continue;
      this.#vdevices.delete(d.vdeviceId);
      this.#dirty.add(`vdev/${d.vdeviceId}`);
      n++;
    }
    return n;
  }

  // ---- vEVENTQs ----

  /**
   * Creates a vIOMMU's event queue of one type (IOMMU_VEVENTQ_ALLOC).
   * @throws INVALID_FIELD (`depth` not 1..{@link MAX_VEVENTQ_DEPTH}), VIOMMU_NOT_FOUND, VEVENTQ_EXISTS
   */
  allocVeventq(spec: { viommuId: number; type: VeventqType; depth: number }): Veventq {
    if (!Number.isInteger(spec.depth) || spec.depth < 1 || spec.depth > MAX_VEVENTQ_DEPTH) {
      throw invalidField("depth", `depth must be 1..${MAX_VEVENTQ_DEPTH}`);
    }
    this.#viommu(spec.viommuId);
    const existing = this.#queueOf(spec.viommuId, spec.type);
    if (existing !== undefined) {
      throw iommuError("VEVENTQ_EXISTS", `vIOMMU ${spec.viommuId} already has vEVENTQ ${existing.veventqId} of type ${spec.type}`);
    }
    const q: VeventqState = {
      veventqId: this.#takeId(),
      viommuId: spec.viommuId,
      type: spec.type,
      depth: spec.depth,
      nextSequence: 1n,
      lostEvents: 0n,
      queuedEvents: 0,
      items: [],
    };
    this.#veventqs.set(q.veventqId, q);
    this.#dirty.add(`veq/${q.veventqId}`);
    return veventqView(q);
  }

  /**
   * Destroys an event queue with its unread items.
   * @throws VEVENTQ_NOT_FOUND
   */
  destroyVeventq(veventqId: number): void {
    this.#veventq(veventqId);
    this.#veventqs.delete(veventqId);
    this.#dirty.add(`veq/${veventqId}`);
  }

  /**
   * Takes up to `max` items (0: all) from the head of a queue, oldest first.
   * @throws VEVENTQ_NOT_FOUND
   */
  readVeventq(veventqId: number, max: number): VeventqItem[] {
    const q = this.#veventq(veventqId);
    const n = max === 0 ? q.items.length : Math.min(max, q.items.length);
    const taken = q.items.splice(0, n);
    for (const it of taken) if (it.kind === "event") q.queuedEvents--;
    if (taken.length > 0) this.#dirty.add(`veq/${veventqId}`);
    return taken.map(itemView);
  }

  /**
   * Reports a DMA fault under an attachment of `domainId` to the DMA_FAULT queue of the vIOMMU the
   * domain was allocated on, naming the device by its virt_id. A full queue drops the event and
   * counts it in the LOST_EVENTS marker at its tail (one marker per gap: a marker is only ever
   * followed by events queued after the reader made room), so the reader always sees the gap.
   * @returns "queued", "lost", or undefined when the fault is no vIOMMU's or it has no such queue
   */
  reportFault(domainId: number, fault: VeventFault): "queued" | "lost" | undefined {
    const viommuId = this.#domainViommu.get(domainId);
    if (viommuId === undefined) return undefined;
    const vdev = this.#vdeviceOf(viommuId, fault.deviceId);
    const q = this.#queueOf(viommuId, VeventqType.DMA_FAULT);
    if (vdev === undefined || q === undefined) return undefined;
    const sequence = q.nextSequence++;
    this.#dirty.add(`veq/${q.veventqId}`);
    if (q.queuedEvents >= q.depth) {
      q.lostEvents++;
      const tail = q.items.at(-1);
      if (tail?.kind === "lostEvents") tail.count++;
      else q.items.push({ kind: "lostEvents", firstSequence: sequence, count: 1n });
      return "lost";
    }
    const { deviceId: _host, ...rest } = fault;
    q.items.push({ kind: "event", event: { ...rest, access: { ...rest.access }, sequence, virtId: vdev.virtId } });
    q.queuedEvents++;
    return "queued";
  }

  // ---- state ----

  /** Every vIOMMU, vdevice and vEVENTQ, each ascending by id. */
  snapshot(): { viommus: Viommu[]; vdevices: Vdevice[]; veventqs: Veventq[] } {
    const byId = <T>(m: Map<number, T>) => [...m.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v);
    return {
      viommus: byId(this.#viommus).map((v) => this.#viommuView(v)),
      vdevices: byId(this.#vdevices).map((d) => ({ ...d })),
      veventqs: byId(this.#veventqs).map(veventqView),
    };
  }

  /** Whether a change is waiting for {@link takeChanges}. */
  hasChanges(): boolean {
    return this.#dirty.size > 0;
  }

  /** What changed since the last call, as key → entry (undefined: deleted), for the role's store. */
  takeChanges(): StateChange<ViommuKeptEntry>[] {
    if (this.#dirty.size === 0) return [];
    const out: StateChange<ViommuKeptEntry>[] = [];
    for (const key of this.#dirty) out.push({ key, value: this.#keptEntryOf(key) });
    this.#dirty.clear();
    out.push({ key: "vids", value: { kind: "viommuIdCounter", nextObjectId: this.#nextId } });
    return out;
  }

  /** The objects rebuilt from what {@link takeChanges} wrote (other kinds of entry are skipped). */
  static restore(saved: ReadonlyMap<string, { readonly kind: string }>, options: { now?: () => Date } = {}): ViommuTable {
    const t = new ViommuTable(options);
    const kept = [...saved.values()] as ViommuKeptEntry[];
    for (const e of kept) {
      if (e.kind === "viommuIdCounter") t.#nextId = Math.max(t.#nextId, e.nextObjectId);
      if (e.kind !== "viommu") continue;
      const v = e.viommu;
      t.#viommus.set(v.viommuId, { ...v, nested: new Set(v.nestedDomainIds) });
      for (const d of v.nestedDomainIds) t.#domainViommu.set(d, v.viommuId);
    }
    for (const e of kept) {
      if (e.kind === "vdevice" && t.#viommus.has(e.vdevice.viommuId)) t.#vdevices.set(e.vdevice.vdeviceId, { ...e.vdevice });
      if (e.kind !== "veventq" || !t.#viommus.has(e.veventq.viommuId)) continue;
      const { items, ...q } = e.veventq;
      const copied: ItemState[] = items.map((it) => (it.kind === "event" ? { kind: "event", event: it.event } : { ...it }));
      t.#veventqs.set(q.veventqId, { ...q, items: copied, queuedEvents: copied.filter((it) => it.kind === "event").length });
    }
    return t;
  }

  // ---- internals ----

  #takeId(): number {
    this.#dirty.add("vids");
    return this.#nextId++;
  }

  #viommu(viommuId: number): ViommuState {
    if (viommuId === 0) throw invalidField("viommu_id", "viommu_id is required");
    const v = this.#viommus.get(viommuId);
    if (v === undefined) throw iommuError("VIOMMU_NOT_FOUND", `vIOMMU ${viommuId} does not exist`);
    return v;
  }

  #veventq(veventqId: number): VeventqState {
    const q = this.#veventqs.get(veventqId);
    if (q === undefined) throw iommuError("VEVENTQ_NOT_FOUND", `vEVENTQ ${veventqId} does not exist`);
    return q;
  }

  #vdeviceOf(viommuId: number, deviceId: string): Vdevice | undefined {
    for (const d of this.#vdevices.values()) if (d.viommuId === viommuId && d.deviceId === deviceId) return d;
    return undefined;
  }

  #queueOf(viommuId: number, type: VeventqType): VeventqState | undefined {
    for (const q of this.#veventqs.values()) if (q.viommuId === viommuId && q.type === type) return q;
    return undefined;
  }

  #viommuView(v: ViommuState): Viommu {
    let vdeviceCount = 0;
    let veventqCount = 0;
    for (const d of this.#vdevices.values()) if (d.viommuId === v.viommuId) vdeviceCount++;
    for (const q of this.#veventqs.values()) if (q.viommuId === v.viommuId) veventqCount++;
    return {
      viommuId: v.viommuId,
      deviceId: v.deviceId,
      parentDomainId: v.parentDomainId,
      owner: v.owner,
      nestedDomainIds: [...v.nested].sort((a, b) => a - b),
      vdeviceCount,
      veventqCount,
      createdAt: v.createdAt,
    };
  }

  #keptEntryOf(key: string): ViommuKeptEntry | undefined {
    const [kind, id] = key.split("/") as [string, string | undefined];
    switch (kind) {
      case "vids":
        return { kind: "viommuIdCounter", nextObjectId: this.#nextId };
      case "viommu": {
        const v = this.#viommus.get(Number(id));
        if (v === undefined) return undefined;
        const { nested, ...rest } = v;
        return { kind: "viommu", viommu: { ...rest, nestedDomainIds: [...nested].sort((a, b) => a - b) } };
      }
      case "vdev": {
        const d = this.#vdevices.get(Number(id));
        return d === undefined ? undefined : { kind: "vdevice", vdevice: { ...d } };
      }
      case "veq": {
        const q = this.#veventqs.get(Number(id));
        if (q === undefined) return undefined;
        const { queuedEvents: _derived, items, ...rest } = q;
        return { kind: "veventq", veventq: { ...rest, items: items.map(itemView) } };
      }
      default:
        return undefined;
    }
  }
}

function veventqView(q: VeventqState): Veventq {
  return {
    veventqId: q.veventqId,
    viommuId: q.viommuId,
    type: q.type,
    depth: q.depth,
    queuedEvents: q.queuedEvents,
    nextSequence: q.nextSequence,
    lostEvents: q.lostEvents,
  };
}

function itemView(it: ItemState): VeventqItem {
  return it.kind === "event" ? { kind: "event", event: { ...it.event, access: { ...it.event.access } } } : { ...it };
}

function assertName(field: string, value: string): void {
  if (value === "") throw invalidField(field, `${field} is required`);
  if (value.length > MAX_NAME_LENGTH || !NAME.test(value)) {
    throw invalidField(field, `${field} must be 1..${MAX_NAME_LENGTH} printable characters without spaces`);
  }
}
