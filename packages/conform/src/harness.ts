import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import {
  DEFAULT_PREFIX,
  deliverySubject,
  readHistory,
  startSubscriber,
  type EventHandler,
  type HandlerResult,
  type Subscriber,
  type TypedHistoryRecord,
} from "@ioasid/bus";
import { checkHealth, createClient, type PromiseClient } from "@ioasid/grpc-kit";
import type { events } from "@ioasid/proto";
import { bus, core } from "@ioasid/proto";
import { natsEnv, startNats, startService, waitFor, type NatsServer, type ServiceProcess } from "@ioasid/testkit";
import { natsConnectOptions, readNatsCredential } from "@ioasid/security";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { patience, type ConformRole } from "./clause.js";

/** A CoreService client. */
export type CoreClient = PromiseClient<typeof core.CoreServiceService>;

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (packages/conform/dist → ../../..): where our own services' builds are. */
const REPO_ROOT = resolve(here, "..", "..", "..");

/** Our services the kit can start around the target, with the variables that carry their addresses. */
const OUR_SERVICES = {
  core: { dir: "ioasid-core", listenVar: "IOASID_CORE_GRPC_ADDRESS", addressVar: "IOASID_CORE_ADDRESS" },
  iommu: { dir: "iommu", listenVar: "IOMMU_GRPC_ADDRESS", addressVar: "IOMMU_ADDRESS" },
  vdcm: { dir: "vdcm", listenVar: "VDCM_GRPC_ADDRESS", addressVar: "VDCM_ADDRESS" },
  kvm: { dir: "kvm", listenVar: "KVM_GRPC_ADDRESS", addressVar: "KVM_ADDRESS" },
  vfio: { dir: "vfio", listenVar: "VFIO_GRPC_ADDRESS", addressVar: "VFIO_ADDRESS" },
} as const satisfies Record<ConformRole, unknown>;
type OurService = keyof typeof OUR_SERVICES;

/**
 * What each role under test needs around it (besides nats-server): the core always (but when the
 * core is the target), the IOMMU for VDCM's work-queue DMA, and for VFIO the three roles it drives.
 */
export const NEEDS: Record<ConformRole, readonly OurService[]> = {
  core: [],
  kvm: ["core"],
  iommu: ["core"],
  vdcm: ["core", "iommu"],
  vfio: ["core", "iommu", "kvm", "vdcm"],
};

/** The order our services start in: each wave needs only what earlier waves started. */
const WAVES: readonly (readonly OurService[])[] = [["core"], ["iommu", "kvm"], ["vdcm"]];

/** Options of {@link Harness.start}. */
export interface HarnessOptions {
  readonly role: ConformRole;
  /** `host:port` of the implementation under test (its gRPC service, with grpc.health.v1). */
  readonly target: string;
  /**
   * A shell command that starts the target; the kit runs it (and restarts it for the restart
   * clauses) with the stack's addresses in its environment (see {@link targetEnvironment}).
   */
  readonly targetCmd?: string;
  /** A NATS with JetStream the target uses; else the kit starts its own nats-server. */
  readonly natsUrl?: string;
  /** The core the (already running) target was pointed at; it must answer SERVING. */
  readonly coreAddress?: string;
  /** A stack started by `ioasidctl up` (its `stack.json`): its NATS, core and roles around the target. */
  readonly stackDir?: string;
  /** Bus subject prefix. @default "ioasid.v1" */
  readonly prefix?: string;
  /** Extra environment for the services the kit starts, and for the target. */
  readonly env?: Readonly<Record<string, string>>;
  /** Time the target gets to answer SERVING after it is started. @default 20000 */
  readonly readyTimeoutMs?: number;
  /** Progress lines. */
  readonly log?: (line: string) => void;
}

/** A delivery the kit received while playing a tier. */
export interface KitDelivery {
  readonly event: events.IoasidEvent;
  readonly registrationId: number;
  readonly attempt: number;
}

