import {
  failStopOnWriteError,
  HistoryGate,
  historyOutbox,
  RoleState,
  retryTransient,
  startSubscriber,
  StateWriteError,
  type HistorySink,
  type RoleStatePort,
  type EventHandler,
  type StateCodec,
  type Subscriber,
  type SubscriberOptions,
} from "@ioasid/bus";
import { Code, isDomainError } from "@ioasid/errors";
import {
  createGrpcMetrics,
  createLogger,
  createMetricsRegistry,
  holdSignals,
  metricsListen,
  runUntilSignal,
  startMetricsServer,
  startServiceTracing,
  type GrpcServer,
  type LogLevel,
  type TraceConfigValues,
} from "@ioasid/grpc-kit";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Logger } from "pino";
import type { Registry } from "prom-client";
import { connectNats } from "./role-kit.js";
import { createRoleMetrics } from "./role-metrics.js";

/** What every role's configuration carries (see `commonRoleConfig`). */
export interface RoleBaseConfig extends TraceConfigValues {
  readonly natsUrl: string;
  readonly natsConnectTimeout: number;
  /** This role instance's credentials directory ("" or absent: none). */
  readonly credentialsDir?: string;
  readonly prefix: string;
  readonly logLevel: string;
  readonly coreAddress: { readonly address: string };
  /** One state write's wait for JetStream, ms (IOASID_STATE_WRITE_TIMEOUT). @default 5000 */
  readonly stateWriteTimeout?: number;
  /** How long a failed state write is retried before the role fail-stops, ms (IOASID_STATE_WRITE_RETRY). @default 20000 */
  readonly stateWriteRetry?: number;
  /** Where the Prometheus endpoint listens (IOASID_METRICS_HOST). @default "127.0.0.1" */
  readonly metricsHost?: string;
  /** Its port (IOASID_METRICS_PORT; 0: ephemeral). @default "off" */
  readonly metricsPort?: number | "off";
}

/** What {@link runRole} hands the role to build itself from (`T`: the role's kept entry). */
export interface RoleRuntime<T> {
  readonly logger: Logger;
  readonly nc: NatsConnection;
  /** The bus subject prefix (deliveries, history, state). */
  readonly prefix: string;
  /** The role's kept state as last written (key → value), for the role to restore its tables from. */
  readonly saved: ReadonlyMap<string, T>;
  /**
   * Where the role writes its state: kept in JetStream, and fail-stop — a write JetStream does not
   * acknowledge is retried with backoff for `IOASID_STATE_WRITE_RETRY` (one slow or timed-out write
   * while the store is reachable is not fatal), and one that still cannot be made ends the process
   * (exit 1) unless it is already stopping, so that a restart restores what was kept and reconciles
   * (the core's operation log does the same). History records made while a write is pending are
   * published once it is kept ({@link RoleRuntime.history}).
   */
  readonly store: RoleStatePort<T>;
  /** Wraps a history sink so that its records wait until the tables they describe are kept. */
  history(sink: HistorySink): HistorySink;
  /** True from SIGTERM/SIGINT on. */
  stopping(): boolean;
  /** The process's metrics registry, for the role's own metrics; undefined when its endpoint is off. */
  readonly metrics?: Registry;
  /**
   * The handler of a delivery subscriber the role starts itself (KVM: one per VM), counted in the
   * role's metrics as the subscriber of {@link RoleParts.subscriber} is; as it is when metrics are off.
   */
  observeHandler(handler: EventHandler): EventHandler;
}

