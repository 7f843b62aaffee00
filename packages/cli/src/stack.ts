import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { METRICS_PORT_OFFSET } from "@ioasid/grpc-kit";
import { readInstanceCredentials, writeStackCredentials, type StackCredentials } from "@ioasid/security";
import type { RestartPolicyOptions } from "./restart-policy.js";
import {
  alive,
  readState,
  runningProcesses,
  SERVICES,
  STANDBY_CORE,
  stateFile,
  Supervision,
  writeState,
  type ServiceName,
  type ServiceRecord,
  type StackState,
} from "./stack-state.js";
import { isServing, supervisorPlanFile, writeSupervisorPlan, type SupervisedService } from "./supervisor.js";

export { alive, readState, SERVICES, stateFile, Supervision, type ServiceName, type ServiceRecord, type StackState } from "./stack-state.js";

/** Options of {@link stackUp}. */
export interface StackUpOptions {
  /** Directory for state, logs and the JetStream store. @default ".ioasid" */
  readonly dir?: string;
  /** Start from an empty JetStream store (the demo: a run of its own, not the last run's IOASIDs). @default false */
  readonly freshStore?: boolean;
  /**
   * gRPC ports are basePort … basePort+4 (core, iommu, vfio, kvm, vdcm); their Prometheus endpoints
   * (`GET /metrics`, on 127.0.0.1) basePort+5 … basePort+9, in the same order. @default 50051
   */
  readonly basePort?: number;
  /** NATS client port. @default 4222 */
  readonly natsPort?: number;
  /** Use this NATS (with JetStream) instead of starting one. */
  readonly natsUrl?: string;
  /**
   * Start a NATS cluster of this many servers instead of one (issue 18): client ports natsPort …
   * natsPort+n-1, route ports natsPort+100 …, JetStream on each, and every stream with
   * min(n, 3) replicas. @default 1
   */
  readonly natsCluster?: number;
  /**
   * Run a second core beside the first (issue 18, DESIGN §13): it waits behind the serving core's
   * lease and takes over when that core dies; the supervisor brings a dead core back as the standby.
   * The roles get both addresses, and so does ioasidctl (`ipv4:a,b`). gRPC on basePort+10, metrics
   * on basePort+15. @default false
   */
  readonly standbyCore?: boolean;
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
  /** When the supervisor restarts a failed service, and when it gives up (DESIGN §13). @default {@link RestartPolicyOptions}' defaults */
  readonly restart?: RestartPolicyOptions;
}

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (packages/cli/dist → ../../..). */
export const repoRoot = resolve(here, "..", "..", "..");

/** Path of the built supervisor (`up` starts it detached; it starts and restarts the services). */
export const supervisorMain = join(repoRoot, "packages", "cli", "dist", "supervisor-main.js");

/** Path of a built service main. */
export function serviceMain(name: ServiceName): string {
  return join(repoRoot, "services", name, "dist", "main.js");
}

async function portFree(port: number): Promise<boolean> {
  return new Promise((resolvePort) => {
    const srv = createServer();
    srv.once("error", () => resolvePort(false));
    srv.listen(port, "127.0.0.1", () => srv.close(() => resolvePort(true)));
  });
}

/**
 * Brings the embedded stack up: a local nats-server with JetStream (unless `natsUrl` is given), and
 * a supervisor process that starts the five services in the background and restarts one that
 * fails, with backoff (DESIGN §13; see `superviseStack`); logs in `<dir>/logs/<service>.log`, the
 * supervisor's (every exit and restart) in `<dir>/logs/supervisor.log`. Resolves when every
 * service's health check answers SERVING. The supervisor and the services outlive the caller:
 * {@link stackDown} stops them by the PIDs in `<dir>/stack.json`.
 * @throws Error with the one thing to do when nats-server is missing, a port is taken, a stack is
 *   already running, or a service does not come up (with the end of its log); nothing it started
 *   is left running then
 */
