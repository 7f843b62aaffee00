import { eventOf, type HistoryRecord } from "@ioasid/bus";
import { ChaosOpName, parseChaosRecord } from "@ioasid/checker";
import type { FinalState } from "@ioasid/checker";

/** The figures of one chaos run, from its history (and final state). */
export interface ChaosRunStats {
  readonly records: number;
  readonly ops: {
    readonly ok: number;
    readonly fail: number;
    readonly info: number;
    /** Per op name: [ok, fail, info]. */
    readonly byOp: Readonly<Record<string, readonly [number, number, number]>>;
  };
  readonly faults: {
    readonly injected: number;
    readonly byKind: Readonly<Record<string, number>>;
    /** Services that went down without being faulted (`ioasid-core (exit)`), which the runner restarted. */
    readonly selfExits: readonly string[];
  };
  readonly guests: {
    /** VMMs started (`open` invoked). */
    readonly started: number;
    /** Containers opened. */
    readonly opened: number;
    /** Clean exits (`close` ok). */
    readonly closed: number;
    /** VMMs killed by the driver (planned crashes, and VMMs whose clean exit failed). */
    readonly crashed: number;
    /** VMMs whose session ended on its own (VFIO went away). */
    readonly lost: number;
  };
  /** The crashed-guest path (DESIGN §7 L2): crashed and lost guests' IOASIDs. */
  readonly reclaim: {
    /** Guests that crashed or lost their session, with their set known. */
    readonly guests: number;
    /** Of those, guests every IOASID of which was reclaimed. */
    readonly reclaimed: number;
    /** Guests (`g3 set 5`) with an IOASID not reclaimed. */
    readonly notReclaimed: readonly string[];
    /** IOASIDs the crashed guests held at their crashes (allocated, not yet reclaimed). */
    readonly ioasids: number;
    /**
     * Longest time from a crash to the reclaim of the crashed guest's last IOASID, in ms. The crash
     * is the driver's SIGKILL of the VMM (the crash operation's invoke, recorded in the same tick as
     * the signal is sent), the reclaim the core's RECLAIM record: a driver starved after sending
     * the signal (a busy machine) neither shortens nor lengthens it.
     */
    readonly maxAfterCrashMs: number | undefined;
    /** Longest time from max(crash, last heal) to that reclaim (the L2 clock), in ms; 0 when all were reclaimed before the heal. */
    readonly maxAfterHealMs: number | undefined;
  };
}

/**
 * Computes the figures of a run from its history: the driver's operations and faults (its chaos
 * records), and for every guest that crashed (or lost its session) the time until the last
 * IOASID its set had at the crash was reclaimed (`event:RECLAIM`), measured from the crash and
 * from max(crash, last heal). An IOASID without a recorded RECLAIM counts as reclaimed when the
 * final state, if given, no longer lists it (its time then unknown). Pure.
 */
