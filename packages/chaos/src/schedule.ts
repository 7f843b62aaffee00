import { ChaosTarget, FaultKind, HostFaultKind, SERVICE_TARGETS, type ChaosLink, type FaultMarker } from "@ioasid/checker";
import { deriveSeed } from "./guest-plan.js";
import { createPrng } from "./prng.js";

/** Options of {@link schedule}. */
export interface ScheduleOptions {
  /** Length of the run, in ms; every fault starts and heals within it. */
  readonly durationMs: number;
  /** Fault kinds to draw from. @default all six of {@link FaultKind} */
  readonly kinds?: readonly FaultKind[];
  /** Services that kill-restart, stop-cont and network faults hit (nats-restart always hits nats). @default the five services */
  readonly targets?: readonly ChaosTarget[];
  /** Mean time between two injection starts (exponentially distributed), in ms. @default 2000 */
  readonly meanIntervalMs?: number;
  /** Shortest and longest time a fault lasts (down, stopped, degraded), in ms. @default [200, 2000] */
  readonly faultMs?: readonly [number, number];
  /** Faults active at once, at most. @default 2 */
  readonly maxConcurrent?: number;
  /** The end of the run kept free of faults, in ms (the run heals and settles). @default 0 */
  readonly quietTailMs?: number;
  /** Range of an added latency, in ms (jitter up to half of it). @default [5, 200] */
  readonly latencyMs?: readonly [number, number];
  /** Range of a drop probability per chunk. @default [0.01, 0.2] */
  readonly dropProbability?: readonly [number, number];
  /**
   * Servers of the NATS cluster (`--nats-cluster N`): a nats-restart then hits one of them, drawn
   * from the seed ("n0" … ). With one server (the default) nothing more is drawn, so a seed's
   * schedule on one server is what it always was. @default 1
   */
  readonly natsNodes?: number;
}

/** One fault to inject: what, where, when, and for how long. */
export interface FaultInjection {
  /** 1, 2, … in start order: pairs the fault marker with its heal marker. */
  readonly faultId: number;
  /** Start, in ms from the run's start. */
  readonly atMs: number;
  /** Time until it is healed (restart, SIGCONT, latency/drop removed, partition healed), in ms. */
  readonly durationMs: number;
  readonly kind: FaultKind | HostFaultKind;
  readonly target: ChaosTarget;
  /** Which link of the target goes through the fault proxy (network faults only). */
  readonly link?: ChaosLink;
  readonly latencyMs?: number;
  readonly jitterMs?: number;
  readonly probability?: number;
  /** The cluster's server a nats-restart hits ("n1"), with {@link ScheduleOptions.natsNodes} > 1. */
  readonly node?: string;
  /** A host partition's hosts (see {@link withHostPartitions}): two cut apart, or one cut from every other. */
  readonly hosts?: readonly string[];
}

const NETWORK: ReadonlySet<FaultKind> = new Set([FaultKind.LATENCY, FaultKind.DROP, FaultKind.PARTITION]);
const ALL_KINDS = Object.values(FaultKind);

/** Most injection starts drawn (a bound on the loop whatever the options). */
const MAX_DRAWS = 100_000;

/**
 * The fault injections of a run, drawn from `seed`: the same seed and options give the same list,
 * on any machine (a mulberry32 stream; see {@link createPrng}). Starts follow a Poisson process of
 * mean interval `meanIntervalMs`; a draw that would hit a target already under a fault, or exceed
 * `maxConcurrent`, is skipped. Sorted by start. Pure.
 * @throws RangeError on options that allow no schedule (no kinds, duration ≤ 0, an empty range)
 * @example
 * for (const f of schedule(7, { durationMs: 60_000 })) console.log(f.atMs, f.kind, f.target);
 */