/** The kit registered as a subscriber at some priority: it plays another tier of the chain. */
export interface KitTier {
  readonly registrationId: number;
  /** Deliveries received, in order. */
  readonly received: KitDelivery[];
  /**
   * Runs `check` when a delivery that `match` takes arrives, before the kit acknowledges it (the
   * chain waits: what `check` sees is the state at that step of the tier order). Resolves with what
   * the check returned once it has run; rejects when no such delivery arrives within `timeoutMs`.
   */
  onDelivery<T>(match: (event: events.IoasidEvent) => boolean, check: (event: events.IoasidEvent) => Promise<T>, timeoutMs?: number): Promise<T>;
  /** Unregisters and stops receiving. */
  close(): Promise<void>;
}

/** A captured request to the target's delivery subject, and the target's answer when it came. */
export interface TappedDelivery {
  readonly batch: bus.DeliveryBatch;
  /** The raw request, to redeliver byte for byte. */
  readonly data: Uint8Array;
  readonly headers: Record<string, string>;
  /** The target's AckBatch, once seen (undefined until then). */
  ack?: bus.AckBatch;
}

/** Watching the core's deliveries to the target (a plain subscription beside the target's). */
export interface Tap {
  readonly seen: TappedDelivery[];
  /**
   * Resolves when the target answers a delivery that `match` takes, with the delivery and the value
   * `atAck` returned, `atAck` running as soon as the answer is seen on the bus (the query "at ack time").
   */
  ackOf<T>(
    match: (d: bus.Delivery) => boolean,
    atAck: (ack: bus.AckBatch) => Promise<T>,
    timeoutMs?: number,
  ): Promise<{ delivery: TappedDelivery; seenAtAck: T }>;
  close(): void;
}

/**
 * The stack a conformance run drives the target through: nats-server and our services on ephemeral
 * ports (or a stack that exists), the target started and restarted by `--target-cmd` when given,
 * and the kit's own instruments — a core client, tiers the kit plays, a tap on the target's
 * deliveries, redelivery, and the history.
 */
export class Harness {
  private readonly started: ServiceProcess[] = [];
  private nats: NatsServer | undefined;
  private targetProc: ChildProcess | undefined;
  private targetOutput: string[] = [];
  private readonly tiers: KitTier[] = [];
  private tierCount = 0;
  private uniqueCounter = 0;
  private readonly runTag = (Date.now() % 1_000_000).toString(36);

  private constructor(
    readonly options: HarnessOptions,
    readonly prefix: string,
    readonly natsUrl: string,
    readonly nc: NatsConnection,
    /** Addresses of the services around the target (ours, or the stack's). */
    readonly addresses: Partial<Record<OurService, string>>,
  ) {}

  /** The role under test. */
  get role(): ConformRole {
    return this.options.role;
  }

  /** `host:port` of the target. */
  get target(): string {
    return this.options.target;
  }

  /** The core of the run: ours around a role, the target when the core is under test. */
  get coreAddress(): string {
    return this.role === "core" ? this.target : (this.addresses.core as string);
  }

  /** Whether the kit can kill and start the target (restart clauses). */
  get canRestart(): boolean {
    return this.options.targetCmd !== undefined;
  }

  private coreClient: CoreClient | undefined;
  /** A client of the run's core (5 s deadline per call). */
  get core(): CoreClient {
    this.coreClient ??= createClient(core.CoreServiceService, this.coreAddress, { deadlineMs: 5000 });
    return this.coreClient;
  }

