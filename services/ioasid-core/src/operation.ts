import type { IoasidSpace } from "@ioasid/ioasid";
import {
  EventType,
  type Allocation,
  type CustomAllocator,
  type Holder,
  type IoasidEvent,
  type RegisterOptions,
  type SetToken,
  type Subscriber,
} from "@ioasid/ioasid";

/**
 * One state-changing operation of the core, as the model applies it and the operation log records
 * it (`proto/ioasid/oplog/v1/oplog.proto`, converted by `op-codec.ts`). The core state is the result
 * of applying the log in order to an empty model: the model is deterministic, so replay yields the
 * same IOASIDs, generations and event sequence numbers. Only operations the model accepted are
 * recorded. Fields carry what the call carried: `generation` 0 is "unchecked", an absent
 * `min`/`max` the default bound.
 */
export type Operation =
  | { readonly kind: "createSet"; readonly token: SetToken; readonly quota: number }
  | { readonly kind: "adjustSet"; readonly setId: number; readonly quota: number }
  | { readonly kind: "destroySet" | "freeSet"; readonly setId: number }
  | {
      readonly kind: "alloc";
      readonly setId: number;
      readonly min?: number;
      readonly max?: number;
      readonly privateData?: Uint8Array;
      /** The IOASID the custom allocator in force answered (absent: the default allocator, or none). */
      readonly allocatorIoasid?: number;
    }
  | { readonly kind: "batchAlloc"; readonly setId: number; readonly count: number; readonly min?: number; readonly max?: number }
  | { readonly kind: "free"; readonly setId: number; readonly ioasid: number; readonly generation: number }
  | { readonly kind: "get"; readonly setId: number; readonly ioasid: number; readonly holder: Holder; readonly generation: number }
  | {
      readonly kind: "put";
      readonly setId: number;
      readonly ioasid: number;
      readonly holder: Holder;
      readonly generation: number;
      /** An operator's force-release of another holder's reference: who and why (its audit record). */
      readonly audit?: OperatorAudit;
    }
  | { readonly kind: "findBySpid"; readonly setId: number; readonly spid: number; readonly holder: Holder }
  | { readonly kind: "attachSpid"; readonly setId: number; readonly ioasid: number; readonly spid: number; readonly generation: number }
  | { readonly kind: "detachSpid" | "detachData"; readonly setId: number; readonly ioasid: number; readonly generation: number }
  | { readonly kind: "attachData"; readonly setId: number; readonly ioasid: number; readonly data: Uint8Array; readonly generation: number }
  | { readonly kind: "register"; readonly options: RegisterOptions }
  | { readonly kind: "unregister"; readonly registrationId: number }
  | { readonly kind: "registerAllocator"; readonly name: string; readonly address: string; readonly audit?: OperatorAudit }
  | { readonly kind: "unregisterAllocator"; readonly name: string; readonly audit?: OperatorAudit }
  /** Acknowledgements by one subscriber, with the references they release. */
  | { readonly kind: "acks"; readonly subscriber: Subscriber; readonly acks: readonly DeliveryAck[] }
  /** Deliveries recorded as missed. */
  | { readonly kind: "misses"; readonly misses: readonly DeliveryRef[] };

/**
 * Who did an audited operator action and why (DESIGN §3, issue 14): recorded in the operation itself,
 * so the audit record is exactly as durable as the action — it is published with the operation's
 * history once the operation is durable, and again by a replay whose history lacks it.
 */
export interface OperatorAudit {
  /** The caller as the core authenticated it: "operator/<instance>". */
  readonly operator: string;
  /** The reason the operator gave ("" if none). */
  readonly reason: string;
  /** Whom the operator's client said it acts for: a label, not authenticated ("" if none). */
  readonly onBehalfOf: string;
}

/** The kinds of {@link Operation}. */
export type OperationKind = Operation["kind"];

/** An operation with the time the core applied it, as the log holds it. */
export type CommittedOperation = Operation & {
  /** Commit time, ms since the epoch (integral: the log keeps milliseconds). */
  readonly commitTimeMs: number;
};

/** One delivery: an event (by sequence number) for one registration. */
export interface DeliveryRef {
  readonly seq: number;
  readonly registrationId: number;
}

/** One delivery acknowledged as settled, and what it releases. */
export interface DeliveryAck extends DeliveryRef {
  /** What the acknowledgement changes (absent: nothing). */
  readonly release?: AckRelease;
}

/**
 * What an acknowledgement releases, on the event's IOASID at the event's generation. The holder of
 * each released reference is the subscriber itself (role = name, instance = instance).
 */
export interface AckRelease {
  readonly setId: number;
  readonly ioasid: number;
  readonly generation: number;
  /** Detach the IOASID's SPID with the acknowledgement. */
  readonly detachSpid: boolean;
  /** Purposes of the references dropped. */
  readonly purposes: readonly string[];
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
 * Applies one operation to the model, exactly as it was applied live, and returns the model's
 * result. Throws the model's DomainError when the model refuses (never for a recorded operation
 * replayed onto the state it was recorded against).
 */
