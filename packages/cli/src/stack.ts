import { spawn, spawnSync } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { checkHealth } from "@ioasid/grpc-kit";
import {
  defaultMember,
  readInstanceCredentials,
  writeStackCredentials,
  type InstanceCredentials,
  type NatsRole,
  type StackCredentials,
} from "@ioasid/security";

/** The five services of the stack, in start order, with their address variable and default port offset. */
export const SERVICES = [
  { name: "ioasid-core", addressVar: "IOASID_CORE_GRPC_ADDRESS", offset: 0, role: "core", instance: defaultMember("core").instance },
  { name: "iommu", addressVar: "IOMMU_GRPC_ADDRESS", offset: 1, role: "iommu", instance: defaultMember("iommu").instance },
  { name: "vfio", addressVar: "VFIO_GRPC_ADDRESS", offset: 2, role: "vfio", instance: defaultMember("vfio").instance },
  { name: "kvm", addressVar: "KVM_GRPC_ADDRESS", offset: 3, role: "kvm", instance: defaultMember("kvm").instance },
  { name: "vdcm", addressVar: "VDCM_GRPC_ADDRESS", offset: 4, role: "vdcm", instance: defaultMember("vdcm").instance },
] as const satisfies ReadonlyArray<{ name: string; addressVar: string; offset: number; role: NatsRole; instance: string }>;
export type ServiceName = (typeof SERVICES)[number]["name"];

/** Where a running stack is: written by {@link stackUp}, read by every other command. */
export interface StackState {
  readonly dir: string;
  readonly natsUrl: string;
  readonly nats: { readonly pid: number | undefined; readonly port: number; readonly storeDir: string; readonly external: boolean };
  readonly services: Record<ServiceName, { readonly pid: number | undefined; readonly address: string; readonly log: string }>;
  readonly startedAt: number;
  /**
   * The operator's credentials directory (its NATS user, no limits, and its certificate): what
   * ioasidctl connects with. Absent when the stack runs without authorization (`--insecure`).
   */
  readonly operatorCredentials?: string;
  /** The credentials directory a VMM process (`ioasidctl vm create`) reaches VFIO with. */
  readonly vmmCredentials?: string;
}

/** Options of {@link stackUp}. */
export interface StackUpOptions {
  /** Directory for state, logs and the JetStream store. @default ".ioasid" */
  readonly dir?: string;
  /** Start from an empty JetStream store (the demo: a run of its own, not the last run's IOASIDs). @default false */
  readonly freshStore?: boolean;
  /** gRPC ports are basePort … basePort+4 (core, iommu, vfio, kvm, vdcm). @default 50051 */
  readonly basePort?: number;
  /** NATS client port. @default 4222 */
  readonly natsPort?: number;
  /** Use this NATS (with JetStream) instead of starting one. */
  readonly natsUrl?: string;
  /** Time every service gets to report SERVING. @default 20000 */
  readonly readyTimeoutMs?: number;
  /** Progress lines. */
  readonly log?: (line: string) => void;
  /** Node options for the services (`--cpu-prof`, `--inspect`…). @default none */
  readonly nodeArgs?: readonly string[];
  /**
   * No authorization (DESIGN §11's debugging mode): nats-server lets anyone publish and subscribe
   * anything, services connect without credentials. Says so loudly. @default false
   */
  readonly insecure?: boolean;
}

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (packages/cli/dist → ../../..). */
export const repoRoot = resolve(here, "..", "..", "..");