  /**
   * Brings up what the role needs around the target, starts the target when the kit may, and waits
   * until the target answers SERVING on its health service.
   */
  static async start(options: HarnessOptions): Promise<Harness> {
    const log = options.log ?? (() => undefined);
    const prefix = options.prefix ?? DEFAULT_PREFIX;
    const stack = options.stackDir === undefined ? undefined : readStack(options.stackDir);
    let nats: NatsServer | undefined;
    // A stack with mTLS: the core authorizes by role (DESIGN §3), and the kit plays several roles
    // around the target (VFIO's sets and allocations, other tiers' registrations and references),
    // which no single certificate may. Refused with what to do instead, before anything is started.
    if (stack?.operatorCredentials !== undefined && existsSync(join(stack.operatorCredentials, "cert.pem"))) {
      throw new Error(
        `the stack in ${String(options.stackDir)} has mTLS: the core authorizes each call by the caller's role, and the kit plays several roles at once; ` +
          "verify a role inside a stack started with `ioasidctl up --insecure`, or let the kit bring up its own stack (--target-cmd)",
      );
    }
    const natsUrl = options.natsUrl ?? stack?.natsUrl ?? (nats = await startNats()).url;
    if (nats !== undefined) log(`nats-server  ${nats.url} (the kit's own, JetStream in a temp dir)`);
    const started: ServiceProcess[] = [];
    const addresses: Partial<Record<OurService, string>> = {};
    let nc: NatsConnection | undefined;
    try {
      // In waves, each after what it needs: the core; then the IOMMU and KVM; then VDCM (its work
      // queues DMA through the IOMMU).
      for (const wave of WAVES) {
        const now = NEEDS[options.role].filter((n) => wave.includes(n));
        await Promise.all(
          now.map(async (need) => {
            const there = stack?.services[OUR_SERVICES[need].dir] ?? (need === "core" ? options.coreAddress : undefined);
            if (there !== undefined && (await serving(there))) {
              addresses[need] = there;
              log(`${need.padEnd(12)} ${there} (already serving)`);
              return;
            }
            if (stack !== undefined) throw new Error(`the stack in ${options.stackDir} has no ${need} serving at ${String(there)}`);
            // A target that is already running was pointed at its core: the kit cannot move it to another.
            if (options.targetCmd === undefined) {
              throw new Error(
                there === undefined
                  ? `a running ${options.role} needs the ${need} it was pointed at: give --core HOST:PORT, --stack DIR, or let the kit start the target with --target-cmd`
                  : `no ${need} answers SERVING at ${there}: start it first (or use --target-cmd, and the kit brings up a stack of its own)`,
              );
            }
            const proc = await startService({
              name: need,
              entry: join(REPO_ROOT, "services", OUR_SERVICES[need].dir, "dist", "main.js"),
              env: {
                ...serviceEnv(natsUrl, prefix, addresses),
                // Each of our services with its own NATS user on the kit's own server (DESIGN §11).
                ...(nats === undefined ? {} : await natsEnv(nats, need)),
                ...options.env,
                [OUR_SERVICES[need].listenVar]: "127.0.0.1:0",
              },
            });
            started.push(proc);
            addresses[need] = proc.address;
            log(`${need.padEnd(12)} ${proc.address} (ours, pid ${proc.pid})`);
          }),
        );
      }
      // The kit observes as the operator: of the stack it was given, or (its own server) anonymous = operator.
      const auth = stack?.operatorCredentials === undefined ? {} : natsConnectOptions(readNatsCredential(stack.operatorCredentials));
      nc = await connect({ servers: natsUrl, name: "ioasid-conform", ...auth });
      const h = new Harness(options, prefix, natsUrl, nc, addresses);
      h.nats = nats;
      h.started.push(...started);
      if (options.targetCmd !== undefined) await h.startTarget();
      else await h.waitTargetServing();
      log(`target       ${options.target} (${options.role}) SERVING`);
      return h;
    } catch (err) {
      await nc?.close().catch(() => undefined);
      for (const p of started.reverse()) await p.stop().catch(() => undefined);
      await nats?.stop();
      throw err;
    }
  }

  /** The environment the target command gets: where NATS and the services around it are, and where to listen. */
  targetEnvironment(): Record<string, string> {
    return targetEnvironment(this.role, this.target, this.natsUrl, this.prefix, this.addresses);
  }

  /** Starts the target with `--target-cmd` and waits until it answers SERVING. */
  async startTarget(): Promise<void> {
    const cmd = this.options.targetCmd;
    if (cmd === undefined) throw new Error("no --target-cmd: the kit cannot start the target");
    this.targetOutput = [];
    // On the kit's own server the target gets its role's NATS user (IOASID_CREDENTIALS_DIR, nats.json):
    // the clauses then also show that it works within its role's permissions (DESIGN §11).
    const credentials = this.nats === undefined ? {} : await natsEnv(this.nats, this.role);
    const child = spawn("sh", ["-c", cmd], {
      // No metrics endpoint unless asked for: the kit starts targets over and over, beside other stacks.
      env: { IOASID_METRICS_PORT: "off", ...process.env, ...this.options.env, ...this.targetEnvironment(), ...credentials },
      stdio: ["ignore", "pipe", "pipe"],
      // Its own process group: a restart kills the shell and whatever it started, nothing else.
      detached: true,
    });
    const keep = (chunk: Buffer) => {
      this.targetOutput.push(
        ...chunk
          .toString("utf8")
          .split("\n")
          .filter((l) => l.length > 0),
      );
      if (this.targetOutput.length > 200) this.targetOutput.splice(0, this.targetOutput.length - 200);
    };
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    this.targetProc = child;
    // The kit interrupted (Ctrl-C, a test runner ending) takes the target's process group with it.
    const onExit = () => killGroup(child, "SIGKILL");
    process.once("exit", onExit);
    child.once("exit", () => process.off("exit", onExit));
    await this.waitTargetServing(child);
  }

