import { ROOT_CONTEXT, SpanStatusCode, context, trace, type Attributes, type Context, type Span } from "@opentelemetry/api";
import type { IoasidEvent } from "@ioasid/ioasid";
import type { SettledAck } from "@ioasid/bus";
import { hasSpan, tracer, tracingStarted } from "@ioasid/trace";
import type { Operation } from "./operation.js";

/**
 * The core's part of a trace (DESIGN §13): an `op <kind>` span for each operation a caller asked
 * for (a child of its gRPC call, ended once the operation is durable), the context each committed
 * event's deliveries continue, and a `reclaim` span where an IOASID goes back to the pool — under
 * the operation that reclaimed it, or under the subscriber's ack whose release was the last
 * reference. The engine's own bookkeeping (acks, misses) gets no span of its own.
 *
 * The context lives with the chain in memory only: deliveries a restarted core resumes from its
 * operation log start a new trace, rooted at a `recover deliveries` span ({@link recovery}).
 * With tracing not started every method returns at once.
 */
export class OperationTrace {
  /** The context events of the operation being applied continue. */
  #parent: Context | undefined;
  #op: Span | undefined;
  /** Spans of the operation being applied; they end when it is durable. */
  #spans: Span[] = [];
  /** While the acks of one reply are applied: the ack's context by `ioasid:generation`. */
  #acks: Map<string, Context> | undefined;

  /** Before an operation is applied: a caller's operation gets its span under the active context. */
  begin(op: Operation): void {
    if (!tracingStarted() || op.kind === "acks" || op.kind === "misses") return;
    const active = context.active();
    if (!hasSpan(active)) return;
    const span = tracer.startSpan(`op ${op.kind}`, { attributes: operationAttributes(op) }, active);
    this.#op = span;
    this.#spans.push(span);
    this.#parent = trace.setSpan(active, span);
  }

  /**
   * The trace context the deliveries of a committed event continue (undefined: not traced); a
   * RECLAIM starts the `reclaim` span and its deliveries continue that.
   */
  eventTrace(e: IoasidEvent): Context | undefined {
    const parent = (this.#acks === undefined ? undefined : this.#acks.get(`${e.ioasid}:${e.generation}`)) ?? this.#parent;
    if (parent === undefined) return undefined;
    this.#op?.addEvent(e.type, { "ioasid.seq": e.seq, "ioasid.ioasid": e.ioasid, "ioasid.refcount": e.refcount });
    if (e.type !== "RECLAIM") return parent;
    const span = tracer.startSpan(
      "reclaim",
      { attributes: { "ioasid.ioasid": e.ioasid, "ioasid.generation": e.generation, "ioasid.set_id": e.setId, "ioasid.seq": e.seq } },
      parent,
    );
    this.#spans.push(span);
    return trace.setSpan(parent, span);
  }

  /**
   * After the operation was applied: its spans end when `durable` settles (an error status if it
   * does not), or at once with the model's refusal.
   */
  end(durable: Promise<unknown> | undefined, refused?: unknown): void {
    const spans = this.#spans;
    const op = this.#op;
    this.#parent = undefined;
    this.#op = undefined;
    if (spans.length === 0) return;
    this.#spans = [];
    const fail = (err: unknown, what: string): void => {
      for (const s of spans) {
        s.setStatus({ code: SpanStatusCode.ERROR, message: `${what}: ${err instanceof Error ? err.message : String(err)}` });
        s.end();
      }
    };
    if (durable === undefined) {
      // A refusal is the caller's answer (DESIGN §8), not the core's error: recorded, status unset.
      op?.setAttribute("ioasid.refused", refused instanceof Error ? refused.message : String(refused));
      for (const s of spans) s.end();
      return;
    }
    durable.then(
      () => {
        for (const s of spans) s.end();
      },
      (err: unknown) => fail(err, "operation log append failed"),
    );
  }

  /** Runs `apply` (the acks of one reply) with each traced ack's context at hand for its reclaim. */
  withAcks<T>(acks: readonly SettledAck[], apply: () => T): T {
    if (!tracingStarted()) return apply();
    let traced: Map<string, Context> | undefined;
    for (const a of acks) {
      if (a.trace === undefined) continue;
      (traced ??= new Map()).set(`${a.event.ioasid}:${a.event.generation}`, a.trace);
    }
    if (traced === undefined) return apply();
    this.#acks = traced;
    try {
      return apply();
    } finally {
      this.#acks = undefined;
    }
  }

  /**
   * The root of the trace that deliveries resumed after a core restart continue (their causing
   * operations' contexts were in the old process's memory), or undefined when not tracing.
   * The span ends at once; `count` deliveries resumed.
   */
  recovery(count: number): Context | undefined {
    if (!tracingStarted() || count === 0) return undefined;
    const span = tracer.startSpan("recover deliveries", { root: true, attributes: { "ioasid.deliveries": count } });
    span.end();
    return trace.setSpan(ROOT_CONTEXT, span);
  }
}

function operationAttributes(op: Operation): Attributes {
  const a: Attributes = { "ioasid.op": op.kind };
  const o = op as Partial<Record<"setId" | "ioasid" | "generation" | "spid" | "count", number>>;
  if (o.setId !== undefined) a["ioasid.set_id"] = o.setId;
  if (o.ioasid !== undefined) a["ioasid.ioasid"] = o.ioasid;
  if (o.generation !== undefined) a["ioasid.generation"] = o.generation;
  if (o.spid !== undefined) a["ioasid.spid"] = o.spid;
  if (o.count !== undefined) a["ioasid.count"] = o.count;
  return a;
}
