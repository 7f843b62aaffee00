import type {
  IoasidSpace} from "@ioasid/ioasid";
import {
  EventType,
  type Allocation,
  type CustomAllocator,
  type Holder,
  type IoasidEvent,
  type RegisterOptions,
  type SetToken,
  type TokenType,
} from "@ioasid/ioasid";

/**
 * One state-changing operation of the core, as recorded in the operation log (JetStream). The core
 * state is the result of applying the log in order to an empty model: the model is deterministic,
 * so replay yields the same IOASIDs, generations and event sequence numbers. Only operations the
 * model accepted are recorded; each carries its commit time `ts` (ms).
 */
export type OpRecord = { readonly ts: number } & (
  | { readonly t: "createSet"; readonly tt: TokenType; readonly tok: string; readonly q: number }
  | { readonly t: "adjustSet"; readonly s: number; readonly q: number }
  | { readonly t: "destroySet"; readonly s: number }
  | { readonly t: "freeSet"; readonly s: number }
  | { readonly t: "alloc"; readonly s: number; readonly min?: number; readonly max?: number; readonly pd?: string; readonly x?: number }
  | { readonly t: "batch"; readonly s: number; readonly n: number; readonly min?: number; readonly max?: number }
  | { readonly t: "free"; readonly s: number; readonly i: number; readonly g: number }
  | { readonly t: "get" | "put"; readonly s: number; readonly i: number; readonly h: Holder; readonly g: number }
  | { readonly t: "findBySpid"; readonly s: number; readonly sp: number; readonly h: Holder }
  | { readonly t: "attachSpid"; readonly s: number; readonly i: number; readonly sp: number; readonly g: number }
  | { readonly t: "detachSpid" | "detachData"; readonly s: number; readonly i: number; readonly g: number }
  | { readonly t: "attachData"; readonly s: number; readonly i: number; readonly d: string; readonly g: number }
  | { readonly t: "register"; readonly o: SerializedRegisterOptions }
  | { readonly t: "unregister"; readonly r: number }
  | { readonly t: "regAlloc"; readonly n: string; readonly a: string }
  | { readonly t: "unregAlloc"; readonly n: string }
  /** Acknowledgements by one subscriber (name `n`, instance `in`), with the references they release. */
  | { readonly t: "acks"; readonly n: string; readonly in: string; readonly a: readonly AckEntry[] }
  /** Missed deliveries: [seq, registration]. */
  | { readonly t: "miss"; readonly a: ReadonlyArray<readonly [number, number]> }
);

/**
 * One acknowledgement: [event seq, registration] when it changes nothing, else [event seq,
 * registration, set, IOASID, generation, flags, ...released purposes] (flags: 1 = detach the
 * SPID). The holder of each released reference is the subscriber itself (role = name, instance =
 * instance).
 */
export type AckEntry = readonly [number, number] | readonly [number, number, number, number, number, number, ...string[]];

/** AckEntry flag: detach the IOASID's SPID with the acknowledgement. */
export const ACK_DETACH_SPID = 1;

/** RegisterOptions with the MM token as a string (JSON has no bigint). */
export interface SerializedRegisterOptions {
  readonly subscriber: { readonly name: string; readonly instance: string };
  readonly priority: number;
  readonly scope: { readonly kind: "global" } | { readonly kind: "set"; readonly setId: number } | { readonly kind: "mm"; readonly token: string };
  readonly events: readonly string[];
}

/** RegisterOptions → record form. */
export function serializeRegisterOptions(o: RegisterOptions): SerializedRegisterOptions {
  return {
    subscriber: { name: o.subscriber?.name, instance: o.subscriber?.instance },
    priority: o.priority,
    scope: o.scope?.kind === "mm" ? { kind: "mm", token: String(o.scope.token) } : o.scope,
    events: [...(o.events ?? [])],
  };
}

function deserializeRegisterOptions(o: SerializedRegisterOptions): RegisterOptions {
  return {
    subscriber: o.subscriber,
    priority: o.priority as RegisterOptions["priority"],
    scope: o.scope.kind === "mm" ? { kind: "mm", token: BigInt(o.scope.token) } : o.scope,
    events: o.events as EventType[],
  };
}

/** The token of a createSet record. */
export function recordToken(op: { tt: TokenType; tok: string }): SetToken {
  return { type: op.tt, value: BigInt(op.tok) };
}

/**
 * The bridge between the synchronous model and an asynchronous external allocator: it hands out
 * the answer recorded in the operation (fetched just before, live; read from the log, on replay).
 */
export class StashedAllocator implements CustomAllocator {
  stashed: number | undefined;
  constructor(
    readonly name: string,
    private readonly onFree: (ioasid: number) => void,
  ) {}
  alloc(): number | undefined {
    const id = this.stashed;
    this.stashed = undefined;
    return id;
  }
  free(ioasid: number): void {
    this.onFree(ioasid);
  }
}

/** What applying an operation needs besides the model. */
export interface ApplyContext {
  readonly space: IoasidSpace;
  /** The external allocator bridge in force, if any. */
  allocator: StashedAllocator | undefined;
  /** Makes the bridge for a registered external allocator (named, at an address). */
  readonly makeAllocator: (name: string, address: string) => StashedAllocator;
  /** Releases (puts) by acknowledgements that failed in the model, for the log. */
  readonly onReleaseRefused?: (ioasid: number, holder: Holder, reason: string) => void;
  /** Every reference taken or dropped (history: the timeline's Ref column). */
  readonly onRef?: (change: RefChange) => void;
}