export async function stackUp(options: StackUpOptions = {}): Promise<StackState> {
  const dir = resolve(options.dir ?? ".ioasid");
  const basePort = options.basePort ?? 50051;
  const natsPort = options.natsPort ?? 4222;
  const log = options.log ?? (() => undefined);
  if (existsSync(stateFile(dir)) && runningProcesses(readState(dir)).length > 0) {
    throw new Error(`a stack is already running from ${dir}: \`ioasidctl down\` first`);
  }
  const standby = options.standbyCore === true;
  for (const main of [...SERVICES.map((s) => serviceMain(s.name)), supervisorMain]) {
    if (!existsSync(main)) throw new Error(`${main} is missing: build first with \`npm run build\``);
  }
  const ports = [
    ...SERVICES.map((s) => ({ port: basePort + s.offset, what: s.name })),
    ...SERVICES.map((s) => ({ port: metricsPort(basePort, s.name), what: `${s.name} metrics` })),
    ...(standby
      ? [
          { port: basePort + STANDBY_CORE.offset, what: STANDBY_CORE.name },
          { port: basePort + METRICS_PORT_OFFSET + STANDBY_CORE.offset, what: `${STANDBY_CORE.name} metrics` },
        ]
      : []),
    ...(options.natsUrl === undefined
      ? Array.from({ length: options.natsCluster ?? 1 }, (_, i) => [
          { port: natsPort + i, what: `nats-server${(options.natsCluster ?? 1) > 1 ? ` n${i}` : ""}` },
          ...((options.natsCluster ?? 1) > 1 ? [{ port: natsPort + 100 + i, what: `nats-server n${i} routes` }] : []),
        ]).flat()
      : []),
  ];
  for (const { port, what } of ports) {
    if (!(await portFree(port))) {
      throw new Error(`port ${port} (${what}) is in use on 127.0.0.1: stop what uses it, or choose other ports (--base-port, --nats-port)`);
    }
  }
  if (options.freshStore === true) rmSync(join(dir, "nats"), { recursive: true, force: true });
  mkdirSync(join(dir, "logs"), { recursive: true });
  // What was started goes again if the stack does not come up: nothing is left running.
  const started: Started = { nats: undefined, natsCluster: [], supervisor: undefined };
  try {
    return await launchStack(dir, basePort, natsPort, options, log, started);
  } catch (err) {
    await killStarted(dir, started);
    rmSync(stateFile(dir), { force: true });
    rmSync(supervisorPlanFile(dir), { force: true });
    throw err;
  }
}

/** The processes a `stackUp` started itself (the services are the supervisor's: stack.json has them). */
interface Started {
  nats: number | undefined;
  /** The servers of `--nats-cluster`. */
  natsCluster: (number | undefined)[];
  supervisor: ChildProcess | undefined;
}

