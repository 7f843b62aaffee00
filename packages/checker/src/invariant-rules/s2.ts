import { eventOf } from "@ioasid/bus";
import { rec, name, holderText, subject, lifecycles, type Finding, type Rule } from "./rule-kit.js";

export const S2: Rule = {
  invariant: "S2",
  order: "the core's own records, in the core's order (op-log sequence)",
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
