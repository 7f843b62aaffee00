import { ChaosTarget } from "../chaos-record.js";
import { ts, SELF_EXIT_LEAD_MS, RECONNECT_GRACE_MS, type RuleContext, type Finding, type Rule } from "./rule-kit.js";

/** Fault targets on a free's path (VMM → VFIO → core → NATS): a free may fail or hang while they are down. */
const FREE_PATH: ReadonlySet<string> = new Set([ChaosTarget.CORE, ChaosTarget.NATS, ChaosTarget.VFIO]);

function faultOverlaps(ctx: RuleContext, targets: ReadonlySet<string>, from: number, to: number): boolean {
  return ctx.index.faults.some((f) => {
    const start = ts(ctx, f.start) - (f.marker.cause === "exit" ? SELF_EXIT_LEAD_MS : 0);
    const grace = f.marker.fault === "kill-restart" ? RECONNECT_GRACE_MS : 0;
    return targets.has(f.marker.target) && start <= to && (f.end === undefined || ts(ctx, f.end) + grace >= from);
  });
}

export const L1: Rule = {
  invariant: "L1",
  order: "time: a free's latency is the driver's own clock (invoke → completion); faults overlap it by the driver's clock too",
  description:
    "every chaos free (invoke → ok/fail) takes at most freeLatencyBoundMs (latencyMs, else the records' times); a free that never completes or completes `info` is a violation, unless a fault on its own path (ioasid-core, nats, vfio) overlapped it — subscribers' faults excuse nothing",
  check(ctx) {
    const out: Finding[] = [];
    const end = ctx.index.endTs ?? 0;
    for (const span of ctx.index.ops) {
      if (!ctx.options.freeOps.includes(span.op.op)) continue;
      const from = span.invoke === undefined ? undefined : ts(ctx, span.invoke);
      if (from === undefined) continue;
      const to = span.completion === undefined ? end : ts(ctx, span.completion);
      const excused = faultOverlaps(ctx, FREE_PATH, from, to);
      const what = `free (op ${span.opId}${span.op.vm === undefined ? "" : `, VM ${span.op.vm}`}${span.op.ioasid === undefined ? "" : `, IOASID ${span.op.ioasid}`})`;
      const evidence = [span.invoke!, ...(span.completion === undefined ? [] : [span.completion])];
      const ids =
        span.op.ioasid === undefined ? {} : { ioasid: span.op.ioasid, ...(span.op.generation === undefined ? {} : { generation: span.op.generation }) };
      if (span.outcome === "ok" || span.outcome === "fail") {
        const latency = span.op.latencyMs ?? to - from;
        if (latency > ctx.options.freeLatencyBoundMs && !excused)
          out.push({ ...ids, message: `${what} took ${latency.toFixed(1)} ms, over the bound of ${ctx.options.freeLatencyBoundMs} ms`, evidence });
      } else if (!excused) {
        out.push({ ...ids, message: `${what} ${span.outcome === "info" ? "ended indeterminate" : "never returned"} with no fault on its path`, evidence });
      }
    }
    return out;
  },
};