/** Kills what a failed `stackUp` started: the supervisor first (so that it restarts nothing), then its services, then nats-server. */
async function killStarted(dir: string, started: Started): Promise<void> {
  const kill = (pid: number | undefined) => {
    if (pid === undefined) return;
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  };
  const supervisor = started.supervisor;
  if (supervisor !== undefined && supervisor.exitCode === null && supervisor.signalCode === null) {
    const gone = new Promise((r) => supervisor.once("exit", r));
    const within = (ms: number) => Promise.race([gone.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
    // SIGTERM first: the supervisor acts on it between two turns, never between a spawn and the
    // record of its PID (a SIGKILL there would leave a service that stack.json does not name).
    supervisor.kill("SIGTERM");
    if (!(await within(3000))) {
      kill(supervisor.pid);
      await within(2000);
    }
  }
  if (existsSync(stateFile(dir))) {
    const state = readState(dir);
    for (const s of [...Object.values(state.services), state.standbyCore]) kill(s?.pid);
  }
  kill(started.nats);
  for (const pid of started.natsCluster) kill(pid);
}

async function launchStack(
  dir: string,
  basePort: number,
  natsPort: number,
  options: StackUpOptions,
  log: (line: string) => void,
  started: Started,
): Promise<StackState> {
  let nats: StackState["nats"];
  let natsUrl: string;
  let credentials: (StackCredentials & { readonly services: Record<ServiceName, string> }) | undefined;
  if (options.insecure === true) {
    log("INSECURE: no authorization — anyone who reaches this NATS may forge deliveries, op-log entries and acks (--insecure is for debugging only)");
  }
  let natsCluster: StackState["natsCluster"];
  if (options.natsUrl !== undefined) {
    natsUrl = options.natsUrl;
    nats = { pid: undefined, port: Number(new URL(natsUrl.split(",")[0]!).port || 4222), storeDir: "", external: true };
  } else if ((options.natsCluster ?? 1) > 1) {
    ({ natsUrl, nats, natsCluster, credentials } = await launchNatsCluster(dir, natsPort, options.natsCluster!, options.insecure === true, log, started));
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
    started.nats = child.pid;
    nats = { pid: child.pid, port: natsPort, storeDir, external: false };
    await waitUntil(async () => !(await portFree(natsPort)), 10_000, "nats-server to listen", join(dir, "logs", "nats-server.log"));
    log(
      `nats-server      pid ${child.pid}  ${natsUrl} (JetStream in ${storeDir}${credentials === undefined ? ", no authorization" : `, a user per role; credentials in ${join(dir, "credentials")}`})`,
    );
  }

  // ioasidctl checks the services' health as the operator (every server demands a client certificate).
  const tls = credentials === undefined ? undefined : readInstanceCredentials(credentials.operator);
  const addr = (name: ServiceName) => `127.0.0.1:${basePort + SERVICES.find((s) => s.name === name)!.offset}`;
  const standby = options.standbyCore === true;
  const standbyAddress = `127.0.0.1:${basePort + STANDBY_CORE.offset}`;
  const env = {
    NATS_URL: natsUrl,
    // Every stream the core creates (op log, history, role state) on up to three servers.
    ...(natsCluster === undefined ? {} : { IOASID_JS_REPLICAS: String(Math.min(natsCluster.length, 3)) }),
    // With a standby the roles (and VFIO) get both cores and follow the one that serves. On a
    // cluster the lease is 3 s: a nats-server's death stalls the lease's requests for a moment
    // (client reconnect, leader elections), which a 1 s lease takes for the core's death.
    ...(standby && natsCluster !== undefined ? { IOASID_CORE_LEASE: "3s" } : {}),
    IOASID_CORE_ADDRESS: standby ? `${addr("ioasid-core")},${standbyAddress}` : addr("ioasid-core"),
    IOMMU_ADDRESS: addr("iommu"),
    VDCM_ADDRESS: addr("vdcm"),
    KVM_ADDRESS: addr("kvm"),
    VFIO_ADDRESS: addr("vfio"),
  };
  const readyTimeoutMs = options.readyTimeoutMs ?? 20_000;
  const plan: SupervisedService[] = SERVICES.map((s) => ({
    name: s.name,
    command: process.execPath,
    args: [...(options.nodeArgs ?? []), serviceMain(s.name)],
    env: {
      ...env,
      [s.addressVar]: addr(s.name),
      IOASID_CREDENTIALS_DIR: credentials?.services[s.name] ?? "",
      IOASID_METRICS_HOST: "127.0.0.1",
      IOASID_METRICS_PORT: String(metricsPort(basePort, s.name)),
    },
    address: addr(s.name),
    log: join(dir, "logs", `${s.name}.log`),
    // A core of a pair comes back as the standby: the other one serves, or takes over, meanwhile.
    ...(standby && s.name === "ioasid-core" ? { restartEnv: { IOASID_CORE_STANDBY: "true" } } : {}),
  }));
  const core = plan[0]!;
  const standbyPlan: SupervisedService | undefined = standby
    ? {
        ...core,
        name: STANDBY_CORE.name,
        env: {
          ...core.env,
          [STANDBY_CORE.addressVar]: standbyAddress,
          IOASID_CORE_STANDBY: "true",
          IOASID_METRICS_PORT: String(basePort + METRICS_PORT_OFFSET + STANDBY_CORE.offset),
        },
        address: standbyAddress,
        log: join(dir, "logs", `${STANDBY_CORE.name}.log`),
      }
    : undefined;
  // Started right after the first core serves, before the roles.
  if (standbyPlan !== undefined) plan.splice(1, 0, standbyPlan);
  writeSupervisorPlan(dir, {
    services: plan,
    ...(credentials === undefined ? {} : { operatorCredentials: credentials.operator }),
    readyTimeoutMs,
    restart: options.restart ?? {},
  });
  const supervisorLog = join(dir, "logs", "supervisor.log");
  const services = Object.fromEntries(
    SERVICES.map((x) => {
      const s = plan.find((p) => p.name === x.name)!;
      return [s.name, { pid: undefined, address: s.address, metrics: metricsUrl(basePort, x.name), log: s.log, restarts: 0 } satisfies ServiceRecord];
    }),
  ) as Record<ServiceName, ServiceRecord>;
  const standbyMetrics = `http://127.0.0.1:${basePort + METRICS_PORT_OFFSET + STANDBY_CORE.offset}/metrics`;
  writeState({
    dir,
    natsUrl,
    nats,
    ...(natsCluster === undefined ? {} : { natsCluster }),
    services,
    ...(standbyPlan === undefined
      ? {}
      : { standbyCore: { pid: undefined, address: standbyPlan.address, metrics: standbyMetrics, log: standbyPlan.log, restarts: 0 } }),
    supervisor: { pid: undefined, log: supervisorLog },
    startedAt: Date.now(),
    ...(credentials === undefined ? {} : { operatorCredentials: credentials.operator, vmmCredentials: credentials.vmm }),
  });
  // From here on the supervisor writes stack.json (the services' PIDs as it starts and restarts them).
  const out = openSync(supervisorLog, "a");
  const supervisor = spawn(process.execPath, [supervisorMain, "--dir", dir], { detached: true, stdio: ["ignore", out, out] });
  closeSync(out);
  supervisor.unref();
  started.supervisor = supervisor;
  log(`supervisor       pid ${supervisor.pid}  starts the services, restarts one that fails (log ${supervisorLog})`);
  for (const s of plan) {
    if (s.name === STANDBY_CORE.name) {
      // A standby does not listen while the other core answers its lease: up once it runs.
      await waitUntil(
        async () => {
          const now = readState(dir).standbyCore;
          if (now?.supervision === Supervision.STOPPED || now?.supervision === Supervision.GAVE_UP) throw notComingUp(s, now.note ?? "");
          if (supervisor.exitCode !== null || supervisor.signalCode !== null) throw notComingUp({ ...s, log: supervisorLog }, "the supervisor exited");
          return Promise.resolve(alive(now?.pid));
        },
        readyTimeoutMs,
        `${s.name} to start`,
        s.log,
      );
      log(
        `${s.name.padEnd(16)} pid ${readState(dir).standbyCore?.pid}  ${s.address}  STANDBY (takes over when the serving core stops answering its lease)  metrics ${standbyMetrics}  (log ${s.log})`,
      );
      continue;
    }
    const name = s.name;
    await waitUntil(
      async () => {
        // A service the supervisor will not start again, or no supervisor: it will not come up.
        const now = readState(dir).services[name];
        if (now.supervision === Supervision.STOPPED || now.supervision === Supervision.GAVE_UP) throw notComingUp(s, now.note ?? "");
        if (supervisor.exitCode !== null || supervisor.signalCode !== null) throw notComingUp({ ...s, log: supervisorLog }, "the supervisor exited");
        return isServing(s.address, tls);
      },
      readyTimeoutMs,
      `${s.name} to report SERVING on ${s.address}`,
      s.log,
    );
    const now = readState(dir).services[name];
    log(`${s.name.padEnd(16)} pid ${now.pid}  ${s.address}  SERVING  metrics ${metricsUrl(basePort, name)}  (log ${s.log})`);
  }
  // A standby is up once its process runs; one that ended meanwhile (a configuration error, say) is
  // not a stack that came up.
  if (standbyPlan !== undefined && !alive(readState(dir).standbyCore?.pid)) {
    const now = readState(dir).standbyCore;
    throw notComingUp(standbyPlan, `it is not running (${now?.note ?? now?.supervision ?? "exited"})`);
  }
  return readState(dir);
}

/**
 * Starts `size` nats-servers clustered on loopback: server `n<i>` takes clients on natsPort+i and
 * routes on natsPort+100+i, JetStream in `<dir>/nats/n<i>`; with authorization, the same users in
 * every server's configuration (one file they include). Resolves once each listens.
 */
async function launchNatsCluster(
  dir: string,
  natsPort: number,
  size: number,
  insecure: boolean,
  log: (line: string) => void,
  started: Started,
): Promise<{
  natsUrl: string;
  nats: StackState["nats"];
  natsCluster: NonNullable<StackState["natsCluster"]>;
  credentials: (StackCredentials & { readonly services: Record<ServiceName, string> }) | undefined;
}> {
  if (spawnSync("nats-server", ["--version"], { encoding: "utf8" }).error !== undefined) {
    throw new Error("nats-server is not installed: `sudo apt-get install -y nats-server` (or give --nats-url of a NATS with JetStream)");
  }
  let credentials: (StackCredentials & { readonly services: Record<ServiceName, string> }) | undefined;
  const authFile = join(dir, "nats-auth.conf");
  if (!insecure) {
    const made = await writeStackCredentials({ root: join(dir, "credentials"), members: SERVICES, config: { file: authFile, lines: [] } });
    const services = Object.fromEntries(SERVICES.map((x) => [x.name, made.members.get(`${x.role}.${x.instance}`)!])) as Record<ServiceName, string>;
    credentials = { ...made, services };
  }
  const routes = Array.from({ length: size }, (_, i) => `nats-route://127.0.0.1:${natsPort + 100 + i}`);
  const nodes: NonNullable<StackState["natsCluster"]>[number][] = [];
  for (let i = 0; i < size; i++) {
    const name = `n${i}`;
    const storeDir = join(dir, "nats", name);
    mkdirSync(storeDir, { recursive: true });
    const config = join(dir, `nats-server-${name}.conf`);
    writeFileSync(
      config,
      [
        `server_name: ${name}`,
        "host: 127.0.0.1",
        `port: ${natsPort + i}`,
        `jetstream { store_dir: ${JSON.stringify(storeDir)} }`,
        `cluster { name: ioasid, host: 127.0.0.1, port: ${natsPort + 100 + i}, routes: [${routes.filter((_, j) => j !== i).join(", ")}] }`,
        ...(credentials === undefined ? [] : [`include ${JSON.stringify(authFile.split("/").at(-1))}`]),
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    const logFile = join(dir, "logs", `nats-server-${name}.log`);
    const out = openSync(logFile, "a");
    const child = spawn("nats-server", ["-c", config], { detached: true, stdio: ["ignore", out, out] });
    child.unref();
    closeSync(out);
    started.natsCluster.push(child.pid);
    nodes.push({ name, pid: child.pid, port: natsPort + i, routePort: natsPort + 100 + i, storeDir, log: logFile });
  }
  for (const n of nodes) {
    await waitUntil(async () => !(await portFree(n.port)), 10_000, `nats-server ${n.name} to listen`, n.log);
    log(`nats-server ${n.name}   pid ${n.pid}  nats://127.0.0.1:${n.port} (routes :${n.routePort}, JetStream in ${n.storeDir})`);
  }
  log(
    `nats cluster     ${size} servers, every stream with ${Math.min(size, 3)} replicas${credentials === undefined ? ", no authorization" : `, a user per role; credentials in ${join(dir, "credentials")}`}`,
  );
  const first = nodes[0]!;
  return {
    natsUrl: nodes.map((n) => `nats://127.0.0.1:${n.port}`).join(","),
    nats: { pid: first.pid, port: first.port, storeDir: first.storeDir, external: false },
    natsCluster: nodes,
    credentials,
  };
}

/** The port of a service's Prometheus endpoint in a stack whose gRPC ports start at `basePort`. */
export function metricsPort(basePort: number, name: ServiceName): number {
  return basePort + METRICS_PORT_OFFSET + SERVICES.find((s) => s.name === name)!.offset;
}

/** The URL of a service's Prometheus endpoint in a stack whose gRPC ports start at `basePort`. */
export function metricsUrl(basePort: number, name: ServiceName): string {
  return `http://127.0.0.1:${metricsPort(basePort, name)}/metrics`;
}

function notComingUp(s: { name: string; log: string }, why: string): Error {
  return new Error(`${s.name} did not come up: ${why}; last lines of ${s.log}:\n${tailOf(s.log)}`);
}

function tailOf(logFile: string): string {
  return existsSync(logFile) ? readFileSync(logFile, "utf8").split("\n").slice(-15).join("\n") : "(no log)";
}

async function waitUntil(cond: () => Promise<boolean>, timeoutMs: number, what: string, logFile: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last lines of ${logFile}:\n${tailOf(logFile)}`);
}

/**
 * Brings the stack down: the supervisor first (so that it restarts nothing), then SIGTERM to every
 * process by the PID `stack.json` records now (a restarted service's too; services first,
 * nats-server last), SIGKILL after `graceMs`, then removes the state file (logs and the JetStream
 * store stay unless `purge`).
 */
export async function stackDown(options: { dir?: string; graceMs?: number; purge?: boolean; log?: (line: string) => void } = {}): Promise<void> {
  const dir = resolve(options.dir ?? ".ioasid");
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
  await stop("supervisor", readState(dir).supervisor?.pid);
  // Read again: the supervisor may have restarted a service since (its new PID is there).
  const state = readState(dir);
  for (const s of [...SERVICES].reverse()) {
    if (s.name !== "ioasid-core") await stop(s.name, state.services[s.name]?.pid);
  }
  // The cores of a pair together: the serving one drops its lease as it stops, and a standby still
  // waiting would take over (replay, seal) while the stack goes down.
  await Promise.all([stop("ioasid-core", state.services["ioasid-core"]?.pid), stop(STANDBY_CORE.name, state.standbyCore?.pid)]);
  if (state.natsCluster !== undefined) for (const n of state.natsCluster) await stop(`nats-server ${n.name}`, n.pid);
  else if (!state.nats.external) await stop("nats-server", state.nats.pid);
  rmSync(stateFile(dir), { force: true });
  rmSync(supervisorPlanFile(dir), { force: true });
  if (options.purge === true) rmSync(dir, { recursive: true, force: true });
}