/** The parts of a running role, in the order {@link runRole} starts them. */
export interface RoleParts {
  /** The gRPC server, its services added; {@link runRole} listens on `listen`. */
  readonly server: GrpcServer;
  readonly listen: { readonly host: string; readonly port: number };
  /** What was restored, logged as `restoredMessage` when the kept state was not empty. */
  readonly restored?: { readonly message: string; readonly fields: () => Record<string, number> };
  /** No table change is waiting to be given to the store (history gate; see HistoryGate). */
  readonly quiet?: () => boolean;
  /**
   * The restored tables against the core (references the tables do not back are released, entries
   * whose reference is gone are cleared…), before anything is delivered. `before-serving`: retried
   * while the core is unreachable, up to the NATS connect timeout, then the process exits 1.
   * `in-background`: the role serves at once and keeps trying every `retryMs` (its calls wait).
   */
  readonly reconcile?: {
    readonly run: () => Promise<unknown>;
    readonly when: "before-serving" | "in-background";
    /** Which failures are worth another try. @default the core unreachable (UNAVAILABLE, DEADLINE_EXCEEDED) */
    readonly retryOn?: (err: unknown) => boolean;
    /** @default 250 before serving, 1000 in the background */
    readonly retryMs?: number;
    /** In the background: attempts before giving up (the role's calls may try again). @default unbounded */
    readonly maxAttempts?: number;
  };
  /** The role's one delivery subscriber, subscribed after reconciling (before registering). */
  readonly subscriber?: Pick<SubscriberOptions, "instance" | "handler" | "dedupeWindow"> & { readonly name?: string };
  /** Registers the role's notifier with the core (idempotent), retried like a before-serving reconcile. */
  readonly register?: () => Promise<unknown>;
  /** Deferred work retried on a timer (releases the core refused while unreachable…). */
  readonly retry?: { readonly due: () => boolean; readonly run: () => Promise<unknown>; readonly everyMs: number };
  /** Once serving (e.g. close what the life before a crash left open, in the background). */
  readonly serving?: () => void;
  /** At SIGTERM/SIGINT, before the server drains (end streams that would hold the drain). */
  readonly onSignal?: () => void;
  /** After the server and the subscriber stopped: the role's own teardown, then its clients closed. */
  readonly stop?: () => Promise<void> | void;
}

/** What {@link runRole} takes (`T`: the role's kept entry). */
export interface RoleSpec<C extends RoleBaseConfig, T> {
  /** The role ("kvm", "vdcm"): its state's owner, its subscriber name, its log's service. */
  readonly role: string;
  /** The instance whose state this process keeps ("vdcm0", "dmar0"). */
  readonly instance: string;
  readonly config: C;
  /**
   * How the role's kept entries are written (its `<Role>StateEntry` proto); a kept state in
   * another format is refused at start with what to do (exit 1).
   */
  readonly codec: StateCodec<T>;
  /** Name of the NATS connection. @default `<role>/<instance>` */
  readonly connectionName?: string;
  /** Builds the role on its restored state. */
  build(runtime: RoleRuntime<T>): RoleParts | Promise<RoleParts>;
}

/** The core unreachable: worth another try while it may still be starting. */
export function isCoreUnreachable(err: unknown): boolean {
  return isDomainError(err) && (err.code === Code.UNAVAILABLE || err.code === Code.DEADLINE_EXCEEDED);
}

/**
 * A role's life, the same for every role (DESIGN §2 "one start/reconcile/shutdown sequence"):
 * connect NATS → open and load the kept state → build the role on it → reconcile with the core →
 * subscribe → register → serve (with the deferred-work timer) → on SIGTERM/SIGINT: drain the
 * server, stop the subscriber, the role's teardown, the history settled, NATS drained, exit 0.
 * A dependency that cannot be reached in time ends the process with exit 1 and a message that says
 * which one and what to do; a state write that fails ends it with exit 1 (fail-stop).
 *
 * @example
 * const config = configOrExit(vdcmConfigSchema, { service: "vdcm" });
 * await runRole({ role: "vdcm", instance: config.instance, config, build: (rt) => ({ server, listen, … }) });
 */
