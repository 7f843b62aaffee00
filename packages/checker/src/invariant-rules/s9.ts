import { eventOf } from "@ioasid/bus";
import { lifecycleKey, type Lifecycle } from "../history-index.js";
import { rec, ts, notAfter, name, who, subject, liveAtEnd, type RuleContext, type Finding, type Rule } from "./rule-kit.js";

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

export const S9: Rule = {
  invariant: "S9",
  order:
    "happens-before between a role's entry set/clear or use and the core's RECLAIM (event → handling, delivery and ack links, the core's answers to calls); by time only where the history does not connect them",
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
        const cause =
          [...l.bindings, ...l.frees, ...guestTeardowns(ctx, l, e.role)].filter((x) => x > e.set && eventOf(rec(ctx, x)) !== "BIND").sort((a, b) => a - b)[0] ??
          e.set;
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
        out.push({
          ioasid: e.ioasid,
          ...(e.generation === undefined ? {} : { generation: e.generation }),
          message: `final state: ${fact} is live, but the core has no such live IOASID`,
          evidence: [],
          facts: [fact],
        });
      }
    }
    return out;
  },
};