/** A reference taken ("get") or dropped ("put"), with the count right after it. */
export interface RefChange {
  readonly kind: "get" | "put";
  readonly setId: number;
  readonly ioasid: number;
  readonly generation: number;
  readonly holder: Holder;
  readonly refcount: number;
  /** The event whose acknowledgement released it, for releases. */
  readonly seq?: number;
}

/**
 * Applies one recorded operation to the model, exactly as it was applied live, and returns the
 * model's result. Throws the model's DomainError when the model refuses (never for a recorded op
 * replayed onto the state it was recorded against).
 */
export function applyOp(ctx: ApplyContext, op: OpRecord): unknown {
  const space = ctx.space;
  switch (op.t) {
    case "createSet":
      return space.createSet({ token: recordToken(op), quota: op.q });
    case "adjustSet":
      return space.adjustSet(op.s, op.q);
    case "destroySet":
      return space.destroySet(op.s);
    case "freeSet":
      return space.freeSet(op.s);
    case "alloc": {
      if (ctx.allocator !== undefined) ctx.allocator.stashed = op.x;
      try {
        return space.alloc(op.s, {
          ...(op.min === undefined ? {} : { min: op.min }),
          ...(op.max === undefined ? {} : { max: op.max }),
          ...(op.pd === undefined ? {} : { privateData: Buffer.from(op.pd, "base64") }),
        });
      } finally {
        if (ctx.allocator !== undefined) ctx.allocator.stashed = undefined;
      }
    }
    case "batch":
      return space.allocMany(op.s, op.n, {
        ...(op.min === undefined ? {} : { min: op.min }),
        ...(op.max === undefined ? {} : { max: op.max }),
      });
    case "free":
      return space.free(op.s, op.i, op.g);
    case "get": {
      const r = space.get(op.s, op.i, op.h, op.g);
      ctx.onRef?.({ kind: "get", setId: op.s, ioasid: op.i, generation: generationOf(space, op.i, op.g), holder: op.h, refcount: r.refcount });
      return r;
    }
    case "put": {
      const generation = generationOf(space, op.i, op.g);
      const r = space.put(op.s, op.i, op.h, op.g);
      ctx.onRef?.({ kind: "put", setId: op.s, ioasid: op.i, generation, holder: op.h, refcount: r.refcount });
      return r;
    }
    case "findBySpid": {
      const r = space.findBySpid(op.s, op.sp, op.h);
      ctx.onRef?.({ kind: "get", setId: op.s, ioasid: r.ioasid, generation: r.generation, holder: op.h, refcount: r.refcount });
      return r;
    }
    case "attachSpid":
      return space.attachSpid(op.s, op.i, op.sp, op.g);
    case "detachSpid":
      return space.detachSpid(op.s, op.i, op.g);
    case "attachData":
      return space.attachData(op.s, op.i, Buffer.from(op.d, "base64"), op.g);
    case "detachData":
      return space.detachData(op.s, op.i, op.g);
    case "register":
      return space.register(deserializeRegisterOptions(op.o));
    case "unregister":
      return space.unregister(op.r);
    case "regAlloc": {
      const bridge = ctx.makeAllocator(op.n, op.a);
      space.registerAllocator(bridge);
      ctx.allocator = bridge;
      return undefined;
    }
    case "unregAlloc":
      space.unregisterAllocator(op.n);
      ctx.allocator = undefined;
      return undefined;
    case "acks":
      // References released with acknowledgements (DESIGN §4.3): the holder is the subscriber
      // itself, on the event's IOASID at the event's generation, so a late ack can never drop a
      // reference of a later owner of the same ID.
      for (const entry of op.a) {
        if (entry.length <= 2) continue;
        const [, , setId, ioasid, generation, flags, ...purposes] = entry as readonly [number, number, number, number, number, number, ...string[]];
        if ((flags & ACK_DETACH_SPID) !== 0) {
          try {
            space.detachSpid(setId, ioasid, generation);
          } catch {
            // Already detached, or reclaimed: nothing to do.
          }
        }
        for (const purpose of purposes) {
          const holder = { role: op.n, instance: op.in, purpose };
          try {
            const r = space.put(setId, ioasid, holder, generation);
            ctx.onRef?.({ kind: "put", setId, ioasid, generation, holder, refcount: r.refcount, seq: entry[0] });
          } catch (err) {
            ctx.onReleaseRefused?.(ioasid, holder, (err as { reason?: string }).reason ?? String(err));
          }
        }
      }
      return undefined;
    case "miss":
      return undefined;
  }
}

function generationOf(space: IoasidSpace, ioasid: number, given: number): number {
  return given !== 0 ? given : (space.describe(ioasid)?.generation ?? 0);
}

/** Key of an event's delivery chain: events of one IOASID (or one set, for set events) in order. */
export function chainKey(e: Pick<IoasidEvent, "type" | "ioasid" | "setId">): string {
  return e.type === EventType.SET_ALLOC || e.type === EventType.SET_FREE ? `s${e.setId}` : `i${e.ioasid}`;
}

export type { Allocation };
