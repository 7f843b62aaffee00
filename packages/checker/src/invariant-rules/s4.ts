import { eventOf } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { CORE_ROLE, lifecycleKey, type Lifecycle } from "../history-index.js";
import { rec, ts, notAfter, name, who, subject, type Finding, type Rule } from "./rule-kit.js";

export const S4: Rule = {
  invariant: "S4",
  order:
    "the core's events in the core's order; a KVM install or VDCM vdev_write after its BIND by happens-before (event → handling, the core's answer to the call that took the reference), by time only where the history does not connect them",
  description:
    "event:BIND of (set, SPID) only while no other IOASID holds that (set, SPID) (held from its BIND to its UNBIND, FREE or RECLAIM); every KVM install and VDCM vdev_write translating (set, SPID) to an IOASID follows a BIND of that IOASID with that SPID; in the final state no two live IOASIDs of a set share a SPID",
  check(ctx) {
    const out: Finding[] = [];
    const live = new Map<string, { l: Lifecycle; idx: number }>();
    const heldBy = new Map<string, string>();
    ctx.index.records.forEach((r, idx) => {
      if (r.role !== CORE_ROLE || r.ioasid === undefined || r.generation === undefined) return;
      const l = ctx.index.lifecycles.get(lifecycleKey(r.ioasid, r.generation));
      if (l === undefined) return;
      if (eventOf(r) === "BIND" && r.setId !== undefined && r.spid !== undefined) {
        const k = `${r.setId}/${r.spid}`;
        const other = live.get(k);
        if (other !== undefined && other.l !== l) {
          out.push({
            ...subject(l),
            message: `SPID ${r.spid} of set ${r.setId} bound to ${name(l)} while still bound to ${name(other.l)}`,
            evidence: [other.idx, idx],
          });
        }
        live.set(k, { l, idx });
        heldBy.set(l.key, k);
      } else if (eventOf(r) === "UNBIND" || eventOf(r) === "FREE" || eventOf(r) === "RECLAIM") {
        const k = heldBy.get(l.key);
        if (k !== undefined && live.get(k)?.l === l) live.delete(k);
        heldBy.delete(l.key);
      }
    });
    ctx.index.records.forEach((r, idx) => {
      const translation =
        (r.role === "kvm" && r.action?.$case === "vmcsUpdate" && r.action.value.kind === h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL) ||
        (r.role === "vdcm" && r.action?.$case === "vdevWrite");
      if (!translation || r.spid === undefined) return;
      const l = ctx.index.lifecycleOf(idx);
      if (l?.alloc === undefined) return; // the generation began before the history: its BIND may be missing
      const bind = l.bindings.filter((b) => eventOf(rec(ctx, b)) === "BIND" && notAfter(ctx, b, idx)).at(-1);
      if (bind === undefined || rec(ctx, bind).spid !== r.spid) {
        out.push({
          ...subject(l),
          message: `${who(r)} translated SPID ${r.spid} to ${name(l)}, ${bind === undefined ? "which was never bound" : `bound to SPID ${String(rec(ctx, bind).spid)}`}`,
          evidence: [...(bind === undefined ? [] : [bind]), idx],
          ...(bind === undefined ? { absence: { role: CORE_ROLE, from: ts(ctx, l.alloc), to: ts(ctx, idx) } } : {}),
        });
      }
    });
    const seen = new Map<string, number>();
    for (const i of ctx.finalState?.ioasids ?? []) {
      if (i.spid === undefined || i.spid === 0) continue;
      const k = `${i.setId}/${i.spid}`;
      const other = seen.get(k);
      if (other !== undefined) {
        out.push({
          ioasid: i.ioasid,
          setId: i.setId,
          message: `final state: SPID ${i.spid} of set ${i.setId} maps to IOASIDs ${other} and ${i.ioasid}`,
          evidence: [],
          facts: [`set ${i.setId} SPID ${i.spid} → ${other}`, `set ${i.setId} SPID ${i.spid} → ${i.ioasid}`],
        });
      }
      seen.set(k, i.ioasid);
    }
    return out;
  },
};
