#!/usr/bin/env node
// npm run bench: measures the targets of DESIGN §9, each against a floor measured in the same run,
// and prints figures, floors and ratios, then one summary row per target (met or not). Results go to
// bench/results/latest.json with the machine's load average beside them.
//
//   node --expose-gc bench/run.mjs [--quick] [--only=allocator,grpc,delivery,restart,crash,scale,faults,failover]
//
// Each section is an async function in a module of its own (bench/<section>.mjs), given a context
// { quick, log, fmt, now, results, target, signal, phase, waitFor, within, own, startNats,
// startService, stackUp }: it records its figures in `results.<name>` and each DESIGN §9 target it
// measures with `target(id, { figure, floor, ratio, met, note })` (ids in summary.mjs). The
// harness (harness.mjs) owns and watches every process a section starts, bounds every section by a
// deadline, and turns a failure — a thrown error, a timeout, a service that exits on its own — into
// that section's "failed: reason"; the next section runs all the same. The exit status is 0 only if
// every section ran to its end (whether its targets are met is in the table, not in the status):
// 1 if a section failed, 2 on a bad argument, 130/143 on SIGINT/SIGTERM.
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { fileURLToPath } from "node:url";
import { allocatorBench } from "./allocator.mjs";
import { crashBench } from "./crash.mjs";
import { deliverySection } from "./delivery.mjs";
import { faultsBench } from "./faults.mjs";
import { failoverBench } from "./failover.mjs";
import { grpcBench, grpcSecurityBench } from "./grpc.mjs";
import { installExitHooks, runSection } from "./harness.mjs";
import { restartBench } from "./restart.mjs";
import { snapshotRestartBench } from "./snapshot-restart.mjs";
import { scaleBench } from "./scale.mjs";
import { formatTable, summaryRows, TARGETS } from "./summary.mjs";
import { fmt, now } from "./util.mjs";

const SECTIONS = ["allocator", "grpc", "delivery", "restart", "crash", "scale", "faults", "failover"];
/** Each section's deadline in seconds, [quick, full]; BENCH_SECTION_TIMEOUT_S overrides all. */
const DEADLINES_S = {
  allocator: [120, 300],
  grpc: [300, 600],
  delivery: [400, 900],
  restart: [300, 900],
  "restart-snapshot": [300, 900],
  crash: [900, 3600],
  scale: [900, 3600],
  faults: [300, 600],
  failover: [300, 600],
};

const log = (line) => process.stdout.write(`${line}\n`);
const quick = process.argv.includes("--quick");
const only = new Set((process.argv.find((a) => a.startsWith("--only="))?.slice(7) ?? SECTIONS.join(",")).split(",").filter(Boolean));
const unknown = [...only].filter((s) => !SECTIONS.includes(s));
if (unknown.length > 0) {
  log(`unknown section(s) ${unknown.join(", ")}: choose among ${SECTIONS.join(", ")}`);
  process.exit(2);
}

const t0 = now();
const results = {};
const recorded = {};
const sections = {};
const meta = {
  date: new Date().toISOString(),
  node: process.version,
  cpus: os.cpus().length,
  cpuModel: os.cpus()[0]?.model,
  quick,
  only: SECTIONS.filter((s) => only.has(s)),
  loadavgStart: os.loadavg(),
};
/** Records a DESIGN §9 target's figure (see summary.mjs for the ids). */
const target = (id, row) => {
  if (!TARGETS.some((t) => t.id === id)) throw new Error(`no DESIGN §9 target ${id} in bench/summary.mjs`);
  recorded[id] = row;
};
const base = { quick, log, fmt, now, results, target };

/** Writes latest.json and prints the summary table; returns the exit status. */
function finish(interrupted) {
  meta.loadavgEnd = os.loadavg();
  meta.wallSeconds = (now() - t0) / 1000;
  if (interrupted !== undefined) meta.interrupted = interrupted;
  // A section cut short by a signal has not recorded its end yet.
  for (const s of Object.values(sections)) s.seconds ??= (Date.now() - Date.parse(s.startedAt)) / 1000;
  const rows = summaryRows(TARGETS, recorded, sections);
  const failed = Object.entries(sections).filter(([, s]) => s.status !== "ok");
  const out = { meta, sections, targets: TARGETS.map((t, i) => ({ id: t.id, section: t.section, ...rows[i] })), ...results };
  mkdirSync(fileURLToPath(new URL("./results/", import.meta.url)), { recursive: true });
  writeFileSync(fileURLToPath(new URL("./results/latest.json", import.meta.url)), JSON.stringify(out, null, 2) + "\n");
  const load = (l) => l.map((x) => fmt(x, 2)).join(" ");
  log(
    `\nsummary (DESIGN §9), ${quick ? "quick" : "full"} run, ${fmt(meta.wallSeconds)} s, load average ${load(meta.loadavgStart)} → ${load(meta.loadavgEnd)} on ${meta.cpus} CPUs`,
  );
  for (const line of formatTable(rows)) log(`  ${line}`);
  for (const [name, s] of Object.entries(sections))
    log(
      `  section ${name.padEnd(9)} ${s.status.padEnd(6)} ${fmt(s.seconds ?? 0).padStart(5)} s   load ${load(s.loadavgStart)} → ${load(s.loadavgEnd ?? os.loadavg())}`,
    );
  log(`results written to bench/results/latest.json${failed.length > 0 ? `; ${failed.length} section(s) failed: ${failed.map(([n]) => n).join(", ")}` : ""}`);
  return failed.length > 0 ? 1 : 0;
}

installExitHooks({ log, onInterrupt: async (signal) => void finish(signal) });

/** Runs one section under its deadline (see harness.mjs: never throws, records its status). */
const section = (name, fn) => {
  const [q, f] = DEADLINES_S[name] ?? [600, 1800];
  const seconds = Number(process.env.BENCH_SECTION_TIMEOUT_S ?? (quick ? q : f));
  return runSection(name, fn, { base, sections, timeoutMs: seconds * 1000 });
};

log(
  `ioasid-fabric benchmarks (${quick ? "quick" : "full"}), node ${process.version}, ${meta.cpus} CPUs, load average ${meta.loadavgStart.map((x) => fmt(x, 2)).join(" ")}, ${meta.date}`,
);
if (typeof globalThis.gc !== "function") log("  (run with --expose-gc for exact memory figures)");

if (only.has("allocator")) await section("allocator", allocatorBench);
if (only.has("grpc"))
  await section("grpc", async (ctx) => {
    await grpcBench(ctx);
    await grpcSecurityBench(ctx);
  });
if (only.has("delivery")) await section("delivery", deliverySection);
if (only.has("restart")) {
  await section("restart", restartBench);
  // The snapshot restart (issue 15 item 3): ~1M operations, 100k live, kill -9, spawn to serving.
  await section("restart-snapshot", snapshotRestartBench);
}
if (only.has("crash")) await section("crash", crashBench);
if (only.has("scale")) await section("scale", scaleBench);
if (only.has("faults")) await section("faults", faultsBench);
if (only.has("failover")) await section("failover", failoverBench);

process.exit(finish());
