import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { checkHealth } from "@ioasid/grpc-kit";
import { readInstanceCredentials, type InstanceCredentials } from "@ioasid/security";
import { describeExit, RestartPolicy, type RestartDecision, type RestartPolicyOptions, type ServiceExit } from "./restart-policy.js";
import { readState, STANDBY_CORE, Supervision, writeState, type ServiceRecord, type StackState, type SupervisedName } from "./stack-state.js";

/** How the supervisor starts one service (written by `stackUp`, read by the supervisor). */
export interface SupervisedService {
  readonly name: SupervisedName;
  /** The program (node) and its arguments. */
  readonly command: string;
  readonly args: readonly string[];
  /** Variables set on top of the supervisor's own environment (which is `up`'s). */
  readonly env: Readonly<Record<string, string>>;
  /**
   * Variables set on top of `env` when it is started again: a core of a pair comes back as the
   * standby (IOASID_CORE_STANDBY), since the other one serves or takes over meanwhile.
   */
  readonly restartEnv?: Readonly<Record<string, string>>;
  readonly address: string;
  /** Its log file (stdout and stderr, appended across restarts). */
  readonly log: string;
}

/** What the supervisor of a stack directory runs: `<dir>/supervisor.json`. */
export interface SupervisorPlan {
  /** In start order; the first (the core) is serving before the others start (they register with it). */
  readonly services: readonly SupervisedService[];
  /** The operator's credentials, to ask the core's health over mTLS. */
  readonly operatorCredentials?: string;
  /** How long the first service gets to report SERVING before the others start anyway, ms. */
  readonly readyTimeoutMs: number;
  readonly restart: RestartPolicyOptions;
}

/** The supervisor's plan file of a stack directory. */
export function supervisorPlanFile(dir: string): string {
  return join(dir, "supervisor.json");
}

/** Writes the supervisor's plan (paths and addresses, no secrets: the credentials stay in their files). */
export function writeSupervisorPlan(dir: string, plan: SupervisorPlan): void {
  writeFileSync(supervisorPlanFile(dir), JSON.stringify(plan, null, 2), { mode: 0o600 });
}

/** Whether a gRPC server answers SERVING to a health check (as the operator when `tls` is given). */
export async function isServing(address: string, tls: InstanceCredentials | undefined, deadlineMs = 500): Promise<boolean> {
  try {
    return (await checkHealth(address, "", { deadlineMs, ...(tls === undefined ? {} : { client: { tls } }) })) === "SERVING";
  } catch {
    return false;
  }
}

/** Options of {@link superviseStack}. */
export interface SuperviseOptions {
  /** The stack's log: one line per start, exit, restart and decision. @default stdout (`<dir>/logs/supervisor.log`) */
  readonly report?: (line: string) => void;
}

/**
 * Runs the embedded stack's services and restarts those that fail (DESIGN §13: "a fail-stopped
 * service is restarted with backoff, and the restart is reported", compose's `restart:
 * on-failure`): each service is spawned from `<dir>/supervisor.json`, its PID recorded in
 * `<dir>/stack.json` at once (so `ioasidctl down` stops it by PID even if the supervisor died),
 * and each exit decided by a {@link RestartPolicy}: a failure (non-zero exit, a signal) is
 * restarted after the backoff; exit 0 (a graceful stop by hand) and exit 2 (a configuration error)
 * are not; too many failures in the window and it gives up. Every decision is a line of the
 * stack's log and shows in `ioasidctl status` (restarts, last exit, supervision).
 *
 * On SIGTERM or SIGINT it stops restarting and exits 0, leaving the services running: `ioasidctl
 * down` stops the supervisor first, then every service by the PID recorded.
 */
