import type { HistoryFields, HistoryRecord } from "@ioasid/bus";
import { createChaosRecord, type ChaosAction, type ChaosDetail, type ChaosOp } from "./chaos-record.js";
import type { FinalState } from "./final-state.js";

/**
 * Builds histories the way the services record them (the same actions, fields and details), one
 * record every `step` ms. The checker's tests use it for the document's life-cycle tables and for
 * deliberately broken variants.
 */
export class HistoryBuilder {
  readonly records: HistoryRecord[] = [];
  private t: number;
  private seq = 0;
  private opId = 0;
  private group = 0;

  constructor(
    start = 1_700_000_000_000,
    private readonly step = 10,
  ) {
    this.t = start;
  }

  /** Appends a record of a role. */
  add(role: string, instance: string, action: string, fields: HistoryFields = {}): HistoryRecord {
    const r: HistoryRecord = { ts: (this.t += this.step), role, instance, action, ...fields };
    this.records.push(r);
    return r;
  }

  /** Appends a core event record with the next sequence number; returns the sequence. */
  event(type: string, fields: HistoryFields): number {
    const seq = ++this.seq;
    this.add("ioasid", "core-0", `event:${type}`, { ...fields, seq });
    return seq;
  }

  /** Appends a chaos record. */
  chaos(action: ChaosAction, detail: ChaosDetail): HistoryRecord {
    const r = createChaosRecord(action, detail, { ts: (this.t += this.step) });
    this.records.push(r);
    return r;
  }

