import { eventOf, type HistoryRecord } from "@ioasid/bus";
import { CORE_ROLE } from "../history-index.js";
import { rec, ts, name, subject, lifecycles, type Finding, type Rule } from "./rule-kit.js";

export const L4: Rule = {
  invariant: "L4",
  order: "the causal order: registration → container_open → BIND → the subscriber's handling",
  description:
    "a registration the core recorded pending (ioasid_register_notifier_mm … (pending)) whose MM token's set then appears (VFIO container_open) receives that set's events: every event:BIND of the set after it, for a generation never freed, is followed by a record of the subscriber instance for that generation (its table change, or an ioasid_get it holds) — unless the subscriber instance was destroyed (…destroy_vm); in the final state a registration whose token has a set is active on it. Activation itself is not recorded",
  check(ctx) {
    const out: Finding[] = [];
    const records = ctx.index.records;
    for (const reg of ctx.index.pendingRegistrations) {
      const mine = (r: HistoryRecord) => r.role === reg.subscriber && r.instance === reg.instance;
      if (records.some((r, i) => i > reg.idx && mine(r) && r.action?.$case === "kvmDestroyVm")) continue;
      const c = ctx.index.containers.find((x) => x.mmToken === reg.mmToken && x.idx > reg.idx);
      if (c === undefined) continue;
      const setFree = records.findIndex((r, i) => i > c.idx && r.role === CORE_ROLE && eventOf(r) === "SET_FREE" && r.setId === c.setId);
      const until = setFree < 0 ? records.length : setFree;
      for (const l of lifecycles(ctx)) {
        if (l.setId !== c.setId || l.frees.length > 0) continue;
        for (const b of l.bindings) {
          if (b < c.idx || b > until || eventOf(rec(ctx, b)) !== "BIND") continue;
          const handled = ctx.index.membersOf(l.key).some((i) => {
            const r = rec(ctx, i);
            if (i <= b) return false;
            if (mine(r)) return true;
            const h = r.role === CORE_ROLE ? ctx.index.holderOf(i) : undefined;
            return h !== undefined && h.role === reg.subscriber && h.instance === reg.instance;
          });
          if (!handled) {
            out.push({
              ...subject(l),
              message: `${reg.subscriber}/${reg.instance} registered pending for mm ${reg.mmToken}; set ${c.setId} appeared, but it never handled the BIND of ${name(l)}`,
              evidence: [reg.idx, c.idx, b],
              absence: { role: reg.subscriber, from: ts(ctx, b), to: Infinity },
            });
          }
        }
      }
    }
    const f = ctx.finalState;
    for (const reg of f?.registrations ?? []) {
      if (reg.mmToken === undefined) continue;
      const set = f!.sets.find((s) => s.mmToken === reg.mmToken);
      if (set === undefined || (reg.active && reg.setId === set.setId)) continue;
      out.push({
        setId: set.setId,
        message: `final state: ${reg.subscriber}/${reg.instance}'s registration for mm ${reg.mmToken} is ${reg.active ? `active on set ${reg.setId}` : "pending"} while set ${set.setId} has that token`,
        evidence: [],
        facts: [
          `registration ${reg.subscriber}/${reg.instance} mm ${reg.mmToken} ${reg.active ? "active" : "pending"} set ${reg.setId}`,
          `set ${set.setId} mm ${set.mmToken}`,
        ],
      });
    }
    return out;
  },
};
