import { lifecycles, type Finding, type Rule } from "./rule-kit.js";

export const S6: Rule = {
  invariant: "S6",
  order: "the core's ALLOC and RECLAIM in the core's order, from VFIO's container_open on (its place in the causal order)",
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
          facts: [
            `capacity ${f.capacity}, reserved ${reserved}, available ${f.available}`,
            ...f.sets.map((s) => `set ${s.setId} quota ${s.quota} in use ${s.inUse}`),
          ],
        });
      }
      for (const s of f.sets) {
        if (s.inUse > s.quota)
          out.push({
            setId: s.setId,
            message: `final state: set ${s.setId} has ${s.inUse} in use over its quota of ${s.quota}`,
            evidence: [],
            facts: [`set ${s.setId} quota ${s.quota} in use ${s.inUse}`],
          });
        if (f.ioasids !== undefined) {
          const n = f.ioasids.filter((i) => i.setId === s.setId).length;
          if (n !== s.inUse)
            out.push({
              setId: s.setId,
              message: `final state: set ${s.setId} says ${s.inUse} in use, but ${n} of its IOASIDs are live`,
              evidence: [],
              facts: [`set ${s.setId} in use ${s.inUse}`, `live IOASIDs of set ${s.setId}: ${n}`],
            });
        }
      }
      for (const i of f.ioasids ?? []) {
        if (!f.sets.some((s) => s.setId === i.setId))
          out.push({
            ioasid: i.ioasid,
            setId: i.setId,
            message: `final state: IOASID ${i.ioasid} is live in set ${i.setId}, which does not exist`,
            evidence: [],
            facts: [`IOASID ${i.ioasid} set ${i.setId}`],
          });
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