export async function superviseStack(dir: string, options: SuperviseOptions = {}): Promise<void> {
  const report = options.report ?? ((line: string) => process.stdout.write(`${new Date().toISOString()} ${line}\n`));
  const plan = JSON.parse(readFileSync(supervisorPlanFile(dir), "utf8")) as SupervisorPlan;
  const tls = plan.operatorCredentials === undefined ? undefined : readInstanceCredentials(plan.operatorCredentials);
  let state: StackState = readState(dir);
  let stopping = false;
  /** Still starting the services for the first time. */
  let launching = true;
  const timers = new Map<SupervisedName, NodeJS.Timeout>();
  const children = new Map<SupervisedName, ChildProcess>();

  const recordOf = (name: SupervisedName): ServiceRecord | undefined => (name === STANDBY_CORE.name ? state.standbyCore : state.services[name]);
  const record = (name: SupervisedName, change: Partial<ServiceRecord>): void => {
    // Written only while the stack is up: `down` removes the state file once it stopped this process.
    if (!existsSync(join(dir, "stack.json"))) return;
    state =
      name === STANDBY_CORE.name
        ? { ...state, standbyCore: { ...state.standbyCore!, ...change } }
        : { ...state, services: { ...state.services, [name]: { ...state.services[name], ...change } } };
    writeState(state);
  };

  const start = (s: SupervisedService, restarts: number): void => {
    const out = openSync(s.log, "a");
    const env = { ...process.env, ...s.env, ...(restarts === 0 ? {} : s.restartEnv) };
    const child = spawn(s.command, [...s.args], { detached: true, stdio: ["ignore", out, out], env });
    closeSync(out);
    const startedAt = Date.now();
    children.set(s.name, child);
    // The PID goes to stack.json in the same turn as the spawn: a `down` from now on finds it.
    record(s.name, { pid: child.pid, restarts, supervision: Supervision.RUNNING, note: undefined });
    report(`${s.name} ${restarts === 0 ? "started" : `restarted (restart ${restarts})`}: pid ${child.pid}`);
    child.once("exit", (code, signal) => onExit(s, { code, signal }, Date.now() - startedAt, restarts));
    // Not started at all (the program is gone): a failure like any other, so the backoff and the bound apply.
    child.once("error", (err) => {
      report(`${s.name} could not be started: ${err.message}`);
      if (child.pid === undefined) onExit(s, { code: 127, signal: null }, 0, restarts);
    });
  };

  const policies = new Map<SupervisedName, RestartPolicy>(plan.services.map((s) => [s.name, new RestartPolicy(plan.restart)]));
  const onExit = (s: SupervisedService, exit: ServiceExit, ranMs: number, restarts: number): void => {
    children.delete(s.name);
    // A signal to the supervisor exits it at once (see stop): no exit is decided after it.
    if (stopping) return;
    const lastExit = { ...exit, at: Date.now() };
    const policy = policies.get(s.name)!;
    const decision: RestartDecision = policy.decide(exit, ranMs, lastExit.at);
    // Each decision is a line of the log before it is in stack.json: whoever sees the state (`up`
    // waiting for the service, `status`) finds the line that explains it.
    const how = `${s.name} pid ${recordOf(s.name)?.pid} ended (${describeExit(exit)}) after ${(ranMs / 1000).toFixed(1)} s`;
    switch (decision.kind) {
      case "restart": {
        report(`${how}: restarting in ${decision.delayMs} ms (${decision.restarts} of at most ${policy.maxRestarts} within ${policy.windowMs / 1000} s)`);
        record(s.name, { pid: undefined, lastExit, supervision: Supervision.RESTARTING });
        const timer = setTimeout(() => {
          timers.delete(s.name);
          if (!stopping) start(s, restarts + 1);
        }, decision.delayMs);
        timers.set(s.name, timer);
        return;
      }
      case "leave": {
        const note =
          decision.reason === "clean-exit"
            ? "exited 0 (a graceful stop is not a failure): not restarted"
            : `exited 2, a configuration error (it would fail the same way again): not restarted; fix it (see ${s.log}), then \`ioasidctl down\` and \`up\``;
        report(`${how}: ${note}`);
        record(s.name, { pid: undefined, lastExit, supervision: Supervision.STOPPED, note });
        break;
      }
      case "give-up": {
        const note = `failed again after ${decision.restarts} restart${decision.restarts === 1 ? "" : "s"} within ${decision.windowMs / 1000} s: not restarted any more (see ${s.log})`;
        report(`${how}: GAVE UP, ${note}`);
        record(s.name, { pid: undefined, lastExit, supervision: Supervision.GAVE_UP, note });
        break;
      }
    }
    if (!launching && children.size === 0 && timers.size === 0) report("no service left to supervise: the supervisor exits");
  };

  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    for (const timer of timers.values()) clearTimeout(timer);
    for (const [name] of timers) record(name, { supervision: Supervision.STOPPED, note: "its restart was cancelled: the supervisor stopped" });
    timers.clear();
    report(`${signal}: the supervisor stops; the services it started keep running until \`ioasidctl down\` stops them by PID`);
    process.exit(0);
  };
  process.once("SIGTERM", () => stop("SIGTERM"));
  process.once("SIGINT", () => stop("SIGINT"));

  state = { ...state, supervisor: { pid: process.pid, log: state.supervisor?.log ?? "" } };
  writeState(state);
  report(`supervising ${plan.services.map((s) => s.name).join(", ")} (pid ${process.pid})`);
  for (const [i, s] of plan.services.entries()) {
    if (stopping) return;
    start(s, 0);
    // The core first: the roles register with it at start.
    if (i === 0) {
      const deadline = Date.now() + plan.readyTimeoutMs;
      while (!stopping && children.has(s.name) && Date.now() < deadline && !(await isServing(s.address, tls))) await new Promise((r) => setTimeout(r, 100));
    }
  }
  launching = false;
  if (children.size === 0 && timers.size === 0) report("no service left to supervise: the supervisor exits");
}
