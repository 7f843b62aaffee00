import type { ChaosJournal } from "./chaos-journal.js";
import { ChaosTarget, FaultKind, HostFaultKind } from "@ioasid/checker";
import { brief, type ChaosStack, type StackService } from "./chaos-stack.js";
import { toFaultMarker, type FaultInjection } from "./schedule.js";

/** Options of {@link runNemesis}. */
export interface NemesisOptions {
  readonly stack: ChaosStack;
  readonly journal: ChaosJournal;
  /** The injections, from {@link schedule}. */
  readonly faults: readonly FaultInjection[];
  /** The run's start (`performance.now()` time base): injection times are relative to it. */
  readonly t0: number;
  /** Stops waiting for the next injection (what is injected still heals). */
  readonly signal?: AbortSignal;
  /** Told when an injection starts or heals (progress). */
  readonly onChange?: (active: number) => void;
}

/**
 * A partition longer than this resets the connections it finds open (as a long partition does);
 * a shorter one stalls them (TCP retransmission delivers their bytes after the heal).
 */
export const PARTITION_RESET_AFTER_MS = 1000;

function until(t: number, signal: AbortSignal | undefined): Promise<boolean> {
  const ms = t - performance.now();
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const timer = setTimeout(
      () => {
        signal?.removeEventListener("abort", onAbort);
        resolve(true);
      },
      Math.max(0, ms),
    );
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Injects a schedule of faults into a chaos stack, each at its time, and heals each after its
 * duration: SIGKILL then restart (same environment, same address; with a standby core, the core
 * that serves is killed, and the heal is done once the other serves, the killed one started again
 * as its standby), SIGSTOP then SIGCONT, a nats-server (of a cluster: the one drawn) SIGKILL then
 * restart (same port, same JetStream store), a host partition of a network-namespace lab (the
 * switch drops frames between two servers' hosts, between one and the rest, or between a core's
 * host and a server's; healed once every stream is current again), and latency, drop or
 * partition on the target's NATS link or on every gRPC link it is an end of. Each injection is
 * recorded (`info` fault marker) before it is done, each heal (`info` heal marker) once it is done.
 * Resolves when every injection has healed; an aborted run injects nothing more but still heals
 * what it injected. A restart that fails is noted and left to the run's final heal.
 */
export async function runNemesis(options: NemesisOptions): Promise<void> {
  const { stack, journal, t0, signal } = options;
  let active = 0;
  const changed = (d: number) => {
    active += d;
    options.onChange?.(active);
  };
  await Promise.all(
    options.faults.map(async (f) => {
      if (!(await until(t0 + f.atMs, signal))) return;
      // Which core a fault of "the core" hits, when there is a standby: the one serving now.
      const core = f.target === ChaosTarget.CORE && f.node === undefined ? stack.coreNode() : undefined;
      journal.fault({ ...toFaultMarker(f), ...(core === undefined ? {} : { node: core }) });
      changed(1);
      try {
        await inject(f);
      } catch (err) {
        journal.note(`fault ${f.faultId} (${f.kind} of ${f.target}) could not be injected: ${brief(err)}`);
      }
      await until(t0 + f.atMs + f.durationMs, undefined);
      try {
        await heal(f);
        journal.heal({ heal: true, faultId: f.faultId });
      } catch (err) {
        journal.note(`fault ${f.faultId} (${f.kind} of ${f.target}) did not heal (left to the final heal): ${brief(err)}`);
      }
      changed(-1);
    }),
  );

  async function inject(f: FaultInjection): Promise<void> {
    const target = f.target as StackService;
    switch (f.kind) {
      case FaultKind.KILL_RESTART:
        return stack.kill(target);
      case FaultKind.STOP_CONT:
        return stack.stop(target);
      case FaultKind.NATS_RESTART:
        return stack.natsKill(f.node);
      case HostFaultKind.HOST_PARTITION:
        return stack.partitionHosts(f.faultId, f.hosts ?? []);
      case FaultKind.LATENCY:
      case FaultKind.DROP:
      case FaultKind.PARTITION:
        if (f.target === ChaosTarget.NATS) return;
        // A core on a lab host dials NATS without a proxy: its NATS link is cut at the switch
        // instead (the serving core's host isolated, as the proxy would cut the serving core's link).
        if (f.kind === FaultKind.PARTITION && f.target === ChaosTarget.CORE && (f.link ?? "nats") === "nats" && stack.lab !== undefined) {
          const serving = stack.coreNode();
          if (serving !== undefined) return stack.partitionHosts(f.faultId, [`core-${serving}`]);
        }
        stack.setNetworkFault(f.faultId, stack.linksOf(target, f.link ?? "nats"), {
          kind: f.kind,
          ...(f.latencyMs === undefined ? {} : { latencyMs: f.latencyMs }),
          ...(f.jitterMs === undefined ? {} : { jitterMs: f.jitterMs }),
          ...(f.probability === undefined ? {} : { probability: f.probability }),
          existing: f.durationMs > PARTITION_RESET_AFTER_MS ? "reset" : "stall",
        });
        return;
    }
  }

  async function heal(f: FaultInjection): Promise<void> {
    const target = f.target as StackService;
    switch (f.kind) {
      case FaultKind.KILL_RESTART:
        return stack.restart(target);
      case FaultKind.STOP_CONT:
        return stack.cont(target);
      case FaultKind.NATS_RESTART:
        return stack.natsRestart(f.node);
      case HostFaultKind.HOST_PARTITION:
        return stack.healHosts(f.faultId);
      default:
        stack.clearNetworkFault(f.faultId);
        // A no-op unless the fault was a cut of a core's host (see inject).
        return stack.healHosts(f.faultId);
    }
  }
}