export function applyOperation(ctx: ApplyContext, op: Operation): unknown {
  const space = ctx.space;
  switch (op.kind) {
    case "createSet":
      return space.createSet({ token: op.token, quota: op.quota });
    case "adjustSet":
      return space.adjustSet(op.setId, op.quota);
    case "destroySet":
      return space.destroySet(op.setId);
    case "freeSet":
      return space.freeSet(op.setId);
    case "alloc": {
      if (ctx.allocator !== undefined) ctx.allocator.stashed = op.allocatorIoasid;
      try {
        return space.alloc(op.setId, {
          ...bounds(op),
          // A copy: the model keeps it, and the caller's bytes may be a view of a request buffer.
          ...(op.privateData === undefined ? {} : { privateData: Buffer.from(op.privateData) }),
        });
      } finally {
        if (ctx.allocator !== undefined) ctx.allocator.stashed = undefined;
      }
    }
    case "batchAlloc":
      return space.allocMany(op.setId, op.count, bounds(op));
    case "free":
      return space.free(op.setId, op.ioasid, op.generation);
    case "get": {
      const r = space.get(op.setId, op.ioasid, op.holder, op.generation);
      ctx.onRef?.({
        kind: "get",
        setId: op.setId,
        ioasid: op.ioasid,
        generation: generationOf(space, op.ioasid, op.generation),
        holder: op.holder,
        refcount: r.refcount,
      });
      return r;
    }
    case "put": {
      const generation = generationOf(space, op.ioasid, op.generation);
      const r = space.put(op.setId, op.ioasid, op.holder, op.generation);
      ctx.onRef?.({ kind: "put", setId: op.setId, ioasid: op.ioasid, generation, holder: op.holder, refcount: r.refcount });
      return r;
    }
    case "findBySpid": {
      const r = space.findBySpid(op.setId, op.spid, op.holder);
      ctx.onRef?.({ kind: "get", setId: op.setId, ioasid: r.ioasid, generation: r.generation, holder: op.holder, refcount: r.refcount });
      return r;
    }
    case "attachSpid":
      return space.attachSpid(op.setId, op.ioasid, op.spid, op.generation);
    case "detachSpid":
      return space.detachSpid(op.setId, op.ioasid, op.generation);
    case "attachData":
      return space.attachData(op.setId, op.ioasid, Buffer.from(op.data), op.generation);
    case "detachData":
      return space.detachData(op.setId, op.ioasid, op.generation);
    case "register":
      return space.register(op.options);
    case "unregister":
      return space.unregister(op.registrationId);
    case "registerAllocator": {
      const bridge = ctx.makeAllocator(op.name, op.address);
      space.registerAllocator(bridge);
      ctx.allocator = bridge;
      return undefined;
    }
    case "unregisterAllocator":
      space.unregisterAllocator(op.name);
      ctx.allocator = undefined;
      return undefined;
    case "acks":
      // References released with acknowledgements (DESIGN §4.3): the holder is the subscriber
      // itself, on the event's IOASID at the event's generation, so a late ack can never drop a
      // reference of a later owner of the same ID.
      for (const ack of op.acks) {
        const release = ack.release;
        if (release === undefined) continue;
        const { setId, ioasid, generation } = release;
        if (release.detachSpid) {
          try {
            space.detachSpid(setId, ioasid, generation);
          } catch {
            // Already detached, or reclaimed: nothing to do.
          }
        }
        for (const purpose of release.purposes) {
          const holder = { role: op.subscriber.name, instance: op.subscriber.instance, purpose };
          try {
            const r = space.put(setId, ioasid, holder, generation);
            ctx.onRef?.({ kind: "put", setId, ioasid, generation, holder, refcount: r.refcount, seq: ack.seq });
          } catch (err) {
            ctx.onReleaseRefused?.(ioasid, holder, (err as { reason?: string }).reason ?? String(err));
          }
        }
      }
      return undefined;
    case "misses":
      return undefined;
  }
}

function bounds(op: { readonly min?: number; readonly max?: number }): { min?: number; max?: number } {
  return { ...(op.min === undefined ? {} : { min: op.min }), ...(op.max === undefined ? {} : { max: op.max }) };
}

function generationOf(space: IoasidSpace, ioasid: number, given: number): number {
  return given !== 0 ? given : (space.describe(ioasid)?.generation ?? 0);
}

/** Key of an event's delivery chain: events of one IOASID (or one set, for set events) in order. */
export function chainKey(e: Pick<IoasidEvent, "type" | "ioasid" | "setId">): string {
  return e.type === EventType.SET_ALLOC || e.type === EventType.SET_FREE ? `s${e.setId}` : `i${e.ioasid}`;
}

export type { Allocation };
