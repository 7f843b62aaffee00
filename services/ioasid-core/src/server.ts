import { core } from "@ioasid/proto";
import { coreError, INVALID_IOASID, MAX_BATCH_ALLOC, type FreeResult, type PutResult, type Registration, type SetInfo } from "@ioasid/ioasid";
import { createClient, createGrpcServer, type GrpcServer, type ServiceHandlers } from "@ioasid/grpc-kit";
import type { Logger } from "pino";
import { DEFAULT_PREFIX, DeliveryEngine, ensureHistoryStream, HistoryRecorder, type HistoryFields } from "@ioasid/bus";
import type { NatsConnection } from "@nats-io/transport-node";
import { OpLog } from "./op-log.js";
import {
  fromCommittedEvent,
  fromIoasidInfo,
  fromRegistration,
  fromSetInfo,
  nonEmpty,
  toHolder,
  toRegisterOptions,
  toBuffer,
  toSetToken,
} from "./convert.js";
import type { CommittedEvent } from "./event-log.js";
import { IoasidCore, type ExternalAllocator } from "./ioasid-core.js";
import { serializeRegisterOptions } from "./ops.js";

const FREE_OUTCOME = {
  FREE_PENDING: core.FreeOutcome.FREE_OUTCOME_FREE_PENDING,
  RECLAIMED: core.FreeOutcome.FREE_OUTCOME_RECLAIMED,
  ALREADY_FREE_PENDING: core.FreeOutcome.FREE_OUTCOME_ALREADY_FREE_PENDING,
} as const;

const ALLOCATOR_ADDRESS = /^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$/;

/** Makes the gRPC AllocatorService client an external allocator is reached through. */
export type ExternalAllocatorFactory = (name: string, address: string) => ExternalAllocator;