export function schedule(seed: number, options: ScheduleOptions): FaultInjection[] {
  const kinds = options.kinds ?? ALL_KINDS;
  const targets = options.targets ?? SERVICE_TARGETS;
  const mean = options.meanIntervalMs ?? 2000;
  const [minFault, maxFault] = options.faultMs ?? [200, 2000];
  const maxConcurrent = options.maxConcurrent ?? 2;
  const [minLatency, maxLatency] = options.latencyMs ?? [5, 200];
  const [minDrop, maxDrop] = options.dropProbability ?? [0.01, 0.2];
  const natsNodes = options.natsNodes ?? 1;
  const end = options.durationMs - (options.quietTailMs ?? 0);
  if (!(options.durationMs > 0) || !(end > 0))
    throw new RangeError(`duration ${options.durationMs} ms less a quiet tail of ${options.quietTailMs ?? 0} ms leaves no time for faults`);
  if (kinds.length === 0) throw new RangeError("no fault kinds to draw from");
  if (targets.length === 0 && kinds.some((k) => k !== FaultKind.NATS_RESTART)) throw new RangeError("no targets to draw from");
  if (!(mean > 0) || !(maxConcurrent >= 1)) throw new RangeError("meanIntervalMs must be > 0 and maxConcurrent ≥ 1");
  if (!(minFault > 0 && minFault <= maxFault) || !(minLatency >= 0 && minLatency <= maxLatency) || !(minDrop >= 0 && minDrop <= maxDrop && maxDrop <= 1)) {
    throw new RangeError("faultMs, latencyMs and dropProbability must be ranges [min, max] with min ≤ max (durations > 0, probabilities in [0, 1])");
  }

  const rng = createPrng(seed);
  const out: FaultInjection[] = [];
  let t = 0;
  for (let draw = 0; draw < MAX_DRAWS; draw++) {
    t += -mean * Math.log(1 - rng.next());
    const atMs = Math.round(t);
    if (atMs >= end - minFault) break;
    // Every draw consumes the same numbers whether or not it is kept: a skipped draw does not shift later ones.
    const kind = rng.pick(kinds);
    const target = kind === FaultKind.NATS_RESTART ? ChaosTarget.NATS : rng.pick(targets);
    const link: ChaosLink = rng.chance(0.5) ? "nats" : "grpc";
    const durationMs = Math.min(rng.int(Math.ceil(minFault), Math.floor(maxFault)), end - atMs);
    const latencyMs = rng.int(Math.ceil(minLatency), Math.floor(maxLatency));
    const jitterMs = rng.int(0, Math.floor(latencyMs / 2));
    const probability = Math.round(rng.between(minDrop, maxDrop) * 1000) / 1000;

    // Drawn only on a cluster: the draws above stay those of a single server's schedule.
    const node = natsNodes > 1 && kind === FaultKind.NATS_RESTART ? `n${rng.int(0, natsNodes - 1)}` : undefined;

    const active = out.filter((f) => f.atMs + f.durationMs > atMs);
    if (active.length >= maxConcurrent || active.some((f) => f.target === target)) continue;
    out.push({
      faultId: out.length + 1,
      atMs,
      durationMs,
      kind,
      target,
      ...(NETWORK.has(kind) ? { link } : {}),
      ...(kind === FaultKind.LATENCY ? { latencyMs, jitterMs } : {}),
      ...(kind === FaultKind.DROP ? { probability } : {}),
      ...(node === undefined ? {} : { node }),
    });
  }
  return out;
}

/** The fault marker the runner records when it injects `f` (its heal marker is `{ heal: true, faultId }`). */
export function toFaultMarker(f: FaultInjection): FaultMarker {
  return {
    fault: f.kind,
    target: f.target,
    faultId: f.faultId,
    ...(f.link === undefined ? {} : { link: f.link }),
    ...(f.latencyMs === undefined ? {} : { latencyMs: f.latencyMs }),
    ...(f.jitterMs === undefined ? {} : { jitterMs: f.jitterMs }),
    ...(f.probability === undefined ? {} : { probability: f.probability }),
    ...(f.node === undefined ? {} : { node: f.node }),
    ...(f.hosts === undefined ? {} : { hosts: f.hosts }),
  };
}

