import { describeAction, eventOf, stepLabel, type HistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { ChaosTarget } from "./chaos-record.js";
import type { FinalState } from "./final-state.js";
import { CORE_ROLE, lifecycleKey, type GroupRecord, type HistoryIndex, type Lifecycle } from "./history-index.js";
import type { InvariantId } from "./invariants.js";

/** Bounds and tolerances of the checker. */
export interface CheckOptions {
  /**
   * How far apart two processes' clocks may be when records of different roles are ordered by
   * time (every role stamps `performance.timeOrigin + performance.now()` on one machine). @default 1
   */
  readonly clockToleranceMs?: number;
  /** L1: longest a free may take (invoke → completion). @default 1000 */
  readonly freeLatencyBoundMs?: number;
  /** L2: longest after max(crash, last heal) until each IOASID of a crashed guest is reclaimed. @default 5000 */
  readonly reclaimBoundMs?: number;
  /** L3: longest after max(group, last heal) until a page-request group is answered; undefined: by the end of the history. */
  readonly faultAnswerBoundMs?: number;
  /** Records of context shown before and after each record of a violation's trace. @default 3 */
  readonly traceContext?: number;
  /** Roles whose tables do not survive a kill (their entries end at the kill marker). @default [] */
  readonly volatileRoles?: readonly string[];
  /**
   * How long before and after a kill, and around a NATS link fault, a role's records may have been
   * lost (history is published fire-and-forget), in ms. A violation that rests on a missing record
   * of that role in such a window becomes a note. @default 100
   */
  readonly recordLossMarginMs?: number;
  /** Chaos op names that are frees (L1). @default ["free"] */
  readonly freeOps?: readonly string[];
  /** Chaos op names that crash a guest's VMM (L2). @default ["crash"] */
  readonly crashOps?: readonly string[];
}

/** {@link CheckOptions} with every default applied. */
export type ResolvedCheckOptions = Required<Omit<CheckOptions, "faultAnswerBoundMs">> & Pick<CheckOptions, "faultAnswerBoundMs">;

/** Applies the defaults of {@link CheckOptions}. */
export function resolveCheckOptions(options: CheckOptions = {}): ResolvedCheckOptions {
  return {
    clockToleranceMs: options.clockToleranceMs ?? 1,
    freeLatencyBoundMs: options.freeLatencyBoundMs ?? 1000,
    reclaimBoundMs: options.reclaimBoundMs ?? 5000,
    faultAnswerBoundMs: options.faultAnswerBoundMs,
    traceContext: options.traceContext ?? 3,
    volatileRoles: options.volatileRoles ?? [],
    recordLossMarginMs: options.recordLossMarginMs ?? 100,
    freeOps: options.freeOps ?? ["free"],
    crashOps: options.crashOps ?? ["crash"],
  };
}

/** What a rule sees. */
export interface RuleContext {
  readonly index: HistoryIndex;
  readonly finalState: FinalState | undefined;
  readonly options: ResolvedCheckOptions;
  /** Says what the history could not show (shown with the verdict; not a violation). */
  note(text: string): void;
}

/** One violation as a rule finds it: what is wrong and the records that show it. */
export interface Finding {
  readonly message: string;
  /** Indices (in the time-ordered history) of the records that show the violation. */
  readonly evidence: readonly number[];
  readonly ioasid?: number;
  readonly generation?: number;
  readonly setId?: number;
  /** Facts of the final state that show it. */
  readonly facts?: readonly string[];
  /**
   * Set when the finding rests on a record that is missing: the role that should have recorded it
   * and the times between which it would have (ms since the epoch). A loss window of that role
   * overlapping them turns the finding into a note. `kills: false` when a kill of the role cannot
   * explain the absence (it would lose the state too, which is the violation).
   */
  readonly absence?: { readonly role: string; readonly from: number; readonly to: number; readonly kills?: boolean };
  /**
   * Set when the finding is an order that a missed delivery explains: a subscriber that misses its
   * deadline, or is still catching up on an earlier one, is passed over and the chain moves on
   * (DESIGN §4.4), and the core records that (`delivery_missed` with the event's seq). Such a record
   * for `seq` and the late subscriber (`role`/`instance`), no later than `before`, turns the finding
   * into a note; so does a loss window of the core's records (or of NATS) between `from` and `to`,
   * which may have taken the record with it.
   */
  readonly missedDelivery?: {
    readonly role: string;
    readonly instance: string;
    readonly seq: number;
    readonly before: number;
    readonly from: number;
    readonly to: number;
  };
}

/** One rule of the checker: the check of one invariant over the history and the final state. */
export interface Rule {
  readonly invariant: InvariantId;
  /** The rule in one line (the README's mapping). */
  readonly description: string;
  check(ctx: RuleContext): Finding[];
}

// ---- helpers --------------------------------------------------------------------------------

function rec(ctx: RuleContext, idx: number): HistoryRecord {
  return ctx.index.records[idx]!;
}

function ts(ctx: RuleContext, idx: number): number {
  return rec(ctx, idx).ts;
}

/** `a` happened no later than `b`, within the clock tolerance (records of different processes). */
function notAfter(ctx: RuleContext, a: number, b: number): boolean {
  return ts(ctx, a) <= ts(ctx, b) + ctx.options.clockToleranceMs;
}

function name(l: Lifecycle): string {
  return `IOASID ${l.ioasid} generation ${l.generation}`;
}

function who(r: HistoryRecord): string {
  return `${r.role}/${r.instance} ${stepLabel(r)}`;
}

/** Who took or dropped a reference (`role/instance/purpose`), as the core recorded it. */
function holderText(r: HistoryRecord): string {
  return r.action?.$case === "ioasidGet" || r.action?.$case === "ioasidPut" ? (describeAction(r) ?? "a holder") : "a holder";
}

function subject(l: Lifecycle): Pick<Finding, "ioasid" | "generation" | "setId"> {
  return { ioasid: l.ioasid, generation: l.generation, ...(l.setId === undefined ? {} : { setId: l.setId }) };
}

function lifecycles(ctx: RuleContext): Lifecycle[] {
  return [...ctx.index.lifecycles.values()];
}

/** The final state's IOASID entry for a generation, when the final state lists IOASIDs. */
function liveAtEnd(ctx: RuleContext, ioasid: number, generation: number | undefined): boolean | undefined {
  const list = ctx.finalState?.ioasids;
  if (list === undefined) return undefined;
  return list.some((i) => i.ioasid === ioasid && (generation === undefined || i.generation === generation));
}

// ---- safety ---------------------------------------------------------------------------------

const S1: Rule = {
  invariant: "S1",
  description:
    "event:RECLAIM only when the core's last reference change before it left 0 (or 1 with no FREE recorded: a free that reclaims at once), with no holder still holding by the history's gets and puts; no event:ALLOC of an ID while an earlier generation of it is not reclaimed, and generations only grow",
  check(ctx) {
    const out: Finding[] = [];
    for (const l of lifecycles(ctx)) {
      const reclaim = l.reclaims[0];
      if (reclaim === undefined) continue;
      const changes = [...l.allocs, ...l.frees, ...l.refs].filter((i) => i < reclaim).sort((a, b) => a - b);
      const last = changes.at(-1);
      const rc = last === undefined ? undefined : rec(ctx, last).refcount;
      const freed = l.frees.some((i) => i < reclaim);
      const lastIsFree = last !== undefined && eventOf(rec(ctx, last)) === "FREE";
      if (rc !== undefined && !(rc === 0 || (rc === 1 && !freed && !lastIsFree))) {
        out.push({ ...subject(l), message: `${name(l)} reclaimed while the core's count stood at ${rc}`, evidence: [last!, reclaim], absence: { role: CORE_ROLE, from: ts(ctx, last!), to: ts(ctx, reclaim) } });
      }
      // The holders the history shows, independent of the core's own count.
      const held = new Map<string, number[]>();
      for (const i of l.refs) {
        if (i > reclaim) break;
        const h = ctx.index.holderOf(i);
        if (h === undefined) continue;
        const k = `${h.role}/${h.instance}/${h.purpose}`;
        const list = held.get(k) ?? [];
        if (rec(ctx, i).action?.$case === "ioasidGet") list.push(i);
        else list.pop();
        held.set(k, list);
      }
      const still = [...held].filter(([, gets]) => gets.length > 0);
      if (still.length > 0) {
        out.push({
          ...subject(l),
          message: `${name(l)} reclaimed while ${still.map(([k]) => k).join(", ")} still held a reference (taken, never released)`,
          evidence: [...still.flatMap(([, gets]) => gets), reclaim],
          absence: { role: CORE_ROLE, from: ts(ctx, Math.min(...still.flatMap(([, gets]) => gets))), to: ts(ctx, reclaim) },
        });
      }
    }
    const byIoasid = new Map<number, Lifecycle[]>();
    for (const l of lifecycles(ctx)) {
      if (l.alloc === undefined) continue;
      const list = byIoasid.get(l.ioasid) ?? [];
      list.push(l);
      byIoasid.set(l.ioasid, list);
    }
    for (const list of byIoasid.values()) {
      list.sort((a, b) => a.alloc! - b.alloc!);
      for (let i = 1; i < list.length; i++) {
        const prev = list[i - 1]!;
        const next = list[i]!;
        const prevEnd = prev.reclaims[0];
        if (prevEnd === undefined || prevEnd > next.alloc!) {
          const lastRef = [...prev.refs, ...prev.frees].filter((x) => x < next.alloc!).sort((a, b) => a - b).at(-1);
          const lastSeen = ctx.index.membersOf(prev.key).filter((x) => x < next.alloc!).at(-1) ?? prev.alloc!;
          out.push({
            ...subject(next),
            message: `${name(next)} allocated while ${name(prev)} was not reclaimed${lastRef === undefined ? "" : ` (count ${String(rec(ctx, lastRef).refcount)})`}`,
            evidence: [prev.alloc!, ...(lastRef === undefined ? [] : [lastRef]), next.alloc!],
            ...(prevEnd === undefined ? { absence: { role: CORE_ROLE, from: ts(ctx, lastSeen), to: ts(ctx, next.alloc!) } } : {}),
          });
        }
        if (next.generation <= prev.generation) {
          out.push({ ...subject(next), message: `${name(next)} allocated after generation ${prev.generation}: generations must grow`, evidence: [prev.alloc!, next.alloc!] });
        }
      }
    }
    return out;
  },
};

const S2: Rule = {
  invariant: "S2",
  description: "no ioasid_get of an IOASID generation after its event:FREE or event:RECLAIM (the core's own records, so in its order)",
  check(ctx) {
    const out: Finding[] = [];
    for (const l of lifecycles(ctx)) {
      const end = [l.frees[0], l.reclaims[0]].filter((x): x is number => x !== undefined).sort((a, b) => a - b)[0];
      if (end === undefined) continue;
      for (const i of l.refs) {
        if (i <= end || rec(ctx, i).action?.$case !== "ioasidGet") continue;
        const state = eventOf(rec(ctx, end)) === "FREE" ? "FREE_PENDING" : "reclaimed";
        out.push({ ...subject(l), message: `${holderText(rec(ctx, i))} took a reference on ${name(l)} while it was ${state}`, evidence: [end, i] });
      }
    }
    return out;
  },
};

const S3: Rule = {
  invariant: "S3",
  description:
    "every record that names an IOASID and a set (a role's table change, a reference, a VFIO call) names the set that owns that generation (from event:ALLOC); a chaos operation of VM A that completes ok names only IOASIDs of A's set",
  check(ctx) {
    const out: Finding[] = [];
    ctx.index.records.forEach((r, idx) => {
      if (r.ioasid === undefined || r.setId === undefined || r.role === "chaos") return;
      const l = ctx.index.lifecycleOf(idx);
      if (l?.setId === undefined || l.setId === r.setId) return;
      out.push({
        ...subject(l),
        message: `${who(r)} acted on ${name(l)} of set ${l.setId} for set ${r.setId}`,
        evidence: [...(l.alloc === undefined ? [] : [l.alloc]), idx],
      });
    });
    for (const span of ctx.index.ops) {
      if (span.outcome !== "ok" || span.completion === undefined || span.op.vm === undefined || span.op.ioasid === undefined) continue;
      const at = span.invoke ?? span.completion;
      const vmSet = ctx.index.setOfVm(span.op.vm, at);
      const l =
        span.op.generation === undefined
          ? ctx.index.lifecycleAt(span.op.ioasid, at)
          : ctx.index.lifecycles.get(lifecycleKey(span.op.ioasid, span.op.generation));
      if (vmSet === undefined || l?.setId === undefined || l.setId === vmSet) continue;
      out.push({
        ...subject(l),
        message: `${span.op.op} by VM ${span.op.vm} (set ${vmSet}) succeeded on ${name(l)}, which belongs to set ${l.setId}`,
        evidence: [...(l.alloc === undefined ? [] : [l.alloc]), ...(span.invoke === undefined ? [] : [span.invoke]), span.completion],
      });
    }
    return out;
  },
};

const S4: Rule = {
  invariant: "S4",
  description:
    "event:BIND of (set, SPID) only while no other IOASID holds that (set, SPID) (held from its BIND to its UNBIND, FREE or RECLAIM); every KVM install and VDCM vdev_write translating (set, SPID) to an IOASID follows a BIND of that IOASID with that SPID; in the final state no two live IOASIDs of a set share a SPID",
  check(ctx) {
    const out: Finding[] = [];
    const live = new Map<string, { l: Lifecycle; idx: number }>();
    const heldBy = new Map<string, string>();
    ctx.index.records.forEach((r, idx) => {
      if (r.role !== CORE_ROLE || r.ioasid === undefined || r.generation === undefined) return;
      const l = ctx.index.lifecycles.get(lifecycleKey(r.ioasid, r.generation));
      if (l === undefined) return;
      if (eventOf(r) === "BIND" && r.setId !== undefined && r.spid !== undefined) {
        const k = `${r.setId}/${r.spid}`;
        const other = live.get(k);
        if (other !== undefined && other.l !== l) {
          out.push({ ...subject(l), message: `SPID ${r.spid} of set ${r.setId} bound to ${name(l)} while still bound to ${name(other.l)}`, evidence: [other.idx, idx] });
        }
        live.set(k, { l, idx });
        heldBy.set(l.key, k);
      } else if (eventOf(r) === "UNBIND" || eventOf(r) === "FREE" || eventOf(r) === "RECLAIM") {
        const k = heldBy.get(l.key);
        if (k !== undefined && live.get(k)?.l === l) live.delete(k);
        heldBy.delete(l.key);
      }
    });
    ctx.index.records.forEach((r, idx) => {
      const translation =
        (r.role === "kvm" && r.action?.$case === "vmcsUpdate" && r.action.value.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL) || (r.role === "vdcm" && r.action?.$case === "vdevWrite");
      if (!translation || r.spid === undefined) return;
      const l = ctx.index.lifecycleOf(idx);
      if (l?.alloc === undefined) return; // the generation began before the history: its BIND may be missing
      const bind = l.bindings.filter((b) => eventOf(rec(ctx, b)) === "BIND" && notAfter(ctx, b, idx)).at(-1);
      if (bind === undefined || rec(ctx, bind).spid !== r.spid) {
        out.push({
          ...subject(l),
          message: `${who(r)} translated SPID ${r.spid} to ${name(l)}, ${bind === undefined ? "which was never bound" : `bound to SPID ${String(rec(ctx, bind).spid)}`}`,
          evidence: [...(bind === undefined ? [] : [bind]), idx],
          ...(bind === undefined ? { absence: { role: CORE_ROLE, from: ts(ctx, l.alloc), to: ts(ctx, idx) } } : {}),
        });
      }
    });
    const seen = new Map<string, number>();
    for (const i of ctx.finalState?.ioasids ?? []) {
      if (i.spid === undefined || i.spid === 0) continue;
      const k = `${i.setId}/${i.spid}`;
      const other = seen.get(k);
      if (other !== undefined) {
        out.push({ ioasid: i.ioasid, setId: i.setId, message: `final state: SPID ${i.spid} of set ${i.setId} maps to IOASIDs ${other} and ${i.ioasid}`, evidence: [], facts: [`set ${i.setId} SPID ${i.spid} → ${other}`, `set ${i.setId} SPID ${i.spid} → ${i.ioasid}`] });
      }
      seen.set(k, i.ioasid);
    }
    return out;
  },
};

/** The tiers of a FREE's teardown, in the order DESIGN §5 and the IOASID document require. */
const TEARDOWN_STAGES: ReadonlyArray<{ readonly name: string; readonly match: (r: HistoryRecord) => boolean }> = [
  { name: "KVM entry cleared", match: (r) => r.role === "kvm" && r.action?.$case === "vmcsUpdate" && r.action.value.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR },
  { name: "device drained/cleared", match: (r) => r.role === "vdcm" && r.action?.$case === "vdevClear" },
  { name: "IOMMU entry torn down and flushed", match: (r) => r.role === "iommu" && (r.action?.$case === "teardownPasid" || r.action?.$case === "iotlbFlush") },
  { name: "faults answered", match: (r) => r.role === "iommu" && r.action?.$case === "pageResponse" },
];

const S5: Rule = {
  invariant: "S5",
  description:
    "for each FREE, the records of its delivery (same seq): every KVM vmcs clear ≤ every VDCM vdev_clear ≤ every IOMMU teardown_pasid/iotlb_flush ≤ every IOMMU drain page_response (by time, stages a role had no state for are absent); each holder's release (ioasid_put with that seq) after its own role's stage; every stage record, and every page_response of the generation, before event:RECLAIM",
  check(ctx) {
    const out: Finding[] = [];
    for (const l of lifecycles(ctx)) {
      const free = l.frees[0];
      const seq = free === undefined ? undefined : rec(ctx, free).seq;
      const reclaim = l.reclaims[0];
      if (free === undefined || seq === undefined) continue;
      const stages = TEARDOWN_STAGES.map(() => [] as number[]);
      const puts: number[] = [];
      for (const idx of ctx.index.withSeq(seq)) {
        const r = rec(ctx, idx);
        if (r.ioasid !== l.ioasid) continue;
        if (r.role === CORE_ROLE && r.action?.$case === "ioasidPut") puts.push(idx);
        TEARDOWN_STAGES.forEach((s, i) => {
          if (s.match(r)) stages[i]!.push(idx);
        });
      }
      for (let a = 0; a < stages.length; a++) {
        for (let b = a + 1; b < stages.length; b++) {
          for (const late of stages[a]!) {
            const early = stages[b]!.find((x) => !notAfter(ctx, late, x));
            if (early === undefined) continue;
            out.push({
              ...subject(l),
              message: `${name(l)}: "${TEARDOWN_STAGES[b]!.name}" (${who(rec(ctx, early))}) came before "${TEARDOWN_STAGES[a]!.name}" (${who(rec(ctx, late))})`,
              evidence: [free, early, late],
              missedDelivery: { role: rec(ctx, late).role, instance: rec(ctx, late).instance, seq, before: ts(ctx, early), from: ts(ctx, free), to: ts(ctx, late) },
            });
            break;
          }
        }
      }
      const stageOfRole: Record<string, number[]> = { kvm: stages[0]!, vdcm: stages[1]!, iommu: [...stages[2]!, ...stages[3]!] };
      for (const p of puts) {
        const h = ctx.index.holderOf(p);
        const own = h === undefined ? undefined : stageOfRole[h.role];
        const pending = own?.filter((x) => rec(ctx, x).instance === h!.instance && !notAfter(ctx, x, p));
        if (pending !== undefined && pending.length > 0) {
          out.push({ ...subject(l), message: `${name(l)}: ${holderText(rec(ctx, p))} released its reference before its own teardown (${who(rec(ctx, pending[0]!))})`, evidence: [free, p, pending[0]!] });
        }
      }
      if (reclaim === undefined) continue;
      const late = stages.flat().find((x) => !notAfter(ctx, x, reclaim));
      if (late !== undefined) out.push({ ...subject(l), message: `${name(l)} reclaimed before its teardown finished (${who(rec(ctx, late))})`, evidence: [free, reclaim, late] });
      const lateAnswer = ctx.index.membersOf(l.key).find((idx) => {
        const r = rec(ctx, idx);
        return r.role === "iommu" && r.action?.$case === "pageResponse" && idx > free && !stages[3]!.includes(idx) && !notAfter(ctx, idx, reclaim);
      });
      if (lateAnswer !== undefined) out.push({ ...subject(l), message: `${name(l)} reclaimed before a fault group of it was answered`, evidence: [free, reclaim, lateAnswer] });
    }
    return out;
  },
};

const S6: Rule = {
  invariant: "S6",
  description:
    "final state: available + Σ quotas = capacity − reserved (PASID 0), every set's inUse ≤ quota, and (with the IOASID list) inUse = the set's live IOASIDs; history: at each event:ALLOC, the set's live generations ≤ the quota its container_open recorded (quotas are assumed not adjusted during the run: AdjustSet is not recorded)",
  check(ctx) {
    const out: Finding[] = [];
    const f = ctx.finalState;
    if (f !== undefined) {
      const reserved = f.reserved ?? 1;
      const sum = f.sets.reduce((s, x) => s + x.quota, 0);
      if (f.available + sum !== f.capacity - reserved) {
        out.push({
          message: `final state: available ${f.available} + Σ quotas ${sum} = ${f.available + sum}, not capacity ${f.capacity} − ${reserved} = ${f.capacity - reserved}`,
          evidence: [],
          facts: [`capacity ${f.capacity}, reserved ${reserved}, available ${f.available}`, ...f.sets.map((s) => `set ${s.setId} quota ${s.quota} in use ${s.inUse}`)],
        });
      }
      for (const s of f.sets) {
        if (s.inUse > s.quota) out.push({ setId: s.setId, message: `final state: set ${s.setId} has ${s.inUse} in use over its quota of ${s.quota}`, evidence: [], facts: [`set ${s.setId} quota ${s.quota} in use ${s.inUse}`] });
        if (f.ioasids !== undefined) {
          const n = f.ioasids.filter((i) => i.setId === s.setId).length;
          if (n !== s.inUse) out.push({ setId: s.setId, message: `final state: set ${s.setId} says ${s.inUse} in use, but ${n} of its IOASIDs are live`, evidence: [], facts: [`set ${s.setId} in use ${s.inUse}`, `live IOASIDs of set ${s.setId}: ${n}`] });
        }
      }
      for (const i of f.ioasids ?? []) {
        if (!f.sets.some((s) => s.setId === i.setId)) out.push({ ioasid: i.ioasid, setId: i.setId, message: `final state: IOASID ${i.ioasid} is live in set ${i.setId}, which does not exist`, evidence: [], facts: [`IOASID ${i.ioasid} set ${i.setId}`] });
      }
    }
    for (const c of ctx.index.containers) {
      if (c.quota === undefined || c.quota === 0) continue;
      // Sweep the set's allocations and reclaims in order, counting the live generations.
      const steps: Array<[number, 1 | -1]> = [];
      for (const l of lifecycles(ctx)) {
        if (l.setId !== c.setId || l.alloc === undefined || l.alloc < c.idx) continue;
        steps.push([l.alloc, 1]);
        if (l.reclaims[0] !== undefined) steps.push([l.reclaims[0], -1]);
      }
      steps.sort((a, b) => a[0] - b[0]);
      let live = 0;
      for (const [idx, d] of steps) {
        live += d;
        if (live > c.quota) {
          out.push({ setId: c.setId, message: `set ${c.setId} had ${live} IOASIDs live over its quota of ${c.quota}`, evidence: [c.idx, idx] });
          break;
        }
      }
    }
    return out;
  },
};

const S7: Rule = {
  invariant: "S7",
  description:
    "per page-request group (IOMMU instance, group id): at most one IOMMU page_response (from the iopf_group on, or for a partial group answered without one); at most one VFIO page_response per group (the L3 rule checks the other half, at least one)",
  check(ctx) {
    const out: Finding[] = [];
    const answered = new Map<string, number>();
    for (const g of ctx.index.groups) {
      if (g.kind === "group") {
        answered.delete(g.key);
        continue;
      }
      const first = answered.get(g.key);
      if (first === undefined) {
        answered.set(g.key, g.idx);
        continue;
      }
      const group = ctx.index.groups.find((x) => x.key === g.key && x.kind === "group" && x.idx < first);
      const l = ctx.index.lifecycleOf(g.idx);
      out.push({
        ...(l === undefined ? {} : subject(l)),
        message: `fault group ${g.groupId} (${g.key.split("/").slice(0, 2).join("/")}) answered twice`,
        evidence: [...(group === undefined ? [] : [group.idx]), first, g.idx],
      });
    }
    return out;
  },
};

const S8: Rule = {
  invariant: "S8",
  description:
    "per IOASID generation at most one event:ALLOC, one event:FREE and one event:RECLAIM; BIND and UNBIND alternate, starting with BIND, and none after FREE; no event before ALLOC or after RECLAIM; no two event records with one sequence number; per set, SET_ALLOC and SET_FREE alternate",
  check(ctx) {
    const out: Finding[] = [];
    for (const l of lifecycles(ctx)) {
      for (const [what, list] of [["ALLOC", l.allocs], ["FREE", l.frees], ["RECLAIM", l.reclaims]] as const) {
        if (list.length > 1) out.push({ ...subject(l), message: `${name(l)} has ${list.length} ${what} events for one transition`, evidence: [...list] });
      }
      let prev: number | undefined;
      for (const b of l.bindings) {
        const type = eventOf(rec(ctx, b));
        const prevType = prev === undefined ? undefined : eventOf(rec(ctx, prev));
        if (type === prevType) out.push({ ...subject(l), message: `${name(l)}: two ${type} events in a row`, evidence: [prev!, b] });
        else if (prevType === undefined && type === "UNBIND" && l.alloc !== undefined) {
          out.push({ ...subject(l), message: `${name(l)}: UNBIND with no BIND before it`, evidence: [l.alloc, b], absence: { role: CORE_ROLE, from: ts(ctx, l.alloc), to: ts(ctx, b) } });
        }
        prev = b;
      }
      const free = l.frees[0];
      if (free !== undefined) {
        for (const b of l.bindings.filter((x) => x > free)) out.push({ ...subject(l), message: `${name(l)}: ${eventOf(rec(ctx, b))} after FREE (the FREE covers it)`, evidence: [free, b] });
      }
      if (l.alloc !== undefined) {
        for (const e of l.events.filter((x) => x < l.alloc!)) out.push({ ...subject(l), message: `${name(l)}: ${eventOf(rec(ctx, e))} before its ALLOC`, evidence: [e, l.alloc] });
      }
      const reclaim = l.reclaims[0];
      if (reclaim !== undefined) {
        for (const e of l.events.filter((x) => x > reclaim && eventOf(rec(ctx, x)) !== "RECLAIM")) {
          out.push({ ...subject(l), message: `${name(l)}: ${eventOf(rec(ctx, e))} after its RECLAIM`, evidence: [reclaim, e] });
        }
      }
    }
    const bySeq = new Map<number, number>();
    const setState = new Map<number, { event: string; idx: number }>();
    ctx.index.records.forEach((r, idx) => {
      const event = eventOf(r);
      if (r.role !== CORE_ROLE || event === undefined) return;
      if (r.seq !== undefined) {
        const other = bySeq.get(r.seq);
        if (other !== undefined) out.push({ ...(r.ioasid === undefined ? {} : { ioasid: r.ioasid }), message: `event sequence ${r.seq} recorded twice (${stepLabel(rec(ctx, other))}, ${stepLabel(r)})`, evidence: [other, idx] });
        else bySeq.set(r.seq, idx);
      }
      if ((event === "SET_ALLOC" || event === "SET_FREE") && r.setId !== undefined) {
        const last = setState.get(r.setId);
        if (last !== undefined && last.event === event) {
          out.push({ setId: r.setId, message: `set ${r.setId}: two ${event} events in a row`, evidence: [last.idx, idx] });
        }
        setState.set(r.setId, { event, idx });
      }
    });
    return out;
  },
};

/**
 * The guest calls (chaos ops) that tear down a role's table entries themselves: an unbind the
 * IOMMU's entry (and, by its UNBIND, KVM's), the guest's WQ clear a VDCM entry, a free, close or
 * crash every role's.
 */
const TEARDOWN_OPS: Readonly<Record<string, readonly string[]>> = {
  unbind: ["iommu", "kvm"],
  clear: ["vdcm"],
  free: ["iommu", "kvm", "vdcm"],
  close: ["iommu", "kvm", "vdcm"],
  crash: ["iommu", "kvm", "vdcm"],
};

/** Invokes of the guest calls that may tear down `role`'s entries of `l`: on its IOASID, or on its whole VM (a clear, close or crash). */
function guestTeardowns(ctx: RuleContext, l: Lifecycle, role: string): number[] {
  const out: number[] = [];
  for (const span of ctx.index.ops) {
    if (span.invoke === undefined || !(TEARDOWN_OPS[span.op.op]?.includes(role) ?? false)) continue;
    const own = span.op.ioasid === l.ioasid && (span.op.generation === undefined || span.op.generation === l.generation);
    const vmWide = span.op.op !== "unbind" && span.op.op !== "free" && l.setId !== undefined && span.op.setId === l.setId;
    if (own || vmWide) out.push(span.invoke);
  }
  return out;
}

const S9: Rule = {
  invariant: "S9",
  description:
    "every role table entry (KVM vmcs install→clear, VDCM vdev_write→vdev_clear, IOMMU pasid_entry_set→teardown_pasid, per role instance, place and generation) set before its generation's event:RECLAIM is cleared no later than it, and none is set after it; no VDCM submit or KVM translated enqcmd naming a generation after its RECLAIM; in the final state no live entry names a reclaimed generation or an IOASID not live",
  check(ctx) {
    const out: Finding[] = [];
    for (const e of ctx.index.entries) {
      const l = ctx.index.lifecycles.get(lifecycleKey(e.ioasid, e.generation));
      const reclaim = l?.reclaims[0];
      if (l === undefined || reclaim === undefined) continue;
      const where = `${e.role}/${e.instance} ${e.where}`;
      if (!notAfter(ctx, e.set, reclaim)) {
        out.push({ ...subject(l), message: `${where}: entry for ${name(l)} set after its reclaim`, evidence: [reclaim, e.set] });
        continue;
      }
      const end = e.clear ?? e.lost;
      if (end === undefined || !notAfter(ctx, end, reclaim)) {
        // A missing clear would have been recorded after what called for it and before the reclaim:
        // an UNBIND or FREE event, or the guest's own call — an unbind, clear, free, close or crash
        // of its VM — which tears the entry down before the core records anything (and the core's
        // record may never come, when the core or its link failed meanwhile).
        const cause = [...l.bindings, ...l.frees, ...guestTeardowns(ctx, l, e.role)].filter((x) => x > e.set && eventOf(rec(ctx, x)) !== "BIND").sort((a, b) => a - b)[0] ?? e.set;
        // No clear recorded (the entry ends only at a later kill of a volatile role, or never): the
        // clear's record may have been lost, like any missing record.
        const noClear = e.clear === undefined;
        out.push({
          ...subject(l),
          message: `${where}: entry for ${name(l)} still live after its reclaim${noClear ? (e.lost === undefined ? " (never cleared)" : " (not cleared before the role was killed)") : ""}`,
          evidence: [e.set, reclaim, ...(end === undefined ? [] : [end])],
          ...(noClear ? { absence: { role: e.role, from: ts(ctx, cause), to: ts(ctx, reclaim) } } : {}),
        });
      }
    }
    ctx.index.records.forEach((r, idx) => {
      // A use of the PASID through a role's table: a descriptor VDCM submitted, an ENQCMD KVM translated.
      const use = (r.role === "vdcm" && r.action?.$case === "submit") || (r.role === "kvm" && r.action?.$case === "enqcmd");
      if (!use || r.ioasid === undefined || r.generation === undefined) return;
      const l = ctx.index.lifecycles.get(lifecycleKey(r.ioasid, r.generation));
      const reclaim = l?.reclaims[0];
      if (l === undefined || reclaim === undefined || notAfter(ctx, idx, reclaim)) return;
      out.push({ ...subject(l), message: `${who(r)} used ${name(l)} after its reclaim`, evidence: [reclaim, idx] });
    });
    for (const e of ctx.finalState?.liveEntries ?? []) {
      const fact = `${e.role}${e.instance === undefined ? "" : `/${e.instance}`} ${e.where}: IOASID ${e.ioasid}${e.generation === undefined ? "" : ` generation ${e.generation}`}`;
      const l = e.generation === undefined ? undefined : ctx.index.lifecycles.get(lifecycleKey(e.ioasid, e.generation));
      if (l?.reclaims[0] !== undefined) {
        out.push({ ...subject(l), message: `final state: ${fact} is live, but that generation was reclaimed`, evidence: [l.reclaims[0]], facts: [fact] });
      } else if (liveAtEnd(ctx, e.ioasid, e.generation) === false) {
        out.push({ ioasid: e.ioasid, ...(e.generation === undefined ? {} : { generation: e.generation }), message: `final state: ${fact} is live, but the core has no such live IOASID`, evidence: [], facts: [fact] });
      }
    }
    return out;
  },
};

// ---- liveness -------------------------------------------------------------------------------

/** Fault targets on a free's path (VMM → VFIO → core → NATS): a free may fail or hang while they are down. */
const FREE_PATH: ReadonlySet<string> = new Set([ChaosTarget.CORE, ChaosTarget.NATS, ChaosTarget.VFIO]);

/**
 * How much earlier than its marker a service's own exit may have begun: the runner records a
 * self-exit (`cause: "exit"`, e.g. the core's fail-stop) when it sees the process gone, after the
 * calls the failure broke were already answered.
 */
export const SELF_EXIT_LEAD_MS = 1000;

/**
 * How long after a restarted service is back its clients may still fail fast: a gRPC channel that
 * saw its peer go reconnects within its bounded backoff (grpc-kit's RECONNECT_BACKOFF: at most 1 s).
 */
export const RECONNECT_GRACE_MS = 1500;

function faultOverlaps(ctx: RuleContext, targets: ReadonlySet<string>, from: number, to: number): boolean {
  return ctx.index.faults.some((f) => {
    const start = ts(ctx, f.start) - (f.marker.cause === "exit" ? SELF_EXIT_LEAD_MS : 0);
    const grace = f.marker.fault === "kill-restart" ? RECONNECT_GRACE_MS : 0;
    return targets.has(f.marker.target) && start <= to && (f.end === undefined || ts(ctx, f.end) + grace >= from);
  });
}

const L1: Rule = {
  invariant: "L1",
  description:
    "every chaos free (invoke → ok/fail) takes at most freeLatencyBoundMs (latencyMs, else the records' times); a free that never completes or completes `info` is a violation, unless a fault on its own path (ioasid-core, nats, vfio) overlapped it — subscribers' faults excuse nothing",
  check(ctx) {
    const out: Finding[] = [];
    const end = ctx.index.records.at(-1)?.ts ?? 0;
    for (const span of ctx.index.ops) {
      if (!ctx.options.freeOps.includes(span.op.op)) continue;
      const from = span.invoke === undefined ? undefined : ts(ctx, span.invoke);
      if (from === undefined) continue;
      const to = span.completion === undefined ? end : ts(ctx, span.completion);
      const excused = faultOverlaps(ctx, FREE_PATH, from, to);
      const what = `free (op ${span.opId}${span.op.vm === undefined ? "" : `, VM ${span.op.vm}`}${span.op.ioasid === undefined ? "" : `, IOASID ${span.op.ioasid}`})`;
      const evidence = [span.invoke!, ...(span.completion === undefined ? [] : [span.completion])];
      const ids = span.op.ioasid === undefined ? {} : { ioasid: span.op.ioasid, ...(span.op.generation === undefined ? {} : { generation: span.op.generation }) };
      if (span.outcome === "ok" || span.outcome === "fail") {
        const latency = span.op.latencyMs ?? to - from;
        if (latency > ctx.options.freeLatencyBoundMs && !excused) out.push({ ...ids, message: `${what} took ${latency.toFixed(1)} ms, over the bound of ${ctx.options.freeLatencyBoundMs} ms`, evidence });
      } else if (!excused) {
        out.push({ ...ids, message: `${what} ${span.outcome === "info" ? "ended indeterminate" : "never returned"} with no fault on its path`, evidence });
      }
    }
    return out;
  },
};

const L2: Rule = {
  invariant: "L2",
  description:
    "for each chaos crash of VM V (set from the chaos records), every generation allocated in V's set before the crash and not reclaimed by then has event:RECLAIM by max(crash, last heal) + reclaimBoundMs; one with no RECLAIM recorded is a violation unless the final state shows it gone (then a note: reclaimed, time unknown). The final state (read after the heal and the settle) has no FREE_PENDING IOASID, and no IOASID of a set whose VM closed or crashed",
  check(ctx) {
    const out: Finding[] = [];
    // After the heal every component is up: a freed IOASID still FREE_PENDING, or an IOASID of a
    // guest that is gone (closed or crashed), is held by something that will never let go.
    const ended = new Set<number>();
    for (const span of ctx.index.ops) {
      const gone = (span.op.op === "close" && span.outcome === "ok") || (ctx.options.crashOps.includes(span.op.op) && span.outcome !== "fail");
      const at = span.completion ?? span.invoke;
      if (!gone || at === undefined || span.op.vm === undefined) continue;
      const setId = span.op.setId ?? ctx.index.setOfVm(span.op.vm, at);
      if (setId !== undefined) ended.add(setId);
    }
    for (const i of ctx.finalState?.ioasids ?? []) {
      if (i.state !== "FREE_PENDING" && !ended.has(i.setId)) continue;
      const why = i.state === "FREE_PENDING" ? "freed" : "of a guest that is gone";
      const l = ctx.index.lifecycles.get(lifecycleKey(i.ioasid, i.generation));
      // The generation's core records (its events and reference changes) show who took what.
      const evidence = l === undefined ? [] : [...l.events, ...l.refs].sort((a, b) => a - b).slice(-12);
      out.push({
        ioasid: i.ioasid,
        generation: i.generation,
        setId: i.setId,
        message: `final state: IOASID ${i.ioasid} generation ${i.generation} (set ${i.setId}), ${why}, is still ${i.state} after every component was back, held by ${(i.holders ?? []).join(", ") || "nobody"}`,
        facts: [`IOASID ${i.ioasid}#${i.generation} set ${i.setId} ${i.state} refcount ${i.refcount ?? "?"}`],
        evidence,
      });
    }
    const lastHeal = ctx.index.lastHeal === undefined ? -Infinity : ts(ctx, ctx.index.lastHeal);
    for (const span of ctx.index.ops) {
      if (!ctx.options.crashOps.includes(span.op.op) || span.outcome === "fail") continue;
      const at = span.completion ?? span.invoke;
      if (at === undefined || span.op.vm === undefined) continue;
      const setId = span.op.setId ?? ctx.index.setOfVm(span.op.vm, at);
      if (setId === undefined) {
        ctx.note(`L2: crash of VM ${span.op.vm} (op ${span.opId}): its set is not in the chaos records, its IOASIDs are not checked`);
        continue;
      }
      const deadline = Math.max(ts(ctx, at), lastHeal) + ctx.options.reclaimBoundMs;
      for (const l of lifecycles(ctx)) {
        if (l.setId !== setId || l.alloc === undefined || l.alloc > at || (l.reclaims[0] !== undefined && l.reclaims[0] < at)) continue;
        const reclaim = l.reclaims[0];
        if (reclaim === undefined) {
          if (liveAtEnd(ctx, l.ioasid, l.generation) === false) {
            ctx.note(`L2: ${name(l)} of crashed VM ${span.op.vm} is gone in the final state but its RECLAIM is not in the history (time unknown)`);
            continue;
          }
          const decided = liveAtEnd(ctx, l.ioasid, l.generation) === true; // still live at the end: no record loss explains it
          out.push({
            ...subject(l),
            message: `${name(l)} of crashed VM ${span.op.vm} was never reclaimed`,
            evidence: [l.alloc, at, ...(l.frees[0] === undefined ? [] : [l.frees[0]])],
            ...(decided ? {} : { absence: { role: CORE_ROLE, from: ts(ctx, at), to: Infinity } }),
          });
        } else if (ts(ctx, reclaim) > deadline) {
          out.push({
            ...subject(l),
            message: `${name(l)} of crashed VM ${span.op.vm} reclaimed ${(ts(ctx, reclaim) - deadline + ctx.options.reclaimBoundMs).toFixed(0)} ms after the crash or last heal, over the bound of ${ctx.options.reclaimBoundMs} ms`,
            evidence: [at, ...(ctx.index.lastHeal === undefined ? [] : [ctx.index.lastHeal]), reclaim],
          });
        }
      }
    }
    return out;
  },
};

const L3: Rule = {
  invariant: "L3",
  description:
    "every IOMMU iopf_group has an IOMMU page_response after it (same instance and group id), within faultAnswerBoundMs of max(group, last heal) when that bound is set; the final state has no outstanding group",
  check(ctx) {
    const out: Finding[] = [];
    const lastHeal = ctx.index.lastHeal === undefined ? -Infinity : ts(ctx, ctx.index.lastHeal);
    const byKey = new Map<string, GroupRecord[]>();
    for (const g of ctx.index.groups) {
      if (!g.key.startsWith("iommu/")) continue;
      let list = byKey.get(g.key);
      if (list === undefined) byKey.set(g.key, (list = []));
      list.push(g);
    }
    const next = new Map<GroupRecord, GroupRecord | undefined>();
    for (const list of byKey.values()) list.forEach((g, i) => next.set(g, list[i + 1]));
    ctx.index.groups.forEach((g) => {
      if (g.kind !== "group" || !g.key.startsWith("iommu/")) return;
      const answer = next.get(g);
      const l = ctx.index.lifecycleOf(g.idx);
      const ids = l === undefined ? {} : subject(l);
      if (answer === undefined || answer.kind !== "response") {
        out.push({
          ...ids,
          message: `fault group ${g.groupId} (${g.key.split("/").slice(0, 2).join("/")}) never answered`,
          evidence: [g.idx],
          // An IOMMU kill forgets the group (the violation itself); only a lost link can lose the answer's record.
          absence: { role: "iommu", from: ts(ctx, g.idx), to: Infinity, kills: false },
        });
        return;
      }
      const bound = ctx.options.faultAnswerBoundMs;
      if (bound !== undefined && ts(ctx, answer.idx) > Math.max(ts(ctx, g.idx), lastHeal) + bound) {
        out.push({ ...ids, message: `fault group ${g.groupId} answered after the bound of ${bound} ms`, evidence: [g.idx, answer.idx] });
      }
    });
    for (const g of ctx.finalState?.faultGroups ?? []) {
      out.push({
        ...(g.ioasid === undefined ? {} : { ioasid: g.ioasid }),
        ...(g.generation === undefined ? {} : { generation: g.generation }),
        message: `final state: fault group ${g.faultGroupId} is still outstanding`,
        evidence: [],
        facts: [`${g.instance ?? "iommu"} fault group ${g.faultGroupId}${g.ioasid === undefined ? "" : ` IOASID ${g.ioasid}`}`],
      });
    }
    return out;
  },
};

const L4: Rule = {
  invariant: "L4",
  description:
    "a registration the core recorded pending (ioasid_register_notifier_mm … (pending)) whose MM token's set then appears (VFIO container_open) receives that set's events: every event:BIND of the set after it, for a generation never freed, is followed by a record of the subscriber instance for that generation (its table change, or an ioasid_get it holds) — unless the subscriber instance was destroyed (…destroy_vm); in the final state a registration whose token has a set is active on it. Activation itself is not recorded",
  check(ctx) {
    const out: Finding[] = [];
    const records = ctx.index.records;
    for (const reg of ctx.index.pendingRegistrations) {
      const mine = (r: HistoryRecord) => r.role === reg.subscriber && r.instance === reg.instance;
      if (records.some((r, i) => i > reg.idx && mine(r) && r.action?.$case === "kvmDestroyVm")) continue;
      const c = ctx.index.containers.find((x) => x.mmToken === reg.mmToken && x.idx > reg.idx);
      if (c === undefined) continue;
      const setFree = records.findIndex((r, i) => i > c.idx && r.role === CORE_ROLE && eventOf(r) === "SET_FREE" && r.setId === c.setId);
      const until = setFree < 0 ? records.length : setFree;
      for (const l of lifecycles(ctx)) {
        if (l.setId !== c.setId || l.frees.length > 0) continue;
        for (const b of l.bindings) {
          if (b < c.idx || b > until || eventOf(rec(ctx, b)) !== "BIND") continue;
          const handled = ctx.index.membersOf(l.key).some((i) => {
            const r = rec(ctx, i);
            if (i <= b) return false;
            if (mine(r)) return true;
            const h = r.role === CORE_ROLE ? ctx.index.holderOf(i) : undefined;
            return h !== undefined && h.role === reg.subscriber && h.instance === reg.instance;
          });
          if (!handled) {
            out.push({
              ...subject(l),
              message: `${reg.subscriber}/${reg.instance} registered pending for mm ${reg.mmToken}; set ${c.setId} appeared, but it never handled the BIND of ${name(l)}`,
              evidence: [reg.idx, c.idx, b],
              absence: { role: reg.subscriber, from: ts(ctx, b), to: Infinity },
            });
          }
        }
      }
    }
    const f = ctx.finalState;
    for (const reg of f?.registrations ?? []) {
      if (reg.mmToken === undefined) continue;
      const set = f!.sets.find((s) => s.mmToken === reg.mmToken);
      if (set === undefined || (reg.active && reg.setId === set.setId)) continue;
      out.push({
        setId: set.setId,
        message: `final state: ${reg.subscriber}/${reg.instance}'s registration for mm ${reg.mmToken} is ${reg.active ? `active on set ${reg.setId}` : "pending"} while set ${set.setId} has that token`,
        evidence: [],
        facts: [`registration ${reg.subscriber}/${reg.instance} mm ${reg.mmToken} ${reg.active ? "active" : "pending"} set ${reg.setId}`, `set ${set.setId} mm ${set.mmToken}`],
      });
    }
    return out;
  },
};

/** The checker's rules, one per invariant of DESIGN §7, in order. */
export const RULES: readonly Rule[] = [S1, S2, S3, S4, S5, S6, S7, S8, S9, L1, L2, L3, L4];
