import { setMaxListeners } from "node:events";
import { appendFileSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { describeAction, historyRecordToJson, readHistory, stepLabel } from "@ioasid/bus";
import { core } from "@ioasid/proto";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { createChaosClients, type ChaosClients, type VmmCommand, type VmmProcess } from "./chaos-clients.js";
import { ChaosJournal } from "./chaos-journal.js";
import { FaultKind } from "@ioasid/checker";
import { renderChaosReport } from "./chaos-report.js";
import { brief, CHAOS_SERVICE_ENV, defaultRepoRoot, LAB_CORE_HOSTS, startChaosStack, type ChaosStack } from "./chaos-stack.js";
import { createChecker, renderVerdict, type CheckerOptions, type Verdict } from "@ioasid/checker";
import type { FinalState } from "@ioasid/checker";
import { runGuest, setupSlots, type GuestContext, type GuestOutcome } from "./guest-driver.js";
import { planGuest, planProbeGuest, PROBE_PASIDS } from "./guest-plan.js";
import { runNemesis } from "./nemesis.js";
import { readFinalState } from "./read-final-state.js";
import { computeRunStats, renderStats, type ChaosRunStats } from "./run-stats.js";
import { schedule, withHostPartitions, type FaultInjection } from "./schedule.js";

/**
 * Roles whose tables do not survive a kill: none any more — KVM, VDCM, the IOMMU and VFIO keep
 * theirs in JetStream (issue 6, deliverable 1), so a table entry left live across a kill is a
 * violation. (CheckOptions.volatileRoles stays for roles of your own that do not.)
 */
export const CHAOS_VOLATILE_ROLES: readonly string[] = [];

/** Where a run is. */
export const ChaosPhase = {
  STARTING: "starting",
  RUNNING: "running",
  /** The duration is over: final heal, guests closing. */
  HEALING: "healing",
  /** The probe guest: a planned guest crashed while holding PASIDs, after the heal. */
  PROBE: "probe",
  /** Waiting for every IOASID to be reclaimed (bounded). */
  SETTLING: "settling",
  CHECKING: "checking",
  DONE: "done",
} as const;
export type ChaosPhase = (typeof ChaosPhase)[keyof typeof ChaosPhase];

/** A progress report (about four a second while the run lasts). */
export interface ChaosProgress {
  readonly seed: number;
  readonly phase: ChaosPhase;
  /** Time since the guests started, in ms. */
  readonly elapsedMs: number;
  readonly durationMs: number;
  readonly ops: { readonly ok: number; readonly fail: number; readonly info: number };
  readonly faultsInjected: number;
  readonly faultsActive: number;
  readonly guestsStarted: number;
  readonly guestsRunning: number;
}

/** Options of {@link runChaos}. */
export interface ChaosRunOptions {
  /** Seeds the guests' plans, the fault schedule and the proxies' decisions. */
  readonly seed: number;
  /** Guests at once. */
  readonly guests: number;
  /** Time guests run and faults are injected, in ms (setup, healing, settling and checking come on top). */
  readonly durationMs: number;
  /** Fault kinds to inject (empty: none). */
  readonly faults: readonly FaultKind[];
  /** Directory for the history, the report, the verdict and the services' logs (emptied first). */
  readonly dir: string;
  /** Where to write the HTML report. @default `<dir>/report.html` */
  readonly htmlFile?: string;
  readonly onProgress?: (p: ChaosProgress) => void;
  /** Ends the run early (Ctrl-C): guests close, everything heals and stops; no verdict. */
  readonly signal?: AbortSignal;
  /** Longest wait, after healing, for every IOASID to be reclaimed, in ms. @default 15000 */
  readonly settleTimeoutMs?: number;
  /** Mean time between fault injections, in ms. @default 2000 */
  readonly meanFaultIntervalMs?: number;
  /** Checker options over the runner's (volatile roles, bounds). */
  readonly checker?: CheckerOptions;
  /** How to start a VMM. @default `node packages/cli/dist/main.js vmm-agent` of the repository */
  readonly vmmCommand?: VmmCommand;
  /** Repository root (the built services). @default found from this package */
  readonly repoRoot?: string;
  /**
   * A NATS cluster of this many servers (streams replicated) and a standby core beside the primary
   * (`ioasidctl chaos run --nats-cluster N`; DESIGN §13): a nats-restart then kills one server
   * drawn from the seed, a kill of the core kills the core that serves. @default 1
   */
  readonly natsCluster?: number;
  /**
   * Each server of the cluster in a network namespace of its own (`--netns`; needs `natsCluster`
   * ≥ 2 and root): the servers cluster over the lab's addresses, and when the faults include
   * partitions the nemesis also cuts the servers' hosts apart ({@link withHostPartitions}: two
   * servers, or one from the rest), each healed once every stream is current again. @default false
   */
  readonly netns?: boolean;
}

/** How the run's probe guest went (see `planProbeGuest`). */
export interface ProbeResult {
  /** Its name in the history ("probe1"; "probe2" when the first try held no PASID at its crash). */
  readonly vm: string;
  /** Tries made (at most {@link PROBE_ATTEMPTS}). */
  readonly attempts: number;
  readonly setId: number | undefined;
  /** How its last try ended: "crashed" as planned, or what went wrong. */
  readonly end: GuestOutcome["end"];
  /** PASIDs it held when its VMM was killed. */
  readonly held: number;
}

/** What a run produced. */
export interface ChaosRunResult {
  readonly seed: number;
  readonly verdict: Verdict;
  readonly verdictText: string;
  readonly stats: ChaosRunStats;
  readonly summaryText: string;
  /** The history, one JSON record per line. */
  readonly historyFile: string;
  readonly reportFile: string;
  readonly dir: string;
  /** Services the final heal could not bring back (with why): the run cannot be trusted to be settled. */
  readonly healFailures: readonly string[];
  /** Whether every IOASID was reclaimed and every fault group answered before the settle timeout. */
  readonly settled: boolean;
  /** Time from the final heal until settled (or the timeout), in ms. */
  readonly settleMs: number;
  /** Services that exited without being killed (each restarted), as notes. */
  readonly unexpectedExits: readonly string[];
  /** The fault schedule drawn from the seed (each one injected and recorded: `stats.faults.injected` counts them). */
  readonly faults: readonly FaultInjection[];
  /** The probe guest: a crash holding PASIDs that every run has, after the final heal. */
  readonly probe: ProbeResult;
  /** Wall-clock time of the whole run, in ms. */
  readonly wallMs: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
/** What a run may take beyond its duration (setup, healing, settling, checking) before it is aborted. */
const WATCHDOG_MARGIN_MS = 300_000;
/** Fault ids of the services' own exits (the schedule's ids are 1, 2, …). */
const SELF_EXIT_FAULT_IDS = 100_001;
/** Time the services' history recorders get to publish after the run settles (they are fire-and-forget). */
const HISTORY_FLUSH_MS = 1000;
/** Tries at reading the final state (a second apart). */
const FINAL_STATE_ATTEMPTS = 5;
/** Tries of the probe guest: a try whose PASIDs were not all allocated (a stack still catching up after the heal) is made again as a new guest. */
export const PROBE_ATTEMPTS = 3;

/**
 * Runs one chaos test (issue 6): starts a stack of its own in `dir` with a fault proxy on every
 * link, drives `guests` guests at once through random life cycles planned from `seed` for
 * `durationMs` while the nemesis injects the faults `schedule(seed, …)` draws, heals everything,
 * waits (bounded) for every crashed guest's IOASIDs to be reclaimed, reads the final state and the
 * history, checks DESIGN §7 and writes the history (JSONL), the HTML report and the verdict into
 * `dir`. Everything it started is stopped, by PID, whatever happens.
 *
 * The same seed gives the same guest plans and the same fault schedule; what the services answer,
 * and so the history, depends on timing.
 * @throws Error when the stack cannot start, or the run was aborted
 * @example
 * const r = await runChaos({ seed: 1, guests: 4, durationMs: 30_000, faults: ["kill-restart", "partition"], dir: ".ioasid-chaos/seed-1" });
 * console.log(r.verdictText); process.exitCode = r.verdict.ok ? 0 : 1;
 */
export async function runChaos(options: ChaosRunOptions): Promise<ChaosRunResult> {
  const started = performance.now();
  const dir = resolve(options.dir);
  if (!(options.guests >= 1 && Number.isInteger(options.guests))) throw new RangeError(`guests must be a positive integer, got ${options.guests}`);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const root = options.repoRoot ?? defaultRepoRoot();
  const vmmCommand: VmmCommand = options.vmmCommand ?? [process.execPath, join(root, "packages", "cli", "dist", "main.js"), "vmm-agent"];

  let phase: ChaosPhase = ChaosPhase.STARTING;
  let t0 = performance.now();
  let faultsActive = 0;
  let guestsStarted = 0;
  let guestsRunning = 0;
  let stopping = false;
  const vmms = new Set<VmmProcess>();
  const unexpected: string[] = [];
  let journal: ChaosJournal | undefined;
  let stack: ChaosStack | undefined;
  let nc: NatsConnection | undefined;
  let clients: ChaosClients | undefined;
  const progress = () => {
    const c = journal?.counts();
    options.onProgress?.({
      seed: options.seed,
      phase,
      elapsedMs: phase === ChaosPhase.STARTING ? 0 : performance.now() - t0,
      durationMs: options.durationMs,
      ops: { ok: c?.ok ?? 0, fail: c?.fail ?? 0, info: c?.info ?? 0 },
      faultsInjected: c?.faults ?? 0,
      faultsActive,
      guestsStarted,
      guestsRunning,
    });
  };
  const ticker = setInterval(progress, 250);
  const abort = new AbortController();
  // Every scheduled fault waits on it at once.
  setMaxListeners(10_000, abort.signal);
  const onAbort = () => abort.abort();
  options.signal?.addEventListener("abort", onAbort, { once: true });

  const logFile = join(dir, "run.log");
  const trace = (line: string) => appendFileSync(logFile, `${new Date().toISOString()} +${((performance.now() - t0) / 1000).toFixed(3)}s ${line}\n`);
  const setPhase = (p: ChaosPhase) => {
    phase = p;
    trace(`phase ${p}`);
  };
  // A hard bound on the whole run: whatever hangs, the run ends (and stops what it started).
  const watchdog = setTimeout(() => {
    trace("watchdog: the run overran its bound; aborting");
    abort.abort();
  }, options.durationMs + WATCHDOG_MARGIN_MS);
  let selfExitId = SELF_EXIT_FAULT_IDS;
  // A run with a violation (or that failed) keeps the JetStream store for the diagnosis.
  let keepStore = true;

  try {
    progress();
    stack = await startChaosStack({
      dir,
      seed: options.seed,
      repoRoot: root,
      ...(options.natsCluster === undefined ? {} : { natsCluster: options.natsCluster }),
      ...(options.netns === true ? { netns: true } : {}),
      // A service that exits on its own (the core's fail-stop when its operation log cannot be
      // written) is restarted at once, as a supervisor would; recorded as a kill-restart it did
      // not inject (cause "exit"), so the checker allows for the records it lost.
      onUnexpectedExit: (name, code, signal, node) => {
        const what = `${name}${node === undefined ? "" : ` ${node}`} exited on its own (code ${String(code)}, signal ${String(signal)})`;
        unexpected.push(what);
        const faultId = selfExitId++;
        journal?.fault({ fault: FaultKind.KILL_RESTART, target: name, faultId, cause: "exit", ...(node === undefined ? {} : { node }) });
        trace(what);
        if (stopping && abort.signal.aborted) return;
        void stack
          ?.restart(name)
          .then(() => journal?.heal({ heal: true, faultId }))
          .catch((err: unknown) => journal?.note(`${name} could not be restarted after it exited: ${brief(err)}`));
      },
    });
    const s = stack;
    // As the operator (nats-server refuses anonymous clients): the journal and the history.
    nc = await connect({ servers: s.natsUrl.split(","), name: "chaos-driver", maxReconnectAttempts: -1, reconnectTimeWait: 100, ...s.credentials.natsAuth });
    clients = createChaosClients(s.addresses, s.credentials);
    const c = clients;
    const j = (journal = new ChaosJournal(nc, {
      onRecord: (r) => {
        if (r.instance === "nemesis" || r.action?.$case !== "chaosOp") trace(`${stepLabel(r)} ${describeAction(r) ?? ""}`);
      },
    }));
    j.note(
      `seed ${options.seed}, ${options.guests} guests, ${options.durationMs} ms, faults ${options.faults.join(",") || "none"}${s.natsNodes.length > 1 ? `; a NATS cluster of ${s.natsNodes.length} servers${s.lab === undefined ? "" : " (each in a network namespace of its own)"} and a standby core` : ""}; service timeouts ${Object.entries(
        CHAOS_SERVICE_ENV,
      )
        .filter(([k]) => /DEADLINE|RETRY|TIMEOUT|GRACE/.test(k))
        .map(([k, v]) => `${k}=${v}`)
        .join(" ")}`,
    );
    // One slot per guest at once, and the probe guest's own (the last).
    await setupSlots(c, options.guests + 1);

    const quietTailMs = Math.min(5000, Math.round(options.durationMs * 0.1));
    const drawn =
      options.faults.length === 0
        ? []
        : schedule(options.seed, {
            durationMs: options.durationMs,
            kinds: options.faults,
            quietTailMs,
            natsNodes: s.natsNodes.length,
            ...(options.meanFaultIntervalMs === undefined ? {} : { meanIntervalMs: options.meanFaultIntervalMs }),
          });
    // Partitions between the servers' hosts on top, from a stream of their own (the schedule above is the seed's as always).
    const faults =
      s.lab !== undefined && options.faults.includes(FaultKind.PARTITION)
        ? withHostPartitions(options.seed, drawn, {
            durationMs: options.durationMs,
            quietTailMs,
            hosts: s.natsNodes.map((n) => n.name),
            coreHosts: s.lab.hosts.filter((h) => LAB_CORE_HOSTS.includes(h)),
          })
        : drawn;
    if (s.lab !== undefined) j.note(s.lab.describe());
    setPhase(ChaosPhase.RUNNING);
    t0 = performance.now();
    const nemesis = runNemesis({
      stack: s,
      journal: j,
      faults,
      t0,
      signal: abort.signal,
      onChange: (n) => (faultsActive = n),
    });

    const guestContext: Omit<GuestContext, "stopping"> = {
      clients: c,
      journal: j,
      vfioAddress: s.addresses.vfio,
      vmmCommand,
      vmms,
      vmmCredentialsDir: s.credentials.vmmDir,
    };
    // Slot s runs guests s, s + G, s + 2G, … one after the other until the duration is over.
    const outcomes: GuestOutcome[] = [];
    const slotLoop = async (slot: number) => {
      for (let index = slot; !stopping && !abort.signal.aborted; index += options.guests) {
        await waitSlotFree(c, slot, outcomes, 5000);
        if (stopping || abort.signal.aborted) return;
        guestsStarted++;
        guestsRunning++;
        trace(`guest g${index} starts in slot ${slot}`);
        try {
          const outcome = await runGuest(planGuest(options.seed, index, { slots: options.guests }), {
            ...guestContext,
            stopping: () => stopping || abort.signal.aborted,
          });
          outcomes.push(outcome);
          // A guest that could not even open (VFIO or the core down) is not retried at once.
          if (outcome.end === "not-opened") await sleep(500);
        } finally {
          guestsRunning--;
        }
      }
    };
    const guests = Promise.all(Array.from({ length: options.guests }, (_, slot) => slotLoop(slot)));

    await Promise.race([sleep(options.durationMs), new Promise((r) => abort.signal.addEventListener("abort", r, { once: true }))]);
    // The duration is over: no new guest; running ones end at their next step (a clean close).
    stopping = true;
    await nemesis;
    setPhase(ChaosPhase.HEALING);
    const healed = await s.healAll();
    // Recorded first: the heal is when the stack was whole again (L2's clock starts here).
    j.heal({ heal: true });
    const healedAt = performance.now();
    if (healed.continued.length + healed.restarted.length > 0 || healed.natsRestarted || healed.failed.length > 0) {
      j.note(
        `final heal: SIGCONT ${healed.continued.join(",") || "-"}, restarted ${healed.restarted.join(",") || "-"}${healed.natsRestarted ? ", nats-server restarted" : ""}${healed.failed.length === 0 ? "" : `, FAILED: ${healed.failed.join("; ")}`}`,
      );
    }
    const healFailures = [...healed.failed];
    const guestsEnded = await Promise.race([guests.then(() => true), sleep(60_000).then(() => false)]);
    trace(guestsEnded ? `guests ended: ${outcomes.length}` : "guests did not all end within 60 s of the heal");
    if (abort.signal.aborted) throw new Error("the chaos run was aborted");

    setPhase(ChaosPhase.PROBE);
    const probe = await runProbe(c, { ...guestContext, stopping: () => abort.signal.aborted }, options.guests, trace);
    trace(`probe: ${probe.vm} ${probe.end} holding ${probe.held} PASIDs after ${probe.attempts} attempt(s)`);
    if (abort.signal.aborted) throw new Error("the chaos run was aborted");

    setPhase(ChaosPhase.SETTLING);
    const settled = await settle(c, options.settleTimeoutMs ?? 15_000);
    const settleMs = performance.now() - healedAt;
    j.flush();
    await sleep(HISTORY_FLUSH_MS);

    setPhase(ChaosPhase.CHECKING);
    progress();
    // A few tries, a second apart: a channel caught between reconnects (after a core's failover
    // its first address may be the one that no longer serves) fails a call at once rather than wait.
    let finalState: FinalState | undefined;
    for (let attempt = 1; attempt <= FINAL_STATE_ATTEMPTS && finalState === undefined; attempt++) {
      if (attempt > 1) await sleep(1000);
      finalState = await readFinalState(c, {
        iommu: CHAOS_SERVICE_ENV["IOMMU_INSTANCE"]!,
        vdcm: CHAOS_SERVICE_ENV["VDCM_INSTANCE"]!,
      }).catch((err: unknown) => {
        j.note(`final state not read (try ${attempt} of ${FINAL_STATE_ATTEMPTS}): ${(err as Error).message.split("\n")[0]}`);
        return undefined;
      });
    }
    const stored = await Promise.race([readHistory(nc), sleep(60_000).then(() => Promise.reject(new Error("reading the history took over 60 s")))]);
    const history = j.merge(stored);
    trace(`history: ${history.length} records`);
    const verdict = createChecker({ volatileRoles: CHAOS_VOLATILE_ROLES, ...options.checker }).check(history, finalState);
    const verdictText = renderVerdict(verdict, `chaos verdict, seed ${options.seed}`);
    const stats = computeRunStats(history, finalState);
    const summaryText = [
      ...(healFailures.length === 0 ? [] : [`HEAL FAILED: the stack did not come back whole: ${healFailures.join("; ")}`]),
      renderStats(stats),
      `probe guest: ${probe.vm} ${probe.end === "crashed" ? `crashed holding ${probe.held} PASIDs` : `ended ${probe.end}, holding ${probe.held} PASIDs`} (set ${probe.setId ?? "?"}, ${probe.attempts} attempt${probe.attempts === 1 ? "" : "s"})`,
      `settled: ${settled ? "yes" : "NO"} (${Math.round(settleMs)} ms after the final heal)${unexpected.length === 0 ? "" : `; services that exited on their own: ${unexpected.join("; ")}`}`,
    ].join("\n");

    const historyFile = join(dir, "history.jsonl");
    writeFileSync(historyFile, history.map(historyRecordToJson).join("\n") + "\n");
    const reportFile = resolve(options.htmlFile ?? join(dir, "report.html"));
    writeFileSync(
      reportFile,
      renderChaosReport({
        title: `ioasid-fabric chaos run, seed ${options.seed}: ${options.guests} guests, ${options.durationMs / 1000} s, faults ${options.faults.join(", ") || "none"}${(options.natsCluster ?? 1) > 1 ? `, a ${options.natsCluster}-server NATS cluster${options.netns === true ? " in network namespaces" : ""} and a standby core` : ""}`,
        history,
        verdict,
        verdictText,
        summaryText,
      }),
    );
    writeFileSync(join(dir, "verdict.txt"), `${verdictText}\n\n${summaryText}\n`);
    // With the history, what it takes to check the run again offline (other checker options).
    if (finalState !== undefined) writeFileSync(join(dir, "final-state.json"), JSON.stringify(finalState, null, 2));
    writeFileSync(
      join(dir, "summary.json"),
      JSON.stringify(
        {
          seed: options.seed,
          ok: verdict.ok,
          counts: verdict.counts,
          stats,
          healFailures,
          settled,
          settleMs: Math.round(settleMs),
          unexpectedExits: unexpected,
          probe,
          faults,
        },
        null,
        2,
      ),
    );
    keepStore = !verdict.ok || healFailures.length > 0;
    setPhase(ChaosPhase.DONE);
    progress();
    return {
      seed: options.seed,
      verdict,
      verdictText,
      stats,
      summaryText,
      historyFile,
      reportFile,
      dir,
      healFailures,
      settled,
      settleMs,
      unexpectedExits: unexpected,
      faults,
      probe,
      wallMs: performance.now() - started,
    };
  } catch (err) {
    trace(`failed: ${String((err as Error)?.stack ?? err)}`);
    throw err;
  } finally {
    stopping = true;
    clearInterval(ticker);
    clearTimeout(watchdog);
    options.signal?.removeEventListener("abort", onAbort);
    for (const v of vmms) v.kill("SIGKILL");
    await Promise.all([...vmms].map((v) => v.exited));
    clients?.close();
    await nc?.close().catch(() => undefined);
    await stack?.close(keepStore ? join(dir, "jetstream") : undefined);
  }
}

/**
 * Runs the probe guest (`planProbeGuest`) in its own slot until one try crashes holding every
 * PASID it planned, at most {@link PROBE_ATTEMPTS} tries: a try that could not allocate (a role
 * still reconciling after the heal answers UNAVAILABLE) proves nothing either way and is made again
 * as a new guest, once the previous try's set is gone.
 */
async function runProbe(c: ChaosClients, ctx: GuestContext, slot: number, trace: (line: string) => void): Promise<ProbeResult> {
  let last: GuestOutcome | undefined;
  let attempts = 0;
  for (let attempt = 1; attempt <= PROBE_ATTEMPTS && !ctx.stopping(); attempt++) {
    if (last !== undefined) await waitSlotFree(c, slot, [last], 10_000);
    attempts = attempt;
    const plan = planProbeGuest(attempt, slot);
    last = await runGuest(plan, ctx);
    if (last.end === "crashed" && last.held === PROBE_PASIDS) break;
    trace(`probe ${plan.name}: ${last.end} holding ${last.held} PASIDs; trying again`);
    await sleep(1000);
  }
  return { vm: last?.plan.name ?? "probe1", attempts, setId: last?.setId, end: last?.end ?? "not-opened", held: last?.held ?? 0 };
}

/** Waits (bounded) until the slot's previous guest's set is gone, so its mdev and PF are free again. */
async function waitSlotFree(c: ChaosClients, slot: number, outcomes: readonly GuestOutcome[], timeoutMs: number): Promise<void> {
  const prev = outcomes.filter((o) => o.plan.slot === slot).at(-1);
  if (prev?.setId === undefined) return;
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const gone = await c.core.getSet(core.GetSetRequest.fromPartial({ setId: prev.setId })).then(
      () => false,
      (err: unknown) => (err as { reason?: string }).reason === "SET_NOT_FOUND",
    );
    if (gone) return;
    await sleep(100);
  }
}

/** Waits (bounded) until the core has no live IOASID and the IOMMU no outstanding fault group. */
async function settle(c: ChaosClients, timeoutMs: number): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const done = await Promise.all([c.core.listIoasids({ setId: 0 }), c.iommu.queryState({ deviceIds: [], maxIotlbFlushes: 0, viommusOnly: false })]).then(
      ([l, i]) => l.ioasids.length === 0 && i.faultGroups.length === 0,
      () => false,
    );
    if (done) return true;
    await sleep(200);
  }
  return false;
}
