import { core } from "@ioasid/proto";
import { quote } from "@ioasid/errors";
import {
  coreError,
  INVALID_IOASID,
  MAX_BATCH_ALLOC,
  type FreeResult,
  type IoasidSpace,
  type IoasidSpaceOptions,
  type PutResult,
  type Registration,
  type SetInfo,
} from "@ioasid/ioasid";
import { createClient, createGrpcMetrics, createGrpcServer, createLogger, type GrpcServer, type ServiceHandlers } from "@ioasid/grpc-kit";
import { formatIdentity, type InstanceCredentials } from "@ioasid/security";
import type { Logger } from "pino";
import {
  DEFAULT_PREFIX,
  DeliveryEngine,
  ensureHistoryStream,
  ensureRoleStateStream,
  HistoryRecorder,
  lastHistoryHeaders,
  historyOutbox,
  type DeliveryEngineOptions,
  type HistoryActionInput,
  type HistoryFields,
} from "@ioasid/bus";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { OpLog, type OpLogOptions } from "./op-log.js";
import { fromIoasidInfo, fromRegistration, fromSetInfo, nonEmpty, toEventType, toHolder, toRegisterOptions, toBuffer, toSetToken } from "./convert.js";
import { EventWatchers } from "./event-watchers.js";
import { IoasidCore, type ExternalAllocator } from "./ioasid-core.js";
import type { AuthorizationView } from "./authorize.js";
import { createAuthorizationInterceptor, operatorAuditOf } from "./authorization-interceptor.js";
import { auditStreamAdmin } from "./stream-admin-audit.js";
import { createCoreMetrics } from "./core-metrics.js";
import type { Registry } from "prom-client";

const FREE_OUTCOME = {
  FREE_PENDING: core.FreeOutcome.FREE_OUTCOME_FREE_PENDING,
  RECLAIMED: core.FreeOutcome.FREE_OUTCOME_RECLAIMED,
  ALREADY_FREE_PENDING: core.FreeOutcome.FREE_OUTCOME_ALREADY_FREE_PENDING,
} as const;

const ALLOCATOR_ADDRESS = /^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$/;

/** Makes the gRPC AllocatorService client an external allocator is reached through. */
export type ExternalAllocatorFactory = (name: string, address: string) => ExternalAllocator;

/**
 * The default {@link ExternalAllocatorFactory}: a grpc-kit client with a 2 s deadline per call,
 * over mTLS with the core's credentials when it has them (an allocator is a service of the stack).
 */
export const grpcExternalAllocator =
  (logger: Logger, tls?: InstanceCredentials): ExternalAllocatorFactory =>
  (name, address) => {
    const client = createClient(core.AllocatorServiceService, address, { deadlineMs: 2000, ...(tls === undefined ? {} : { tls }) });
    return {
      name,
      allocate: async (min, max) => (await client.allocate({ min, max })).ioasid,
      release: (ioasid) => {
        client.release({ ioasid }).catch((err: unknown) => logger.warn({ err, ioasid, allocator: name }, "allocator release failed"));
      },
      close: () => client.close(),
    };
  };

/**
 * The CoreService handlers: each translates the wire request, calls the core, and translates the
 * answer. Errors are the domain's, thrown as they are (grpc-kit maps them to status + reason).
 */
export function createCoreHandlers(ioasidCore: IoasidCore, watchers = new EventWatchers(ioasidCore.log)): ServiceHandlers<typeof core.CoreServiceService> {
  const handlers = coreHandlers(ioasidCore, watchers);
  // Unary answers, queries and refusals included, go out once what they read is durable.
  const settledAnswers: Record<string, unknown> = {};
  for (const [name, handler] of Object.entries(handlers) as Array<[string, (...args: never[]) => unknown]>) {
    const method = (core.CoreServiceService as Record<string, { requestStream: boolean; responseStream: boolean }>)[name];
    if (method === undefined || method.requestStream || method.responseStream) {
      settledAnswers[name] = handler;
      continue;
    }
    settledAnswers[name] = async (...args: never[]) => {
      try {
        return await handler(...args);
      } finally {
        await ioasidCore.settled();
      }
    };
  }
  return settledAnswers as unknown as ServiceHandlers<typeof core.CoreServiceService>;
}

