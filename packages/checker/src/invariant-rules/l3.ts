import type { GroupRecord } from "../history-index.js";
import { ts, subject, type Finding, type Rule } from "./rule-kit.js";

export const L3: Rule = {
  invariant: "L3",
  order: "one IOMMU instance's records in its publisher order (the answer after the group); the bound, when set, by time",
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
