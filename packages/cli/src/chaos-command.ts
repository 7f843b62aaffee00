import { join } from "node:path";
import type { ParseArgsConfig } from "node:util";
import {
  ChaosUsageError,
  FAULT_NAMES,
  netnsAvailable,
  parseDuration,
  parseFaultKinds,
  parseSeeds,
  runChaos,
  type ChaosProgress,
  type ChaosRunResult,
  type FaultKind,
  type VmmCommand,
} from "@ioasid/chaos";

/** The options of `ioasidctl chaos run`, parsed. */
export interface ChaosCommandOptions {
  readonly seeds: readonly number[];
  readonly guests: number;
  readonly durationMs: number;
  readonly faults: readonly FaultKind[];
  /** Each seed runs in `<dir>/seed-<n>`. */
  readonly dir: string;
  readonly html: string | undefined;
  readonly json: boolean;
  /** Servers of the run's NATS cluster (with a standby core); 1: one nats-server and one core. */
  readonly natsCluster: number;
  /** Each nats-server in a network namespace of its own, partitions between them (`--netns`); set only when given. */
  readonly netns?: true;
}

/** Defaults of `ioasidctl chaos run`. */
export const CHAOS_DEFAULTS = { seed: 1, guests: 4, duration: "30s", faults: "all", dir: ".ioasid-chaos" } as const;

type Values = Record<string, string | boolean | undefined>;

/**
 * Parses the flags of `ioasidctl chaos run` (the verb `run` checked by the caller).
 * @throws ChaosUsageError on a bad value or a bad combination (both --seed and --seeds; --html with several seeds)
 */
export function parseChaosOptions(v: Values): ChaosCommandOptions {
  if (v["seed"] !== undefined && v["seeds"] !== undefined) throw new ChaosUsageError("give --seed N or --seeds A..B, not both");
  const seeds = v["seeds"] !== undefined ? parseSeeds(String(v["seeds"])) : parseSeeds(String(v["seed"] ?? CHAOS_DEFAULTS.seed), "--seed");
  if (v["seed"] !== undefined && seeds.length !== 1) throw new ChaosUsageError("--seed takes one seed; use --seeds A..B for several");
  const guestsText = String(v["guests"] ?? CHAOS_DEFAULTS.guests);
  const guests = Number(guestsText);
  if (!/^\d+$/.test(guestsText) || guests < 1 || guests > 32) throw new ChaosUsageError(`--guests must be an integer 1..32, got "${guestsText}"`);
  const clusterText = String(v["nats-cluster"] ?? 1);
  const natsCluster = Number(clusterText);
  if (!/^\d+$/.test(clusterText) || natsCluster < 1 || natsCluster > 7)
    throw new ChaosUsageError(`--nats-cluster must be an integer 1..7 (servers), got "${clusterText}"`);
  // Two servers are two replicas and a meta group of two: every nats fault would take JetStream's
  // quorum for its whole length, which tests nothing but that.
  if (natsCluster === 2) throw new ChaosUsageError("--nats-cluster 2 loses JetStream's quorum whenever the nemesis kills a server: use 1, or 3..7");
  const netns = v["netns"] === true;
  if (netns && natsCluster < 2) throw new ChaosUsageError("--netns places the servers of a NATS cluster in namespaces: give --nats-cluster N (3..7) too");
  const html = v["html"] === undefined ? undefined : String(v["html"]);
  if (html !== undefined && seeds.length > 1)
    throw new ChaosUsageError("--html names one file: use it with --seed (with --seeds each report is in <dir>/seed-<n>/report.html)");
  return {
    seeds,
    guests,
    durationMs: parseDuration(String(v["duration"] ?? CHAOS_DEFAULTS.duration), "--duration", 1000, 3_600_000),
    faults: parseFaultKinds(String(v["faults"] ?? CHAOS_DEFAULTS.faults)),
    dir: String(v["dir"] ?? CHAOS_DEFAULTS.dir),
    html,
    json: v["json"] === true,
    natsCluster,
    ...(netns ? { netns } : {}),
  };
}