  /** Kills the target (SIGKILL to its process group: a crash) and waits for its end. */
  async killTarget(): Promise<void> {
    const child = this.targetProc;
    if (child === undefined) throw new Error("the kit did not start the target");
    this.targetProc = undefined;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const ended = new Promise<void>((r) => child.once("exit", () => r()));
    killGroup(child, "SIGKILL");
    await ended;
  }

  /** Kill -9 and start again (the restart clauses). */
  async restartTarget(): Promise<void> {
    await this.killTarget();
    await this.startTarget();
  }

  /** The last lines the target printed (for failure messages). */
  targetLog(): string {
    return this.targetOutput.slice(-20).join("\n");
  }

  private async waitTargetServing(child?: ChildProcess): Promise<void> {
    const timeoutMs = this.options.readyTimeoutMs ?? 20_000;
    const controller = new AbortController();
    const onExit = (code: number | null) =>
      controller.abort(new Error(`the target command exited (code ${String(code)}) before serving on ${this.target}; its last output:\n${this.targetLog()}`));
    child?.once("exit", onExit);
    try {
      await waitFor(() => serving(this.target), {
        timeoutMs,
        intervalMs: 100,
        message: `the target to answer SERVING on ${this.target} (grpc.health.v1)`,
        signal: controller.signal,
      });
    } catch (err) {
      if (child !== undefined) await this.killTarget().catch(() => undefined);
      throw err;
    } finally {
      child?.off("exit", onExit);
    }
  }

  /** A fresh u64 token (an MM token nobody uses) for one clause. */
  uniqueToken(): bigint {
    this.uniqueCounter++;
    return BigInt(Date.now()) * 1000n + BigInt(this.uniqueCounter);
  }

  /** A fresh name for one clause (`conform-<run>-<n>-<what>`). */
  uniqueName(what: string): string {
    this.uniqueCounter++;
    return `conform-${this.runTag}-${this.uniqueCounter}-${what}`;
  }

  /**
   * Registers the kit as a subscriber at `priority` with `scope` and acknowledges what it receives
   * (releasing nothing: the kit takes no references) — the kit playing another tier of the chain.
   */
  async playTier(priority: events.Priority, scope: { setId: number } | { mmToken: bigint } | { global: true }): Promise<KitTier> {
    const instance = `${this.runTag}-tier-${++this.tierCount}`;
    const received: KitDelivery[] = [];
    const hooks: Array<{ match: (e: events.IoasidEvent) => boolean; run: (e: events.IoasidEvent) => Promise<void> }> = [];
    const handler: EventHandler = async (event, ctx): Promise<HandlerResult | void> => {
      received.push({ event, registrationId: ctx.registrationId, attempt: ctx.attempt });
      const i = hooks.findIndex((h) => h.match(event));
      if (i >= 0) {
        const [hook] = hooks.splice(i, 1);
        await hook!.run(event);
      }
    };
    const sub: Subscriber = await startSubscriber({ nc: this.nc, name: "conform", instance, handler, prefix: this.prefix });
    const scopeField =
      "global" in scope
        ? { $case: "global" as const, value: true }
        : "setId" in scope
          ? { $case: "setId" as const, value: scope.setId }
          : { $case: "mmToken" as const, value: scope.mmToken };
    let registrationId: number;
    try {
      registrationId = (await this.core.register(core.RegisterRequest.fromPartial({ subscriber: { name: "conform", instance }, priority, scope: scopeField })))
        .registration!.registrationId;
    } catch (err) {
      await sub.stop();
      throw err;
    }
    const core_ = this.core;
    const tier: KitTier = {
      registrationId,
      received,
      onDelivery<T>(match: (e: events.IoasidEvent) => boolean, check: (e: events.IoasidEvent) => Promise<T>, timeoutMs = patience()): Promise<T> {
        return new Promise<T>((resolveCheck, rejectCheck) => {
          const timer = setTimeout(() => {
            const at = hooks.findIndex((h) => h.run === run);
            if (at >= 0) hooks.splice(at, 1);
            rejectCheck(new Error(`no matching delivery reached the kit's tier within ${timeoutMs} ms (received: ${received.length})`));
          }, timeoutMs);
          const run = async (e: events.IoasidEvent): Promise<void> => {
            clearTimeout(timer);
            try {
              resolveCheck(await check(e));
            } catch (err) {
              rejectCheck(err);
            }
          };
          hooks.push({ match, run });
        });
      },
      async close() {
        await core_.unregister({ registrationId }).catch(() => undefined);
        await sub.stop();
      },
    };
    this.tiers.push(tier);
    return tier;
  }

