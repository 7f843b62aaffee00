import { subject, type Finding, type Rule } from "./rule-kit.js";

export const S7: Rule = {
  invariant: "S7",
  order: "one IOMMU instance's own records, in its publisher order (its runs one after another)",
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
