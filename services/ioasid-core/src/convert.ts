import type { events } from "@ioasid/proto";
import { core } from "@ioasid/proto";
import {
  coreError,
  type EventType,
  type TokenType,
  type Holder,
  type IoasidInfo,
  type RegisterOptions,
  type Registration,
  type SetInfo,
  type SetToken,
} from "@ioasid/ioasid";
import {
  eventTypeFromWire,
  eventTypeToWire,
  priorityFromWire,
  priorityToWire,
  scopeFromWire,
  scopeToWire,
  tokenTypeFromWire,
  tokenTypeToWire,
} from "@ioasid/role-kit";
import type { CommittedEvent } from "./event-log.js";

// Translations between the wire (ts-proto types) and the domain model. Invalid enum values are
// passed through as values the domain refuses, so the refusal carries the domain's reason.

/** Wire token type + token → domain token (unknown types become a value the domain refuses). */
export function toSetToken(type: events.TokenType, value: bigint): SetToken {
  return { type: tokenTypeFromWire(type) ?? ("UNSPECIFIED" as TokenType), value };
}

/** Domain token type → wire. */
export const fromTokenType = tokenTypeToWire;

/** Wire priority (kernel value + 1) → domain priority (UNSPECIFIED becomes -1, which the domain refuses). */
export const toPriority = priorityFromWire;

/** Domain priority → wire. */
export const fromPriority = priorityToWire;

/** Wire event type → domain (unknown values become a value the domain refuses). */
export function toEventType(t: events.EventType): EventType {
  return eventTypeFromWire(t) ?? (`UNSPECIFIED(${t})` as EventType);
}

/** Domain event type → wire. */
export const fromEventType = eventTypeToWire;

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
  const scope = scopeFromWire(req.scope);
  if (scope === undefined) throw coreError("SCOPE_INVALID", "scope must be global (true), a set id, or an MM token");
  return { subscriber, priority: toPriority(req.priority), scope, events: req.events.map(toEventType) };
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
  return {
    registrationId: r.id,
    subscriber: { ...r.subscriber },
    priority: fromPriority(r.priority),
    scope: scopeToWire(r.scope),
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
