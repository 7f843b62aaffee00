import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parseHistoryJsonl } from "@ioasid/bus";
import { parseFaultKinds, PROBE_PASIDS, runChaos, type ChaosRunResult } from "@ioasid/chaos";
import { formatRecord, orderHistory } from "@ioasid/checker";

// The bounded chaos suite (issue 6): a few seeds, each a stack of its own with a fault proxy on
// every link, 4 guests through random life cycles for ~20 s while every fault kind is injected,
// then healed; DESIGN §7 is checked on the recorded history and the final state. A failure
// prints the verdict with the trace of each violation; the run's history, report and logs stay
// in the directory named (runChaos stops every process it started, by PID, whatever happens).
//
// Security on (issue 14): the stack runs with NATS users and mTLS, and runChaos refuses to start on
// a stack that is open anywhere. Deterministic (issue 15): every assertion holds on every run of a
// seed, on a quiet machine or a busy one — each says below why.
const SEEDS = [1, 2, 3];
const DURATION_MS = 20_000;

const root = mkdtempSync(join(tmpdir(), "ioasid-chaos-"));
let failed = false;
afterAll(() => {
  if (!failed) rmSync(root, { recursive: true, force: true });
});

/** One line of figures per seed (in the test output: what a run under load did). */
function figures(r: ChaosRunResult): string {
  const s = r.stats;
  return (
    `chaos seed ${r.seed}: ${(r.wallMs / 1000).toFixed(1)} s, ops ${s.ops.ok}/${s.ops.fail}/${s.ops.info} ok/fail/info, faults ${s.faults.injected}, ` +
    `guests ${s.guests.started} (${s.guests.crashed} crashed, ${s.guests.lost} lost), crashed reclaimed ${s.reclaim.reclaimed}/${s.reclaim.guests} ` +
    `holding ${s.reclaim.ioasids} IOASIDs, max ${String(s.reclaim.maxAfterCrashMs)} ms after crash, max ${String(s.reclaim.maxAfterHealMs)} ms after heal; ` +
    `probe ${r.probe.vm} ${r.probe.end} holding ${r.probe.held}; settled ${r.settled} in ${Math.round(r.settleMs)} ms`
  );
}

/** What every seed's run must show (each assertion holds on every run of the seed; see why below). */
function assertRun(r: ChaosRunResult): void {
  const story = `${r.verdictText}\n\n${r.summaryText}\n(history, report and logs in ${r.dir})`;
  failed ||= !r.verdict.ok || r.healFailures.length > 0;
  console.log(figures(r));
  // The final heal brought every service back (each restart gets 40 s to listen).
  expect(r.healFailures, story).toEqual([]);
  // The claim itself. L1 and L2 are bounds in time (a free returns within 1 s unless a fault
  // was on its path; a crashed guest's IOASIDs are reclaimed within 5 s of max(crash, last
  // heal)), timed on the services' own records and the instants the driver acted.
  expect(
    r.verdict.violations.map((v) => `${v.invariant}: ${v.message}`),
    story,
  ).toEqual([]);
  // The run did what a chaos run is for. The schedule is a pure function of the seed (never
  // empty for these seeds), and the nemesis records each fault before injecting it: every
  // run injects all of them. How many guest operations succeed depends on the machine's
  // speed and the faults' timing, so it is reported above, not asserted.
  expect(r.faults.length, story).toBeGreaterThan(0);
  expect(r.stats.faults.injected, story).toBe(r.faults.length);
  // Every run has a crashed guest holding PASIDs to time: the probe guest, planned (not drawn)
  // and run after the final heal (issue 15: seed 1 once had no drawn guest crash with PASIDs,
  // and nothing to time). It is retried, a bounded number of times, while the stack catches up.
  expect(r.probe, story).toMatchObject({ end: "crashed", held: PROBE_PASIDS });
  expect(r.stats.reclaim.ioasids, story).toBeGreaterThanOrEqual(PROBE_PASIDS);
  expect(r.stats.reclaim.notReclaimed, story).toEqual([]);
  // Issue 6: after healing, every crashed guest's IOASIDs reclaimed within 5 s — drawn guests
  // that crashed during the faults and the probe alike (the probe makes the figure defined).
  expect(r.stats.reclaim.maxAfterHealMs, story).toBeDefined();
  expect(r.stats.reclaim.maxAfterHealMs, story).toBeLessThanOrEqual(5000);
  // Nothing left live: every IOASID reclaimed and every fault group answered within the settle
  // bound (15 s, three times L2's).
  expect(r.settled, story).toBe(true);
  // Order without clocks (issue 18): every record the run kept carries its publisher's sequence
  // (each recorder numbers every record it makes, faults or not), and the sequences and causal
  // links never contradict each other (a cycle would leave the checker ordering by time).
  const history = parseHistoryJsonl(readFileSync(r.historyFile, "utf8"), r.historyFile);
  expect(
    history.filter((x) => x.publisherSeq === undefined).map((x) => formatRecord(x)),
    story,
  ).toEqual([]);
  expect(orderHistory(history).cycles, story).toBe(0);
}

describe("chaos: crashed-guest cleanup under every fault kind, security on", () => {
  for (const seed of SEEDS) {
    it(`seed ${seed}: no violation of S1–S9, L1–L4; every crashed guest's IOASIDs reclaimed`, async () => {
      const r = await runChaos({ seed, guests: 4, durationMs: DURATION_MS, faults: parseFaultKinds("all"), dir: join(root, `seed-${seed}`) });
      assertRun(r);
    });
  }
});

// Beyond one machine (issue 18, DESIGN §13): the same claim on a three-server NATS cluster (every
// stream with three replicas, each service given every server) with a standby core behind the
// primary's lease. Seed 10's schedule (a pure function of the seed) kills the serving core once
// and kills nats-servers three times, each a server drawn from the seed.
describe("chaos on a NATS cluster with a standby core", () => {
  const SEED = 10;
  it(`seed ${SEED}: the serving core and nats-servers killed; no violation, every crashed guest reclaimed`, async () => {
    const r = await runChaos({
      seed: SEED,
      guests: 3,
      durationMs: DURATION_MS,
      faults: parseFaultKinds("all"),
      dir: join(root, `cluster-seed-${SEED}`),
      natsCluster: 3,
    });
    assertRun(r);
    const story = `${r.summaryText}\n(history, report and logs in ${r.dir})`;
    // What makes it a cluster run: the schedule kills the core and named servers of the cluster,
    // and each core fault's record names the core that served when it was injected.
    expect(r.faults.filter((f) => f.kind === "kill-restart" && f.target === "ioasid-core").length, story).toBeGreaterThan(0);
    expect(
      r.faults.filter((f) => f.kind === "nats-restart").map((f) => f.node),
      story,
    ).toEqual(["n0", "n0", "n2"]);
    const history = parseHistoryJsonl(readFileSync(r.historyFile, "utf8"), r.historyFile);
    const coreKills = history.flatMap((x) =>
      x.action?.$case === "chaosFault" && x.action.value.target === "ioasid-core" && x.action.value.fault === "kill-restart" ? [x.action.value] : [],
    );
    expect(coreKills.length, story).toBeGreaterThan(0);
    expect(
      coreKills.every((f) => f.node === "a" || f.node === "b"),
      story,
    ).toBe(true);
  });
});