export function computeRunStats(history: readonly HistoryRecord[], finalState?: FinalState): ChaosRunStats {
  const records = [...history].sort((a, b) => a.ts - b.ts);
  const byOp = new Map<string, [number, number, number]>();
  const byKind = new Map<string, number>();
  const guests = { started: 0, opened: 0, closed: 0, crashed: 0, lost: 0 };
  const setOfVm = new Map<string, number>();
  const crashes: Array<{ vm: string; setId: number | undefined; ts: number }> = [];
  // Crash invokes by opId: the moment the driver sent SIGKILL.
  const crashInvokes = new Map<number, number>();
  let lastHeal = -Infinity;
  const allocs = new Map<number, Array<{ ioasid: number; generation: number; ts: number }>>();
  const reclaims = new Map<string, number>();
  const selfExits: string[] = [];

  for (const r of records) {
    if (r.role === "ioasid" && eventOf(r) === "ALLOC" && r.setId !== undefined && r.ioasid !== undefined && r.generation !== undefined) {
      let list = allocs.get(r.setId);
      if (list === undefined) allocs.set(r.setId, (list = []));
      list.push({ ioasid: r.ioasid, generation: r.generation, ts: r.ts });
    }
    if (r.role === "ioasid" && eventOf(r) === "RECLAIM" && r.ioasid !== undefined && r.generation !== undefined) {
      const k = `${r.ioasid}#${r.generation}`;
      if (!reclaims.has(k)) reclaims.set(k, r.ts);
    }
    const e = parseChaosRecord(r);
    if (e === undefined) continue;
    if (e.kind === "fault" && e.marker.cause === undefined) byKind.set(e.marker.fault, (byKind.get(e.marker.fault) ?? 0) + 1);
    if (e.kind === "fault" && e.marker.cause !== undefined) selfExits.push(`${e.marker.target} (${e.marker.cause})`);
    if (e.kind === "heal") lastHeal = r.ts;
    if (e.kind !== "op") continue;
    const { op } = e;
    if (e.action === "invoke") {
      if (op.op === ChaosOpName.OPEN) guests.started++;
      if (op.op === ChaosOpName.CRASH) crashInvokes.set(op.opId, r.ts);
      continue;
    }
    const counts = byOp.get(op.op) ?? [0, 0, 0];
    counts[e.action === "ok" ? 0 : e.action === "fail" ? 1 : 2]++;
    byOp.set(op.op, counts);
    if (op.op === ChaosOpName.OPEN && e.action === "ok") {
      guests.opened++;
      if (op.vm !== undefined && op.setId !== undefined) setOfVm.set(op.vm, op.setId);
    }
    if (op.op === ChaosOpName.CLOSE && e.action === "ok") guests.closed++;
    if (op.op === ChaosOpName.CRASH && e.action !== "fail" && op.vm !== undefined) {
      if (op.error?.startsWith("session lost") === true) guests.lost++;
      else guests.crashed++;
      // From the signal, not from when the driver saw the VMM gone (that may be late on a busy
      // machine, and would shorten the figure by the driver's own delay).
      crashes.push({ vm: op.vm, setId: op.setId ?? setOfVm.get(op.vm), ts: Math.min(r.ts, crashInvokes.get(op.opId) ?? r.ts) });
    }
  }

  let reclaimed = 0;
  let ioasids = 0;
  const notReclaimed: string[] = [];
  let maxAfterCrashMs: number | undefined;
  let maxAfterHealMs: number | undefined;
  const withSet = crashes.filter((c) => c.setId !== undefined);
  for (const c of withSet) {
    let last = c.ts;
    let all = true;
    for (const a of allocs.get(c.setId!) ?? []) {
      if (a.ts > c.ts) continue;
      const at = reclaims.get(`${a.ioasid}#${a.generation}`);
      if (at !== undefined && at < c.ts) continue; // reclaimed before the crash
      ioasids++;
      if (at !== undefined) last = Math.max(last, at);
      else if (finalState?.ioasids === undefined || finalState.ioasids.some((i) => i.ioasid === a.ioasid && i.generation === a.generation)) all = false;
    }
    if (!all) {
      notReclaimed.push(`${c.vm} set ${c.setId}`);
      continue;
    }
    reclaimed++;
    maxAfterCrashMs = Math.max(maxAfterCrashMs ?? 0, last - c.ts);
    maxAfterHealMs = Math.max(maxAfterHealMs ?? 0, last - Math.max(c.ts, lastHeal));
  }

  let ok = 0;
  let fail = 0;
  let info = 0;
  for (const [a, b, x] of byOp.values()) {
    ok += a;
    fail += b;
    info += x;
  }
  const kinds = Object.fromEntries(byKind);
  return {
    records: records.length,
    ops: { ok, fail, info, byOp: Object.fromEntries(byOp) },
    faults: { injected: Object.values(kinds).reduce((s, n) => s + n, 0), byKind: kinds, selfExits },
    guests,
    reclaim: { guests: withSet.length, reclaimed, ioasids, notReclaimed, maxAfterCrashMs: round(maxAfterCrashMs), maxAfterHealMs: round(maxAfterHealMs) },
  };
}

function round(x: number | undefined): number | undefined {
  return x === undefined ? undefined : Math.round(x);
}

/** The summary of a run in a few lines (what `ioasidctl chaos run` prints under the verdict). */
export function renderStats(s: ChaosRunStats): string {
  const ops = Object.entries(s.ops.byOp)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([op, [ok, fail, info]]) => `${op} ${ok}/${fail}/${info}`)
    .join(", ");
  const kinds = Object.entries(s.faults.byKind)
    .map(([k, n]) => `${k} ${n}`)
    .join(", ");
  const r = s.reclaim;
  return [
    `operations: ${s.ops.ok} ok, ${s.ops.fail} fail, ${s.ops.info} info (ok/fail/info: ${ops || "none"})`,
    `faults injected: ${s.faults.injected}${kinds === "" ? "" : ` (${kinds})`}${s.faults.selfExits.length === 0 ? "" : `; services that exited on their own and were restarted: ${s.faults.selfExits.join(", ")}`}`,
    `guests: ${s.guests.started} started, ${s.guests.opened} opened, ${s.guests.closed} closed cleanly, ${s.guests.crashed} crashed, ${s.guests.lost} lost their session`,
    `crashed guests reclaimed: ${r.reclaimed}/${r.guests} (holding ${r.ioasids} IOASIDs at their crashes)` +
      (r.maxAfterCrashMs === undefined ? "" : `; max ${r.maxAfterCrashMs} ms after the crash, max ${r.maxAfterHealMs} ms after max(crash, last heal)`) +
      (r.notReclaimed.length === 0 ? "" : `; NOT reclaimed: ${r.notReclaimed.join(", ")}`),
    `history: ${s.records} records`,
  ].join("\n");
}
