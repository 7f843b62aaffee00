import type { HistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { CORE_ROLE } from "../history-index.js";
import { rec, ts, notAfter, name, who, holderText, subject, lifecycles, type Finding, type Rule } from "./rule-kit.js";

/** The tiers of a FREE's teardown, in the order DESIGN §5 and the IOASID document require. */
const TEARDOWN_STAGES: ReadonlyArray<{ readonly name: string; readonly match: (r: HistoryRecord) => boolean }> = [
  {
    name: "KVM entry cleared",
    match: (r) => r.role === "kvm" && r.action?.$case === "vmcsUpdate" && r.action.value.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR,
  },
  { name: "device drained/cleared", match: (r) => r.role === "vdcm" && r.action?.$case === "vdevClear" },
  { name: "IOMMU entry torn down and flushed", match: (r) => r.role === "iommu" && (r.action?.$case === "teardownPasid" || r.action?.$case === "iotlbFlush") },
  { name: "faults answered", match: (r) => r.role === "iommu" && r.action?.$case === "pageResponse" },
];

export const S5: Rule = {
  invariant: "S5",
  order:
    "happens-before: event → handling, each delivery after the core's position when it was sent (a higher tier's delivery_acked among them), each release after the holder's position at its ack; by time (within the clock tolerance) only where the history does not connect two records",
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
              missedDelivery: {
                role: rec(ctx, late).role,
                instance: rec(ctx, late).instance,
                seq,
                before: early,
                from: ts(ctx, free),
                to: ts(ctx, late),
              },
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
          out.push({
            ...subject(l),
            message: `${name(l)}: ${holderText(rec(ctx, p))} released its reference before its own teardown (${who(rec(ctx, pending[0]!))})`,
            evidence: [free, p, pending[0]!],
          });
        }
      }
      if (reclaim === undefined) continue;
      const late = stages.flat().find((x) => !notAfter(ctx, x, reclaim));
      if (late !== undefined)
        out.push({ ...subject(l), message: `${name(l)} reclaimed before its teardown finished (${who(rec(ctx, late))})`, evidence: [free, reclaim, late] });
      const lateAnswer = ctx.index.membersOf(l.key).find((idx) => {
        const r = rec(ctx, idx);
        return r.role === "iommu" && r.action?.$case === "pageResponse" && idx > free && !stages[3]!.includes(idx) && !notAfter(ctx, idx, reclaim);
      });
      if (lateAnswer !== undefined)
        out.push({ ...subject(l), message: `${name(l)} reclaimed before a fault group of it was answered`, evidence: [free, reclaim, lateAnswer] });
    }
    return out;
  },
};
