import { core } from "@ioasid/proto";
import { coreError, INVALID_IOASID, MAX_BATCH_ALLOC } from "@ioasid/ioasid";
import { createClient, createGrpcServer, type GrpcServer, type ServiceHandlers } from "@ioasid/grpc-kit";
import type { Logger } from "pino";
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
export function createCoreHandlers(
  ioasidCore: IoasidCore,
  externalAllocator: ExternalAllocatorFactory,
): ServiceHandlers<typeof core.CoreServiceService> {
  const space = ioasidCore.space;
  return {
    createSet: (req) => ({
      set: fromSetInfo(space.createSet({ token: toSetToken(req.tokenType, req.token), quota: req.quota })),
    }),
    adjustSet: (req) => ({ set: fromSetInfo(space.adjustSet(req.setId, req.quota)) }),
    destroySet: (req) => {
      space.destroySet(req.setId);
      return {};
    },
    freeSet: (req) => space.freeSet(req.setId),
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
    free: (req) => {
      const r = space.free(req.setId, req.ioasid, req.generation);
      return { outcome: FREE_OUTCOME[r.outcome], refcount: r.refcount };
    },
    get: (req) => space.get(req.setId, req.ioasid, toHolder(req.holder)!, req.generation),
    put: (req) => space.put(req.setId, req.ioasid, toHolder(req.holder)!, req.generation),
    find: (req) => ({ info: fromIoasidInfo(space.find(req.setId, req.ioasid, req.generation)) }),
    findBySpid: (req) => space.findBySpid(req.setId, req.spid, toHolder(req.holder)),
    attachSpid: (req) => {
      space.attachSpid(req.setId, req.ioasid, req.spid, req.generation);
      return {};
    },
    detachSpid: (req) => space.detachSpid(req.setId, req.ioasid, req.generation),
    attachData: (req) => {
      space.attachData(req.setId, req.ioasid, req.data, req.generation);
      return {};
    },
    detachData: (req) => ({ data: toBuffer(space.detachData(req.setId, req.ioasid, req.generation)) }),
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
    register: (req) => ({ registration: fromRegistration(space.register(toRegisterOptions(req))) }),
    unregister: (req) => {
      space.unregister(req.registrationId);
      return {};
    },
    listRegistrations: () => ({ registrations: space.listRegistrations().map(fromRegistration) }),
    registerAllocator: (req) => {
      if (!ALLOCATOR_ADDRESS.test(req.address)) {
        throw coreError("ALLOCATOR_INVALID", `allocator address ${JSON.stringify(req.address)} is not host:port`);
      }
      const external = externalAllocator(req.name, req.address);
      try {
        ioasidCore.registerExternalAllocator(external);
      } catch (err) {
        external.close();
        throw err;
      }
      return {};
    },
    unregisterAllocator: (req) => {
      ioasidCore.unregisterExternalAllocator(req.name);
      return {};
    },
    getStats: () => {
      const s = space.stats();
      return { ...s, lastSeq: BigInt(s.lastSeq) };
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
}

/** A running core: its gRPC server, bound port and model. */
export interface RunningCore {
  readonly server: GrpcServer;
  readonly port: number;
  readonly address: string;
  readonly core: IoasidCore;
  /** Graceful stop. */
  close(graceMs?: number): Promise<void>;
}

/**
 * Starts the IOASID core's gRPC server (CoreService + health + reflection).
 *
 * @example
 * const running = await startCoreServer({ port: 0 });
 * console.log(running.address);
 */
export async function startCoreServer(options: StartCoreServerOptions = {}): Promise<RunningCore> {
  const ioasidCore = new IoasidCore({
    ...(options.capacity === undefined ? {} : { capacity: options.capacity }),
    ...(options.eventLogRetain === undefined ? {} : { retain: options.eventLogRetain }),
  });
  const server = createGrpcServer({ service: "ioasid-core", ...(options.logger === undefined ? {} : { logger: options.logger }) });
  server.addService(
    core.CoreServiceService,
    createCoreHandlers(ioasidCore, options.externalAllocator ?? grpcExternalAllocator(server.logger)),
  );
  const host = options.host ?? "127.0.0.1";
  const port = await server.listen(host, options.port ?? 0);
  return {
    server,
    port,
    address: `${host.includes(":") ? `[${host}]` : host}:${port}`,
    core: ioasidCore,
    close: async (graceMs = 2000) => {
      await server.shutdown(graceMs);
      ioasidCore.close();
    },
  };
}