export async function runRole<C extends RoleBaseConfig, T>(spec: RoleSpec<C, T>): Promise<void> {
  const { config, role, instance } = spec;
  const logger = createLogger(role, { level: config.logLevel as LogLevel });
  const fatal = (message: string, fields: Record<string, unknown>): never => {
    logger.fatal(fields, message);
    process.exit(1);
  };
  // A signal that arrives while the role starts is held and acted on once the role serves (else it
  // would kill the process without its graceful stop).
  const held = holdSignals();
  let signalled = false;
  // IOASID_TRACE_FILE / OTEL_EXPORTER_OTLP_ENDPOINT: spans exported (DESIGN §13); nothing set, no SDK.
  const tracing = await startServiceTracing(role, config, logger).catch((err: unknown) => fatal("cannot start tracing", { err: String(err) }));
  const stopping = (): boolean => signalled || held.received !== undefined;

  // Prometheus text on the role's own port (IOASID_METRICS_PORT; off: none), before anything else binds.
  const metricsAt = metricsListen(config);
  const registry = metricsAt === undefined ? undefined : createMetricsRegistry();
  const metrics = registry === undefined ? undefined : createRoleMetrics(registry);
  const metricsServer =
    metricsAt === undefined || registry === undefined
      ? undefined
      : await startMetricsServer({ registry, ...metricsAt, logger }).catch((err: unknown) =>
          fatal("cannot serve metrics: choose another IOASID_METRICS_PORT, or off", { err: String(err) }),
        );

  const nc = await connectNats(config.natsUrl, {
    name: spec.connectionName ?? `${role}/${instance}`,
    timeoutMs: config.natsConnectTimeout,
    logger,
    credentialsDir: config.credentialsDir,
  }).catch((err: unknown) => fatal("cannot reach NATS: start nats-server with JetStream (-js) or set NATS_URL", { url: config.natsUrl, err: String(err) }));
  // History the outbox gave up on (never stored within its bound) is said, never silently lost.
  historyOutbox(nc).onLost((loss) => logger.warn({ messages: loss.messages, reason: loss.reason }, "history records lost"));
  // The role's tables live in JetStream: a role killed with -9 comes back with them (the hardware
  // did not forget), then reconciles with the core.
  // A start while JetStream fails over (a cluster electing leaders, or without quorum until a
  // server is back: a timeout, no responder, a 503) waits for it within IOASID_STATE_WRITE_RETRY,
  // as a state write does (issue 18: a role restarted during a nats-server's restart exited 1 and
  // stayed down); anything else — a stream it may not read — still ends it at once.
  const openRetryMs = config.stateWriteRetry ?? 20_000;
  const openKept = () =>
    RoleState.open(nc, {
      role,
      instance,
      prefix: config.prefix,
      codec: spec.codec,
      retry: {
        attemptTimeoutMs: config.stateWriteTimeout ?? 5000,
        retryMs: config.stateWriteRetry ?? 20_000,
        // Issue 15: one write that timed out under load made KVM exit with nothing to restart it.
        onRetry: (r) => {
          const fields = {
            attempt: r.attempt,
            keys: r.keys.length,
            sinceFirstFailureMs: r.elapsedMs,
            boundMs: config.stateWriteRetry ?? 20_000,
            err: String(r.error),
          };
          metrics?.writeRetried();
          if (r.attempt === 2) logger.warn(fields, "state write not acknowledged by JetStream; retrying within the bound (IOASID_STATE_WRITE_RETRY)");
          else logger.debug(fields, "state write retried");
        },
      },
    });
  const onOpenRetry = (err: unknown, attempt: number) => {
    if (attempt === 1)
      logger.warn(
        { boundMs: openRetryMs, err: String(err) },
        "JetStream not answering while the kept state opens; retrying within the bound (IOASID_STATE_WRITE_RETRY)",
      );
  };
  const kept = await retryTransient(openKept, { retryMs: openRetryMs, delayMs: 500, onRetry: onOpenRetry }).catch((err: unknown) =>
    fatal(`cannot open the ${role} state in JetStream (is nats-server running with -js?)`, { err: String(err) }),
  );
  // A kept state in another format (the JSON of earlier versions) is refused at once: the error says what to do.
  const saved = await retryTransient(() => kept.load(), { retryMs: openRetryMs, delayMs: 500, onRetry: onOpenRetry }).catch((err: unknown) =>
    fatal(`cannot read the ${role} kept state`, { err: String(err) }),
  );
  // Late-bound: the gate asks the role, which is built on the gate's store.
  const built: { parts?: RoleParts } = {};
  // History records wait until the tables they describe are kept (a crash takes back both).
  const gate = new HistoryGate({ quiet: () => built.parts?.quiet?.() ?? true });
  const store = gate.store(
    failStopOnWriteError(
      metrics?.store(kept) ?? kept,
      (err: unknown) =>
        fatal("state store unwritable: exiting so a restart restores the kept tables and reconciles", {
          err: String(err),
          ...(err instanceof StateWriteError ? { attempts: err.attempts } : {}),
        }),
      {
        stopping,
      },
    ),
  );
  const p = await spec.build({
    logger,
    nc,
    prefix: config.prefix,
    saved,
    store,
    history: (sink) => gate.wrap(sink),
    stopping,
    ...(registry === undefined ? {} : { metrics: registry }),
    observeHandler: (handler) => metrics?.handler(handler) ?? handler,
  });
  if (registry !== undefined) p.server.observeCalls(createGrpcMetrics(registry));
  built.parts = p;
  if (saved.size > 0 && p.restored !== undefined) logger.info(p.restored.fields(), p.restored.message);

  /** `call`, retried while `retryOn` says so, until the NATS connect timeout; then exit 1. */
  const untilReachable = async <T>(what: string, call: () => Promise<T>, retryOn = isCoreUnreachable, retryMs = 250): Promise<T> => {
    const deadline = Date.now() + config.natsConnectTimeout;
    for (let attempt = 0; ; attempt++) {
      try {
        return await call();
      } catch (err) {
        if (!retryOn(err) || Date.now() >= deadline) {
          return fatal(`cannot ${what} with ioasid-core: start it or set IOASID_CORE_ADDRESS`, { core: config.coreAddress.address, err: String(err) });
        }
        if (attempt === 0) logger.warn({ core: config.coreAddress.address, err: String(err) }, "ioasid-core not reachable yet; retrying");
        await new Promise((r) => setTimeout(r, retryMs));
      }
    }
  };

  let reconcileTimer: NodeJS.Timeout | undefined;
  const reconcile = p.reconcile;
  if (reconcile?.when === "before-serving") {
    const r = await untilReachable("reconcile", reconcile.run, reconcile.retryOn, reconcile.retryMs);
    if (hasCounts(r)) logger.info(r, "reconciled with the core after the restart");
  } else if (reconcile?.when === "in-background") {
    // Serve at once; calls that need the reconciled tables wait for it (KVM's CreateVm).
    const retryOn = reconcile.retryOn ?? (() => true);
    const attempt = async (n: number): Promise<void> => {
      try {
        const r = await reconcile.run();
        if (hasCounts(r)) logger.info(r, "reconciled with the core after the restart");
      } catch (err) {
        if (stopping() || !retryOn(err)) return void logger.error({ err: String(err) }, "reconciling with ioasid-core failed");
        if (n === 0) logger.warn({ err: String(err) }, "cannot reconcile with ioasid-core yet; retrying in the background");
        if (n + 1 >= (reconcile.maxAttempts ?? Infinity)) return void logger.error({ attempts: n + 1 }, "giving up reconciling with ioasid-core for now");
        reconcileTimer = setTimeout(() => void attempt(n + 1), reconcile.retryMs ?? 1000);
        reconcileTimer.unref();
      }
    };
    await attempt(0);
  }

  // Subscribe before registering, so that no delivery finds nobody listening.
  let subscriber: Subscriber | undefined;
  if (p.subscriber !== undefined) {
    const s = p.subscriber;
    subscriber = await startSubscriber({
      nc,
      name: s.name ?? role,
      instance: s.instance,
      prefix: config.prefix,
      handler: metrics?.handler(s.handler) ?? s.handler,
      ...(s.dedupeWindow === undefined ? {} : { dedupeWindow: s.dedupeWindow }),
    });
    metrics?.follow(subscriber);
  }
  if (p.register !== undefined) await untilReachable("register", p.register);

  let retrying = false;
  const retryTimer =
    p.retry === undefined
      ? undefined
      : setInterval(() => {
          const r = p.retry!;
          if (retrying || stopping() || !r.due()) return;
          retrying = true;
          void r.run().finally(() => (retrying = false));
        }, p.retry.everyMs);
  retryTimer?.unref();

  await p.server.listen(p.listen.host, p.listen.port).catch((err: unknown) => fatal("could not start", { err: String(err) }));
  p.serving?.();
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.once(signal, () => {
      signalled = true;
      p.onSignal?.();
    });
  }
  runUntilSignal(p.server, {
    logger,
    beforeExit: async () => {
      clearTimeout(reconcileTimer);
      if (retryTimer !== undefined) clearInterval(retryTimer);
      await subscriber?.stop();
      await p.stop?.();
      await gate.settle();
      await nc.drain();
      await metricsServer?.close();
      await tracing?.shutdown();
    },
  });
  held.release();
}

/** A reconcile result worth logging: some count in it is not zero. */
function hasCounts(r: unknown): r is Record<string, number> {
  return typeof r === "object" && r !== null && Object.values(r).some((v) => typeof v === "number" && v > 0);
}