function coreHandlers(ioasidCore: IoasidCore, watchers: EventWatchers): ServiceHandlers<typeof core.CoreServiceService> {
  const space = ioasidCore.space;
  // Every state change goes through ioasidCore.commit: applied, logged, answered once durable.
  const commit = (op: Parameters<IoasidCore["commit"]>[0]) => ioasidCore.commit(op);
  return {
    createSet: async (req) => {
      const token = toSetToken(req.tokenType, req.token);
      const set = (await commit({ kind: "createSet", token, quota: req.quota })) as SetInfo;
      return { set: fromSetInfo(set) };
    },
    adjustSet: async (req) => ({ set: fromSetInfo((await commit({ kind: "adjustSet", setId: req.setId, quota: req.quota })) as SetInfo) }),
    destroySet: async (req) => {
      await commit({ kind: "destroySet", setId: req.setId });
      return {};
    },
    freeSet: async (req) => (await commit({ kind: "freeSet", setId: req.setId })) as { freed: number; destroyed: boolean },
    getSet: (req) => {
      if (req.setId !== 0) return { set: fromSetInfo(space.getSet(req.setId)) };
      const token = toSetToken(req.tokenType, req.token);
      if (token.type !== "NONE" && token.type !== "MM") throw coreError("TOKEN_TYPE_INVALID", "token type must be NONE or MM");
      if (token.value === 0n) throw coreError("TOKEN_EMPTY", "set_id is 0: give a token to look the set up by");
      const set = space.findSetByToken(token);
      if (set === undefined) throw coreError("SET_NOT_FOUND", `no set with ${token.type} token ${token.value}`);
      return { set: fromSetInfo(set) };
    },
    listSets: () => ({ sets: space.listSets().map(fromSetInfo) }),
    alloc: async (req) => {
      const privateData = nonEmpty(req.privateData);
      return ioasidCore.alloc(req.setId, {
        ...bounds(req),
        ...(privateData === undefined ? {} : { privateData }),
      });
    },
    batchAlloc: async (req) => {
      if (req.count === 0 || req.count > MAX_BATCH_ALLOC) {
        throw coreError("COUNT_INVALID", `count ${req.count} is outside 1..${MAX_BATCH_ALLOC}`);
      }
      return { allocations: await ioasidCore.allocMany(req.setId, req.count, bounds(req)) };
    },
    free: async (req) => {
      const r = (await commit({ kind: "free", setId: req.setId, ioasid: req.ioasid, generation: req.generation })) as FreeResult;
      return { outcome: FREE_OUTCOME[r.outcome], refcount: r.refcount };
    },
    get: async (req) =>
      (await commit({ kind: "get", setId: req.setId, ioasid: req.ioasid, holder: toHolder(req.holder)!, generation: req.generation })) as { refcount: number },
    put: async (req) => {
      // An operator's force-release carries its audit into the operation (DESIGN §3, §4.4).
      const audit = operatorAuditOf(req);
      return (await commit({
        kind: "put",
        setId: req.setId,
        ioasid: req.ioasid,
        holder: toHolder(req.holder)!,
        generation: req.generation,
        ...(audit === undefined ? {} : { audit }),
      })) as PutResult;
    },
    find: (req) => ({ info: fromIoasidInfo(space.find(req.setId, req.ioasid, req.generation)) }),
    findBySpid: async (req) => {
      const holder = toHolder(req.holder);
      // Without a holder it is a read; with one it takes a reference, a state change.
      if (holder === undefined) return space.findBySpid(req.setId, req.spid);
      return (await commit({ kind: "findBySpid", setId: req.setId, spid: req.spid, holder })) as core.FindBySpidResponse;
    },
    attachSpid: async (req) => {
      await commit({ kind: "attachSpid", setId: req.setId, ioasid: req.ioasid, spid: req.spid, generation: req.generation });
      return {};
    },
    detachSpid: async (req) =>
      (await commit({ kind: "detachSpid", setId: req.setId, ioasid: req.ioasid, generation: req.generation })) as core.DetachSpidResponse,
    attachData: async (req) => {
      await commit({ kind: "attachData", setId: req.setId, ioasid: req.ioasid, data: req.data, generation: req.generation });
      return {};
    },
    detachData: async (req) => ({
      data: toBuffer((await commit({ kind: "detachData", setId: req.setId, ioasid: req.ioasid, generation: req.generation })) as Uint8Array),
    }),
    describe: (req) => {
      if (req.ioasid === 0 || req.ioasid >= space.capacity || req.ioasid === INVALID_IOASID) {
        throw coreError("IOASID_OUT_OF_RANGE", `IOASID ${req.ioasid} is outside 1..${space.capacity - 1}`);
      }
      const info = space.describe(req.ioasid);
      if (info === undefined) throw coreError("IOASID_NOT_FOUND", `IOASID ${req.ioasid} is not allocated`);
      return { info: fromIoasidInfo(info) };
    },
    listIoasids: (req) => ({
      ioasids: space.listIoasids(req.setId === 0 ? undefined : req.setId).map(fromIoasidInfo),
    }),
    register: async (req) => {
      const registration = (await commit({ kind: "register", options: toRegisterOptions(req) })) as Registration;
      return { registration: fromRegistration(registration) };
    },
    unregister: async (req) => {
      await commit({ kind: "unregister", registrationId: req.registrationId });
      return {};
    },
    listRegistrations: () => ({ registrations: space.listRegistrations().map(fromRegistration) }),
    registerAllocator: async (req) => {
      if (!ALLOCATOR_ADDRESS.test(req.address)) {
        throw coreError("ALLOCATOR_INVALID", `allocator address ${quote(req.address)} is not host:port`);
      }
      await ioasidCore.registerAllocator(req.name, req.address, operatorAuditOf(req));
      return {};
    },
    unregisterAllocator: async (req) => {
      await ioasidCore.unregisterAllocator(req.name, operatorAuditOf(req));
      return {};
    },
    getStats: () => {
      const s = space.stats();
      const d = ioasidCore.pendingDeliveries();
      return {
        ...s,
        lastSeq: BigInt(s.lastSeq),
        deliveriesPending: d.filter((x) => x.pending > 0).length,
        deliveriesMissed: d.filter((x) => x.missed > 0).length,
        ...watchers.stats(),
      };
    },
    watchEvents: (req, ctx, send) => watchers.serve(req.fromSeq, space.stats().lastSeq, ctx, send, watchedTypes(req.types)),
  };
}

