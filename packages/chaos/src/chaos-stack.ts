import { appendFileSync, cpSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import {
  freePort,
  natsEnv as roleNatsEnv,
  startNats,
  startNatsCluster,
  startService,
  waitFor,
  type NatsCluster,
  type NatsServer,
  type ServiceProcess,
} from "@ioasid/testkit";
import { ChaosTarget, FaultKind, type ChaosLink } from "@ioasid/checker";
import { readInstanceCredentials, VMM_IDENTITY, type InstanceCredentials, type Role } from "@ioasid/security";
import { startFaultProxy, type FaultProxy, type PartitionMode } from "./fault-proxy.js";
import { deriveSeed } from "./guest-plan.js";
import { createNetnsLab, type LabCut, type NetnsLab } from "./netns-lab.js";
import { assertNatsRefusesAnonymous, assertServicesSecure } from "./stack-security.js";

/** A service of the stack (a fault target other than nats-server). */
export type StackService = Exclude<ChaosTarget, "nats">;

/** The services in start order, with the variable each listens on and the role its certificate names. */
export const STACK_SERVICES: ReadonlyArray<{ readonly name: StackService; readonly addressVar: string; readonly role: Exclude<Role, "operator" | "vmm"> }> = [
  { name: ChaosTarget.CORE, addressVar: "IOASID_CORE_GRPC_ADDRESS", role: "core" },
  { name: ChaosTarget.IOMMU, addressVar: "IOMMU_GRPC_ADDRESS", role: "iommu" },
  { name: ChaosTarget.KVM, addressVar: "KVM_GRPC_ADDRESS", role: "kvm" },
  { name: ChaosTarget.VDCM, addressVar: "VDCM_GRPC_ADDRESS", role: "vdcm" },
  { name: ChaosTarget.VFIO, addressVar: "VFIO_GRPC_ADDRESS", role: "vfio" },
];

/**
 * The timeouts a chaos run gives the services: short, so that a fault's consequences (a missed
 * delivery, an unanswered page request, a VMM that never attaches) play out within a run of
 * seconds. Each is the service's own variable (`node services/<name>/dist/main.js --help`).
 */
export const CHAOS_SERVICE_ENV: Readonly<Record<string, string>> = {
  /** A subscriber that has not acknowledged a delivery in 1 s is recorded as missed; the chain moves on (DESIGN §4.4). */
  IOASID_DELIVERY_DEADLINE: "1s",
  /** Missed deliveries are retried every 500 ms (a role that comes back catches up quickly). */
  IOASID_DELIVERY_RETRY: "500ms",
  /** A page-request group nobody answers is answered INVALID by the IOMMU after 2 s. */
  IOMMU_FAULT_TIMEOUT: "2s",
  /** A container whose VMM never attaches its Session is closed as crashed after 3 s. */
  VFIO_SESSION_GRACE: "3s",
  /** A service restarted while nats-server is down keeps trying to reach it for 30 s. */
  IOASID_NATS_CONNECT_TIMEOUT: "30s",
  /** The roles' instance names, explicit: a restarted role must come back under the same name. */
  IOMMU_INSTANCE: "dmar0",
  VDCM_INSTANCE: "vdcm0",
  VFIO_INSTANCE: "vfio-1",
  LOG_LEVEL: "info",
};

/**
 * The lease a chaos run gives its cores when there is a standby (`natsCluster`): longer than a NATS
 * cluster's own failover (a client's reconnect, JetStream's leader elections take seconds) and than
 * the longest stop-cont the nemesis draws (2 s), so that neither is taken for the primary's death.
 */
export const CHAOS_CORE_LEASE = "3s";

/** The lab hosts of the two cores (`netns`). */
export const LAB_CORE_HOSTS: readonly string[] = ["core-a", "core-b"];
/** The port a core listens on, on its lab host (a namespace of its own: any port is free there). */
const LAB_CORE_PORT = 50051;

/** Time a standby core may wait behind the lease: the whole run (it is killed when the stack closes). */
const STANDBY_WAIT_MS = 6 * 3_600_000;

/** One nats-server of the stack: the only one, or one server of its cluster. */
export interface NatsNode {
  /** "nats" for a single server; "n0", "n1", … in a cluster. */
  readonly name: string;
  readonly url: string;
  readonly port: number;
  /** PID while it runs. */
  readonly pid: number | undefined;
  readonly storeDir: string | undefined;
}

/** A proxied link between a service and NATS or one of its gRPC peers. */
export interface ProxyLink {
  /** "vfio→iommu", "kvm→nats", "kvm→nats/n1" (a cluster's server), "iommu→ioasid-core/b" (the second core). */
  readonly name: string;
  /** The service whose connection it carries. */
  readonly from: StackService;
  /** Which of a core and its standby the link is from or to ("a", "b"); unset for a single core. */
  readonly core?: string;
  /** The peer: a service, or "nats". */
  readonly to: StackService | "nats";
  readonly kind: ChaosLink;
  readonly proxy: FaultProxy;
}

/** A network fault on some links, by fault id (faults on one link compose: see {@link ChaosStack.setNetworkFault}). */
export interface NetworkFault {
  readonly kind: typeof FaultKind.LATENCY | typeof FaultKind.DROP | typeof FaultKind.PARTITION;
  readonly latencyMs?: number;
  readonly jitterMs?: number;
  readonly probability?: number;
  /** What a partition does to open connections. @default "stall" */
  readonly existing?: PartitionMode;
}

/** Options of {@link startChaosStack}. */
export interface ChaosStackOptions {
  /** Directory for the services' logs (`<dir>/logs`). */
  readonly dir: string;
  /** Seeds the proxies' jitter and drop decisions. */
  readonly seed: number;
  /** Extra environment of every service, over {@link CHAOS_SERVICE_ENV}. */
  readonly env?: Readonly<Record<string, string>>;
  /**
   * The last say over one service's environment, after the stack made it (its NATS user, its
   * certificate, its peers' proxies): what it returns is what the service runs with, restarts too.
   * @default the environment as made
   */
  readonly adjustEnv?: (name: StackService, env: Readonly<Record<string, string>>) => Record<string, string>;
  /** The repository root (where `services/<name>/dist/main.js` are). @default found from this file */
  readonly repoRoot?: string;
  /** Time a (re)started service gets to listen, retries included, in ms. @default 40000 */
  readonly readyTimeoutMs?: number;
  /**
   * Told when a service exits without the stack having killed or stopped it (a crash of its own);
   * `node` says which core ("a", "b") when there is a standby.
   */
  readonly onUnexpectedExit?: (name: StackService, code: number | null, signal: string | null, node?: string) => void;
  /**
   * A NATS cluster of this many servers instead of one nats-server (routes between them, JetStream
   * on each, every stream with min(N, 3) replicas, the same users on each), each service given every
   * server (each through its own proxy) — and a standby core beside the primary (DESIGN §13): both
   * started with IOASID_CORE_LEASE {@link CHAOS_CORE_LEASE}, the roles and the driver given both
   * addresses. A core killed (or exited) comes back as the standby; the other takes over.
   * @default 1 (one nats-server, one core)
   */
  readonly natsCluster?: number;
  /**
   * Each server of the NATS cluster and each core on a host of its own (`--netns`, issue 18 item
   * 5): a network-namespace lab ({@link createNetnsLab}) whose hosts n0, n1, … each run one
   * server, clustered over the lab's addresses, and core-a, core-b one core each, dialling the
   * servers at those addresses (no fault proxy on a core's NATS link then); the roles, their
   * proxies and the driver (in this namespace) reach each server and core through a relay into its
   * namespace, and {@link ChaosStack.partitionHosts} cuts hosts apart. Needs `natsCluster` > 1 and root.
   * @default false
   */
  readonly netns?: boolean;
}

/**
 * The credentials of a chaos stack's driver (DESIGN §11): the stack-local CA made by the testkit's
 * nats-server, which also gave every service its NATS user and its certificate.
 */
export interface ChaosStackCredentials {
  /** The operator's certificate: the driver's clients of the core, the IOMMU, KVM and VDCM (as `ioasidctl` is). */
  readonly operator: InstanceCredentials;
  /** The operator's NATS user (the driver's history and journal connection; nats-server refuses anonymous clients). */
  readonly natsAuth: { readonly user: string; readonly pass: string };
  /** A VMM's certificate (`vmm/vmm`): the driver's VFIO client, as `ioasidctl vmm-agent` is. */
  readonly vmm: InstanceCredentials;
  /** Its directory: `IOASID_CREDENTIALS_DIR` of the VMM processes. */
  readonly vmmDir: string;
}

/** What {@link ChaosStack.healAll} had to do. */
export interface HealReport {
  readonly continued: readonly StackService[];
  readonly restarted: readonly StackService[];
  readonly natsRestarted: boolean;
  readonly linksCleared: number;
  /** Host partitions of the lab healed. */
  readonly hostCutsHealed?: number;
  /** Services it could not bring back (with why). */
  readonly failed: readonly string[];
}

/**
 * The stack of a chaos run: its own nats-server (JetStream in a fresh temp dir, its own port), the
 * core and the four roles as processes, and a {@link FaultProxy} on every link the nemesis cuts —
 * each service to NATS, each role to the core, VFIO to the IOMMU and VDCM, VDCM to the IOMMU.
 * Every process is started and signalled by PID; a restart reuses the service's environment and
 * listening address, so a role comes back under its instance name where its peers expect it.
 *
 * Authenticated as `ioasidctl up` is (DESIGN §11): nats-server refuses anonymous clients and each
 * service has its own NATS user with its role's permissions; each service has a certificate of the
 * stack's CA and speaks mTLS to its peers, through the proxies too (TCP: TLS passes through, and a
 * client recognises its server by the role in its certificate, not by the address it dials).
 */
export interface ChaosStack {
  /** The nats-server, or each server of the cluster (`natsCluster`). */
  readonly natsNodes: readonly NatsNode[];
  /** The driver's own NATS URL (not proxied): every server's, comma-separated, on a cluster. */
  readonly natsUrl: string;
  /** True when a standby core runs beside the primary (`natsCluster`). */
  readonly standbyCore: boolean;
  /** Which core serves now ("a", "b") with a standby; undefined with one core. */
  coreNode(): string | undefined;
  /** What the driver presents: the operator's certificate and NATS user, a VMM's certificate. */
  readonly credentials: ChaosStackCredentials;
  /**
   * Where each service listens (the driver calls them directly, not through a proxy); with a
   * standby the core's is both cores' (`ipv4:a,b`: the channel reaches the one that serves).
   */
  readonly addresses: Readonly<Record<StackService, string>>;
  readonly links: readonly ProxyLink[];
  /** The links a network fault on `target`'s `link` cuts: its NATS link, or every gRPC link it is an end of. */
  linksOf(target: StackService, link: ChaosLink): ProxyLink[];
  /** SIGKILL, and waits for the exit. With a standby, the core that serves is the one killed. */
  kill(name: StackService): Promise<void>;
  /**
   * Starts it again with the same environment and address (retrying while the port is not free).
   * With a standby, the other core takes over first (waited for, bounded), then a core that is
   * down comes back as the standby; this resolves once a core serves.
   */
  restart(name: StackService): Promise<void>;
  /** SIGSTOP / SIGCONT. With a standby, the core that serves is the one stopped. */
  stop(name: StackService): void;
  cont(name: StackService): void;
  isRunning(name: StackService): boolean;
  /** PID of the running process, if any. */
  pidOf(name: StackService): number | undefined;
  /** A nats-server killed (SIGKILL) / restarted on the same port and store: `node` of a cluster ("n1"; default n0). */
  natsKill(node?: string): Promise<void>;
  natsRestart(node?: string): Promise<void>;
  /** Adds (or replaces) fault `faultId` on `links`; what each link does is the union of its faults. */
  setNetworkFault(faultId: number, links: readonly ProxyLink[], fault: NetworkFault): void;
  /** Removes fault `faultId` from every link. */
  clearNetworkFault(faultId: number): void;
  /** The network-namespace lab the servers and the cores run in (`netns`), else undefined. */
  readonly lab: NetnsLab | undefined;
  /**
   * Fault `faultId` between hosts of the lab (`netns`): two hosts ("n0", "n1"; "core-a", "n2")
   * cut apart both ways, or one host cut from every other.
   * @throws Error without a lab, or for a host it does not have
   */
  partitionHosts(faultId: number, hosts: readonly string[]): Promise<void>;
  /** Heals host fault `faultId`, then waits until every stream has a leader and every replica is current. */
  healHosts(faultId: number): Promise<void>;
  /** SIGCONT to every stopped service, a restart of anything down (nats-server first), no proxy fault left. */
  healAll(): Promise<HealReport>;
  /**
   * Stops everything (SIGTERM, then SIGKILL), closes the proxies, writes the logs. Idempotent.
   * @param keepStoreIn copy nats-server's JetStream store there first (the core's operation log,
   *   the roles' state, the history: what a violation's diagnosis may need)
   */
  close(keepStoreIn?: string): Promise<void>;
}

interface Managed {
  readonly name: StackService;
  /** A core of a primary and its standby: "a" or "b". */
  readonly slot?: string;
  /** The next launch starts a standby core (IOASID_CORE_STANDBY): it listens once it took over. */
  standbyNext: boolean;
  /** The command it runs under: `ip netns exec <ns>` for a core on a host of the lab (`netns`). */
  readonly command?: readonly string[];
  /** Kills a standby that is still waiting behind the lease. */
  abort: AbortController | undefined;
  readonly env: Record<string, string>;
  proc: ServiceProcess | undefined;
  stopped: boolean;
  /** Set while the stack itself ends the process. */
  expectingExit: boolean;
  incarnation: number;
  /** The launch in progress, if any. */
  launching: Promise<void> | undefined;
  /** When its process last started listening (performance.now()): of a core pair, the later one took over. */
  listeningSince: number;
}

/** The repository root, from this file (packages/chaos/dist or src → ../../..). */
export function defaultRepoRoot(): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
}

