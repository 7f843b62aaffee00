import { core, events } from "@ioasid/proto";
import type {
  Priority} from "@ioasid/ioasid";
import {
  coreError,
  EventType,
  TokenType,
  type Holder,
  type IoasidInfo,
  type RegisterOptions,
  type Registration,
  type SetInfo,
  type SetToken,
} from "@ioasid/ioasid";
import type { CommittedEvent } from "./event-log.js";

// Translations between the wire (ts-proto types) and the domain model. Invalid enum values are
// passed through as values the domain refuses, so the refusal carries the domain's reason.

const TOKEN_TYPES: Record<number, TokenType> = {
  [events.TokenType.TOKEN_TYPE_NONE]: TokenType.NONE,
  [events.TokenType.TOKEN_TYPE_MM]: TokenType.MM,
};

/** Wire token type + token → domain token (unknown types become a value the domain refuses). */
export function toSetToken(type: events.TokenType, value: bigint): SetToken {
  return { type: TOKEN_TYPES[type] ?? ("UNSPECIFIED" as TokenType), value };
}

/** Domain token type → wire. */
export function fromTokenType(type: TokenType): events.TokenType {
  return type === TokenType.MM ? events.TokenType.TOKEN_TYPE_MM : events.TokenType.TOKEN_TYPE_NONE;
}

/** Wire priority (kernel value + 1) → domain priority. */
export function toPriority(p: events.Priority): Priority {
  return (p - 1) as Priority; // UNSPECIFIED (0) becomes -1, which the domain refuses.
}

/** Domain priority → wire. */
export function fromPriority(p: Priority): events.Priority {
  return (p + 1) as events.Priority;
}

const EVENT_TYPES: Record<number, EventType> = {
  [events.EventType.EVENT_TYPE_ALLOC]: EventType.ALLOC,
  [events.EventType.EVENT_TYPE_FREE]: EventType.FREE,
  [events.EventType.EVENT_TYPE_BIND]: EventType.BIND,
  [events.EventType.EVENT_TYPE_UNBIND]: EventType.UNBIND,
  [events.EventType.EVENT_TYPE_SET_ALLOC]: EventType.SET_ALLOC,
  [events.EventType.EVENT_TYPE_SET_FREE]: EventType.SET_FREE,
  [events.EventType.EVENT_TYPE_RECLAIM]: EventType.RECLAIM,
};
const EVENT_TYPE_WIRE = new Map<EventType, events.EventType>(
  Object.entries(EVENT_TYPES).map(([k, v]) => [v, Number(k) as events.EventType]),
);

/** Wire event type → domain. */
export function toEventType(t: events.EventType): EventType {
  return EVENT_TYPES[t] ?? (`UNSPECIFIED(${t})` as EventType);
}

/** Domain event type → wire. */
export function fromEventType(t: EventType): events.EventType {
  return EVENT_TYPE_WIRE.get(t) ?? events.EventType.EVENT_TYPE_UNSPECIFIED;
}

/** A wire holder, or undefined (the domain refuses a missing one with HOLDER_INVALID). */
export function toHolder(h: core.Holder | undefined): Holder | undefined {
  return h === undefined ? undefined : { role: h.role, instance: h.instance, purpose: h.purpose };
}

/** Uint8Array of a bytes field, or undefined when empty. */
export function nonEmpty(bytes: Uint8Array | undefined): Uint8Array | undefined {
  return bytes === undefined || bytes.length === 0 ? undefined : bytes;
}

/** A Buffer view of bytes (ts-proto with env=node types bytes fields as Buffer). */
export function toBuffer(bytes: Uint8Array | undefined): Buffer {
  return bytes === undefined ? Buffer.alloc(0) : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A wire RegisterRequest → domain options. */
export function toRegisterOptions(req: core.RegisterRequest): RegisterOptions {
  const subscriber = { name: req.subscriber?.name ?? "", instance: req.subscriber?.instance ?? "" };
  const scope = req.scope;
  let domainScope: RegisterOptions["scope"];
  if (scope?.$case === "global" && scope.value) domainScope = { kind: "global" };
  else if (scope?.$case === "setId") domainScope = { kind: "set", setId: scope.value };
  else if (scope?.$case === "mmToken") domainScope = { kind: "mm", token: scope.value };
  else throw coreError("SCOPE_INVALID", "scope must be global (true), a set id, or an MM token");
  return { subscriber, priority: toPriority(req.priority), scope: domainScope, events: req.events.map(toEventType) };
}

/** Domain set → wire. */
export function fromSetInfo(s: SetInfo): core.IoasidSet {
  return {
    setId: s.id,
    tokenType: fromTokenType(s.token.type),
    token: s.token.value,
    quota: s.quota,
    inUse: s.inUse,
    freeing: s.freeing,
  };
}

/** Domain IOASID → wire. */
export function fromIoasidInfo(i: IoasidInfo): core.IoasidInfo {
  return {
    ioasid: i.ioasid,
    setId: i.setId,
    state: i.state === "ACTIVE" ? core.IoasidState.IOASID_STATE_ACTIVE : core.IoasidState.IOASID_STATE_FREE_PENDING,
    generation: i.generation,
    refcount: i.refcount,
    holders: i.holders.map((h) => ({ holder: { ...h.holder }, count: h.count })),
    spid: i.spid,
    privateData: toBuffer(i.privateData),
  };
}

/** Domain registration → wire. */
export function fromRegistration(r: Registration): core.Registration {
  const scope: core.Registration["scope"] =
    r.scope.kind === "global"
      ? { $case: "global", value: true }
      : r.scope.kind === "set"
        ? { $case: "setId", value: r.scope.setId }
        : { $case: "mmToken", value: r.scope.token };
  return {
    registrationId: r.id,
    subscriber: { ...r.subscriber },
    priority: fromPriority(r.priority),
    scope,
    events: r.events.map(fromEventType),
    active: r.active,
    activeSetId: r.setId,
  };
}

/** A committed event → wire. */
export function fromCommittedEvent(e: CommittedEvent): events.IoasidEvent {
  return {
    seq: BigInt(e.seq),
    type: fromEventType(e.type),
    ioasid: e.ioasid,
    generation: e.generation,
    spid: e.spid,
    setId: e.setId,
    tokenType: fromTokenType(e.token.type),
    token: e.token.value,
    privateData: toBuffer(e.privateData),
    refcount: e.refcount,
    commitTime: new Date(e.commitTimeMs),
  };
}