  /** The subscriber (name, instance) the target registered with the core as, by its role name. */
  async targetSubscribers(name: string = this.role): Promise<Array<{ name: string; instance: string; registrationId: number; setId?: number }>> {
    const regs = (await this.core.listRegistrations({})).registrations;
    return regs
      .filter((r) => r.subscriber?.name === name)
      .map((r) => ({
        name: r.subscriber!.name,
        instance: r.subscriber!.instance,
        registrationId: r.registrationId,
        ...(r.activeSetId !== 0 ? { setId: r.activeSetId } : {}),
      }));
  }

  /**
   * Watches the deliveries the core sends to `name`/`instance` and the target's answers, with a
   * plain subscription on the delivery subject and on the reply inboxes.
   */
  tap(name: string, instance: string): Tap {
    const seen: TappedDelivery[] = [];
    const byReply = new Map<string, TappedDelivery>();
    const waiters: Array<{ match: (d: bus.Delivery) => boolean; onAck: (t: TappedDelivery) => void }> = [];
    const requests = this.nc.subscribe(deliverySubject(this.prefix, name, instance), {
      callback: (err, msg) => {
        if (err !== null) return;
        const t: TappedDelivery = { batch: bus.DeliveryBatch.decode(msg.data), data: msg.data, headers: headersOf(msg.headers) };
        seen.push(t);
        if (msg.reply !== undefined) byReply.set(msg.reply, t);
      },
    });
    const replies = this.nc.subscribe("_INBOX.>", {
      callback: (err, msg) => {
        if (err !== null) return;
        const t = byReply.get(msg.subject);
        if (t === undefined) return;
        byReply.delete(msg.subject);
        try {
          t.ack = bus.AckBatch.decode(msg.data);
        } catch {
          return;
        }
        for (let i = 0; i < waiters.length; i++) {
          const w = waiters[i]!;
          if (t.batch.deliveries.some(w.match)) {
            waiters.splice(i, 1);
            w.onAck(t);
            return;
          }
        }
      },
    });
    return {
      seen,
      ackOf<T>(match: (d: bus.Delivery) => boolean, atAck: (ack: bus.AckBatch) => Promise<T>, timeoutMs = patience()) {
        return new Promise<{ delivery: TappedDelivery; seenAtAck: T }>((resolveAck, rejectAck) => {
          const timer = setTimeout(() => rejectAck(new Error(`the target did not answer a matching delivery within ${timeoutMs} ms`)), timeoutMs);
          waiters.push({
            match,
            onAck: (t) => {
              clearTimeout(timer);
              atAck(t.ack!).then((v) => resolveAck({ delivery: t, seenAtAck: v }), rejectAck);
            },
          });
        });
      },
      close() {
        requests.unsubscribe();
        replies.unsubscribe();
      },
    };
  }

  /** Sends `data` (a DeliveryBatch) to the target's delivery subject again, as the core would, and decodes its answer. */
  async redeliver(name: string, instance: string, data: Uint8Array, headers: Record<string, string> = {}): Promise<bus.AckBatch> {
    const { headers: makeHeaders } = await import("@nats-io/transport-node");
    const h = makeHeaders();
    for (const [k, v] of Object.entries(headers)) h.set(k, v);
    const reply = await this.nc.request(deliverySubject(this.prefix, name, instance), data, { timeout: 10_000, headers: h });
    return bus.AckBatch.decode(reply.data);
  }