/**
 * Starts the stack of a chaos run (see {@link ChaosStack}), then checks it is secure: nats-server
 * refuses a client without a credential, and every service refuses a client without a certificate
 * and proves its role to the operator ({@link assertServicesSecure}). On failure, whatever was
 * started is stopped before the error is thrown.
 * @throws Error when nats-server or a service cannot start (with the end of its output); Error
 *   `INSECURE: …` when the stack came up without authentication somewhere
 */
export async function startChaosStack(options: ChaosStackOptions): Promise<ChaosStack> {
  const root = options.repoRoot ?? defaultRepoRoot();
  const logDir = join(options.dir, "logs");
  mkdirSync(logDir, { recursive: true });
  const readyTimeoutMs = options.readyTimeoutMs ?? 40_000;
  const clusterSize = options.natsCluster ?? 1;
  if (!(Number.isInteger(clusterSize) && clusterSize >= 1 && clusterSize <= 7)) throw new RangeError(`natsCluster must be 1..7 servers, got ${clusterSize}`);
  const standbyCore = clusterSize > 1;
  const baseEnv: Record<string, string> = {
    ...pick(process.env, ["PATH", "HOME", "TMPDIR", "LANG"]),
    ...CHAOS_SERVICE_ENV,
    // Every stream (op log, snapshots, role state, history) replicated on up to three servers.
    ...(clusterSize > 1 ? { IOASID_JS_REPLICAS: String(Math.min(clusterSize, 3)) } : {}),
    ...options.env,
  };
  // Our own server, never the caller's NATS_URL (which startNats would otherwise use).
  const natsEnv = { ...process.env };
  delete natsEnv["NATS_URL"];
  delete natsEnv["IOASID_TESTKIT_DOCKER"];
  // A user per service and nobody anonymous (as in `ioasidctl up`), and a certificate per service
  // from the server's own stack CA (tls): the testkit makes both, as for the e2e stack fixture.
  if (options.netns === true && clusterSize < 2) throw new RangeError("netns needs a NATS cluster (natsCluster ≥ 2): its servers are what the lab's hosts run");
  const lab: NetnsLab | undefined =
    options.netns === true ? await createNetnsLab({ hosts: [...Array.from({ length: clusterSize }, (_, i) => `n${i}`), ...LAB_CORE_HOSTS] }) : undefined;
  let cluster: NatsCluster | undefined;
  try {
    cluster =
      clusterSize > 1
        ? await startNatsCluster({
            size: clusterSize,
            tls: true,
            auth: { anonymous: "refuse" },
            ...(lab === undefined
              ? {}
              : {
                  placement: {
                    command: (i: number) => lab.exec(`n${i}`),
                    host: (i: number) => lab.addressOf(`n${i}`),
                    reach: async (i: number, port: number) => (await lab.forward(`n${i}`, port)).address,
                  },
                }),
          })
        : undefined;
  } catch (err) {
    await lab?.destroy();
    throw err;
  }
  const single: NatsServer | undefined = cluster === undefined ? await startNats({ env: natsEnv, tls: true, auth: { anonymous: "refuse" } }) : undefined;
  const nats: Pick<NatsServer, "url" | "credentials" | "operator" | "operatorTls" | "certificateDir"> & { stop(): Promise<void> } = (cluster ?? single)!;
  const natsNodes: NatsNode[] =
    cluster !== undefined
      ? cluster.nodes.map((n) => ({
          name: n.name,
          url: n.url,
          port: n.port,
          get pid() {
            return n.pid;
          },
          storeDir: n.storeDir,
        }))
      : [
          {
            name: "nats",
            url: single!.url,
            port: single!.port,
            get pid() {
              return single!.pid;
            },
            storeDir: single!.storeDir,
          },
        ];
  const nodeOf = (name: string | undefined) => {
    const i = name === undefined ? 0 : natsNodes.findIndex((n) => n.name === name);
    if (i < 0) throw new Error(`no nats-server "${String(name)}" in this stack (${natsNodes.map((n) => n.name).join(", ")})`);
    return {
      kill: () => (cluster !== undefined ? cluster.nodes[i]!.kill() : single!.kill("SIGKILL")),
      // On a cluster, restarted means whole again: every stream led and every replica current (a
      // stream that lost its leader stalls every write until another is elected, seconds).
      restart: async () => {
        if (cluster === undefined) return single!.restart();
        await cluster.nodes[i]!.restart();
        await cluster.untilStreamsCurrent(readyTimeoutMs);
      },
      logs: () => (cluster !== undefined ? cluster.nodes[i]!.logs() : single!.logs()),
    };
  };
  let credentials: ChaosStackCredentials;
  try {
    const operator = await nats.operatorTls();
    const vmmDir = await nats.certificateDir(VMM_IDENTITY);
    if (operator === undefined || vmmDir === undefined || nats.operator === undefined) {
      throw new Error("the chaos stack's nats-server made no certificates or users: a chaos run is authenticated (DESIGN §11)");
    }
    credentials = { operator, natsAuth: nats.operator, vmm: readInstanceCredentials(vmmDir), vmmDir };
  } catch (err) {
    await nats.stop();
    await lab?.destroy();
    throw err;
  }

  const links: ProxyLink[] = [];
  const managed = new Map<StackService, Managed>();
  /** The core, or a primary and its standby ("a", "b"): the slots are fixed, which one serves is not. */
  const cores: Managed[] = [];
  const addresses = {} as Record<StackService, string>;
  const networkFaults = new Map<number, { links: readonly ProxyLink[]; fault: NetworkFault }>();
  const partitioned = new Set<ProxyLink>();
  const hostCuts = new Map<number, LabCut>();
  let closed: Promise<void> | undefined;

  const proxy = async (from: StackService, to: StackService | "nats", target: string, detail: { core?: string; node?: string } = {}): Promise<string> => {
    const p = await startFaultProxy({ target, seed: deriveSeed(options.seed, 2, links.length) });
    const suffix = detail.node ?? detail.core;
    const name = `${from}${from === ChaosTarget.CORE && detail.core !== undefined && to === "nats" ? `/${detail.core}` : ""}→${to}${suffix === undefined || (to === "nats" && detail.node === undefined) ? "" : `/${suffix}`}`;
    links.push({ name, from, to, kind: to === "nats" ? "nats" : "grpc", proxy: p, ...(detail.core === undefined ? {} : { core: detail.core }) });
    return p.address;
  };

  const logName = (m: Managed) => (m.slot === undefined ? m.name : `${m.name}-${m.slot}`);
  const writeLogs = (m: Managed, proc: ServiceProcess, how: string): void => {
    appendFileSync(join(logDir, `${logName(m)}.log`), `==== ${logName(m)} #${m.incarnation} pid ${proc.pid} (${how})\n${proc.logs()}\n`);
  };

  /** Starts the service's process; one launch at a time per service (a second caller awaits the first). */
  const launch = (m: Managed): Promise<void> => {
    m.launching ??= launchOnce(m).finally(() => {
      m.launching = undefined;
    });
    return m.launching;
  };

  const launchOnce = async (m: Managed): Promise<void> => {
    const entry = join(root, "services", m.name, "dist", "main.js");
    // A standby listens once it took over, which may be never (it is killed when the stack closes).
    const standby = m.standbyNext;
    const abort = standby ? (m.abort = new AbortController()) : undefined;
    const deadline = performance.now() + (standby ? STANDBY_WAIT_MS : readyTimeoutMs);
    const env = standby ? { ...m.env, IOASID_CORE_STANDBY: "true" } : m.env;
    const aborted = (): boolean => abort?.signal.aborted === true;
    let lastError: unknown;
    // A port just released by a killed process may not be bindable at once: retry, bounded in time.
    while (closed === undefined && !aborted()) {
      try {
        const proc = await startService({
          name: logName(m),
          entry,
          ...(m.command === undefined ? {} : { command: m.command }),
          env,
          inheritEnv: false,
          readyTimeoutMs: Math.max(1000, deadline - performance.now()),
          ...(abort === undefined ? {} : { signal: abort.signal }),
        });
        if (closed !== undefined) {
          // The stack was closed while this one started: it must not outlive the run.
          await proc.stop("SIGKILL", 1000);
          throw new Error(`${m.name} started after the stack was closed`);
        }
        m.incarnation++;
        m.proc = proc;
        m.listeningSince = performance.now();
        m.stopped = false;
        m.expectingExit = false;
        m.abort = undefined;
        // Any later launch of a core of a pair is a standby's: the other core serves, or takes over.
        if (m.slot !== undefined) m.standbyNext = true;
        void proc.exited.then((status) => {
          writeLogs(m, proc, `exit code ${String(status.code)} signal ${String(status.signal)}`);
          if (m.proc === proc && !m.expectingExit) {
            m.proc = undefined;
            m.stopped = false;
            options.onUnexpectedExit?.(m.name, status.code, status.signal, m.slot);
          }
        });
        return;
      } catch (err) {
        lastError = err;
        appendFileSync(join(logDir, `${logName(m)}.log`), `==== ${logName(m)} failed to start: ${String((err as Error)?.message ?? err)}\n`);
        if (closed !== undefined || aborted() || performance.now() >= deadline) break;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    throw new Error(`${m.name} could not be (re)started: ${String((lastError as Error)?.message ?? lastError ?? "the stack is closed")}`, { cause: lastError });
  };

  const start = async (name: StackService, env: Record<string, string>): Promise<void> => {
    const spec = STACK_SERVICES.find((s) => s.name === name)!;
    const made = { ...baseEnv, ...env, [spec.addressVar]: "127.0.0.1:0" };
    const m: Managed = {
      name,
      env: { ...(options.adjustEnv?.(name, made) ?? made), [spec.addressVar]: "127.0.0.1:0" },
      proc: undefined,
      stopped: false,
      expectingExit: false,
      incarnation: 0,
      listeningSince: 0,
      launching: undefined,
      standbyNext: false,
      abort: undefined,
    };
    managed.set(name, m);
    await launch(m);
    // Restarts listen where the peers (and their proxies) expect it.
    addresses[name] = m.proc!.address;
    m.env[spec.addressVar] = m.proc!.address;
  };

  // Each service with its own NATS user (DESIGN §11), through its fault proxy: one proxy per
  // server of a cluster, so a fault on the service's NATS link cuts it from every server.
  const natsOf = async (name: StackService, core?: string) => {
    const urls: string[] = [];
    for (const n of natsNodes) {
      urls.push(
        `nats://${await proxy(name, "nats", `127.0.0.1:${n.port}`, { ...(core === undefined ? {} : { core }), ...(cluster === undefined ? {} : { node: n.name }) })}`,
      );
    }
    return { ...(await roleNatsEnv(nats, name === ChaosTarget.CORE ? "core" : name, CHAOS_SERVICE_ENV)), NATS_URL: urls.join(",") };
  };

  /**
   * The core that serves now: of those listening and not stopped, the one that started listening
   * last (a primary resumed after its standby took over is stale: it is fenced at its next write);
   * else a stopped one (its standby may not have taken over yet).
   */
  const servingCore = (): Managed | undefined => {
    const latest = (ms: Managed[]) =>
      ms.reduce<Managed | undefined>((best, m) => (best === undefined || m.listeningSince > best.listeningSince ? m : best), undefined);
    return latest(cores.filter((m) => m.proc !== undefined && !m.stopped)) ?? latest(cores.filter((m) => m.proc !== undefined));
  };
  /** Starts every core of the pair that is down as a standby, without waiting for it to serve. */
  const launchStandbys = (): boolean => {
    let launched = false;
    for (const m of cores) {
      if (m.proc !== undefined || m.launching !== undefined) continue;
      m.standbyNext = true;
      launched = true;
      void launch(m).catch((err: unknown) => {
        if (closed === undefined) appendFileSync(join(logDir, `${logName(m)}.log`), `==== standby gave up: ${brief(err)}\n`);
      });
    }
    return launched;
  };
  /** Waits (bounded) until a core serves: after a kill, the standby's lease expiry and its replay. */
  const untilCoreServes = (): Promise<void> =>
    waitFor(() => closed !== undefined || cores.some((m) => m.proc !== undefined && !m.stopped), {
      timeoutMs: readyTimeoutMs,
      intervalMs: 50,
      message: "a core (the standby, taking over) to serve",
    });
  /**
   * Before a killed core of the pair is started again: the other core takes over first, and only
   * then does the killed one come back, as its standby. Started at once, the killed one could take
   * the lease itself: when the other's takeover fails to start (JetStream unavailable past
   * IOASID_OPLOG_WRITE_RETRY, as after the netns host partitions on a busy machine; CI on d698680),
   * that core exits and starts over as a standby, and the killed one, started earlier, is then the
   * first to see the lease expire. Without another core running or on its way, nothing to wait for;
   * bounded, so a standby that never takes over does not keep the pair from its other core.
   */
  const untilOtherCoreServes = async (): Promise<void> => {
    if (cores.some((m) => m.proc !== undefined || m.launching !== undefined)) await untilCoreServes().catch(() => undefined);
  };

  const stopAll = async (keepStoreIn?: string): Promise<void> => {
    // A standby still waiting behind the lease is killed first, not waited for: stopping the
    // serving core drops its lease, and a standby left waiting would take over as the stack ends.
    for (const m of cores) m.abort?.abort();
    for (const s of [...STACK_SERVICES].reverse()) {
      const group = s.name === ChaosTarget.CORE && cores.length > 0 ? cores : [managed.get(s.name)];
      // The cores of a pair together: neither is left to take over from the other.
      await Promise.all(
        group.map(async (m) => {
          m?.abort?.abort();
          await m?.launching?.catch(() => undefined);
          if (m?.proc === undefined) return;
          m.expectingExit = true;
          if (m.stopped) m.proc.kill("SIGCONT");
          await m.proc.stop("SIGTERM", 5000).catch(() => undefined);
        }),
      );
    }
    await Promise.all(links.map((l) => l.proxy.close()));
    if (keepStoreIn !== undefined) {
      // Stopped first (a single server cleanly; a cluster's nodes killed), so the copy is the store as the server left it.
      if (single !== undefined && single.storeDir !== undefined) {
        await single.kill("SIGTERM").catch(() => undefined);
        cpSync(single.storeDir, keepStoreIn, { recursive: true });
      }
      if (cluster !== undefined) {
        for (const n of cluster.nodes) {
          await n.kill().catch(() => undefined);
          cpSync(n.storeDir, join(keepStoreIn, n.name), { recursive: true });
        }
      }
    }
    for (const n of natsNodes) appendFileSync(join(logDir, cluster === undefined ? "nats-server.log" : `nats-server-${n.name}.log`), nodeOf(n.name).logs());
    await nats.stop();
    if (lab !== undefined) {
      appendFileSync(join(logDir, "netns-lab.log"), `${lab.describe()}\n`);
      await lab.destroy();
    }
  };

  try {
    let coreAddresses: string[];
    if (!standbyCore) {
      await start(ChaosTarget.CORE, await natsOf(ChaosTarget.CORE));
      cores.push(managed.get(ChaosTarget.CORE)!);
      coreAddresses = [addresses[ChaosTarget.CORE]];
    } else {
      // A primary and its standby on ports fixed now (a standby logs its address only once it
      // serves): "a" serves first; "b" waits behind a's lease (DESIGN §13).
      const spec = STACK_SERVICES.find((x) => x.name === ChaosTarget.CORE)!;
      coreAddresses = [];
      for (const slot of ["a", "b"]) {
        // With a lab, each core on a host of its own (core-a, core-b): it listens on its host's
        // address and dials every server at theirs, across the lab's switch (no fault proxy: a
        // host partition is what cuts it from a server); the roles and the driver reach it through
        // a relay into its namespace.
        const coreHost = `core-${slot}`;
        const address = lab === undefined ? `127.0.0.1:${await freePort()}` : `${lab.addressOf(coreHost)}:${LAB_CORE_PORT}`;
        const natsForCore =
          lab === undefined || cluster === undefined
            ? await natsOf(ChaosTarget.CORE, slot)
            : { ...(await roleNatsEnv(nats, "core", CHAOS_SERVICE_ENV)), NATS_URL: cluster.nodes.map((n) => n.listenUrl).join(",") };
        const made = { ...baseEnv, ...natsForCore, IOASID_CORE_LEASE: CHAOS_CORE_LEASE, [spec.addressVar]: address };
        const m: Managed = {
          name: ChaosTarget.CORE,
          slot,
          ...(lab === undefined ? {} : { command: lab.exec(coreHost) }),
          env: { ...(options.adjustEnv?.(ChaosTarget.CORE, made) ?? made), [spec.addressVar]: address },
          proc: undefined,
          stopped: false,
          expectingExit: false,
          incarnation: 0,
          listeningSince: 0,
          launching: undefined,
          standbyNext: slot !== "a",
          abort: undefined,
        };
        cores.push(m);
        coreAddresses.push(lab === undefined ? address : (await lab.forward(coreHost, LAB_CORE_PORT)).address);
      }
      await launch(cores[0]!);
      launchStandbys();
      managed.set(ChaosTarget.CORE, cores[0]!);
      addresses[ChaosTarget.CORE] = `ipv4:${coreAddresses.join(",")}`;
    }
    // Each role reaches every core through a proxy of its own (a list: the one that serves answers).
    const coreOf = async (name: StackService) => {
      const through: string[] = [];
      for (const [i, a] of coreAddresses.entries()) through.push(await proxy(name, ChaosTarget.CORE, a, standbyCore ? { core: cores[i]!.slot! } : {}));
      return { ...(await natsOf(name)), IOASID_CORE_ADDRESS: through.join(",") };
    };
    await start(ChaosTarget.IOMMU, await coreOf(ChaosTarget.IOMMU));
    await start(ChaosTarget.KVM, await coreOf(ChaosTarget.KVM));
    // VDCM's work queues issue their DMA through the IOMMU.
    await start(ChaosTarget.VDCM, {
      ...(await coreOf(ChaosTarget.VDCM)),
      IOMMU_ADDRESS: await proxy(ChaosTarget.VDCM, ChaosTarget.IOMMU, addresses[ChaosTarget.IOMMU]),
    });
    await start(ChaosTarget.VFIO, {
      ...(await coreOf(ChaosTarget.VFIO)),
      IOMMU_ADDRESS: await proxy(ChaosTarget.VFIO, ChaosTarget.IOMMU, addresses[ChaosTarget.IOMMU]),
      VDCM_ADDRESS: await proxy(ChaosTarget.VFIO, ChaosTarget.VDCM, addresses[ChaosTarget.VDCM]),
    });
    // Loud, before anything is driven: a run on a stack open somewhere would test something else.
    for (const n of natsNodes) await assertNatsRefusesAnonymous(n.url);
    await assertServicesSecure(
      STACK_SERVICES.map((s) => ({ name: s.name, address: s.name === ChaosTarget.CORE ? coreAddresses[0]! : addresses[s.name], role: s.role })),
      credentials.operator,
    );
  } catch (err) {
    await stopAll();
    throw err;
  }

  const get = (name: StackService): Managed => managed.get(name)!;

  /** Applies the union of the faults on one link. */
  const applyLink = (link: ProxyLink): void => {
    const on = [...networkFaults.values()].filter((f) => f.links.includes(link)).map((f) => f.fault);
    const latency = on.filter((f) => f.kind === FaultKind.LATENCY);
    const worst = latency.reduce<NetworkFault | undefined>((a, f) => (a === undefined || (f.latencyMs ?? 0) > (a.latencyMs ?? 0) ? f : a), undefined);
    link.proxy.setLatency(worst?.latencyMs ?? 0, worst?.jitterMs ?? 0);
    link.proxy.setDrop(Math.max(0, ...on.filter((f) => f.kind === FaultKind.DROP).map((f) => f.probability ?? 0)));
    const partitions = on.filter((f) => f.kind === FaultKind.PARTITION);
    if (partitions.length > 0 && !partitioned.has(link)) {
      partitioned.add(link);
      link.proxy.partition(true, { existing: partitions.some((p) => p.existing === "reset") ? "reset" : "stall" });
    } else if (partitions.length === 0 && partitioned.delete(link)) link.proxy.partition(false);
  };

  /** The process a kill or a stop of `name` hits: with a standby, the core that serves. */
  const hit = (name: StackService): Managed | undefined => (standbyCore && name === ChaosTarget.CORE ? servingCore() : get(name));

  return {
    natsNodes,
    natsUrl: natsNodes.map((n) => n.url).join(","),
    standbyCore,
    coreNode: () => (standbyCore ? servingCore()?.slot : undefined),
    credentials,
    addresses,
    links,
    linksOf(target, link) {
      // The NATS link of "the core" is the serving core's: cutting the standby's too would only
      // keep it from taking over, which is not the fault drawn.
      const serving = standbyCore && target === ChaosTarget.CORE && link === "nats" ? servingCore()?.slot : undefined;
      return links.filter((l) => l.kind === link && (l.from === target || l.to === target) && (serving === undefined || l.core === serving));
    },
    async kill(name) {
      const m = hit(name);
      if (m === undefined) return;
      const proc = m.proc;
      if (proc === undefined) return;
      m.expectingExit = true;
      proc.kill("SIGKILL");
      await proc.exited;
      m.proc = undefined;
      m.stopped = false;
    },
    async restart(name) {
      if (standbyCore && name === ChaosTarget.CORE) {
        await untilOtherCoreServes();
        launchStandbys();
        await untilCoreServes();
        return;
      }
      const m = get(name);
      if (m.proc !== undefined) return;
      await launch(m);
    },
    stop(name) {
      const m = hit(name);
      if (m?.proc === undefined || m.stopped) return;
      m.proc.kill("SIGSTOP");
      m.stopped = true;
    },
    cont(name) {
      // With a standby, the core that was stopped (another may serve by now).
      for (const m of standbyCore && name === ChaosTarget.CORE ? cores : [get(name)]) {
        if (m.proc === undefined || !m.stopped) continue;
        m.proc.kill("SIGCONT");
        m.stopped = false;
      }
    },
    isRunning: (name) => hit(name)?.proc !== undefined,
    pidOf: (name) => hit(name)?.proc?.pid,
    natsKill: (node) => nodeOf(node).kill(),
    natsRestart: (node) => nodeOf(node).restart(),
    setNetworkFault(faultId, on, fault) {
      const before = networkFaults.get(faultId)?.links ?? [];
      networkFaults.set(faultId, { links: on, fault });
      for (const l of new Set([...before, ...on])) applyLink(l);
    },
    clearNetworkFault(faultId) {
      const f = networkFaults.get(faultId);
      if (f === undefined) return;
      networkFaults.delete(faultId);
      for (const l of f.links) applyLink(l);
    },
    lab,
    async partitionHosts(faultId, hosts) {
      if (lab === undefined) throw new Error("no network-namespace lab in this stack (netns)");
      const [a, b] = hosts;
      if (a === undefined || hosts.length > 2) throw new Error(`a host partition names one or two hosts, got ${hosts.length}`);
      const cut = b === undefined ? await lab.isolate(a) : await lab.partition(a, b);
      hostCuts.set(faultId, cut);
    },
    async healHosts(faultId) {
      const cut = hostCuts.get(faultId);
      if (cut === undefined) return;
      hostCuts.delete(faultId);
      await cut.heal();
      // Healed means whole again: a server cut off catches up, a stream it led has another leader.
      await cluster?.untilStreamsCurrent(readyTimeoutMs);
    },
    async healAll() {
      const continued: StackService[] = [];
      const restarted: StackService[] = [];
      const failed: string[] = [];
      // A standby's launch lasts until it takes over: not waited for here.
      await Promise.all(STACK_SERVICES.map((s) => (standbyCore && s.name === ChaosTarget.CORE ? undefined : get(s.name).launching?.catch(() => undefined))));
      const linksCleared = new Set([...networkFaults.values()].flatMap((f) => f.links)).size;
      networkFaults.clear();
      partitioned.clear();
      for (const l of links) l.proxy.reset();
      const hostCutsHealed = hostCuts.size;
      hostCuts.clear();
      await lab?.heal().catch((err: unknown) => failed.push(`netns lab: ${brief(err)}`));
      let natsRestarted = false;
      for (const n of natsNodes) {
        if (n.pid !== undefined) continue;
        try {
          await nodeOf(n.name).restart();
          natsRestarted = true;
        } catch (err) {
          failed.push(`nats-server ${n.name}: ${brief(err)}`);
        }
      }
      for (const s of STACK_SERVICES) {
        for (const m of standbyCore && s.name === ChaosTarget.CORE ? cores : [get(s.name)]) {
          if (m.proc !== undefined && m.stopped) {
            m.proc.kill("SIGCONT");
            m.stopped = false;
            if (!continued.includes(s.name)) continued.push(s.name);
          }
        }
      }
      for (const s of STACK_SERVICES) {
        if (standbyCore && s.name === ChaosTarget.CORE) {
          // Whole again: a core serves, and the other is started again as its standby.
          await untilOtherCoreServes();
          if (launchStandbys()) restarted.push(s.name);
          try {
            await untilCoreServes();
          } catch (err) {
            failed.push(`${s.name}: ${brief(err)}`);
          }
          continue;
        }
        const m = get(s.name);
        if (m.proc !== undefined) continue;
        try {
          await launch(m);
          restarted.push(s.name);
        } catch (err) {
          failed.push(`${s.name}: ${brief(err)}`);
        }
      }
      if (hostCutsHealed > 0 && cluster !== undefined) {
        await cluster.untilStreamsCurrent(readyTimeoutMs).catch((err: unknown) => failed.push(`nats cluster after the host partitions: ${brief(err)}`));
      }
      return { continued, restarted, natsRestarted, linksCleared, failed, ...(lab === undefined ? {} : { hostCutsHealed }) };
    },
    close(keepStoreIn) {
      closed ??= stopAll(keepStoreIn);
      return closed;
    },
  };
}

/** An error in one line: its first line and, when it has more, its last (the process's last words). */
export function brief(err: unknown): string {
  const lines = String((err as Error)?.message ?? err)
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "");
  const text = lines.length <= 1 ? (lines[0] ?? "") : `${lines[0]} … ${lines.at(-1)}`;
  return text.length > 400 ? `${text.slice(0, 400)}…` : text;
}

function pick(env: NodeJS.ProcessEnv, keys: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of keys) if (env[k] !== undefined) out[k] = env[k];
  return out;
}