/** One progress line: a bar when `width` is given (a TTY), else plain figures. */
export function formatProgress(p: ChaosProgress, width?: number): string {
  const secs = (ms: number) => (ms / 1000).toFixed(1);
  const figures = `${p.phase.padEnd(8)} ops ${p.ops.ok} ok ${p.ops.fail} fail ${p.ops.info} info  faults ${p.faultsInjected} (${p.faultsActive} active)  guests ${p.guestsRunning} running, ${p.guestsStarted} started`;
  const time = `${secs(Math.min(p.elapsedMs, p.durationMs))}/${secs(p.durationMs)} s`;
  if (width === undefined) return `chaos seed ${p.seed}: ${time} ${figures}`;
  const cells = Math.max(10, Math.min(30, width - 110));
  const done = Math.round((Math.min(p.elapsedMs, p.durationMs) / p.durationMs) * cells);
  return `seed ${p.seed} [${"#".repeat(done)}${"-".repeat(cells - done)}] ${time} ${figures}`.slice(0, width - 1);
}

/** The one-line summary of a run among several (`--seeds`). */
export function formatSeedLine(r: ChaosRunResult): string {
  const s = r.stats;
  const bad = Object.entries(r.verdict.counts)
    .filter(([, n]) => (n ?? 0) > 0)
    .map(([id, n]) => `${id} ${n}`);
  const reclaim = `crashed ${s.reclaim.reclaimed}/${s.reclaim.guests} reclaimed${s.reclaim.maxAfterHealMs === undefined ? "" : ` (max ${s.reclaim.maxAfterHealMs} ms after heal)`}`;
  const heal = r.healFailures.length === 0 ? "" : `HEAL FAILED (${r.healFailures.map((f) => f.split(":")[0]).join(", ")}) `;
  return `seed ${r.seed}: ${heal}${r.verdict.ok ? "ok        " : `VIOLATIONS ${bad.join(", ")}`}  ops ${s.ops.ok}/${s.ops.fail}/${s.ops.info}  faults ${s.faults.injected}  guests ${s.guests.started}, ${reclaim}  ${(r.wallMs / 1000).toFixed(1)} s  ${r.dir}`;
}

function resultJson(r: ChaosRunResult): Record<string, unknown> {
  return {
    seed: r.seed,
    ok: r.verdict.ok,
    counts: r.verdict.counts,
    violations: r.verdict.violations.map((v) => ({
      invariant: v.invariant,
      message: v.message,
      ioasid: v.ioasid,
      generation: v.generation,
      setId: v.setId,
      facts: v.facts,
      trace: v.trace.map((t) => ({ evidence: t.evidence, ...t.record })),
    })),
    notes: r.verdict.notes,
    stats: r.stats,
    probe: r.probe,
    healFailures: r.healFailures,
    settled: r.settled,
    settleMs: Math.round(r.settleMs),
    unexpectedExits: r.unexpectedExits,
    historyFile: r.historyFile,
    reportFile: r.reportFile,
    wallMs: Math.round(r.wallMs),
  };
}

/** What the chaos command needs from the CLI. */
export interface ChaosCommandContext {
  out(line: string): void;
  err(line: string): void;
  /** How to start a VMM (`node <this cli> vmm-agent`). */
  readonly vmmCommand: VmmCommand;
  /** stderr's width when it is a terminal (the progress bar), else undefined (a plain line every 5 s). */
  readonly ttyColumns: number | undefined;
  /** Writes to stderr without a newline (the bar redraws itself). */
  write(text: string): void;
}