  /** An operation: invoke, what `body` records while it runs, then its completion (`ok` unless told). */
  op(detail: Omit<ChaosOp, "opId">, body: () => void = () => undefined, done: Partial<ChaosOp> = {}, outcome: ChaosAction = "ok"): number {
    const opId = ++this.opId;
    const invoke = this.chaos("invoke", { ...detail, opId });
    body();
    this.chaos(outcome, { ...detail, ...done, opId, latencyMs: this.t + this.step - invoke.ts });
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

/** Registers the VM's notifier (pending: KVM starts first), then VFIO opens its container. */
export function openGuest(b: HistoryBuilder, g: FixtureGuest, registration: number): void {
  b.add("ioasid", "core-0", "ioasid_register_notifier_mm", { detail: `kvm/${g.kvm} mm ${g.token} priority 3 (pending)` });
  b.add("kvm", g.kvm, "kvm_create_vm", { detail: `mm token ${g.token}, 1 vCPU(s), registration ${registration} PENDING` });
  b.op({ op: "open", vm: g.vm }, () => {
    b.event("SET_ALLOC", { setId: g.setId, refcount: 0 });
    b.add("vfio", VFIO, "container_open", { setId: g.setId, detail: `container ${g.setId} mm_token ${g.token} quota 16 vm ${g.vm} grace 5000ms` });
  }, { setId: g.setId });
}

/** The guest allocates a PASID (virtual command): ALLOC, reference 1. */
export function allocPasid(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number): void {
  b.op({ op: "alloc", vm: g.vm, setId: g.setId }, () => {
    b.event("ALLOC", { ioasid, generation, setId: g.setId, refcount: 1 });
    b.add("vfio", VFIO, "vcmd_alloc", { ioasid, generation, setId: g.setId, detail: `container ${g.setId}` });
  }, { ioasid, generation });
}

/** bind_gpasid: the IOMMU's reference (2), BIND, its PASID entry; KVM's reference (3) and VMCS entry. */
export function bindPasid(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number, withKvm = true): void {
  const ids = { ioasid, generation, setId: g.setId };
  let seq = 0;
  b.op({ op: "bind", vm: g.vm, ...ids, spid }, () => {
    b.add("ioasid", "core-0", "ioasid_get", { ...ids, refcount: 2, detail: `iommu/${IOMMU}/bind` });
    seq = b.event("BIND", { ...ids, spid, refcount: 2 });
    b.add("iommu", IOMMU, "pasid_entry_set", { ...ids, spid, detail: `device ${DEVICE} handle ${ioasid} domain 3 NESTED` });
    b.add("iommu", IOMMU, "bind_gpasid", { ...ids, spid, refcount: 2, detail: `device ${DEVICE} handle ${ioasid} first bind` });
    b.add("vfio", VFIO, "bind_gpasid", { ...ids, spid, detail: `container ${g.setId} device ${DEVICE} handle ${ioasid} first` });
  });
  if (!withKvm) return;
  b.add("ioasid", "core-0", "ioasid_get", { ...ids, refcount: 3, seq, detail: `kvm/${g.kvm}/vmcs` });
  b.add("kvm", g.kvm, "vmcs_update", { ...ids, spid, seq, refcount: 3, detail: `install gpasid ${spid} → hpasid ${ioasid}` });
}

/** Guest programs its mdev's WQ with the gpasid: VDCM's find-by-SPID reference (4), vdev_write, a descriptor. */
export function programWq(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number): void {
  const ids = { ioasid, generation, setId: g.setId, spid };
  b.op({ op: "program", vm: g.vm, ...ids }, () => {
    b.add("ioasid", "core-0", "ioasid_get", { ioasid, generation, setId: g.setId, refcount: 4, detail: `vdcm/${VDCM}/${DEVICE}.wq${WQ}` });
    b.add("vdcm", VDCM, "vdev_write", { ...ids, refcount: 4, detail: `device ${DEVICE} wq ${WQ} mdev ${g.mdev} mdev_write(${spid})` });
  });
  b.add("vdcm", VDCM, "submit", { ...ids, detail: `device ${DEVICE} wq ${WQ} mdev ${g.mdev}: MEMMOVE SUCCESS (4096 bytes)` });
}

/** A page-request group of the guest's PASID, relayed by VFIO; answered by the guest when `answer`. */
export function pageRequest(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number, answer: boolean): number {
  const group = b.nextGroup();
  const ids = { ioasid, generation, setId: g.setId, spid };
  b.op({ op: "dma", vm: g.vm, ...ids }, () => {
    b.add("iommu", IOMMU, "iopf_group", { ...ids, detail: `group ${group} device ${DEVICE} prgi 0: 1 request(s) → vfio` });
    b.add("vfio", VFIO, "iopf_relay", { ioasid, spid, detail: `container ${g.setId} group ${group}: 1 request(s)` });
  });
  if (answer) {
    b.op({ op: "respond", vm: g.vm, ...ids }, () => {
      b.add("iommu", IOMMU, "page_response", { ...ids, detail: `group ${group} device ${DEVICE} prgi 0: SUCCESS (HANDLER)` });
      b.add("vfio", VFIO, "page_response", { detail: `container ${g.setId} group ${group}: SUCCESS` });
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
    b.add("vfio", VFIO, "vcmd_free", { ...ids, detail: `container ${g.setId} FREE_PENDING` });
  });
  freeTeardown(b, g, ioasid, generation, spid, seq, outstandingGroup);
}

/** The tiers' work for the FREE with sequence `seq`. */
export function freeTeardown(b: HistoryBuilder, g: FixtureGuest, ioasid: number, generation: number, spid: number, seq: number, outstandingGroup?: number): void {
  const ids = { ioasid, generation, setId: g.setId };
  b.add("kvm", g.kvm, "vmcs_update", { ...ids, spid, seq, detail: `clear gpasid ${spid} → hpasid ${ioasid} (FREE)` });
  b.add("ioasid", "core-0", "ioasid_put", { ...ids, refcount: 2, seq, detail: `kvm/${g.kvm}/vmcs` });
  b.add("vdcm", VDCM, "vdev_clear", { ...ids, spid, seq, detail: `device ${DEVICE} wq ${WQ} mdev ${g.mdev} FREE` });
  b.add("ioasid", "core-0", "ioasid_put", { ...ids, refcount: 1, seq, detail: `vdcm/${VDCM}/${DEVICE}.wq${WQ}` });
  b.add("iommu", IOMMU, "teardown_pasid", { ...ids, spid, seq, detail: `device ${DEVICE} handle ${ioasid} domain 3 NESTED (IOASID_FREED)` });
  b.add("iommu", IOMMU, "iotlb_flush", { ioasid, seq, detail: `PASID IOASID_FREED domain 3 device ${DEVICE} +devtlb` });
  if (outstandingGroup !== undefined) {
    b.add("iommu", IOMMU, "page_response", { ...ids, spid, seq, detail: `group ${outstandingGroup} device ${DEVICE} prgi 0: INVALID (IOASID_FREED)` });
  }
  b.add("iommu", IOMMU, "iommu_nb_handler", { ...ids, spid, seq, detail: "FREE: 1 entry torn down, bind reference released" });
  b.add("ioasid", "core-0", "ioasid_put", { ...ids, refcount: 0, seq, detail: `iommu/${IOMMU}/bind` });
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
export function correctHistory(): HistoryRecord[] {
  const b = new HistoryBuilder();
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
    b.add("vdcm", VDCM, "vdev_clear", { ioasid: 201, generation: 1, setId: 1, spid: 101, detail: `device ${DEVICE} wq ${WQ} mdev ${g1.mdev} mdev_clear` });
    b.add("ioasid", "core-0", "ioasid_put", { ioasid: 201, generation: 1, setId: 1, refcount: 3, detail: `vdcm/${VDCM}/${DEVICE}.wq${WQ}` });
  });
  let unbindSeq = 0;
  b.op({ op: "unbind", vm: g1.vm, ioasid: 201, generation: 1, setId: 1, spid: 101 }, () => {
    b.add("iommu", IOMMU, "teardown_pasid", { ioasid: 201, generation: 1, setId: 1, spid: 101, detail: `device ${DEVICE} handle 201 domain 3 NESTED (UNBIND)` });
    b.add("iommu", IOMMU, "iotlb_flush", { ioasid: 201, detail: `PASID UNBIND domain 3 device ${DEVICE} +devtlb` });
    unbindSeq = b.event("UNBIND", { ioasid: 201, generation: 1, setId: 1, spid: 101, refcount: 3 });
    b.add("iommu", IOMMU, "unbind_gpasid", { ioasid: 201, generation: 1, setId: 1, spid: 101, refcount: 3, detail: `device ${DEVICE} handle 201 last unbind` });
    b.add("vfio", VFIO, "unbind_gpasid", { ioasid: 201, generation: 1, setId: 1, spid: 101, detail: `container 1 device ${DEVICE} last` });
  });
  b.add("kvm", g1.kvm, "vmcs_update", { ioasid: 201, generation: 1, setId: 1, spid: 101, seq: unbindSeq, detail: "clear gpasid 101 → hpasid 201 (UNBIND)" });
  b.add("ioasid", "core-0", "ioasid_put", { ioasid: 201, generation: 1, setId: 1, refcount: 2, seq: unbindSeq, detail: `kvm/${g1.kvm}/vmcs` });
  let freeSeq = 0;
  b.op({ op: "free", vm: g1.vm, ioasid: 201, generation: 1, setId: 1 }, () => {
    freeSeq = b.event("FREE", { ioasid: 201, generation: 1, setId: 1, refcount: 1 });
    b.add("vfio", VFIO, "vcmd_free", { ioasid: 201, generation: 1, setId: 1, detail: "container 1 FREE_PENDING" });
  });
  b.add("iommu", IOMMU, "iommu_nb_handler", { ioasid: 201, generation: 1, setId: 1, seq: freeSeq, detail: "FREE: 0 entries torn down, bind reference released" });
  b.add("ioasid", "core-0", "ioasid_put", { ioasid: 201, generation: 1, setId: 1, refcount: 0, seq: freeSeq, detail: `iommu/${IOMMU}/bind` });
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
    b.add("vfio", VFIO, "fault_session_lost", { detail: "container 3: 0 group(s) answered INVALID" });
  });
  const seq203 = b.event("FREE", { ioasid: 203, generation: 1, setId: 3, spid: 103, refcount: 3 });
  b.event("RECLAIM", { ioasid: 204, generation: 1, setId: 3, refcount: 0 });
  freeTeardown(b, g3, 203, 1, 103, seq203);
  b.event("SET_FREE", { setId: 3, refcount: 0 });
  b.add("vfio", VFIO, "container_close", { setId: 3, detail: "container 3 reason SESSION_LOST freed 2" });
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
    ioasids: [{ ioasid: 201, generation: 2, setId: 1, state: "ACTIVE", refcount: 3, spid: 101, holders: ["set-owner/1/alloc", `iommu/${IOMMU}/bind`, "kvm/vm-1/vmcs"] }],
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
