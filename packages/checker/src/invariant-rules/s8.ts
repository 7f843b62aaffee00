import { eventOf, stepLabel } from "@ioasid/bus";
import { CORE_ROLE } from "../history-index.js";
import { rec, ts, name, subject, lifecycles, type Finding, type Rule } from "./rule-kit.js";

export const S8: Rule = {
  invariant: "S8",
  order: "the core's own records, in the core's order (op-log sequence)",
  description:
    "per IOASID generation at most one event:ALLOC, one event:FREE and one event:RECLAIM; BIND and UNBIND alternate, starting with BIND, and none after FREE; no event before ALLOC or after RECLAIM; no two event records with one sequence number; per set, SET_ALLOC and SET_FREE alternate",
  check(ctx) {
    const out: Finding[] = [];
    for (const l of lifecycles(ctx)) {
      for (const [what, list] of [
        ["ALLOC", l.allocs],
        ["FREE", l.frees],
        ["RECLAIM", l.reclaims],
      ] as const) {
        if (list.length > 1) out.push({ ...subject(l), message: `${name(l)} has ${list.length} ${what} events for one transition`, evidence: [...list] });
      }
      let prev: number | undefined;
      for (const b of l.bindings) {
        const type = eventOf(rec(ctx, b));
        const prevType = prev === undefined ? undefined : eventOf(rec(ctx, prev));
        if (type === prevType) out.push({ ...subject(l), message: `${name(l)}: two ${type} events in a row`, evidence: [prev!, b] });
        else if (prevType === undefined && type === "UNBIND" && l.alloc !== undefined) {
          out.push({
            ...subject(l),
            message: `${name(l)}: UNBIND with no BIND before it`,
            evidence: [l.alloc, b],
            absence: { role: CORE_ROLE, from: ts(ctx, l.alloc), to: ts(ctx, b) },
          });
        }
        prev = b;
      }
      const free = l.frees[0];
      if (free !== undefined) {
        for (const b of l.bindings.filter((x) => x > free))
          out.push({ ...subject(l), message: `${name(l)}: ${eventOf(rec(ctx, b))} after FREE (the FREE covers it)`, evidence: [free, b] });
      }
      if (l.alloc !== undefined) {
        for (const e of l.events.filter((x) => x < l.alloc!))
          out.push({ ...subject(l), message: `${name(l)}: ${eventOf(rec(ctx, e))} before its ALLOC`, evidence: [e, l.alloc] });
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
        if (other !== undefined)
          out.push({
            ...(r.ioasid === undefined ? {} : { ioasid: r.ioasid }),
            message: `event sequence ${r.seq} recorded twice (${stepLabel(rec(ctx, other))}, ${stepLabel(r)})`,
            evidence: [other, idx],
          });
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