/** The `ioasidctl chaos` command, in main.ts's command shape. */
export function chaosCommand(ctx: ChaosCommandContext): {
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig["options"]>;
  readonly run: (values: Values, positionals: string[]) => Promise<number>;
} {
  const usage =
    `ioasidctl chaos run [--seed N | --seeds A..B] [--guests ${CHAOS_DEFAULTS.guests}] [--duration ${CHAOS_DEFAULTS.duration}] [--faults ${CHAOS_DEFAULTS.faults}|${Object.keys(FAULT_NAMES).join(",")}|none] [--dir ${CHAOS_DEFAULTS.dir}] [--nats-cluster N [--netns]] [--html FILE] [--json]\n` +
    "  starts a stack of its own (its nats-server and the five services on ephemeral ports, a TCP fault proxy on every\n" +
    "  NATS and gRPC link), drives G guests at once through random life cycles (alloc, bind, program the mdev, ENQCMD,\n" +
    "  DMA and page faults, unbind, free, VMM crashes at any step), injects faults (kill: SIGKILL then restart, stop:\n" +
    "  SIGSTOP/SIGCONT, nats: nats-server restart, latency, drop, partition), heals, runs the probe guest (a planned\n" +
    "  guest whose VMM is killed holding PASIDs: every run has a crash to time), waits for the crashed guests'\n" +
    "  IOASIDs to be reclaimed, and checks DESIGN §7 (S1–S9, L1–L4) on the recorded history and the final state.\n" +
    "  Authenticated as `ioasidctl up` is (DESIGN §11): a NATS user and a certificate per service (mTLS on every link,\n" +
    "  through the fault proxies too), the driver as the operator, the VMMs as `vmm`; the run stops before it begins\n" +
    "  if nats-server lets an anonymous client in or a service answers a client without a certificate (INSECURE).\n" +
    "  --nats-cluster N (1 or 3..7; DESIGN §13): N nats-servers clustered on loopback (every stream with min(N,3) replicas, each\n" +
    "  service given every server, each through a proxy) and a standby core beside the primary (IOASID_CORE_LEASE 3s,\n" +
    "  the roles and the driver given both): `nats` then kills one server drawn from the seed, `kill` of the core kills\n" +
    "  the one that serves (the standby takes over; the killed one comes back as the standby).\n" +
    "  --netns (with --nats-cluster N; root, iproute2, ebtables): each nats-server and each core on a host of its own —\n" +
    "  a network namespace with one veth into a bridge in a switch namespace, an address in a private 10.231.x.0/24\n" +
    "  that exists only there — the servers clustered and the cores dialling them over those addresses; the roles and\n" +
    "  the driver reach each through a relay into its namespace (a unix socket). With partition faults the nemesis also\n" +
    "  cuts hosts apart (the switch drops every frame between two servers, between one server and the rest, or between\n" +
    "  a core and one server), each healed once every stream is current.\n" +
    "  Every namespace is removed at the end (and those of a dead run at the next one).\n" +
    "  The same seed gives the same guest plans and fault schedule (timing, hence the history, varies).\n" +
    "  Writes <dir>/seed-<n>/{history.jsonl,report.html,verdict.txt,summary.json,logs/}; --html FILE: the report there.\n" +
    "  --seeds 1..50 runs seeds in turn, one line each and a total. --json: the result as JSON on stdout.\n" +
    "  Exit 0: no violation; 1: violations, a stack the final heal could not bring back, or a run that could not finish;\n" +
    "  2: bad flags; 130: interrupted.";
  return {
    summary: "chaos test: random guests, injected faults, the invariants of DESIGN §7 checked (`chaos run --seed N`)",
    usage,
    options: {
      seed: { type: "string" },
      seeds: { type: "string" },
      guests: { type: "string" },
      duration: { type: "string" },
      faults: { type: "string" },
      dir: { type: "string" },
      html: { type: "string" },
      json: { type: "boolean", default: false },
      "nats-cluster": { type: "string" },
      netns: { type: "boolean", default: false },
    },
    run: async (values, positionals) => {
      let o: ChaosCommandOptions;
      try {
        if (positionals.length !== 1 || positionals[0] !== "run")
          throw new ChaosUsageError(`the verb is "run": ioasidctl chaos run …${positionals.length === 0 ? "" : ` (got "${positionals.join(" ")}")`}`);
        o = parseChaosOptions(values);
      } catch (err) {
        if (!(err instanceof ChaosUsageError)) throw err;
        ctx.err(`ioasidctl chaos: ${err.message}\nusage: ${usage.split("\n")[0]}   (ioasidctl chaos --help for more)`);
        return 2;
      }
      if (o.netns === true) {
        const netns = await netnsAvailable();
        if (!netns.available) {
          ctx.err(`ioasidctl chaos: --netns cannot run here: ${netns.reason}`);
          return 2;
        }
      }
      const abort = new AbortController();
      const onSignal = () => {
        if (abort.signal.aborted) {
          // A second Ctrl-C: exit now; every process the run started is killed by PID on exit.
          ctx.err("\nchaos: interrupted again: killing what the run started and exiting");
          process.exit(130);
        }
        ctx.err("\nchaos: interrupted, healing and stopping everything (Ctrl-C again to kill at once)…");
        abort.abort();
      };
      process.on("SIGINT", onSignal);
      process.on("SIGTERM", onSignal);
      const results: ChaosRunResult[] = [];
      const failures: string[] = [];
      try {
        for (const seed of o.seeds) {
          if (abort.signal.aborted) break;
          let lastPlain = 0;
          const onProgress = (p: ChaosProgress) => {
            if (ctx.ttyColumns !== undefined) ctx.write(`\r${formatProgress(p, ctx.ttyColumns).padEnd(ctx.ttyColumns - 1)}`);
            else if (performance.now() - lastPlain >= 5000 || p.phase === "done") {
              lastPlain = performance.now();
              ctx.err(formatProgress(p));
            }
          };
          let r: ChaosRunResult;
          try {
            r = await runChaos({
              seed,
              guests: o.guests,
              durationMs: o.durationMs,
              faults: o.faults,
              dir: join(o.dir, `seed-${seed}`),
              ...(o.html === undefined ? {} : { htmlFile: o.html }),
              onProgress,
              signal: abort.signal,
              vmmCommand: ctx.vmmCommand,
              ...(o.natsCluster > 1 ? { natsCluster: o.natsCluster } : {}),
              ...(o.netns === true ? { netns: true } : {}),
            });
          } catch (err) {
            if (ctx.ttyColumns !== undefined) ctx.write("\n");
            const why = `seed ${seed}: the run did not finish: ${(err as Error).message.split("\n").slice(0, 6).join("\n  ")}`;
            failures.push(why);
            ctx.err(why);
            continue;
          } finally {
            if (ctx.ttyColumns !== undefined) ctx.write(`\r${" ".repeat(ctx.ttyColumns - 1)}\r`);
          }
          results.push(r);
          if (o.json) ctx.out(JSON.stringify(resultJson(r)));
          else if (o.seeds.length > 1) ctx.out(formatSeedLine(r));
          else {
            ctx.out(r.verdictText);
            ctx.out("");
            ctx.out(r.summaryText);
            ctx.out(`history ${r.historyFile}\nreport  ${r.reportFile}`);
          }
        }
      } finally {
        process.off("SIGINT", onSignal);
        process.off("SIGTERM", onSignal);
      }
      const bad = results.filter((r) => !r.verdict.ok || r.healFailures.length > 0);
      if (o.seeds.length > 1) {
        const per = new Map<string, number>();
        for (const r of bad) for (const [id, n] of Object.entries(r.verdict.counts)) if ((n ?? 0) > 0) per.set(id, (per.get(id) ?? 0) + (n ?? 0));
        const total =
          `total: ${results.length} seed(s) run, ${results.length - bad.length} ok, ${bad.length} with violations` +
          (bad.length === 0 ? "" : ` (seeds ${bad.map((r) => r.seed).join(", ")}: ${[...per].map(([id, n]) => `${id} ${n}`).join(", ")})`) +
          (failures.length === 0 ? "" : `, ${failures.length} did not finish`) +
          `; ${results.reduce((s, r) => s + r.stats.ops.ok + r.stats.ops.fail + r.stats.ops.info, 0)} operations, ${results.reduce((s, r) => s + r.stats.faults.injected, 0)} faults`;
        if (o.json)
          ctx.out(
            JSON.stringify({
              total: true,
              seeds: results.length,
              ok: results.length - bad.length,
              violations: bad.map((r) => r.seed),
              failed: failures.length,
            }),
          );
        else ctx.out(total);
      }
      if (abort.signal.aborted) return 130;
      return bad.length === 0 && failures.length === 0 ? 0 : 1;
    },
  };
}
