import { lifecycleKey } from "../history-index.js";
import { name, who, subject, type Finding, type Rule } from "./rule-kit.js";

export const S3: Rule = {
  invariant: "S3",
  order: "no order between processes; a record without a generation belongs to the generation of its IOASID current at its place in the causal order",
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
