// Section `crash` (DESIGN §9 "crashed guest"): every IOASID of a VM bound (IOMMU, KVM) and
// programmed (VDCM) when its VMM goes away; time from the session's end to the set's destruction
// (its last IOASID reclaimed), taken from the core's own event stream (SET_FREE commit time).
import { mkdirSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { readHistory, stepLabel } from "@ioasid/bus";
import { readState } from "@ioasid/cli";
import { events } from "@ioasid/proto";
import { describeRetries, guestFactory, PREPARE_ATTEMPTS, PREPARE_DEADLINE_MS, PREPARE_GUESTS, PREPARE_PASIDS, wholeStack } from "./guests.mjs";
import { cpuWindows, peakRssMiBOf } from "./proc-cpu.mjs";
import { envCount, fmt, percentile } from "./util.mjs";

/**
 * How long a crowd's reclaim may take before the section fails (the target is 3 s). Ten minutes:
 * the section must print its figure however far from the target it is (issue 15 item 6), and on the
 * 2-core machine 1,000 guests' reclaim took longer than the two minutes this bound was before.
 */
const CROWD_RECLAIM_TIMEOUT_MS = Number(process.env.BENCH_RECLAIM_TIMEOUT_MS ?? 600_000);

/**
 * Starts watching the core's events from now on (the position is taken before returning, so
 * nothing committed after the call is missed). `done` resolves with the commit times of SET_FREE
 * of the given sets; `freed()` says how many have been seen so far; `stop()` ends the watch.
 */
export async function watchSetFrees(c, sets) {
  const pending = new Set(sets);
  const times = new Map();
  const from = (await c.core.getStats({})).lastSeq + 1n;
  const ac = new AbortController();
  let resumed = 0;
  const done = (async () => {
    // SET_FREE only: the core neither serializes nor holds the rest for this stream (the whole
    // stream cost the core ~6% of its time in a crowd). The core cuts off a reader that falls
    // 10,000 events behind (READER_TOO_SLOW, with the sequence to resume from) — resume, a bounded
    // number of times.
    let fromSeq = from;
    for (;;) {
      try {
        for await (const m of c.core.watchEvents(
          { fromSeq, types: [events.EventType.EVENT_TYPE_SET_FREE] },
          { signal: ac.signal, deadlineMs: CROWD_RECLAIM_TIMEOUT_MS + 60_000 },
        )) {
          const e = m.event;
          if (e.type === events.EventType.EVENT_TYPE_SET_FREE && pending.delete(e.setId)) times.set(e.setId, e.commitTime.getTime());
          if (pending.size === 0) break;
        }
        break;
      } catch (err) {
        if (err?.reason !== "READER_TOO_SLOW" || err.metadata?.resume_from_seq === undefined || ++resumed > 1000) throw err;
        fromSeq = BigInt(err.metadata.resume_from_seq);
      }
    }
    ac.abort();
    if (pending.size > 0) throw new Error(`the core's event stream ended with ${pending.size} of ${sets.length} sets not freed`);
    return times;
  })();
  done.catch(() => undefined);
  return { done, freed: () => times.size, resumed: () => resumed, stop: () => ac.abort() };
}

/** The stack's processes by name (its five services, its nats-server) and this one's, for {@link cpuWindows}. */
function stackProcesses(dir) {
  const state = readState(dir);
  const pids = new Map();
  for (const [name, record] of Object.entries(state.services)) if (record.pid !== undefined) pids.set(name, record.pid);
  if (state.nats.pid !== undefined) pids.set("nats-server", state.nats.pid);
  pids.set("this process", process.pid);
  return pids;
}

/**
 * Prints the CPU each process spent in `w`'s windows (divided by `per`), and how many of the
 * machine's CPUs that kept busy; returns the figures by name (ms, divided by `per`).
 */
function logCpu(log, what, w, per) {
  const totals = [...w.totals()].sort((a, b) => b[1] - a[1]);
  const sum = totals.reduce((s, [, ms]) => s + ms, 0);
  log(
    `  CPU ${what} (/proc, session end → SET_FREE): ${totals.map(([name, ms]) => `${name} ${fmt(ms / per, 1)}`).join(", ")} ms; ` +
      `${fmt(sum)} ms of CPU in ${fmt(w.wallMs)} ms: ${fmt(sum / w.wallMs, 2)} of ${availableParallelism()} CPUs busy`,
  );
  return Object.fromEntries(totals.map(([name, ms]) => [name, ms / per]));
}

/** Section `crash`: one crashed guest at a time, then a crowd crashing together. */
export async function crashBench(ctx) {
  const { quick, log, results, target, phase, within } = ctx;
  const runs = envCount("BENCH_CRASH_RUNS", quick ? 3 : 10);
  const warmRuns = envCount("BENCH_CRASH_WARM_RUNS", quick ? 0 : 30, 0);
  const perGuest = 64;
  const crowd = envCount("BENCH_CROWD", quick ? 100 : 1000);
  log(`\n[crash] the whole stack as processes; ${perGuest} PASIDs per guest, each bound (IOMMU, KVM) and programmed (VDCM)`);
  const { c, dir } = await wholeStack(ctx, "crash");
  const guests = guestFactory(ctx, c);

  const single = [];
  // Each teardown's window on the monotonic clock (µs, as a V8 CPU profile's timestamps): with
  // BENCH_PROFILE=1 they are written beside the services' profiles, to cut them to the teardowns.
  const windows = [];
  // Where the time goes: the CPU each process of the stack spends from the session's end to the
  // SET_FREE, summed over the runs (/proc counts in 10 ms ticks: one run alone is too short).
  const singleCpu = cpuWindows(stackProcesses(dir));
  /** One guest prepared, then crashed: ms from its session's end to its set's SET_FREE. */
  const teardown = async (cpu) => {
    const g = await guests.prepare(perGuest);
    const watching = await watchSetFrees(c, [g.setId]);
    cpu?.start();
    const w0 = process.hrtime.bigint();
    const t0 = Date.now();
    g.session.abort();
    const times = await within(watching.done, 30_000, `the SET_FREE of ${g.name}'s set ${g.setId} after its session ended`);
    cpu?.stop();
    windows.push([Number(w0 / 1000n), Number(process.hrtime.bigint() / 1000n)]);
    await c.kvm.destroyVm({ vmId: g.vmId }).catch(() => undefined);
    return times.get(g.setId) - t0;
  };
  for (let r = 0; r < runs; r++) {
    phase(`one crashed guest, run ${r + 1} of ${runs}`);
    single.push(await teardown(singleCpu));
  }
  // The same again on the now warm stack (reported, not the target's figure): the first runs of
  // a new stack also pay for compiling the services' code as it runs (150 runs in a row: 22 ms
  // p50 over the first 25, then 15–18 ms over each 25 after).
  const warm = [];
  for (let r = 0; r < warmRuns; r++) {
    phase(`one crashed guest on the warm stack, run ${r + 1} of ${warmRuns}`);
    warm.push(await teardown());
  }
  if (process.env.BENCH_PROFILE) {
    mkdirSync(new URL("./results/profiles/crash/", import.meta.url), { recursive: true });
    writeFileSync(new URL("./results/profiles/crash/windows.json", import.meta.url), JSON.stringify(windows));
  }
  if (process.env.BENCH_DEBUG) log(`  one crashed guest, in the order run: ${[...single, ...warm].map((ms) => fmt(ms)).join(" ")} ms`);
  single.sort((a, b) => a - b);
  warm.sort((a, b) => a - b);
  const warm50 = warm.length === 0 ? undefined : percentile(warm, 50);
  const s50 = percentile(single, 50);
  log(
    `  one crashed guest, ${perGuest} PASIDs: all reclaimed in p50 ${fmt(s50)} ms (min ${fmt(single[0])}, max ${fmt(single.at(-1))}, ${runs} runs; target ≤ 10 ms p50)`,
  );
  const singleCpuMs = logCpu(log, `per guest in those ${runs} teardowns`, singleCpu, runs);
  if (warm50 !== undefined) {
    log(
      `  then ${warmRuns} more on the same stack, its code compiled by now: p50 ${fmt(warm50)} ms (min ${fmt(warm[0])}, max ${fmt(warm.at(-1))}; reported, not the target's figure)`,
    );
  }
  target("crash.single", {
    figure: `${fmt(s50)} ms p50`,
    ratio: `${fmt(s50 / 10, 2)}× target`,
    met: s50 <= 10,
    note: `the first ${runs} runs on a new stack${warm50 === undefined ? "" : `; ${fmt(warm50)} ms p50 over the ${warmRuns} runs after them`}`,
  });

  log(
    `  preparing ${fmt(crowd)} guests × ${perGuest} PASIDs: ${PREPARE_GUESTS} guests at a time, ${PREPARE_PASIDS} PASIDs of a guest at a time, each call's deadline ${fmt(PREPARE_DEADLINE_MS)} ms, up to ${PREPARE_ATTEMPTS} attempts on DEADLINE_EXCEEDED/UNAVAILABLE`,
  );
  const prepared = await guests.prepareMany(crowd, perGuest, { log });
  log(
    `  prepared in ${fmt(prepared.seconds, 1)} s (${fmt((crowd * perGuest) / prepared.seconds)} PASIDs/s); preparation calls retried: ${describeRetries(guests.stats)}`,
  );

  phase(`reclaim of ${fmt(crowd)} crashed guests`);
  const watching = await watchSetFrees(
    c,
    prepared.guests.map((g) => g.setId),
  );
  const crowdCpu = cpuWindows(stackProcesses(dir));
  crowdCpu.start();
  const w0 = process.hrtime.bigint();
  const t0 = Date.now();
  for (const g of prepared.guests) g.session.abort();
  const times = await within(
    watching.done,
    CROWD_RECLAIM_TIMEOUT_MS,
    `the SET_FREE of all ${fmt(crowd)} crashed guests' sets`,
    () => `${fmt(watching.freed())} of ${fmt(crowd)} sets freed, the event watch resumed ${watching.resumed()} times`,
  );
  crowdCpu.stop();
  if (process.env.BENCH_PROFILE) {
    writeFileSync(
      new URL("./results/profiles/crash/crowd-window.json", import.meta.url),
      JSON.stringify([[Number(w0 / 1000n), Number(process.hrtime.bigint() / 1000n)]]),
    );
  }
  const all = Math.max(...times.values()) - t0;
  if (process.env.BENCH_DEBUG) {
    // Where the time went: first and last record of each step, ms after the sessions ended.
    const h = await readHistory(c.nc, { sinceMs: t0 - 5 });
    const groups = new Map();
    for (const r of h) {
      const k = `${r.role}:${stepLabel(r)}${r.action.$case === "ioasidPut" ? `:${r.action.value.holder?.role}` : ""}`;
      const g = groups.get(k) ?? { n: 0, first: Infinity, last: 0 };
      g.n++;
      g.first = Math.min(g.first, r.ts - t0);
      g.last = Math.max(g.last, r.ts - t0);
      groups.set(k, g);
    }
    for (const [k, g] of [...groups].sort((a, b) => a[1].first - b[1].first))
      log(`    ${k.padEnd(36)} ${String(g.n).padStart(6)} ${fmt(g.first).padStart(7)} ${fmt(g.last).padStart(7)} ms`);
  }
  log(
    `  ${fmt(crowd)} guests × ${perGuest} PASIDs (${fmt(crowd * perGuest)} IOASIDs) crashing together: all reclaimed in ${fmt(all)} ms (target ≤ 3,000 ms for 1,000 guests)`,
  );
  const crowdCpuMs = logCpu(log, `in the crowd's reclaim`, crowdCpu, 1);
  // What the run cost in memory (a GC setting in BENCH_SERVICE_NODE_ARGS trades it for CPU).
  const peakRssMiB = Object.fromEntries([...stackProcesses(dir)].map(([name, pid]) => [name, peakRssMiBOf(pid)]).filter(([, mib]) => mib !== undefined));
  log(
    `  peak resident set (/proc VmHWM) by the crowd's end: ${Object.entries(peakRssMiB)
      .map(([name, mib]) => `${name} ${fmt(mib)}`)
      .join(", ")} MiB`,
  );
  target("crash.crowd", {
    figure: `${fmt(all)} ms`,
    ratio: `${fmt(all / 3000, 2)}× target`,
    met: crowd >= 1000 && all <= 3000,
    note: crowd < 1000 ? `only ${fmt(crowd)} guests (quick or BENCH_CROWD): not the target's 1,000` : undefined,
  });
  results.crash = {
    perGuest,
    singleP50Ms: s50,
    single,
    warmP50Ms: warm50,
    warm,
    crowd,
    crowdAllReclaimedMs: all,
    singleCpuMsPerGuest: singleCpuMs,
    crowdCpuMs,
    peakRssMiB,
    preparationSeconds: prepared.seconds,
    preparationRetries: guests.stats.retries,
    preparation: { guestsAtOnce: PREPARE_GUESTS, pasidsAtOnce: PREPARE_PASIDS, deadlineMs: PREPARE_DEADLINE_MS, attempts: PREPARE_ATTEMPTS },
  };
}