function bounds(req: { min: number; max: number }): { min?: number; max?: number } {
  // 0 means "the default bound" on the wire (PASID 0 can never be a bound).
  return { ...(req.min === 0 ? {} : { min: req.min }), ...(req.max === 0 ? {} : { max: req.max }) };
}

/** Options of {@link startCoreServer}. */
export interface StartCoreServerOptions {
  readonly host?: string;
  readonly port?: number;
  readonly capacity?: number;
  readonly eventLogRetain?: number;
  /** Most events held for one WatchEvents stream (see {@link EventWatchers}). @default DEFAULT_WATCH_BUFFER */
  readonly watchBuffer?: number;
  readonly logger?: Logger;
  readonly externalAllocator?: ExternalAllocatorFactory;
  /**
   * NATS for durability and delivery: the operation log in JetStream and the delivery engine.
   * Without it the core keeps its state in memory only and delivers nothing (unit tests).
   */
  readonly nats?: {
    readonly nc: NatsConnection;
    /** Subject prefix of the bus. @default "ioasid.v1" */
    readonly prefix?: string;
    /** JetStream stream of the operation log. @default "IOASID_CORE_OPS" */
    readonly stream?: string;
    /** Stream replicas (3 in a NATS cluster). @default 1 */
    readonly replicas?: number;
    /** Delivery deadline per batch, ms. @default 2000 */
    readonly deadlineMs?: number;
    /** Retry period of missed deliveries, ms. @default 1000 */
    readonly retryMs?: number;
    /** See {@link DeliveryEngineOptions.maxInFlightPerName}. @default 2048 */
    readonly maxInFlightPerName?: number;
    /** How long history records wait for company before they are published, ms. @default DEFAULT_HISTORY_FLUSH_MS */
    readonly historyFlushMs?: number;
    /** Snapshot after this many operations (0: never by count). @default DEFAULT_SNAPSHOT_EVERY_OPS */
    readonly snapshotEveryOps?: number;
    /** Snapshot after this many bytes of operations (0: never by size). @default DEFAULT_SNAPSHOT_EVERY_BYTES */
    readonly snapshotEveryBytes?: number;
    /** See {@link OpLogOptions.onSnapshotStep} (tests). */
    readonly onSnapshotStep?: OpLogOptions["onSnapshotStep"];
    /** See {@link OpLogOptions.writeRetryMs}. @default DEFAULT_WRITE_RETRY_MS */
    readonly writeRetryMs?: number;
  };
  /** Called when the operation log cannot be written (the process must stop). */
  readonly onFatal?: (err: unknown) => void;
  /** Makes the model (see {@link IoasidCoreOptions.space}). @default `new IoasidSpace(options)` */
  readonly space?: (options: IoasidSpaceOptions) => IoasidSpace;
  /**
   * Makes the delivery engine from the options the core gives it. @default `new DeliveryEngine(options)`.
   * A composition seam, not a switch: the conformance kit's test-only broken cores wrap it.
   */
  readonly deliveryEngine?: (options: DeliveryEngineOptions) => DeliveryEngine;
  /**
   * The core's credentials (grpc-kit `loadCredentials`): CoreService requires mTLS and authorizes
   * each call by the caller's role (DESIGN §3, §11; see `authorize`). Without them the core is
   * insecure — anyone on the network may make any call — and says so at start.
   */
  readonly tls?: InstanceCredentials;
  /**
   * Where the core's metrics go (`createMetricsRegistry`; served by the caller on its metrics port):
   * its gRPC calls, IOASIDs, references, deliveries and writes (see `createCoreMetrics`). @default none
   */
  readonly metrics?: Registry;
}