/** Options of {@link withHostPartitions}. */
export interface HostPartitionOptions {
  /** Length of the run, in ms (as for {@link schedule}). */
  readonly durationMs: number;
  /** The end of the run kept free of faults, in ms. @default 0 */
  readonly quietTailMs?: number;
  /** The lab's hosts the partitions cut between (the NATS cluster's servers: "n0", "n1", …); at least 2. */
  readonly hosts: readonly string[];
  /**
   * The cores' hosts ("core-a", "core-b") when the cores run on hosts of the lab too: a third move
   * then cuts a core's host from one server's. @default none (two moves: cut two servers apart, isolate one)
   */
  readonly coreHosts?: readonly string[];
  /** Mean time between two host partitions (exponentially distributed), in ms. @default 5000 */
  readonly meanIntervalMs?: number;
  /** Shortest and longest time a host partition lasts, in ms. @default [500, 3000] */
  readonly faultMs?: readonly [number, number];
}

/** The stream of {@link deriveSeed} host partitions draw from (apart from {@link schedule}'s own). */
const HOST_PARTITION_STREAM = 4;

/**
 * A schedule with host partitions added (`ioasidctl chaos run --netns`): drawn from a stream of
 * their own (`seed`), so the schedule they join is exactly {@link schedule}'s for the seed. Each
 * either cuts two hosts apart (both directions) or isolates one from every other, half and half —
 * with `coreHosts`, a third of each and a third cutting a core's host from one server's;
 * one at a time, and never while a nats-restart runs (a server down and another cut off would
 * leave a 3-server cluster without a majority, which tests nothing the run can check). The result
 * is sorted by start and numbered again 1, 2, ….
 * Pure.
 * @throws RangeError with fewer than 2 hosts, or options that allow no fault
 */
export function withHostPartitions(seed: number, faults: readonly FaultInjection[], options: HostPartitionOptions): FaultInjection[] {
  const hosts = options.hosts;
  const mean = options.meanIntervalMs ?? 5000;
  const [minFault, maxFault] = options.faultMs ?? [500, 3000];
  const end = options.durationMs - (options.quietTailMs ?? 0);
  if (hosts.length < 2) throw new RangeError(`host partitions need at least 2 hosts, got ${hosts.length}`);
  if (!(mean > 0) || !(minFault > 0 && minFault <= maxFault))
    throw new RangeError("meanIntervalMs must be > 0 and faultMs a range [min, max] with 0 < min ≤ max");
  const rng = createPrng(deriveSeed(seed, HOST_PARTITION_STREAM, 0));
  const added: FaultInjection[] = [];
  let t = 0;
  for (let draw = 0; draw < MAX_DRAWS; draw++) {
    t += -mean * Math.log(1 - rng.next());
    const atMs = Math.round(t);
    if (atMs >= end - minFault) break;
    const durationMs = Math.min(rng.int(Math.ceil(minFault), Math.floor(maxFault)), end - atMs);
    const coreHosts = options.coreHosts ?? [];
    const move = coreHosts.length === 0 ? (rng.chance(0.5) ? "isolate" : "pair") : (["isolate", "pair", "core"] as const)[rng.int(0, 2)]!;
    const isolate = move === "isolate";
    const a = move === "core" ? rng.pick(coreHosts) : rng.pick(hosts);
    const b = rng.pick(hosts.filter((h) => h !== a));
    const overlaps = (f: FaultInjection) => f.atMs < atMs + durationMs && atMs < f.atMs + f.durationMs;
    if (added.some(overlaps) || faults.some((f) => f.kind === FaultKind.NATS_RESTART && overlaps(f))) continue;
    // A cut of a core's host is a fault of that core ("a", "b"), not of whichever core serves then.
    const core = move === "core" ? { target: ChaosTarget.CORE, node: a.replace(/^core-/, "") } : { target: ChaosTarget.NATS };
    added.push({ faultId: 0, atMs, durationMs, kind: HostFaultKind.HOST_PARTITION, ...core, hosts: isolate ? [a] : [a, b].sort() });
  }
  return [...faults, ...added]
    .map((f, i) => ({ f, i }))
    .sort((x, y) => x.f.atMs - y.f.atMs || x.i - y.i)
    .map(({ f }, i) => ({ ...f, faultId: i + 1 }));
}