/** The default {@link ExternalAllocatorFactory}: a grpc-kit client with a 2 s deadline per call. */
export const grpcExternalAllocator =
  (logger: Logger): ExternalAllocatorFactory =>
  (name, address) => {
    const client = createClient(core.AllocatorServiceService, address, { deadlineMs: 2000 });
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
export function createCoreHandlers(ioasidCore: IoasidCore): ServiceHandlers<typeof core.CoreServiceService> {
  const space = ioasidCore.space;
  // Every state change goes through ioasidCore.commit: applied, logged, answered once durable.
  const commit = (op: Parameters<IoasidCore["commit"]>[0]) => ioasidCore.commit(op);
  return {
    createSet: async (req) => {
      const token = toSetToken(req.tokenType, req.token);
      const set = (await commit({ t: "createSet", tt: token.type, tok: String(token.value), q: req.quota })) as SetInfo;
      return { set: fromSetInfo(set) };
    },
    adjustSet: async (req) => ({ set: fromSetInfo((await commit({ t: "adjustSet", s: req.setId, q: req.quota })) as SetInfo) }),
    destroySet: async (req) => {
      await commit({ t: "destroySet", s: req.setId });
      return {};
    },
    freeSet: async (req) => (await commit({ t: "freeSet", s: req.setId })) as { freed: number; destroyed: boolean },
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
      const r = (await commit({ t: "free", s: req.setId, i: req.ioasid, g: req.generation })) as FreeResult;
      return { outcome: FREE_OUTCOME[r.outcome], refcount: r.refcount };
    },
    get: async (req) =>
      (await commit({ t: "get", s: req.setId, i: req.ioasid, h: toHolder(req.holder)!, g: req.generation })) as { refcount: number },
    put: async (req) => (await commit({ t: "put", s: req.setId, i: req.ioasid, h: toHolder(req.holder)!, g: req.generation })) as PutResult,
    find: (req) => ({ info: fromIoasidInfo(space.find(req.setId, req.ioasid, req.generation)) }),
    findBySpid: async (req) => {
      const holder = toHolder(req.holder);
      // Without a holder it is a read; with one it takes a reference, a state change.
      if (holder === undefined) return space.findBySpid(req.setId, req.spid);
      return (await commit({ t: "findBySpid", s: req.setId, sp: req.spid, h: holder })) as core.FindBySpidResponse;
    },
    attachSpid: async (req) => {
      await commit({ t: "attachSpid", s: req.setId, i: req.ioasid, sp: req.spid, g: req.generation });
      return {};
    },
    detachSpid: async (req) => (await commit({ t: "detachSpid", s: req.setId, i: req.ioasid, g: req.generation })) as core.DetachSpidResponse,
    attachData: async (req) => {
      await commit({ t: "attachData", s: req.setId, i: req.ioasid, d: Buffer.from(req.data).toString("base64"), g: req.generation });
      return {};
    },
    detachData: async (req) => ({
      data: toBuffer((await commit({ t: "detachData", s: req.setId, i: req.ioasid, g: req.generation })) as Uint8Array),
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
      const options = toRegisterOptions(req);
      const registration = (await commit({ t: "register", o: serializeRegisterOptions(options) })) as Registration;
      return { registration: fromRegistration(registration) };
    },
    unregister: async (req) => {
      await commit({ t: "unregister", r: req.registrationId });
      return {};
    },
    listRegistrations: () => ({ registrations: space.listRegistrations().map(fromRegistration) }),
    registerAllocator: async (req) => {
      if (!ALLOCATOR_ADDRESS.test(req.address)) {
        throw coreError("ALLOCATOR_INVALID", `allocator address ${JSON.stringify(req.address)} is not host:port`);
      }
      await ioasidCore.registerAllocator(req.name, req.address);
      return {};
    },
    unregisterAllocator: async (req) => {
      await ioasidCore.unregisterAllocator(req.name);
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
      };
    },
    watchEvents: async (req, ctx, send) => {
      // Follow first, then read the backlog, so nothing committed in between is missed; the
      // follower's copies of backlog events are skipped by sequence number.
      const queue: CommittedEvent[] = [];
      let wake: (() => void) | undefined;
      const unfollow = ioasidCore.log.follow((e) => {
        queue.push(e);
        wake?.();
      });
      const onAbort = () => wake?.();
      ctx.signal.addEventListener("abort", onAbort);
      try {
        const from = req.fromSeq === 0n ? space.stats().lastSeq + 1 : Number(req.fromSeq);
        let next = from;
        for (const e of ioasidCore.log.since(from)) {
          if (ctx.signal.aborted) return;
          await send({ event: fromCommittedEvent(e) });
          next = e.seq + 1;
        }
        while (!ctx.signal.aborted) {
          const batch = queue.splice(0);
          for (const e of batch) {
            if (e.seq < next) continue;
            await send({ event: fromCommittedEvent(e) });
            next = e.seq + 1;
          }
          if (queue.length === 0 && !ctx.signal.aborted) {
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
            wake = undefined;
          }
        }
      } finally {
        unfollow();
        ctx.signal.removeEventListener("abort", onAbort);
      }
    },
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
  };
  /** Called when the operation log cannot be written (the process must stop). */
  readonly onFatal?: (err: unknown) => void;
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
  const server = createGrpcServer({ service: "ioasid-core", ...(options.logger === undefined ? {} : { logger: options.logger }) });
  const logger = server.logger;
  let history: ((action: string, fields: HistoryFields, ts?: number) => void) | undefined;
  const ioasidCore = new IoasidCore({
    history: (action, fields, ts) => history?.(action, fields, ts),
    ...(options.capacity === undefined ? {} : { capacity: options.capacity }),
    ...(options.eventLogRetain === undefined ? {} : { retain: options.eventLogRetain }),
    externalAllocator: options.externalAllocator ?? grpcExternalAllocator(logger),
    log: (level, msg, fields) => logger[level](fields ?? {}, msg),
    ...(options.onFatal === undefined ? {} : { onFatal: options.onFatal }),
  });
  let engine: DeliveryEngine | undefined;
  let opLog: OpLog | undefined;
  if (options.nats !== undefined) {
    const n = options.nats;
    await ensureHistoryStream(n.nc, n.prefix ?? DEFAULT_PREFIX, n.replicas ?? 1);
    const recorder = new HistoryRecorder(n.nc, "ioasid", "core", n.prefix ?? DEFAULT_PREFIX);
    history = (action, fields, ts) => recorder.record(action, fields, ts);
    opLog = await OpLog.open(n.nc, {
      ...(n.stream === undefined ? {} : { stream: n.stream }),
      subject: `${n.prefix ?? DEFAULT_PREFIX}.core.ops`,
      ...(n.replicas === undefined ? {} : { replicas: n.replicas }),
    });
    engine = new DeliveryEngine({
      nc: n.nc,
      ...(n.prefix === undefined ? {} : { prefix: n.prefix }),
      ...(n.deadlineMs === undefined ? {} : { deadlineMs: n.deadlineMs }),
      ...(n.retryMs === undefined ? {} : { retryMs: n.retryMs }),
      onAcks: (acks) => ioasidCore.onAcks(acks),
      onMissed: (missed) => ioasidCore.onMissed(missed),
      log: (level, msg, fields) => logger[level](fields ?? {}, msg),
    });
  }
  const replayed = await ioasidCore.recover(opLog, engine);
  // Fence earlier incarnations: from here on only this core's writes can follow what it replayed.
  await opLog?.seal();
  engine?.start();
  server.addService(core.CoreServiceService, createCoreHandlers(ioasidCore));
  const host = options.host ?? "127.0.0.1";
  const port = await server.listen(host, options.port ?? 0);
  const startupMs = performance.now() - t0;
  logger.info({ replayed, startupMs: Math.round(startupMs), inUse: ioasidCore.space.stats().inUse }, "state recovered");
  return {
    server,
    port,
    address: `${host.includes(":") ? `[${host}]` : host}:${port}`,
    core: ioasidCore,
    engine,
    opLog,
    replayed,
    startupMs,
    close: async (graceMs = 2000) => {
      await server.shutdown(graceMs);
      await engine?.stop();
      await opLog?.drain();
      ioasidCore.close();
    },
  };
}