/** A running core: its gRPC server, bound port and model. */
export interface RunningCore {
  readonly server: GrpcServer;
  readonly port: number;
  readonly address: string;
  readonly core: IoasidCore;
  readonly engine: DeliveryEngine | undefined;
  readonly opLog: OpLog | undefined;
  /** Operations replayed from the log at start. */
  readonly replayed: number;
  /** Time from start to serving, ms (replay included). */
  readonly startupMs: number;
  /**
   * Publishes the history records still waiting for company (they wait up to 5 ms): a graceful
   * stop calls it once the op log is drained, before the connection closes.
   */
  flushHistory(): void;
  /** Graceful stop. */
  close(graceMs?: number): Promise<void>;
}

/**
 * Starts the IOASID core: replays its operation log (when NATS is given), resumes delivery, then
 * serves CoreService + health + reflection. It listens only once its state is rebuilt.
 *
 * @example
 * const running = await startCoreServer({ port: 0, nats: { nc } });
 * console.log(running.address);
 */
export async function startCoreServer(options: StartCoreServerOptions = {}): Promise<RunningCore> {
  const t0 = performance.now();
  // Late-bound: the interceptor reads the model (for set owners and registrations) only once serving.
  const state: { core?: IoasidCore } = {};
  const baseLogger = options.logger ?? createLogger("ioasid-core");
  const server = createGrpcServer({
    service: "ioasid-core",
    logger: baseLogger,
    ...(options.tls === undefined
      ? {}
      : {
          tls: options.tls,
          interceptors: [
            createAuthorizationInterceptor({
              view: authorizationView(() => state.core!),
              logger: baseLogger,
            }),
          ],
        }),
  });
  const logger = server.logger;
  const metrics = options.metrics === undefined ? undefined : createCoreMetrics(options.metrics);
  if (options.metrics !== undefined) server.observeCalls(createGrpcMetrics(options.metrics));
  if (options.tls === undefined) {
    // DESIGN §11: "An explicit insecure mode exists for debugging and says so loudly at start."
    logger.warn(
      "INSECURE: no credentials (IOASID_CREDENTIALS_DIR unset): CoreService is plaintext, callers are not authenticated and every call is allowed to anyone",
    );
  } else {
    logger.info({ identity: formatIdentity(options.tls.identity) }, "mTLS: callers are authenticated by the stack CA and authorized by role");
  }
  let history: ((action: HistoryActionInput, fields: HistoryFields, ts?: number, opSeq?: number) => void) | undefined;
  let historyStamp: ((fields: HistoryFields) => HistoryFields) | undefined;
  /** Publishes the history records still waiting for company (a graceful stop). */
  let flushHistory: (() => void) | undefined;
  const ioasidCore = new IoasidCore({
    history: (action, fields, ts, opSeq) => history?.(action, fields, ts, opSeq),
    historyStamp: (fields) => historyStamp?.(fields) ?? fields,
    ...(options.capacity === undefined ? {} : { capacity: options.capacity }),
    ...(options.eventLogRetain === undefined ? {} : { retain: options.eventLogRetain }),
    externalAllocator: options.externalAllocator ?? grpcExternalAllocator(logger, options.tls),
    log: (level, msg, fields) => logger[level](fields ?? {}, msg),
    ...(options.onFatal === undefined ? {} : { onFatal: options.onFatal }),
    ...(options.space === undefined ? {} : { space: options.space }),
  });
  state.core = ioasidCore;
  let engine: DeliveryEngine | undefined;
  let opLog: OpLog | undefined;
  let republishAfter: number | undefined;
  let streamAudit: Subscription | undefined;
  let stopLossLog: (() => void) | undefined;
  let replayed: number;
  let recoverMs: number;
  // A start that fails before it serves (JetStream failing over: a timeout, a 503) leaves nothing
  // behind, so the caller may start again: the audit subscription, the loss listener and the
  // engine go with it.
  try {
    if (options.nats !== undefined) {
      const n = options.nats;
      const prefix = n.prefix ?? DEFAULT_PREFIX;
      await ensureHistoryStream(n.nc, prefix, n.replicas ?? 1);
      // The roles' state stream too: with authorization on, roles may not create streams (DESIGN §11).
      await ensureRoleStateStream(n.nc, prefix, n.replicas ?? 1);
      // The records of operations wait up to 5 ms for company (IOASID_CORE_HISTORY_FLUSH): a run of
      // sequential calls (durable Allocs, one at a time) shares one history message and its
      // acknowledgement, not one each — two socket writes and a read per call, on the core's
      // critical path (issue 15: 1.35× → 1.24× the floor in alternating runs). What a crash takes
      // before it is published, a start publishes again from the op log (recover's
      // `republishAfter`). Plain records (the stream-admin audit) go out at the end of their turn.
      const recorder = new HistoryRecorder(n.nc, CORE_HISTORY_ROLE, CORE_HISTORY_INSTANCE, prefix, {
        flushDelayMs: n.historyFlushMs ?? DEFAULT_HISTORY_FLUSH_MS,
      });
      flushHistory = () => recorder.flush();
      // History the outbox gave up on (never stored within its bound) is said, never silently lost.
      // Removed when this start fails or the server closes: a core started again on the same
      // connection (the binary retries through a JetStream fail-over) says each loss once.
      stopLossLog = historyOutbox(n.nc).onLost((loss) => logger.warn({ messages: loss.messages, reason: loss.reason }, "history records lost"));
      const log = await OpLog.open(n.nc, {
        ...(n.stream === undefined ? {} : { stream: n.stream }),
        subject: `${prefix}.core.ops`,
        ...(n.replicas === undefined ? {} : { replicas: n.replicas }),
        ...(n.snapshotEveryOps === undefined ? {} : { snapshotEveryOps: n.snapshotEveryOps }),
        ...(n.snapshotEveryBytes === undefined ? {} : { snapshotEveryBytes: n.snapshotEveryBytes }),
        ...(n.onSnapshotStep === undefined ? {} : { onSnapshotStep: n.onSnapshotStep }),
        ...(n.writeRetryMs === undefined ? {} : { writeRetryMs: n.writeRetryMs }),
        onWriteRetry: (err, attempt) => logger.warn({ err: String(err), attempt }, "operation log write not taken (JetStream failing over?): retrying"),
      });
      if (log.snapshotsDisabled !== undefined) logger.warn({ stream: log.stream }, `no snapshots: ${log.snapshotsDisabled}`);
      opLog = log;
      // The records of one op-log message go out as one group (JetStream message id), so a replay
      // that publishes them again is stored once. Each names its op-log message (op_seq) and is
      // numbered when the core makes it (issue 18: order without clocks).
      historyStamp = (fields) => recorder.stamp(fields);
      // The records of one op-log message come one after another (about ten per IOASID a crowd's
      // teardown reclaims): its group name and headers are made once, not per record.
      let group: { opSeq: number; name: string; headers: Record<string, string> } | undefined;
      history = (action, fields, ts, opSeq) => {
        if (opSeq === undefined) return recorder.record(action, fields, ts);
        if (group?.opSeq !== opSeq) {
          group = { opSeq, name: `ioasid-core:${log.logId}:${opSeq}`, headers: { [OP_LOG_HEADER]: log.logId, [OP_SEQ_HEADER]: String(opSeq) } };
        }
        recorder.recordIn(group.name, group.headers, action, { ...fields, opSeq }, ts ?? Date.now());
      };
      republishAfter = await historyWatermark(n.nc, prefix, log, logger);
      const engineOptions: DeliveryEngineOptions = {
        nc: n.nc,
        ...(n.prefix === undefined ? {} : { prefix: n.prefix }),
        ...(n.deadlineMs === undefined ? {} : { deadlineMs: n.deadlineMs }),
        ...(n.retryMs === undefined ? {} : { retryMs: n.retryMs }),
        ...(n.maxInFlightPerName === undefined ? {} : { maxInFlightPerName: n.maxInFlightPerName }),
        onAcks: (acks) => {
          metrics?.acked(acks);
          ioasidCore.onAcks(acks);
        },
        onMissed: (missed) => {
          metrics?.missed(missed);
          ioasidCore.onMissed(missed);
        },
        // Each delivery carries the core's history position: its handling follows the core's records up to it.
        position: () => recorder.position(),
        ...(metrics === undefined ? {} : { onDelivered: (target, outcome, seconds) => metrics.delivered(target, outcome, seconds) }),
        log: (level, msg, fields) => logger[level](fields ?? {}, msg),
      };
      engine = options.deliveryEngine?.(engineOptions) ?? new DeliveryEngine(engineOptions);
      // Stream administration (only an operator credential may) leaves an audit record (DESIGN §11).
      streamAudit = auditStreamAdmin(n.nc, (action, fields) => recorder.record(action, fields), logger);
    }
    const tReplay = performance.now();
    replayed = await ioasidCore.recover(opLog, engine, republishAfter);
    recoverMs = performance.now() - tReplay;
    if (ioasidCore.republished > 0) {
      logger.info({ after: republishAfter, records: ioasidCore.republished }, "published the history of logged operations found unrecorded");
    }
    // Fence earlier incarnations: from here on only this core's writes can follow what it replayed.
    await opLog?.seal();
  } catch (err) {
    streamAudit?.unsubscribe();
    stopLossLog?.();
    await engine?.stop().catch(() => undefined);
    throw err;
  }
  // Metrics from here on: a replay is not the life of this core.
  const unfollow = metrics?.follow(ioasidCore, engine);
  if (opLog !== undefined && metrics !== undefined) opLog.onWrite = (seconds) => metrics.opLogWritten(seconds);
  engine?.start();
  server.addService(core.CoreServiceService, createCoreHandlers(ioasidCore, new EventWatchers(ioasidCore.log, options.watchBuffer)));
  const host = options.host ?? "127.0.0.1";
  let port: number;
  try {
    port = await server.listen(host, options.port ?? 0);
  } catch (err) {
    // Not serving (the port taken): nothing of this start stays behind, as when it fails above.
    unfollow?.();
    streamAudit?.unsubscribe();
    stopLossLog?.();
    await engine?.stop().catch(() => undefined);
    throw err;
  }
  const startupMs = performance.now() - t0;
  // `replayed` then `startupMs` first: the bench reads them in that order.
  const fromSnapshot = opLog?.lastReplay;
  logger.info(
    {
      replayed,
      startupMs: Math.round(startupMs),
      inUse: ioasidCore.space.stats().inUse,
      ...(fromSnapshot === undefined
        ? {}
        : {
            snapshotSeq: fromSnapshot.snapshotSeq,
            snapshotBytes: fromSnapshot.snapshotBytes,
            snapshotLoadMs: Math.round(fromSnapshot.snapshotMs),
          }),
      recoverMs: Math.round(recoverMs),
    },
    "state recovered",
  );
  return {
    server,
    port,
    address: `${host.includes(":") ? `[${host}]` : host}:${port}`,
    core: ioasidCore,
    engine,
    opLog,
    replayed,
    startupMs,
    flushHistory: () => flushHistory?.(),
    close: async (graceMs = 2000) => {
      await server.shutdown(graceMs);
      streamAudit?.unsubscribe();
      unfollow?.();
      await engine?.stop();
      await opLog?.drain();
      flushHistory?.();
      stopLossLog?.();
      ioasidCore.close();
    },
  };
}