/** Path of a built service main. */
export function serviceMain(name: ServiceName): string {
  return join(repoRoot, "services", name, "dist", "main.js");
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

async function portFree(port: number): Promise<boolean> {
  return new Promise((resolvePort) => {
    const srv = createServer();
    srv.once("error", () => resolvePort(false));
    srv.listen(port, "127.0.0.1", () => srv.close(() => resolvePort(true)));
  });
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

/**
 * Brings the embedded stack up: a local nats-server with JetStream (unless `natsUrl` is given) and
 * the five services as background processes, logs in `<dir>/logs/<service>.log`. Resolves when
 * every service's health check answers SERVING.
 * @throws Error with the one thing to do when nats-server is missing, a port is taken, a stack is
 *   already running, or a service does not come up (with the end of its log)
 */
export async function stackUp(options: StackUpOptions = {}): Promise<StackState> {
  const dir = resolve(options.dir ?? ".ioasid");
  const basePort = options.basePort ?? 50051;
  const natsPort = options.natsPort ?? 4222;
  const log = options.log ?? (() => undefined);
  if (existsSync(stateFile(dir))) {
    const old = JSON.parse(readFileSync(stateFile(dir), "utf8")) as StackState;
    if (Object.values(old.services).some((s) => alive(s.pid)) || alive(old.nats.pid)) {
      throw new Error(`a stack is already running from ${dir}: \`ioasidctl down\` first`);
    }
  }
  for (const s of SERVICES) {
    if (!existsSync(serviceMain(s.name))) throw new Error(`${serviceMain(s.name)} is missing: build first with \`npm run build\``);
  }
  const ports = [
    ...SERVICES.map((s) => ({ port: basePort + s.offset, what: s.name })),
    ...(options.natsUrl === undefined ? [{ port: natsPort, what: "nats-server" }] : []),
  ];
  for (const { port, what } of ports) {
    if (!(await portFree(port))) {
      throw new Error(`port ${port} (${what}) is in use on 127.0.0.1: stop what uses it, or choose other ports (--base-port, --nats-port)`);
    }
  }
  if (options.freshStore === true) rmSync(join(dir, "nats"), { recursive: true, force: true });
  mkdirSync(join(dir, "logs"), { recursive: true });
  // What was started goes again if the stack does not come up: nothing is left running.
  const started: number[] = [];
  try {
    return await launchStack(dir, basePort, natsPort, options, log, started);
  } catch (err) {
    for (const pid of started.reverse()) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    rmSync(stateFile(dir), { force: true });
    throw err;
  }
}

async function launchStack(
  dir: string,
  basePort: number,
  natsPort: number,
  options: StackUpOptions,
  log: (line: string) => void,
  started: number[],
): Promise<StackState> {
  let nats: StackState["nats"];
  let natsUrl: string;
  let credentials: (StackCredentials & { readonly services: Record<ServiceName, string> }) | undefined;
  if (options.insecure === true) {
    log("INSECURE: no authorization — anyone who reaches this NATS may forge deliveries, op-log entries and acks (--insecure is for debugging only)");
  }
  if (options.natsUrl !== undefined) {
    natsUrl = options.natsUrl;
    nats = { pid: undefined, port: Number(new URL(natsUrl).port || 4222), storeDir: "", external: true };
  } else {
    if (spawnSync("nats-server", ["--version"], { encoding: "utf8" }).error !== undefined) {
      throw new Error("nats-server is not installed: `sudo apt-get install -y nats-server` (or give --nats-url of a NATS with JetStream)");
    }
    const storeDir = join(dir, "nats");
    mkdirSync(storeDir, { recursive: true });
    const out = openSync(join(dir, "logs", "nats-server.log"), "a");
    const args = ["-js", "-sd", storeDir, "-a", "127.0.0.1", "-p", String(natsPort)];
    if (options.insecure !== true) {
      const made = await writeStackCredentials({
        root: join(dir, "credentials"),
        members: SERVICES,
        config: {
          file: join(dir, "nats-server.conf"),
          lines: ["host: 127.0.0.1", `port: ${natsPort}`, `jetstream { store_dir: ${JSON.stringify(storeDir)} }`],
        },
      });
      const services = Object.fromEntries(SERVICES.map((x) => [x.name, made.members.get(`${x.role}.${x.instance}`)!])) as Record<ServiceName, string>;
      credentials = { ...made, services };
      args.splice(0, args.length, "-c", credentials.config);
    }
    const child = spawn("nats-server", args, {
      detached: true,
      stdio: ["ignore", out, out],
    });
    child.unref();
    closeSync(out);
    natsUrl = `nats://127.0.0.1:${natsPort}`;
    if (child.pid !== undefined) started.push(child.pid);
    nats = { pid: child.pid, port: natsPort, storeDir, external: false };
    await waitUntil(async () => !(await portFree(natsPort)), 10_000, "nats-server to listen", join(dir, "logs", "nats-server.log"));
    log(
      `nats-server      pid ${child.pid}  ${natsUrl} (JetStream in ${storeDir}${credentials === undefined ? ", no authorization" : `, a user per role; credentials in ${join(dir, "credentials")}`})`,
    );
  }

  const services = {} as Record<ServiceName, { pid: number | undefined; address: string; log: string }>;
  // ioasidctl checks the services' health as the operator (every server demands a client certificate).
  const tls = credentials === undefined ? undefined : readInstanceCredentials(credentials.operator);
  const addr = (name: ServiceName) => `127.0.0.1:${basePort + SERVICES.find((s) => s.name === name)!.offset}`;
  const env = {
    ...process.env,
    NATS_URL: natsUrl,
    IOASID_CORE_ADDRESS: addr("ioasid-core"),
    IOMMU_ADDRESS: addr("iommu"),
    VDCM_ADDRESS: addr("vdcm"),
    KVM_ADDRESS: addr("kvm"),
    VFIO_ADDRESS: addr("vfio"),
  };
  for (const s of SERVICES) {
    const logFile = join(dir, "logs", `${s.name}.log`);
    const out = openSync(logFile, "a");
    const child = spawn(process.execPath, [...(options.nodeArgs ?? []), serviceMain(s.name)], {
      detached: true,
      stdio: ["ignore", out, out],
      env: { ...env, [s.addressVar]: addr(s.name), IOASID_CREDENTIALS_DIR: credentials?.services[s.name] ?? "" },
    });
    child.unref();
    closeSync(out);
    if (child.pid !== undefined) started.push(child.pid);
    services[s.name] = { pid: child.pid, address: addr(s.name), log: logFile };
    // The core first: the roles register with it at start.
    if (s.name === "ioasid-core") await waitServing(s.name, addr(s.name), logFile, options.readyTimeoutMs ?? 20_000, tls);
  }
  const state: StackState = {
    dir,
    natsUrl,
    nats,
    services,
    startedAt: Date.now(),
    ...(credentials === undefined ? {} : { operatorCredentials: credentials.operator, vmmCredentials: credentials.vmm }),
  };
  writeFileSync(stateFile(dir), JSON.stringify(state, null, 2));
  for (const s of SERVICES) {
    await waitServing(s.name, services[s.name].address, services[s.name].log, options.readyTimeoutMs ?? 20_000, tls);
    log(`${s.name.padEnd(16)} pid ${services[s.name].pid}  ${services[s.name].address}  SERVING  (log ${services[s.name].log})`);
  }
  return state;
}

async function waitServing(name: string, address: string, logFile: string, timeoutMs: number, tls: InstanceCredentials | undefined): Promise<void> {
  await waitUntil(
    async () => {
      try {
        return (await checkHealth(address, "", { deadlineMs: 500, ...(tls === undefined ? {} : { client: { tls } }) })) === "SERVING";
      } catch {
        return false;
      }
    },
    timeoutMs,
    `${name} to report SERVING on ${address}`,
    logFile,
  );
}

async function waitUntil(cond: () => Promise<boolean>, timeoutMs: number, what: string, logFile: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  const tail = existsSync(logFile) ? readFileSync(logFile, "utf8").split("\n").slice(-15).join("\n") : "(no log)";
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last lines of ${logFile}:\n${tail}`);
}

/**
 * Brings the stack down: SIGTERM to every process it started (services first, nats-server last),
 * SIGKILL after `graceMs`, then removes the state file (logs and the JetStream store stay unless
 * `purge`).
 */
export async function stackDown(options: { dir?: string; graceMs?: number; purge?: boolean; log?: (line: string) => void } = {}): Promise<void> {
  const dir = resolve(options.dir ?? ".ioasid");
  const state = readState(dir);
  const log = options.log ?? (() => undefined);
  const stop = async (name: string, pid: number | undefined) => {
    if (!alive(pid)) return;
    process.kill(pid!, "SIGTERM");
    const deadline = Date.now() + (options.graceMs ?? 5000);
    while (alive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (alive(pid)) {
      process.kill(pid!, "SIGKILL");
      log(`${name.padEnd(16)} pid ${pid} killed (did not stop in time)`);
    } else log(`${name.padEnd(16)} pid ${pid} stopped`);
  };
  for (const s of [...SERVICES].reverse()) await stop(s.name, state.services[s.name]?.pid);
  if (!state.nats.external) await stop("nats-server", state.nats.pid);
  rmSync(stateFile(dir), { force: true });
  if (options.purge === true) rmSync(dir, { recursive: true, force: true });
}
