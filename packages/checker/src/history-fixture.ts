import { createHistoryRecord, eventTypeOf, type HistoryActionInput, type HistoryFields, type HistoryLink, type HistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { createChaosRecord, roleOfTarget, type ChaosAction, type ChaosDetail, type ChaosOp } from "./chaos-record.js";
import type { FinalState } from "./final-state.js";

/** Options of {@link HistoryBuilder}: the ordering data the services record, and clocks that differ. */
export interface BuilderOptions {
  /**
   * Records carry what orders them without clocks, as the services record it (issue 18): each its
   * publisher's `publisher_seq` and incarnation, the core's its `op_seq`; a role's record of a
   * delivery it handles (one with `seq`) links the core's position when the delivery was sent; the
   * core's release of a holder's reference with an ack (an `ioasid_put` with `seq`) links the
   * holder's position when it acknowledged. @default false (records carry none: ordered by time)
   */
  readonly sequenced?: boolean;
  /** Per role, how far its host's clock is off, ms (`{ vdcm: -5000 }`: the VDCM's host is 5 s behind). */
  readonly skewMs?: Readonly<Record<string, number>>;
}

/**
 * Builds histories the way the services record them (the same actions and fields), one
 * record every `step` ms. The checker's tests use it for the document's life-cycle tables and for
 * deliberately broken variants.
 */
export class HistoryBuilder {
  readonly records: HistoryRecord[] = [];
  private t: number;
  private seq = 0;
  private opId = 0;
  private group = 0;
  private opSeq = 0;
  /** Each publisher's last `publisher_seq` (`role/instance/incarnation`). */
  private readonly positions = new Map<string, number>();
  /** Holders the core recorded a reference change of, whose next record follows the core's answer. */
  private readonly awaitingAnswer = new Set<string>();
  /** Restarts of each role so far (a kill-restart marker starts a new incarnation of its processes). */
  private readonly restarts = new Map<string, number>();

  constructor(
    start = 1_700_000_000_000,
    private readonly step = 10,
    private readonly options: BuilderOptions = {},
  ) {
    this.t = start;
  }

  /** Appends a record of a role. */
  add(role: string, instance: string, action: HistoryActionInput, fields: HistoryFields = {}): HistoryRecord {
    this.t += this.step;
    const r = createHistoryRecord({ role, instance }, action, this.ordering(role, instance, action, fields), this.t + (this.options.skewMs?.[role] ?? 0));
    this.records.push(r);
    return r;
  }

  /** The publisher's position now (its last record), as a link. */
  position(role: string, instance: string): HistoryLink | undefined {
    const incarnation = this.incarnation(role);
    const seq = this.positions.get(`${role}/${instance}/${incarnation}`);
    return seq === undefined ? undefined : { role, instance, incarnation, publisherSeq: seq };
  }

  private incarnation(role: string): string {
    return `run-${this.restarts.get(role) ?? 0}`;
  }

  /** The ordering fields of a record, when the builder is sequenced (see {@link BuilderOptions.sequenced}). */
  private ordering(role: string, instance: string, action: HistoryActionInput, fields: HistoryFields): HistoryFields {
    if (this.options.sequenced !== true) return fields;
    const incarnation = this.incarnation(role);
    const key = `${role}/${instance}/${incarnation}`;
    const after: HistoryLink[] = [];
    const holder = action.$case === "ioasidGet" || action.$case === "ioasidPut" ? action.value.holder : undefined;
    if (role === "ioasid" && holder !== undefined) {
      // The holder's call (its metadata), or its ack (a put with seq), carried its position; the
      // holder's next record follows the core's answer.
      const link = this.position(holder.role, holder.instance);
      if (link !== undefined) after.push(link);
      this.awaitingAnswer.add(`${holder.role}/${holder.instance}`);
    } else if (role !== "ioasid" && (fields.seq !== undefined || this.awaitingAnswer.delete(`${role}/${instance}`))) {
      // A delivery being handled (it carried the core's position), or the core's answer to a call.
      const link = this.position("ioasid", "core-0");
      if (link !== undefined) after.push(link);
    }
    const publisherSeq = (this.positions.get(key) ?? 0) + 1;
    this.positions.set(key, publisherSeq);
    return {
      ...fields,
      publisherSeq,
      incarnation,
      ...(role === "ioasid" ? { opSeq: ++this.opSeq } : {}),
      ...(after.length === 0 ? {} : { after }),
    };
  }

  /** Appends a core event record with the next sequence number; returns the sequence. */
  event(type: string, fields: HistoryFields): number {
    const seq = ++this.seq;
    this.add("ioasid", "core-0", { $case: "ioasidNotify", value: { type: eventTypeOf(type) } }, { ...fields, seq });
    return seq;
  }

  /** Appends a chaos record. */
  chaos(action: ChaosAction, detail: ChaosDetail): HistoryRecord {
    this.t += this.step;
    const made = createChaosRecord(action, detail, { ts: this.t + (this.options.skewMs?.chaos ?? 0) });
    const r = { ...made, ...this.ordering(made.role, made.instance, made.action, {}) };
    this.records.push(r);
    if ("fault" in detail && detail.fault === "kill-restart") {
      const role = roleOfTarget(detail.target);
      this.restarts.set(role, (this.restarts.get(role) ?? 0) + 1);
    }
    return r;
  }

  /** An operation: invoke, what `body` records while it runs, then its completion (`ok` unless told). */
  op(detail: Omit<ChaosOp, "opId">, body: () => void = () => undefined, done: Partial<ChaosOp> = {}, outcome: ChaosAction = "ok"): number {
    const opId = ++this.opId;
    const invoke = this.chaos("invoke", { ...detail, opId });
    body();
    this.chaos(outcome, { ...detail, ...done, opId, latencyMs: this.t + this.step + (this.options.skewMs?.chaos ?? 0) - invoke.ts });
    return opId;
  }

  nextGroup(): number {
    return ++this.group;
  }
}

/** A guest of the fixture: its VM, set, KVM instance and mdev. */
export interface FixtureGuest {
  readonly vm: string;
  readonly kvm: string;
  readonly token: number;
  readonly setId: number;
  readonly mdev: string;
}

const IOMMU = "iommu-0";
const VDCM = "vdcm-0";
const VFIO = "vfio-0";
const DEVICE = "idxd0";
const WQ = 1;

/** A reference change by `holder` ("kvm/vm-1/vmcs"). */
const ref = (kind: "get" | "put", holder: string): HistoryActionInput => {
  const [role = "", instance = "", purpose = ""] = holder.split("/");
  const value = { holder: { role, instance, purpose } };
  return kind === "get" ? { $case: "ioasidGet", value } : { $case: "ioasidPut", value };
};
const vmcs = (kind: "install" | "clear", gpasid: number, hpasid: number, cause = h.VmcsClearCause.VMCS_CLEAR_CAUSE_UNSPECIFIED): HistoryActionInput => ({
  $case: "vmcsUpdate",
  value: { kind: kind === "install" ? h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL : h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid, hpasid, cause },
});
const entry = (ioasid: number, cause?: string) => ({
  device: DEVICE,
  handle: BigInt(ioasid),
  domain: 3,
  domainType: "NESTED",
  ...(cause === undefined ? {} : { cause }),
});
const flush = (cause: string): HistoryActionInput => ({ $case: "iotlbFlush", value: { scope: "PASID", cause, domain: 3, device: DEVICE, devtlb: true } });
const wq = (mdev: string) => ({ device: DEVICE, wq: WQ, mdev });

/** Registers the VM's notifier (pending: KVM starts first), then VFIO opens its container. */
export function openGuest(b: HistoryBuilder, g: FixtureGuest, registration: number): void {
  b.add("ioasid", "core-0", {
    $case: "ioasidRegisterNotifierMm",
    value: { subscriber: "kvm", instance: g.kvm, scope: { $case: "mmToken", value: BigInt(g.token) }, priority: 3, pending: true },
  });
  b.add("kvm", g.kvm, { $case: "kvmCreateVm", value: { mmToken: BigInt(g.token), vcpus: 1, registration, active: false } });
  b.op(
    { op: "open", vm: g.vm },
    () => {
      b.event("SET_ALLOC", { setId: g.setId, refcount: 0 });
      b.add(
        "vfio",
        VFIO,
        { $case: "containerOpen", value: { container: g.setId, mmToken: BigInt(g.token), quota: 16, vmName: g.vm, graceMs: 5000 } },
        { setId: g.setId },
      );
    },
    { setId: g.setId },
  );
}

/** The guest allocates a PASID (virtual command): ALLOC, reference 1. */
export function allocPasid(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number): void {
  b.op(
    { op: "alloc", vm: g.vm, setId: g.setId },
    () => {
      b.event("ALLOC", { ioasid, generation, setId: g.setId, refcount: 1 });
      b.add("vfio", VFIO, { $case: "vcmdAlloc", value: { container: g.setId } }, { ioasid, generation, setId: g.setId });
    },
    { ioasid, generation },
  );
}

/** bind_gpasid: the IOMMU's reference (2), BIND, its PASID entry; KVM's reference (3) and VMCS entry. */
export function bindPasid(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number, withKvm = true): void {
  const ids = { ioasid, generation, setId: g.setId };
  let seq = 0;
  b.op({ op: "bind", vm: g.vm, ...ids, spid }, () => {
    b.add("ioasid", "core-0", ref("get", `iommu/${IOMMU}/bind`), { ...ids, refcount: 2 });
    seq = b.event("BIND", { ...ids, spid, refcount: 2 });
    b.add("iommu", IOMMU, { $case: "pasidEntrySet", value: entry(ioasid) }, { ...ids, spid });
    b.add("iommu", IOMMU, { $case: "bindGpasid", value: { device: DEVICE, handle: BigInt(ioasid), first: true } }, { ...ids, spid, refcount: 2 });
    b.add(
      "vfio",
      VFIO,
      { $case: "bindGpasid", value: { container: g.setId, deviceKind: "device", device: DEVICE, handle: BigInt(ioasid), first: true } },
      { ...ids, spid },
    );
  });
  if (!withKvm) return;
  b.add("ioasid", "core-0", ref("get", `kvm/${g.kvm}/vmcs`), { ...ids, refcount: 3, seq });
  b.add("kvm", g.kvm, vmcs("install", spid, ioasid), { ...ids, spid, seq, refcount: 3 });
}

/** Guest programs its mdev's WQ with the gpasid: VDCM's find-by-SPID reference (4), vdev_write, a descriptor. */
export function programWq(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number): void {
  const ids = { ioasid, generation, setId: g.setId, spid };
  b.op({ op: "program", vm: g.vm, ...ids }, () => {
    b.add("ioasid", "core-0", ref("get", `vdcm/${VDCM}/${DEVICE}.wq${WQ}`), { ioasid, generation, setId: g.setId, refcount: 4 });
    b.add("vdcm", VDCM, { $case: "vdevWrite", value: { ...wq(g.mdev), gpasid: spid } }, { ...ids, refcount: 4 });
  });
  b.add("vdcm", VDCM, { $case: "submit", value: { ...wq(g.mdev), op: "MEMMOVE", status: "SUCCESS", bytes: 4096n } }, ids);
}

/** A page-request group of the guest's PASID, relayed by VFIO; answered by the guest when `answer`. */
export function pageRequest(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number, answer: boolean): number {
  const group = b.nextGroup();
  const ids = { ioasid, generation, setId: g.setId, spid };
  b.op({ op: "dma", vm: g.vm, ...ids }, () => {
    b.add("iommu", IOMMU, { $case: "iopfGroup", value: { group: BigInt(group), device: DEVICE, prgi: 0, requests: 1, owner: "vfio" } }, ids);
    b.add("vfio", VFIO, { $case: "iopfRelay", value: { container: g.setId, group: BigInt(group), requests: 1 } }, { ioasid, spid });
  });
  if (answer) {
    b.op({ op: "respond", vm: g.vm, ...ids }, () => {
      b.add("iommu", IOMMU, { $case: "pageResponse", value: { group: BigInt(group), device: DEVICE, prgi: 0, code: "SUCCESS", source: "HANDLER" } }, ids);
      b.add("vfio", VFIO, { $case: "pageResponse", value: { container: g.setId, group: BigInt(group), code: "SUCCESS" } });
    });
  }
  return group;
}

/** Steps 1–12 of both tables: ALLOC, bind, KVM's entry, VDCM's WQ, DMA with a page request answered. */
export function setUp(b: HistoryBuilder, g: FixtureGuest, ioasid: number, spid: number, generation = 1): void {
  allocPasid(b, g, ioasid, generation);
  bindPasid(b, g, ioasid, generation, spid);
  programWq(b, g, ioasid, generation, spid);
  pageRequest(b, g, ioasid, generation, spid, true);
}

/**
 * The FREE of a bound, programmed IOASID delivered in priority order (the misbehaving table's steps
 * 15–28, as this project settles each tier before the next): KVM clears and releases (count 2),
 * VDCM drains, clears and releases (1), the IOMMU tears down, flushes, drains an outstanding group
 * and releases (0), RECLAIM.
 */
export function freeDelivered(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number, outstandingGroup?: number): void {
  const ids = { ioasid, generation, setId: g.setId };
  let seq = 0;
  b.op({ op: "free", vm: g.vm, ...ids }, () => {
    seq = b.event("FREE", { ...ids, spid, refcount: 3 });
    b.add("vfio", VFIO, { $case: "vcmdFree", value: { container: g.setId, outcome: "FREE_PENDING" } }, ids);
  });
  freeTeardown(b, g, ioasid, generation, spid, seq, outstandingGroup);
}

/** The tiers' work for the FREE with sequence `seq`. */
export function freeTeardown(
  b: HistoryBuilder,
  g: FixtureGuest,
  ioasid: number,
  generation: number,
  spid: number,
  seq: number,
  outstandingGroup?: number,
): void {
  const ids = { ioasid, generation, setId: g.setId };
  b.add("kvm", g.kvm, vmcs("clear", spid, ioasid, h.VmcsClearCause.VMCS_CLEAR_CAUSE_FREE), { ...ids, spid, seq });
  b.add("ioasid", "core-0", ref("put", `kvm/${g.kvm}/vmcs`), { ...ids, refcount: 2, seq });
  b.add("vdcm", VDCM, { $case: "vdevClear", value: { ...wq(g.mdev), cause: h.VdevClearCause.VDEV_CLEAR_CAUSE_FREE } }, { ...ids, spid, seq });
  b.add("ioasid", "core-0", ref("put", `vdcm/${VDCM}/${DEVICE}.wq${WQ}`), { ...ids, refcount: 1, seq });
  b.add("iommu", IOMMU, { $case: "teardownPasid", value: entry(ioasid, "IOASID_FREED") }, { ...ids, spid, seq });
  b.add("iommu", IOMMU, flush("IOASID_FREED"), { ioasid, seq });
  if (outstandingGroup !== undefined) {
    b.add(
      "iommu",
      IOMMU,
      { $case: "pageResponse", value: { group: BigInt(outstandingGroup), device: DEVICE, prgi: 0, code: "INVALID", source: "IOASID_FREED" } },
      { ...ids, spid, seq },
    );
  }
  b.add("iommu", IOMMU, { $case: "iommuNbHandler", value: { type: eventTypeOf("FREE"), tornDown: 1, bindReferenceReleased: true } }, { ...ids, spid, seq });
  b.add("ioasid", "core-0", ref("put", `iommu/${IOMMU}/bind`), { ...ids, refcount: 0, seq });
  b.event("RECLAIM", { ...ids, spid, refcount: 0 });
}

export const GUEST_1: FixtureGuest = { vm: "g1", kvm: "vm-1", token: 7, setId: 1, mdev: "mdev-g1" };
export const GUEST_2: FixtureGuest = { vm: "g2", kvm: "vm-2", token: 8, setId: 2, mdev: "mdev-g2" };
export const GUEST_3: FixtureGuest = { vm: "g3", kvm: "vm-3", token: 9, setId: 3, mdev: "mdev-g3" };

/**
 * A correct history: the document's normal table (guest g1, IOASID 201: ALLOC, BIND, UNBIND, FREE,
 * RECLAIM; references 1→2→3→4→3→2→1→0; then a new life cycle, 201 generation 2, bound), its
 * misbehaving table (g2, IOASID 202: FREE before unbind, an outstanding page request drained, a
 * late unbind), and a crashed guest (g3: 203 bound and programmed, 204 only allocated) with a VDCM
 * kill and restart healed, then a final heal.
 */
export function correctHistory(options: BuilderOptions = {}): HistoryRecord[] {
  const b = new HistoryBuilder(undefined, undefined, options);
  const g1 = GUEST_1;
  const g2 = GUEST_2;
  const g3 = GUEST_3;
  b.chaos("info", { note: "seed 1, 3 guests" });
  openGuest(b, g1, 1);
  openGuest(b, g2, 2);
  openGuest(b, g3, 3);

  // The normal table (steps 1–24).
  setUp(b, g1, 201, 101);
  b.op({ op: "clear", vm: g1.vm, ioasid: 201, generation: 1, setId: 1, spid: 101 }, () => {
    b.add(
      "vdcm",
      VDCM,
      { $case: "vdevClear", value: { ...wq(g1.mdev), cause: h.VdevClearCause.VDEV_CLEAR_CAUSE_MDEV_CLEAR } },
      { ioasid: 201, generation: 1, setId: 1, spid: 101 },
    );
    b.add("ioasid", "core-0", ref("put", `vdcm/${VDCM}/${DEVICE}.wq${WQ}`), { ioasid: 201, generation: 1, setId: 1, refcount: 3 });
  });
  let unbindSeq = 0;
  b.op({ op: "unbind", vm: g1.vm, ioasid: 201, generation: 1, setId: 1, spid: 101 }, () => {
    b.add("iommu", IOMMU, { $case: "teardownPasid", value: entry(201, "UNBIND") }, { ioasid: 201, generation: 1, setId: 1, spid: 101 });
    b.add("iommu", IOMMU, flush("UNBIND"), { ioasid: 201 });
    unbindSeq = b.event("UNBIND", { ioasid: 201, generation: 1, setId: 1, spid: 101, refcount: 3 });
    b.add(
      "iommu",
      IOMMU,
      { $case: "unbindGpasid", value: { device: DEVICE, handle: 201n, last: true } },
      { ioasid: 201, generation: 1, setId: 1, spid: 101, refcount: 3 },
    );
    b.add(
      "vfio",
      VFIO,
      { $case: "unbindGpasid", value: { container: 1, deviceKind: "device", device: DEVICE, last: true } },
      { ioasid: 201, generation: 1, setId: 1, spid: 101 },
    );
  });
  b.add("kvm", g1.kvm, vmcs("clear", 101, 201, h.VmcsClearCause.VMCS_CLEAR_CAUSE_UNBIND), { ioasid: 201, generation: 1, setId: 1, spid: 101, seq: unbindSeq });
  b.add("ioasid", "core-0", ref("put", `kvm/${g1.kvm}/vmcs`), { ioasid: 201, generation: 1, setId: 1, refcount: 2, seq: unbindSeq });
  let freeSeq = 0;
  b.op({ op: "free", vm: g1.vm, ioasid: 201, generation: 1, setId: 1 }, () => {
    freeSeq = b.event("FREE", { ioasid: 201, generation: 1, setId: 1, refcount: 1 });
    b.add("vfio", VFIO, { $case: "vcmdFree", value: { container: 1, outcome: "FREE_PENDING" } }, { ioasid: 201, generation: 1, setId: 1 });
  });
  b.add(
    "iommu",
    IOMMU,
    { $case: "iommuNbHandler", value: { type: eventTypeOf("FREE"), tornDown: 0, bindReferenceReleased: true } },
    { ioasid: 201, generation: 1, setId: 1, seq: freeSeq },
  );
  b.add("ioasid", "core-0", ref("put", `iommu/${IOMMU}/bind`), { ioasid: 201, generation: 1, setId: 1, refcount: 0, seq: freeSeq });
  b.event("RECLAIM", { ioasid: 201, generation: 1, setId: 1, refcount: 0 });
  // New life cycle: 201 again, generation 2, bound (KVM's registration is active on set 1).
  allocPasid(b, g1, 201, 2);
  bindPasid(b, g1, 201, 2, 101);

  // The misbehaving table (steps 13–30): FREE before unbind, with a page request outstanding.
  setUp(b, g2, 202, 101);
  const outstanding = pageRequest(b, g2, 202, 1, 101, false);
  freeDelivered(b, g2, 202, 1, 101, outstanding);
  b.op({ op: "unbind", vm: g2.vm, ioasid: 202, generation: 1, setId: 2, spid: 101 }); // late unbind: nothing to do

  // A crashed guest, with a VDCM kill and restart meanwhile.
  setUp(b, g3, 203, 103);
  allocPasid(b, g3, 204, 1);
  b.chaos("info", { fault: "kill-restart", target: "vdcm", faultId: 1 });
  b.chaos("info", { heal: true, faultId: 1 });
  b.op({ op: "crash", vm: g3.vm, setId: 3 }, () => {
    b.add("vfio", VFIO, { $case: "faultSessionLost", value: { container: 3, group: 0n } });
  });
  const seq203 = b.event("FREE", { ioasid: 203, generation: 1, setId: 3, spid: 103, refcount: 3 });
  b.event("RECLAIM", { ioasid: 204, generation: 1, setId: 3, refcount: 0 });
  freeTeardown(b, g3, 203, 1, 103, seq203);
  b.event("SET_FREE", { setId: 3, refcount: 0 });
  b.add("vfio", VFIO, { $case: "containerClose", value: { container: 3, reason: "SESSION_LOST", freed: 2 } }, { setId: 3 });
  b.chaos("info", { heal: true });
  return b.records;
}

/** The final state that goes with {@link correctHistory}: 201 generation 2 live and bound in set 1. */
export function correctFinalState(): FinalState {
  return {
    ts: 1_700_000_100_000,
    capacity: 1024,
    available: 1024 - 1 - 32,
    sets: [
      { setId: 1, quota: 16, inUse: 1, mmToken: "7" },
      { setId: 2, quota: 16, inUse: 0, mmToken: "8" },
    ],
    ioasids: [
      { ioasid: 201, generation: 2, setId: 1, state: "ACTIVE", refcount: 3, spid: 101, holders: ["set-owner/1/alloc", `iommu/${IOMMU}/bind`, "kvm/vm-1/vmcs"] },
    ],
    liveEntries: [
      { role: "kvm", instance: "vm-1", ioasid: 201, generation: 2, where: "gpasid 101" },
      { role: "iommu", instance: IOMMU, ioasid: 201, generation: 2, where: `device ${DEVICE}` },
    ],
    faultGroups: [],
    registrations: [
      { subscriber: "kvm", instance: "vm-1", mmToken: "7", active: true, setId: 1 },
      { subscriber: "kvm", instance: "vm-2", mmToken: "8", active: true, setId: 2 },
      { subscriber: "kvm", instance: "vm-3", mmToken: "9", active: false, setId: 0 },
    ],
  };
}
