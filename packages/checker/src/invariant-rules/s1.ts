import { eventOf } from "@ioasid/bus";
import { CORE_ROLE, type Lifecycle } from "../history-index.js";
import { rec, ts, name, subject, lifecycles, type Finding, type Rule } from "./rule-kit.js";

export const S1: Rule = {
  invariant: "S1",
  order: "the core's own records (its get/put, ALLOC, FREE, RECLAIM), in the core's order: op-log sequence, then its publisher sequence",
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
        out.push({
          ...subject(l),
          message: `${name(l)} reclaimed while the core's count stood at ${rc}`,
          evidence: [last!, reclaim],
          absence: { role: CORE_ROLE, from: ts(ctx, last!), to: ts(ctx, reclaim) },
        });
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
          const lastRef = [...prev.refs, ...prev.frees]
            .filter((x) => x < next.alloc!)
            .sort((a, b) => a - b)
            .at(-1);
          const lastSeen =
            ctx.index
              .membersOf(prev.key)
              .filter((x) => x < next.alloc!)
              .at(-1) ?? prev.alloc!;
          out.push({
            ...subject(next),
            message: `${name(next)} allocated while ${name(prev)} was not reclaimed${lastRef === undefined ? "" : ` (count ${String(rec(ctx, lastRef).refcount)})`}`,
            evidence: [prev.alloc!, ...(lastRef === undefined ? [] : [lastRef]), next.alloc!],
            ...(prevEnd === undefined ? { absence: { role: CORE_ROLE, from: ts(ctx, lastSeen), to: ts(ctx, next.alloc!) } } : {}),
          });
        }
        if (next.generation <= prev.generation) {
          out.push({
            ...subject(next),
            message: `${name(next)} allocated after generation ${prev.generation}: generations must grow`,
            evidence: [prev.alloc!, next.alloc!],
          });
        }
      }
    }
    return out;
  },
};