/** What the authorization reads of the model: set token types and registrations' subscribers. */
function authorizationView(model: () => IoasidCore): AuthorizationView {
  return {
    setTokenType: (setId) =>
      model()
        .space.listSets()
        .find((s) => s.id === setId)?.token.type,
    subscriberOf: (registrationId) =>
      model()
        .space.listRegistrations()
        .find((r) => r.id === registrationId)?.subscriber,
  };
}

const CORE_HISTORY_ROLE = "ioasid";
/** How long the core's history records wait for company before they are published, ms (IOASID_CORE_HISTORY_FLUSH). */
export const DEFAULT_HISTORY_FLUSH_MS = 5;
const CORE_HISTORY_INSTANCE = "core";
/** Headers of the core's history messages: which op log, and which message of it, they record. */
const OP_LOG_HEADER = "Ioasid-Op-Log";
const OP_SEQ_HEADER = "Ioasid-Op-Seq";
/** At most this many op-log messages' history is published again at a start. */
const MAX_REPUBLISH = 50_000;

/**
 * The op-log sequence after which the history may be missing: the newest message of this log
 * whose records the history stream holds (0 when it holds none of this log), but no further back
 * than {@link MAX_REPUBLISH} messages. A newest record that does not say (written before records
 * carried their op-log message) leaves nothing to publish.
 */
