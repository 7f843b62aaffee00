import { eventOf, type HistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { ChaosAction, FaultKind, HostFaultKind, parseChaosRecord, roleOfTarget, type ChaosOp, type FaultMarker } from "./chaos-record.js";
import { orderHistory } from "./history-order.js";

/** The core's history column ("ioasid"): events and reference changes. */
export const CORE_ROLE = "ioasid";

/** One generation of one IOASID as the core's records show it (all fields are record indices). */
export interface Lifecycle {
  readonly key: string;
  readonly ioasid: number;
  readonly generation: number;
  /** The owning set: from event:ALLOC, else from the first core record that names one. */
  setId: number | undefined;
  /** First record of any role naming this generation. */
  first: number;
  alloc: number | undefined;
  readonly allocs: number[];
  readonly frees: number[];
  readonly reclaims: number[];
  /** event:BIND and event:UNBIND, in order. */
  readonly bindings: number[];
  /** Every core event of this generation, in order. */
  readonly events: number[];
  /** ioasid_get / ioasid_put, in order. */
  readonly refs: number[];
}

/** A role's table entry for one IOASID generation: when it was set and when it went away. */
export interface EntrySpan {
  readonly role: string;
  readonly instance: string;
  /** "vm vm-1", "device idxd0 wq 1", "device idxd0". */
  readonly where: string;
  readonly ioasid: number;
  readonly generation: number;
  readonly set: number;
  clear: number | undefined;
  /** A kill of a role whose tables do not survive it (CheckOptions.volatileRoles). */
  lost: number | undefined;
}

/** A chaos operation: its invoke and its completion, and what both said. */
export interface OpSpan {
  readonly opId: number;
  op: ChaosOp;
  invoke: number | undefined;
  completion: number | undefined;
  outcome: "ok" | "fail" | "info" | undefined;
}

/** An injected fault, from its marker to its heal (or the heal-all). */
export interface FaultSpan {
  readonly marker: FaultMarker;
  readonly start: number;
  end: number | undefined;
}

/**
 * A time when a role's history records may have been lost: records are published fire-and-forget,
 * so a kill loses those of its last moments, and a broken NATS link (drop, partition) or a
 * nats-server restart those in flight.
 */
export interface LossWindow {
  /** The role whose records may be lost; undefined for every role (nats-server restart). */
  readonly role: string | undefined;
  readonly kind: "kill" | "link";
  /** From and to, ms since the epoch. */
  readonly from: number;
  readonly to: number;
  /** The fault, for the verdict's notes. */
  readonly why: string;
}

/** A page-request group record of the IOMMU (or VFIO's relay of an answer). */
export interface GroupRecord {
  /** `<role>/<instance>/<group id>`: ids are unique for the run (the IOMMU keeps its counter). */
  readonly key: string;
  readonly groupId: string;
  readonly idx: number;
  readonly kind: "group" | "response";
}

/** A registration by MM token the core recorded as pending. */
export interface PendingRegistration {
  readonly subscriber: string;
  readonly instance: string;
  readonly mmToken: string;
  readonly idx: number;
}

/** A VFIO container: the set of a VM, with its MM token and quota. */
export interface ContainerRecord {
  readonly setId: number;
  readonly mmToken: string | undefined;
  readonly quota: number | undefined;
  readonly idx: number;
}

/**
 * The history in causal order, and the indexes the rules read. Record indices everywhere are
 * positions in `records`: a linear extension of happens-before built from the records' sequences
 * and causal links (see history-order.ts), so `i < j` never contradicts what the sequences show;
 * records they leave unordered are in the order of their times.
 */
export interface HistoryIndex {
  readonly records: readonly HistoryRecord[];
  /**
   * Whether record `a` happened before record `b` by sequences and causal links (publisher order,
   * the core's op-log order, event → handling, `after` links): true, false (`b` before `a`), or
   * undefined when they do not decide it.
   */
  happenedBefore(a: number, b: number): boolean | undefined;
  /**
   * `a` did not happen after `b`: by happens-before when it decides; otherwise (records no
   * recorded message orders, or a history without sequences) by time, within `toleranceMs`.
   */
  notAfter(a: number, b: number, toleranceMs: number): boolean;
  /** The earliest and the latest record time (display, and the end of open time windows). */
  readonly startTs: number | undefined;
  readonly endTs: number | undefined;
  /** Records that carry a publisher sequence; the rest are ordered by time. */
  readonly sequenced: number;
  /** Causal edges left out because they closed a cycle (0 in a consistent history). */
  readonly cycles: number;
  readonly lifecycles: ReadonlyMap<string, Lifecycle>;
  /** The lifecycle of a record that names an IOASID (by its generation, else by its place in the causal order). */
  lifecycleOf(idx: number): Lifecycle | undefined;
  /** The generation of `ioasid` allocated (or first seen) most recently at or before `idx`, unless reclaimed before it. */
  lifecycleAt(ioasid: number, idx: number): Lifecycle | undefined;
  /** Indices of every record that names the generation `key` (directly, or by its place in the order), in order. */
  membersOf(key: string): readonly number[];
  /** Indices of every record (of any role) that carries event sequence `seq`, in order. */
  withSeq(seq: number): readonly number[];
  readonly entries: readonly EntrySpan[];
  readonly ops: readonly OpSpan[];
  readonly faults: readonly FaultSpan[];
  /** When records may have been lost, from the fault markers. */
  readonly lossWindows: readonly LossWindow[];
  /** Index of the last heal marker, if any. */
  readonly lastHeal: number | undefined;
  readonly groups: readonly GroupRecord[];
  readonly pendingRegistrations: readonly PendingRegistration[];
  readonly containers: readonly ContainerRecord[];
  /** The set of a VM as the chaos records last said at or before `idx` (else the first they say). */
  setOfVm(vm: string, idx: number): number | undefined;
  /** `role/instance/purpose` of an ioasid_get / ioasid_put. */
  holderOf(idx: number): Holder | undefined;
}

/** A reference holder as the core records it in a get/put detail. */
export interface Holder {
  readonly role: string;
  readonly instance: string;
  readonly purpose: string;
}

/** Key of one IOASID generation. */
export function lifecycleKey(ioasid: number, generation: number): string {
  return `${ioasid}#${generation}`;
}

/** Options of {@link indexHistory}. */
export interface IndexOptions {
  /** Roles whose tables vanish when they are killed (their entries end at the kill marker). @default [] */
  readonly volatileRoles?: readonly string[];
  /** How long before and after a kill or a link fault records may be lost, in ms. @default 100 */
  readonly recordLossMarginMs?: number;
}

/**
 * Orders the history by its sequences and causal links, not by clocks (issue 18; see
 * history-order.ts: records nothing orders keep the order of their times, stable on equal times),
 * and builds the indexes the rules read. Pure.
 */
export function indexHistory(history: readonly HistoryRecord[], options: IndexOptions = {}): HistoryIndex {
  const causal = orderHistory(history);
  const records = causal.order.map((i) => history[i]!);
  const happenedBefore = (a: number, b: number): boolean | undefined => causal.happenedBefore(causal.order[a]!, causal.order[b]!);
  const lifecycles = new Map<string, Lifecycle>();
  const byIoasid = new Map<number, Lifecycle[]>();

  const lifecycle = (ioasid: number, generation: number, idx: number): Lifecycle => {
    const key = lifecycleKey(ioasid, generation);
    let l = lifecycles.get(key);
    if (l === undefined) {
      l = { key, ioasid, generation, setId: undefined, first: idx, alloc: undefined, allocs: [], frees: [], reclaims: [], bindings: [], events: [], refs: [] };
      lifecycles.set(key, l);
      let list = byIoasid.get(ioasid);
      if (list === undefined) byIoasid.set(ioasid, (list = []));
      list.push(l);
    }
    return l;
  };

  // Pass 1: the core's view of every generation (and every generation any role names).
  records.forEach((r, idx) => {
    if (r.ioasid === undefined || r.generation === undefined || r.generation === 0) return;
    const l = lifecycle(r.ioasid, r.generation, idx);
    if (r.role !== CORE_ROLE) return;
    const event = eventOf(r);
    if (r.setId !== undefined && (l.setId === undefined || event === "ALLOC")) l.setId = r.setId;
    switch (event) {
      case "ALLOC":
        l.allocs.push(idx);
        l.alloc ??= idx;
        break;
      case "FREE":
        l.frees.push(idx);
        break;
      case "RECLAIM":
        l.reclaims.push(idx);
        break;
      case "BIND":
      case "UNBIND":
        l.bindings.push(idx);
        break;
      case "SET_ALLOC":
      case "SET_FREE":
      case undefined:
        // Set events name no IOASID generation; other records are not events.
        break;
    }
    if (r.action?.$case === "ioasidGet" || r.action?.$case === "ioasidPut") l.refs.push(idx);
    if (event !== undefined) l.events.push(idx);
  });
  for (const list of byIoasid.values()) list.sort((a, b) => start(a) - start(b));

  const lifecycleAt = (ioasid: number, idx: number): Lifecycle | undefined => {
    const list = byIoasid.get(ioasid);
    if (list === undefined) return undefined;
    // The last generation that started at or before idx (the list is sorted by start).
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (start(list[mid]!) <= idx) lo = mid + 1;
      else hi = mid;
    }
    const found = lo === 0 ? undefined : list[lo - 1];
    if (found !== undefined && found.reclaims.length > 0 && found.reclaims[0]! < idx) return undefined;
    return found;
  };
  const lifecycleOf = (idx: number): Lifecycle | undefined => {
    const r = records[idx];
    if (r?.ioasid === undefined) return undefined;
    if (r.generation !== undefined && r.generation !== 0) return lifecycles.get(lifecycleKey(r.ioasid, r.generation));
    return lifecycleAt(r.ioasid, idx);
  };

  const members = new Map<string, number[]>();
  const bySeq = new Map<number, number[]>();
  records.forEach((r, idx) => {
    if (r.seq !== undefined) {
      let list = bySeq.get(r.seq);
      if (list === undefined) bySeq.set(r.seq, (list = []));
      list.push(idx);
    }
    const l = lifecycleOf(idx);
    if (l === undefined) return;
    let list = members.get(l.key);
    if (list === undefined) members.set(l.key, (list = []));
    list.push(idx);
  });

  // Pass 2: chaos operations, faults, VMs' sets.
  const ops = new Map<number, OpSpan>();
  const faults: FaultSpan[] = [];
  const openFaults = new Map<number | string, FaultSpan>();
  const vmSets = new Map<string, Array<{ idx: number; setId: number }>>();
  const kills: Array<{ idx: number; role: string }> = [];
  let lastHeal: number | undefined;
  let anonymous = 0;
  records.forEach((r, idx) => {
    const e = parseChaosRecord(r);
    if (e === undefined) return;
    if (e.kind === "op") {
      let span = ops.get(e.op.opId);
      if (span === undefined) ops.set(e.op.opId, (span = { opId: e.op.opId, op: e.op, invoke: undefined, completion: undefined, outcome: undefined }));
      else span.op = { ...span.op, ...e.op };
      if (e.action === ChaosAction.INVOKE) span.invoke ??= idx;
      else if (span.completion === undefined) {
        span.completion = idx;
        span.outcome = e.action;
      }
      if (e.op.vm !== undefined && e.op.setId !== undefined) {
        let list = vmSets.get(e.op.vm);
        if (list === undefined) vmSets.set(e.op.vm, (list = []));
        list.push({ idx, setId: e.op.setId });
      }
    } else if (e.kind === "fault") {
      const span: FaultSpan = { marker: e.marker, start: idx, end: undefined };
      faults.push(span);
      openFaults.set(e.marker.faultId ?? `anonymous ${anonymous++}`, span);
      if (e.marker.fault === FaultKind.KILL_RESTART) kills.push({ idx, role: roleOfTarget(e.marker.target) });
    } else if (e.kind === "heal") {
      lastHeal = idx;
      if (e.marker.faultId !== undefined) {
        const span = openFaults.get(e.marker.faultId);
        if (span !== undefined) span.end = idx;
        openFaults.delete(e.marker.faultId);
      } else {
        for (const span of openFaults.values()) span.end = idx;
        openFaults.clear();
      }
    }
  });

  const margin = options.recordLossMarginMs ?? 100;
  let startTs: number | undefined;
  let endTs: number | undefined;
  for (const r of records) {
    if (startTs === undefined || r.ts < startTs) startTs = r.ts;
    if (endTs === undefined || r.ts > endTs) endTs = r.ts;
  }
  const lastTs = endTs ?? 0;
  const lossWindows: LossWindow[] = [];
  for (const f of faults) {
    const m = f.marker;
    const from = records[f.start]!.ts - margin;
    const why = `${m.fault} of ${m.target}${m.link === undefined ? "" : ` (${m.link} link)`} at +${(records[f.start]!.ts - (startTs ?? 0)).toFixed(0)} ms`;
    const until = (f.end === undefined ? lastTs : records[f.end]!.ts) + margin;
    if (m.fault === FaultKind.KILL_RESTART) lossWindows.push({ role: roleOfTarget(m.target), kind: "kill", from, to: records[f.start]!.ts + margin, why });
    else if (m.fault === FaultKind.NATS_RESTART) lossWindows.push({ role: undefined, kind: "link", from, to: until, why });
    // Servers of the cluster cut apart: a service connected to a server in the minority loses what
    // it publishes until the heal, as when that server restarts.
    else if (m.fault === HostFaultKind.HOST_PARTITION)
      lossWindows.push({ role: undefined, kind: "link", from, to: until, why: `${why} (${(m.hosts ?? []).join(" ⇹ ")})` });
    else if ((m.fault === FaultKind.DROP || m.fault === FaultKind.PARTITION) && m.link !== "grpc") {
      lossWindows.push({ role: roleOfTarget(m.target), kind: "link", from, to: until, why });
    }
  }

  // Pass 3: role tables, fault groups, registrations, containers.
  const entries: EntrySpan[] = [];
  const openEntries = new Map<string, EntrySpan>();
  const groups: GroupRecord[] = [];
  const pendingRegistrations: PendingRegistration[] = [];
  const containers: ContainerRecord[] = [];
  const volatile = new Set(options.volatileRoles ?? []);
  let killAt = 0;
  records.forEach((r, idx) => {
    while (killAt < kills.length && kills[killAt]!.idx <= idx) {
      const kill = kills[killAt++]!;
      if (!volatile.has(kill.role)) continue;
      for (const [k, span] of openEntries) {
        if (span.role !== kill.role) continue;
        span.lost = kill.idx;
        openEntries.delete(k);
      }
    }
    const change = tableChange(r);
    if (change !== undefined && r.ioasid !== undefined) {
      const generation = r.generation ?? lifecycleAt(r.ioasid, idx)?.generation ?? 0;
      const k = `${r.role}/${r.instance}/${change.where}/${lifecycleKey(r.ioasid, generation)}`;
      const open = openEntries.get(k);
      if (change.kind === "set" && open === undefined) {
        const span: EntrySpan = {
          role: r.role,
          instance: r.instance,
          where: change.where,
          ioasid: r.ioasid,
          generation,
          set: idx,
          clear: undefined,
          lost: undefined,
        };
        entries.push(span);
        openEntries.set(k, span);
      } else if (change.kind === "clear" && open !== undefined) {
        open.clear = idx;
        openEntries.delete(k);
      }
    }
    const a = r.action;
    if ((r.role === "iommu" && (a?.$case === "iopfGroup" || a?.$case === "pageResponse")) || (r.role === "vfio" && a?.$case === "pageResponse")) {
      // The IOMMU keeps its outstanding groups and its id counter across a kill, so an id names
      // one group for the whole run (a restarted IOMMU answers the groups it had).
      const groupId = String(a.value.group);
      groups.push({ key: `${r.role}/${r.instance}/${groupId}`, groupId, idx, kind: a.$case === "iopfGroup" ? "group" : "response" });
    }
    if (r.role === CORE_ROLE && a?.$case === "ioasidRegisterNotifierMm" && a.value.pending && a.value.scope?.$case === "mmToken") {
      pendingRegistrations.push({ subscriber: a.value.subscriber, instance: a.value.instance, mmToken: String(a.value.scope.value), idx });
    }
    if (r.role === "vfio" && a?.$case === "containerOpen" && r.setId !== undefined) {
      containers.push({ setId: r.setId, mmToken: String(a.value.mmToken), quota: a.value.quota, idx });
    }
  });

  return {
    records,
    happenedBefore,
    notAfter(a, b, toleranceMs) {
      const hb = happenedBefore(a, b);
      if (hb !== undefined) return hb;
      return records[a]!.ts <= records[b]!.ts + toleranceMs;
    },
    startTs,
    endTs,
    sequenced: causal.sequenced,
    cycles: causal.cycles,
    lifecycles,
    lifecycleOf,
    lifecycleAt,
    membersOf: (key) => members.get(key) ?? [],
    withSeq: (seq) => bySeq.get(seq) ?? [],
    entries,
    ops: [...ops.values()],
    faults,
    lossWindows,
    lastHeal,
    groups,
    pendingRegistrations,
    containers,
    setOfVm(vm, idx) {
      const list = vmSets.get(vm);
      if (list === undefined) return undefined;
      let found = list[0]?.setId;
      for (const m of list) if (m.idx <= idx) found = m.setId;
      return found;
    },
    holderOf(idx) {
      const a = records[idx]?.action;
      if (a?.$case !== "ioasidGet" && a?.$case !== "ioasidPut") return undefined;
      const holder = a.value.holder;
      return holder === undefined ? undefined : { role: holder.role, instance: holder.instance, purpose: holder.purpose };
    },
  };
}

function start(l: Lifecycle): number {
  return l.alloc ?? l.first;
}

/**
 * The table change a role's record stands for, or undefined: a VMCS translation installed or
 * cleared (KVM), a device PASID entry programmed or drained and cleared (VDCM), an IOMMU PASID
 * entry set or torn down.
 */
export function tableChange(r: HistoryRecord): { kind: "set" | "clear"; where: string } | undefined {
  const a = r.action;
  switch (a?.$case) {
    case "vmcsUpdate":
      if (r.role !== "kvm") return undefined;
      if (a.value.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL) return { kind: "set", where: `vm ${r.instance}` };
      if (a.value.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR) return { kind: "clear", where: `vm ${r.instance}` };
      return undefined;
    case "vdevWrite":
    case "vdevClear":
      return r.role === "vdcm" ? { kind: a.$case === "vdevWrite" ? "set" : "clear", where: `device ${a.value.device} wq ${a.value.wq}` } : undefined;
    case "pasidEntrySet":
    case "teardownPasid":
      return r.role === "iommu" ? { kind: a.$case === "pasidEntrySet" ? "set" : "clear", where: `device ${a.value.device}` } : undefined;
    default:
      return undefined;
  }
}
