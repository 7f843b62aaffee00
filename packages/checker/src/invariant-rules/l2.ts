import { CORE_ROLE, lifecycleKey } from "../history-index.js";
import { ts, name, subject, lifecycles, liveAtEnd, type Finding, type Rule } from "./rule-kit.js";

export const L2: Rule = {
  invariant: "L2",
  order:
    "time for the bound (the driver's crash record to the core's RECLAIM: a clock skew between those hosts adds to or takes from it); which generations the crash concerns by the causal order",
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
