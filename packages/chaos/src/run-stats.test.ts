import { createHistoryRecord, eventOf, eventTypeOf, type HistoryRecord } from "@ioasid/bus";
import { describe, expect, it } from "vitest";
import { ChaosJournal, DefiniteFailure, outcomeOf } from "./chaos-journal.js";
import { createChaosRecord, parseChaosRecord, type ChaosDetail } from "@ioasid/checker";
import { renderChaosReport } from "./chaos-report.js";
import { check } from "@ioasid/checker";
import { computeRunStats, renderStats } from "./run-stats.js";
import { DomainError, Code } from "@ioasid/errors";

const chaos = (ts: number, action: "invoke" | "ok" | "fail" | "info", detail: ChaosDetail) => createChaosRecord(action, detail, { ts });
/** A core event record ("event:ALLOC"). */
const core = (ts: number, event: `event:${string}`, fields: Partial<HistoryRecord>): HistoryRecord =>
  createHistoryRecord({ role: "ioasid", instance: "core" }, { $case: "ioasidNotify", value: { type: eventTypeOf(event.slice(6)) } }, fields, ts);

/** g1 opens set 3, allocates 201 and 202, crashes at 2000; 201 is reclaimed at 2300, 202 at 2600; a fault heals at 2100. */
function crashedGuest(): HistoryRecord[] {
  return [
    chaos(1000, "invoke", { op: "open", opId: 1, vm: "g1" }),
    chaos(1010, "ok", { op: "open", opId: 1, vm: "g1", setId: 3, latencyMs: 10 }),
    core(1100, "event:ALLOC", { ioasid: 201, generation: 1, setId: 3, refcount: 1, seq: 1 }),
    core(1200, "event:ALLOC", { ioasid: 202, generation: 1, setId: 3, refcount: 1, seq: 2 }),
    chaos(1500, "info", { fault: "kill-restart", target: "vdcm", faultId: 1 }),
    chaos(2000, "invoke", { op: "crash", opId: 2, vm: "g1", setId: 3 }),
    chaos(2005, "ok", { op: "crash", opId: 2, vm: "g1", setId: 3, latencyMs: 5 }),
    chaos(2100, "info", { heal: true, faultId: 1 }),
    core(2300, "event:RECLAIM", { ioasid: 201, generation: 1, setId: 3, refcount: 0, seq: 5 }),
    core(2600, "event:RECLAIM", { ioasid: 202, generation: 1, setId: 3, refcount: 0, seq: 6 }),
    chaos(2700, "info", { fault: "kill-restart", target: "ioasid-core", faultId: 100_001, cause: "exit" }),
  ];
}

describe("computeRunStats", () => {
  it("counts operations by outcome, injected faults by kind, and guests by how they ended", () => {
    const s = computeRunStats(crashedGuest());
    expect(s.ops).toEqual({ ok: 2, fail: 0, info: 0, byOp: { open: [1, 0, 0], crash: [1, 0, 0] } });
    expect(s.faults).toEqual({ injected: 1, byKind: { "kill-restart": 1 }, selfExits: ["ioasid-core (exit)"] });
    expect(s.guests).toEqual({ started: 1, opened: 1, closed: 0, crashed: 1, lost: 0 });
  });

  it("times the crashed guest's last reclaim from the crash and from max(crash, last heal)", () => {
    const s = computeRunStats(crashedGuest());
    expect(s.reclaim).toEqual({ guests: 1, reclaimed: 1, ioasids: 2, notReclaimed: [], maxAfterCrashMs: 600, maxAfterHealMs: 500 });
  });

  it("times a crash from the SIGKILL (its invoke), not from when a starved driver saw the VMM gone", () => {
    // The driver sent SIGKILL at 2000 but, starved, recorded the VMM's exit only at 2550.
    const late = crashedGuest().map((r) => {
      const e = parseChaosRecord(r);
      return e?.kind === "op" && e.op.op === "crash" && e.action === "ok" ? { ...r, ts: 2550 } : r;
    });
    expect(computeRunStats(late).reclaim).toMatchObject({ maxAfterCrashMs: 600, maxAfterHealMs: 500 });
  });

  it("reports a crashed guest with an IOASID never reclaimed, unless the final state shows it gone", () => {
    const history = crashedGuest().filter((r) => !(eventOf(r) === "RECLAIM" && r.ioasid === 202));
    expect(computeRunStats(history).reclaim.notReclaimed).toEqual(["g1 set 3"]);
    const gone = computeRunStats(history, { capacity: 1024, available: 1023, sets: [], ioasids: [] });
    expect(gone.reclaim.reclaimed).toBe(1);
    const live = computeRunStats(history, {
      capacity: 1024,
      available: 1015,
      sets: [{ setId: 3, quota: 8, inUse: 1 }],
      ioasids: [{ ioasid: 202, generation: 1, setId: 3, state: "FREE_PENDING", refcount: 1 }],
    });
    expect(live.reclaim.notReclaimed).toEqual(["g1 set 3"]);
    expect(renderStats(live)).toMatch(/crashed guests reclaimed: 0\/1 \(holding 2 IOASIDs at their crashes\); NOT reclaimed: g1 set 3/);
  });

  it("counts a lost session as its own end", () => {
    const s = computeRunStats([
      ...crashedGuest().slice(0, 4),
      chaos(3000, "invoke", { op: "crash", opId: 9, vm: "g1" }),
      chaos(3000, "info", { op: "crash", opId: 9, vm: "g1", error: "session lost: the VMM exited" }),
    ]);
    expect(s.guests).toMatchObject({ crashed: 0, lost: 1 });
    expect(s.reclaim.guests).toBe(1);
  });
});