  /** History records of `role` (default: the target's) since `sinceMs`. */
  async history(sinceMs: number, role: string = this.role): Promise<TypedHistoryRecord[]> {
    return (await readHistory(this.nc, { prefix: this.prefix, sinceMs })).filter((r) => r.role === role);
  }

  /** Stops the target (when the kit started it), the kit's tiers, our services and the kit's nats-server. */
  async close(): Promise<void> {
    for (const t of this.tiers.splice(0)) await t.close().catch(() => undefined);
    if (this.targetProc !== undefined) {
      const child = this.targetProc;
      const ended = new Promise<void>((r) => child.once("exit", () => r()));
      if (child.exitCode === null && child.signalCode === null) {
        killGroup(child, "SIGTERM");
        const timer = setTimeout(() => killGroup(child, "SIGKILL"), 5000);
        await ended;
        clearTimeout(timer);
      }
      this.targetProc = undefined;
    }
    this.coreClient?.close();
    await this.nc.close().catch(() => undefined);
    for (const p of this.started.reverse()) await p.stop().catch(() => undefined);
    await this.nats?.stop();
  }
}

/** Signals the target's process group (the shell and what it started), or the child alone if the group is gone. */
function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(-(child.pid as number), signal);
  } catch {
    child.kill(signal);
  }
}

/** The environment of a target command: the stack's addresses, and where the target listens. */
export function targetEnvironment(
  role: ConformRole,
  target: string,
  natsUrl: string,
  prefix: string,
  addresses: Partial<Record<OurService, string>>,
): Record<string, string> {
  return {
    ...serviceEnv(natsUrl, prefix, addresses),
    // Our services' own variable for where to listen, and a name any implementation can read.
    [OUR_SERVICES[role].listenVar]: target,
    IOASID_CONFORM_TARGET: target,
    IOASID_CONFORM_ROLE: role,
  };
}

function serviceEnv(natsUrl: string, prefix: string, addresses: Partial<Record<OurService, string>>): Record<string, string> {
  const env: Record<string, string> = { NATS_URL: natsUrl, IOASID_BUS_PREFIX: prefix };
  for (const [name, address] of Object.entries(addresses)) env[OUR_SERVICES[name as OurService].addressVar] = address;
  return env;
}

async function serving(address: string): Promise<boolean> {
  try {
    return (await checkHealth(address, "", { deadlineMs: 1000 })) === "SERVING";
  } catch {
    return false;
  }
}

function headersOf(h: { keys(): string[]; get(k: string): string } | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  if (h === undefined) return out;
  for (const k of h.keys()) out[k] = h.get(k);
  return out;
}

/** The parts of an `ioasidctl up` stack's `stack.json` the kit reads. */
interface StackFile {
  readonly natsUrl: string;
  readonly services: Record<string, string>;
  /** The stack's operator credentials directory (a stack with authorization). */
  readonly operatorCredentials?: string;
}

function readStack(dir: string): StackFile {
  const file = join(resolve(dir), "stack.json");
  if (!existsSync(file)) throw new Error(`no stack is running from ${resolve(dir)} (no ${file}): start one with \`ioasidctl up\``);
  const raw = JSON.parse(readFileSync(file, "utf8")) as {
    natsUrl: string;
    services: Record<string, { address: string }>;
    standbyCore?: { address: string };
    operatorCredentials?: string;
  };
  const services = Object.fromEntries(Object.entries(raw.services).map(([k, v]) => [k, v.address]));
  // `up --standby-core`: both cores, so the kit follows a takeover as ioasidctl does.
  const core = services["ioasid-core"];
  if (raw.standbyCore !== undefined && core !== undefined) services["ioasid-core"] = `ipv4:${core},${raw.standbyCore.address}`;
  return {
    natsUrl: raw.natsUrl,
    services,
    ...(raw.operatorCredentials === undefined ? {} : { operatorCredentials: raw.operatorCredentials }),
  };
}
