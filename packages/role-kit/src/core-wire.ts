import { EventType, TokenType, type Priority, type RegistrationScope } from "@ioasid/ioasid";
import { events } from "@ioasid/proto";

// The IOASID core's enums and registration scope on the wire (ts-proto) and in the domain model,
// both ways: one table each, shared by the core's server, its operation-log codec and the roles'
// gRPC port, so that the three never disagree on what a wire value means. A wire value the domain
// does not know becomes `undefined`: the caller decides whether that is a refusal (a request's
// INVALID_ARGUMENT, an unreadable log entry) or a protocol error.

const EVENT_TYPE_TO_WIRE: Readonly<Record<EventType, events.EventType>> = {
  [EventType.ALLOC]: events.EventType.EVENT_TYPE_ALLOC,
  [EventType.FREE]: events.EventType.EVENT_TYPE_FREE,
  [EventType.BIND]: events.EventType.EVENT_TYPE_BIND,
  [EventType.UNBIND]: events.EventType.EVENT_TYPE_UNBIND,
  [EventType.SET_ALLOC]: events.EventType.EVENT_TYPE_SET_ALLOC,
  [EventType.SET_FREE]: events.EventType.EVENT_TYPE_SET_FREE,
  [EventType.RECLAIM]: events.EventType.EVENT_TYPE_RECLAIM,
};
const EVENT_TYPE_FROM_WIRE = new Map<events.EventType, EventType>(Object.entries(EVENT_TYPE_TO_WIRE).map(([d, w]) => [w, d as EventType]));

/** Domain event type → wire. */
export function eventTypeToWire(t: EventType): events.EventType {
  return EVENT_TYPE_TO_WIRE[t] ?? events.EventType.EVENT_TYPE_UNSPECIFIED;
}

/** Wire event type → domain, or undefined for UNSPECIFIED and values this build does not know. */
export function eventTypeFromWire(t: events.EventType): EventType | undefined {
  return EVENT_TYPE_FROM_WIRE.get(t);
}

/** Domain token type → wire. */
export function tokenTypeToWire(t: TokenType): events.TokenType {
  return t === TokenType.MM ? events.TokenType.TOKEN_TYPE_MM : events.TokenType.TOKEN_TYPE_NONE;
}

/** Wire token type → domain, or undefined for UNSPECIFIED and unknown values. */
export function tokenTypeFromWire(t: events.TokenType): TokenType | undefined {
  if (t === events.TokenType.TOKEN_TYPE_MM) return TokenType.MM;
  if (t === events.TokenType.TOKEN_TYPE_NONE) return TokenType.NONE;
  return undefined;
}

/** Domain priority → wire (the wire value is the kernel's + 1: 0 is UNSPECIFIED). */
export function priorityToWire(p: Priority): events.Priority {
  return (p + 1) as events.Priority;
}

/** Wire priority → domain; UNSPECIFIED becomes -1, which the domain refuses (PRIORITY_INVALID). */
export function priorityFromWire(p: events.Priority): Priority {
  return (p - 1) as Priority;
}

/** A registration scope as the `oneof scope` of `RegisterRequest`, `Registration` and the op log's `Register`. */
export type WireScope = { $case: "global"; value: boolean } | { $case: "setId"; value: number } | { $case: "mmToken"; value: bigint };

/** Domain registration scope → wire. */
export function scopeToWire(scope: RegistrationScope): WireScope {
  if (scope.kind === "global") return { $case: "global", value: true };
  if (scope.kind === "set") return { $case: "setId", value: scope.setId };
  return { $case: "mmToken", value: scope.token };
}

/** Wire registration scope → domain, or undefined when it is missing (or `global: false`). */
export function scopeFromWire(scope: WireScope | undefined): RegistrationScope | undefined {
  if (scope?.$case === "global") return scope.value ? { kind: "global" } : undefined;
  if (scope?.$case === "setId") return { kind: "set", setId: scope.value };
  if (scope?.$case === "mmToken") return { kind: "mm", token: scope.value };
  return undefined;
}