describe("ChaosJournal", () => {
  it("records invoke then the completion with its latency, counts outcomes, and sorts a failure as fail or info", async () => {
    const j = new ChaosJournal(undefined);
    const ok = await j.run(
      { op: "alloc", vm: "g1", setId: 3 },
      async () => ({ hpasid: 201, generation: 1 }),
      (a) => ({ ioasid: a.hpasid, generation: a.generation }),
    );
    expect(ok).toEqual({ ok: true, value: { hpasid: 201, generation: 1 } });
    const refused = await j.run({ op: "free", vm: "g1" }, () => Promise.reject(new DomainError(Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET", "not yours")));
    expect(refused).toEqual({ ok: false, outcome: "fail", error: "IOASID_NOT_IN_SET" });
    const lost = await j.run({ op: "bind", vm: "g1" }, () => Promise.reject(new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "gone")));
    expect(lost).toMatchObject({ ok: false, outcome: "info" });
    expect(j.counts()).toMatchObject({ ok: 1, fail: 1, info: 1, byOp: { alloc: [1, 0, 0], free: [0, 1, 0], bind: [0, 0, 1] } });
    const phases = j.records.map((r) => parseChaosRecord(r)).map((e) => (e?.kind === "op" ? e.action : undefined));
    expect(phases).toEqual(["invoke", "ok", "invoke", "fail", "invoke", "info"]);
    expect(j.records[1]).toMatchObject({ ioasid: 201, generation: 1, setId: 3 });
    expect(parseChaosRecord(j.records[1]!)).toMatchObject({ op: { op: "alloc", opId: 1, latencyMs: expect.any(Number) } });
  });

  it("takes a DefiniteFailure as fail and anything else unknown as info", () => {
    expect(outcomeOf(new DefiniteFailure("GP"))).toBe("fail");
    expect(outcomeOf(new Error("socket hang up"))).toBe("info");
    expect(outcomeOf(new DomainError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "slow"))).toBe("info");
  });

  it("merges its own records into a stored history in place of the stored chaos records", () => {
    const j = new ChaosJournal(undefined);
    j.note("seed 1");
    j.fault({ fault: "partition", target: "vdcm", faultId: 1 });
    j.fault({ fault: "kill-restart", target: "ioasid-core", faultId: 100_001, cause: "exit" });
    const stored: HistoryRecord[] = [
      core(1, "event:ALLOC", { ioasid: 5, generation: 1, setId: 1 }),
      { ...j.records[0]!, action: { $case: "chaosNote", value: { note: "truncated" } } },
    ];
    const merged = j.merge(stored);
    expect(merged.filter((r) => r.role === "chaos")).toEqual(j.records);
    expect(merged).toHaveLength(4);
    expect(j.counts().faultsByKind).toEqual({ partition: 1 });
  });
});

describe("renderChaosReport", () => {
  it("is one self-contained page: the summary, a timeline of faults, operations and violations, the verdict", () => {
    const history = crashedGuest();
    const verdict = check(history);
    const html = renderChaosReport({
      title: "seed 1 <test>",
      history,
      verdict,
      verdictText: "verdict text",
      summaryText: renderStats(computeRunStats(history)),
    });
    expect(html).toMatch(/^<!doctype html>/);
    expect(html).toContain("seed 1 &lt;test&gt;");
    expect(html).toContain("fault: vdcm");
    expect(html).toContain("kill-restart of vdcm");
    expect(html).toContain("<svg");
    expect(html).toContain(">g1<");
    expect(html).not.toMatch(/<script|https?:\/\/(?!www\.w3\.org\/2000\/svg)/);
  });
});
