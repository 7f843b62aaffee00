import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { defaultMember, type NatsRole } from "@ioasid/security";

/** The five services of the stack, in start order, with their address variable and default port offset. */
export const SERVICES = [
  { name: "ioasid-core", addressVar: "IOASID_CORE_GRPC_ADDRESS", offset: 0, role: "core", instance: defaultMember("core").instance },
  { name: "iommu", addressVar: "IOMMU_GRPC_ADDRESS", offset: 1, role: "iommu", instance: defaultMember("iommu").instance },
  { name: "vfio", addressVar: "VFIO_GRPC_ADDRESS", offset: 2, role: "vfio", instance: defaultMember("vfio").instance },
  { name: "kvm", addressVar: "KVM_GRPC_ADDRESS", offset: 3, role: "kvm", instance: defaultMember("kvm").instance },
  { name: "vdcm", addressVar: "VDCM_GRPC_ADDRESS", offset: 4, role: "vdcm", instance: defaultMember("vdcm").instance },
] as const satisfies ReadonlyArray<{ name: string; addressVar: string; offset: number; role: NatsRole; instance: string }>;
export type ServiceName = (typeof SERVICES)[number]["name"];

/**
 * `up --standby-core` (issue 18, DESIGN §13): the second core process's name in the supervisor's
 * plan, the logs and `status`. Its gRPC port is base-port+10, its metrics base-port+15.
 */
export const STANDBY_CORE = { name: "ioasid-core-b", addressVar: "IOASID_CORE_GRPC_ADDRESS", offset: 10 } as const;
/** A process the supervisor runs: one of the five services, or the second core of a pair. */
export type SupervisedName = ServiceName | typeof STANDBY_CORE.name;

/** What the supervisor is doing about a service (closed set; see {@link ServiceRecord.supervision}). */
export const Supervision = {
  /** Its process runs. */
  RUNNING: "running",
  /** Its process failed; it is started again after the backoff. */
  RESTARTING: "restarting",
  /** Its process ended and is not started again: a clean exit (exit 0), or a configuration error (exit 2). */
  STOPPED: "stopped",
  /** It kept failing (too many restarts within the window): it is not started again. */
  GAVE_UP: "gave-up",
} as const;
export type Supervision = (typeof Supervision)[keyof typeof Supervision];

/** One service of a running stack as `stack.json` records it. */
export interface ServiceRecord {
  /** Its running process, kept current by the supervisor across restarts; undefined while none runs. */
  readonly pid: number | undefined;
  readonly address: string;
  /** Its Prometheus endpoint, `http://127.0.0.1:<port>/metrics` (absent for a stack `attach` found). */
  readonly metrics?: string;
  readonly log: string;
  /** Restarts by the supervisor since `up` (absent for a stack that is not supervised: `attach`). */
  readonly restarts?: number;
  /** How its last process ended (a code or a signal) and when (epoch ms). */
  readonly lastExit?: { readonly code: number | null; readonly signal: string | null; readonly at: number };
  /** What the supervisor does about it. */
  readonly supervision?: Supervision;
  /** Why it is stopped or was given up, in words. */
  readonly note?: string;
}

/** Where a running stack is: written by `stackUp`, kept current by the supervisor, read by every other command. */
export interface StackState {
  readonly dir: string;
  readonly natsUrl: string;
  readonly nats: { readonly pid: number | undefined; readonly port: number; readonly storeDir: string; readonly external: boolean };
  /**
   * `up --nats-cluster N`: every server of the NATS cluster (the first is `nats` too); `natsUrl`
   * lists their client URLs. Absent for one server.
   */
  readonly natsCluster?: readonly {
    readonly name: string;
    readonly pid: number | undefined;
    readonly port: number;
    readonly routePort: number;
    readonly storeDir: string;
    readonly log: string;
  }[];
  readonly services: Record<ServiceName, ServiceRecord>;
  /**
   * `up --standby-core`: the second core process (`ioasid-core-b`), beside `services["ioasid-core"]`.
   * Either of the two may serve; the other waits behind its lease. Absent without a standby.
   */
  readonly standbyCore?: ServiceRecord;
  /**
   * The process that starts the services and restarts those that fail (DESIGN §13), and its log (the
   * stack's log: every exit and restart is a line of it). Absent for a stack `attach` found.
   */
  readonly supervisor?: { readonly pid: number | undefined; readonly log: string };
  readonly startedAt: number;
  /**
   * The operator's credentials directory (its NATS user, no limits, and its certificate): what
   * ioasidctl connects with. Absent when the stack runs without authorization (`--insecure`).
   */
  readonly operatorCredentials?: string;
  /** The credentials directory a VMM process (`ioasidctl vm create`) reaches VFIO with. */
  readonly vmmCredentials?: string;
}

/** The state file of a stack directory. */
export function stateFile(dir: string): string {
  return join(dir, "stack.json");
}

/** Reads the running stack's state, or explains how to start one. */
export function readState(dir = ".ioasid"): StackState {
  const file = stateFile(dir);
  if (!existsSync(file)) throw new Error(`no stack is running from ${resolve(dir)} (no ${file}): start one with \`ioasidctl up\``);
  return JSON.parse(readFileSync(file, "utf8")) as StackState;
}

/**
 * Writes the stack's state file whole, by rename: a reader (`status`, `down`) never sees half of it
 * while the supervisor records a restarted service's PID.
 */
export function writeState(state: StackState): void {
  const file = stateFile(state.dir);
  const temporary = `${file}.${process.pid}.tmp`;
  writeFileSync(temporary, JSON.stringify(state, null, 2));
  renameSync(temporary, file);
}

/** Whether a process with this PID is running (and may be signalled by this one). */
export function alive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Every process a stack state names that is still running (services, supervisor, nats-server). */
export function runningProcesses(state: StackState): number[] {
  const pids = [
    ...Object.values(state.services).map((s) => s.pid),
    state.standbyCore?.pid,
    state.supervisor?.pid,
    state.nats.pid,
    ...(state.natsCluster ?? []).map((n) => n.pid),
  ];
  return pids.filter((pid): pid is number => alive(pid));
}