async function historyWatermark(nc: NatsConnection, prefix: string, log: OpLog, logger: Logger): Promise<number> {
  const h = await lastHistoryHeaders(nc, CORE_HISTORY_ROLE, CORE_HISTORY_INSTANCE, prefix);
  if (h !== undefined && h[OP_LOG_HEADER] === undefined) return log.head;
  const seq = h !== undefined && h[OP_LOG_HEADER] === log.logId ? Number(h[OP_SEQ_HEADER] ?? 0) : 0;
  const floor = Math.max(0, log.head - MAX_REPUBLISH);
  if (seq < floor) logger.warn({ stored: seq, from: floor }, "history of the oldest operations is missing and not published again");
  return Math.max(seq, floor);
}

/**
 * The event types a WatchEvents stream asked for (undefined: every type).
 * @throws DomainError INVALID_ARGUMENT `EVENT_TYPE_INVALID` for a value that is not an event type
 */
function watchedTypes(types: readonly number[]): ReadonlySet<ReturnType<typeof toEventType>> | undefined {
  if (types.length === 0) return undefined;
  const out = new Set<ReturnType<typeof toEventType>>();
  for (const t of types) {
    const type = toEventType(t);
    if (type.startsWith("UNSPECIFIED")) throw coreError("EVENT_TYPE_INVALID", `WatchEvents types: ${t} is not an event type`);
    out.add(type);
  }
  return out;
}
