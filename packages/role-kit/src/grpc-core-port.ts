import { isDomainError } from "@ioasid/errors";
import { core, events } from "@ioasid/proto";
import type { EventType, TokenType } from "@ioasid/ioasid";
import { IoasidState, type Holder, type IoasidInfo, type RegisterOptions, type Registration, type SetInfo, type SetToken } from "@ioasid/ioasid";
import type { CorePort } from "./core-port.js";
import {
  eventTypeFromWire,
  eventTypeToWire,
  priorityFromWire,
  priorityToWire,
  scopeFromWire,
  scopeToWire,
  tokenTypeFromWire,
  tokenTypeToWire,
} from "./core-wire.js";
import type { CoreClient } from "./role-kit.js";

// The core's wire types (ts-proto) ↔ the domain model, on the client side; the enum tables and the
// scope are core-wire.ts's, shared with the core's server and its op-log codec.

/** A wire value the domain does not know is a protocol error, never a silent default. */
function unknownWire(what: string, value: unknown): never {
  throw new Error(`ioasid-core answered an unknown ${what} (${String(value)}): client and core speak different versions of core.proto`);
}

function toTokenType(t: events.TokenType): TokenType {
  return tokenTypeFromWire(t) ?? unknownWire("token type", t);
}

function toEventType(t: events.EventType): EventType {
  return eventTypeFromWire(t) ?? unknownWire("event type", t);
}

/** The wire set → domain. */
function toSetInfo(s: core.IoasidSet | undefined): SetInfo {
  if (s === undefined) return unknownWire("set", s);
  return { id: s.setId, token: { type: toTokenType(s.tokenType), value: s.token }, quota: s.quota, inUse: s.inUse, freeing: s.freeing };
}

/** The wire IOASID → domain. */
function toIoasidInfo(i: core.IoasidInfo | undefined): IoasidInfo {
  if (i === undefined) return unknownWire("IOASID", i);
  let state: IoasidState;
  if (i.state === core.IoasidState.IOASID_STATE_ACTIVE) state = IoasidState.ACTIVE;
  else if (i.state === core.IoasidState.IOASID_STATE_FREE_PENDING) state = IoasidState.FREE_PENDING;
  else return unknownWire("IOASID state", i.state);
  return {
    ioasid: i.ioasid,
    setId: i.setId,
    state,
    generation: i.generation,
    refcount: i.refcount,
    holders: i.holders.map((h) => ({ holder: toHolder(h.holder), count: h.count })),
    spid: i.spid,
    privateData: i.privateData.length === 0 ? undefined : new Uint8Array(i.privateData),
  };
}

function toHolder(h: core.Holder | undefined): Holder {
  return { role: h?.role ?? "", instance: h?.instance ?? "", purpose: h?.purpose ?? "" };
}

/** The wire registration → domain. */
function toRegistration(r: core.Registration | undefined): Registration {
  if (r === undefined) return unknownWire("registration", r);
  return {
    id: r.registrationId,
    subscriber: { name: r.subscriber?.name ?? "", instance: r.subscriber?.instance ?? "" },
    priority: priorityFromWire(r.priority),
    scope: scopeFromWire(r.scope) ?? unknownWire("registration scope", r.scope),
    events: r.events.map(toEventType),
    active: r.active,
    setId: r.activeSetId,
  };
}

/** Domain registration options → the wire request. */
function fromRegisterOptions(o: RegisterOptions): core.RegisterRequest {
  return {
    subscriber: { ...o.subscriber },
    priority: priorityToWire(o.priority),
    scope: scopeToWire(o.scope),
    events: (o.events ?? []).map(eventTypeToWire),
  };
}

function fromToken(token: SetToken): { tokenType: events.TokenType; token: bigint } {
  return { tokenType: tokenTypeToWire(token.type), token: token.value };
}

/**
 * The {@link CorePort} over a CoreService gRPC client: each call is one RPC with the client's
 * deadline; refusals arrive as the core's `DomainError`s (grpc-kit rebuilds them).
 *
 * @example
 * const port = createGrpcCorePort(createCoreClient(config.coreAddress));
 * const { ioasid, generation } = await port.alloc(setId);
 */
export function createGrpcCorePort(client: CoreClient): CorePort {
  return {
    async createSet(token, quota) {
      return toSetInfo((await client.createSet({ ...fromToken(token), quota })).set);
    },
    async getSet(setId) {
      return toSetInfo((await client.getSet({ setId, tokenType: events.TokenType.TOKEN_TYPE_UNSPECIFIED, token: 0n })).set);
    },
    async listSets() {
      return (await client.listSets({})).sets.map(toSetInfo);
    },
    async destroySet(setId) {
      await client.destroySet({ setId });
    },
    async freeSet(setId) {
      const r = await client.freeSet({ setId });
      return { freed: r.freed, destroyed: r.destroyed };
    },
    async alloc(setId, options = {}) {
      const r = await client.alloc({ setId, min: options.min ?? 0, max: options.max ?? 0, privateData: Buffer.alloc(0) });
      return { ioasid: r.ioasid, generation: r.generation };
    },
    async free(setId, ioasid, generation = 0) {
      const r = await client.free({ setId, ioasid, generation });
      if (r.outcome === core.FreeOutcome.FREE_OUTCOME_FREE_PENDING) return { outcome: "FREE_PENDING", refcount: r.refcount };
      if (r.outcome === core.FreeOutcome.FREE_OUTCOME_RECLAIMED) return { outcome: "RECLAIMED", refcount: r.refcount };
      if (r.outcome === core.FreeOutcome.FREE_OUTCOME_ALREADY_FREE_PENDING) return { outcome: "ALREADY_FREE_PENDING", refcount: r.refcount };
      return unknownWire("free outcome", r.outcome);
    },
    async find(setId, ioasid, generation = 0) {
      return toIoasidInfo((await client.find({ setId, ioasid, generation })).info);
    },
    async findBySpid(setId, spid, holder) {
      const r = await client.findBySpid({ setId, spid, holder: holder === undefined ? undefined : { ...holder } });
      return { ioasid: r.ioasid, generation: r.generation, refcount: r.refcount };
    },
    async get(setId, ioasid, holder, generation = 0) {
      return { refcount: (await client.get({ setId, ioasid, holder: { ...holder }, generation })).refcount };
    },
    async put(setId, ioasid, holder, generation = 0) {
      const r = await client.put({ setId, ioasid, holder: { ...holder }, generation });
      return { refcount: r.refcount, reclaimed: r.reclaimed };
    },
    async attachSpid(setId, ioasid, spid, generation = 0) {
      await client.attachSpid({ setId, ioasid, spid, generation });
    },
    async detachSpid(setId, ioasid, generation = 0) {
      const r = await client.detachSpid({ setId, ioasid, generation });
      return { spid: r.spid, unbindEmitted: r.unbindEmitted };
    },
    async describe(ioasid) {
      try {
        return toIoasidInfo((await client.describe({ ioasid })).info);
      } catch (err) {
        // Not allocated is an answer here, as IoasidSpace.describe gives it.
        if (isDomainError(err, "IOASID_NOT_FOUND")) return undefined;
        throw err;
      }
    },
    async listIoasids(setId) {
      return (await client.listIoasids({ setId })).ioasids.map(toIoasidInfo);
    },
    async register(options) {
      return toRegistration((await client.register(fromRegisterOptions(options))).registration);
    },
    async unregister(registrationId) {
      await client.unregister({ registrationId });
    },
    async listRegistrations() {
      return (await client.listRegistrations({})).registrations.map(toRegistration);
    },
  };
}
