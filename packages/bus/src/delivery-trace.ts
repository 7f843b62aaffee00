import { randomBytes } from "node:crypto";
import { context, SpanKind, SpanStatusCode, trace, type Attributes, type Context, type Span } from "@opentelemetry/api";
import { formatTraceparentList, fromTraceparent, parseTraceparentList, toTraceparent, tracer, tracingStarted } from "@ioasid/trace";
import type { MsgHdrs } from "@nats-io/transport-node";
import { bus, type events } from "@ioasid/proto";
import { eventTypeName } from "./history-catalogue.js";
import { Headers } from "./subjects.js";

// Traces of delivery (DESIGN §13): the core's delivery of an event continues the trace of the
// operation that committed it, each subscriber's handling and ack continue the delivery, and the
// core's handling of the ack (a reclaim) continues the ack. A NATS message batches deliveries of
// different operations, so besides `traceparent` (its first delivery's) it carries one context per
// delivery in `Ioasid-Traceparents`; the AckBatch reply does the same for the acks.

/** Call order names of the priorities (DESIGN §4, kernel ioasid_notifier priorities). */
const TIERS: Readonly<Record<number, string>> = { 3: "CPU", 2: "DEVICE", 1: "IOMMU", 0: "LAST" };

/** What the engine knows of one delivery when it sends it. */
export interface TracedDelivery {
  readonly seq: number;
  readonly registrationId: number;
  readonly event: events.IoasidEvent;
  readonly attempt: number;
  /** The context of the operation that committed the event; undefined: the delivery is not traced. */
  readonly trace?: Context | undefined;
  /** The target's priority, when known. */
  readonly priority?: number | undefined;
  /** The span of the attempt in flight. */
  span?: Span | undefined;
  /** The context of the subscriber's ack span, from the reply. */
  ackTrace?: Context | undefined;
}

function eventAttributes(event: events.IoasidEvent): Attributes {
  return {
    "ioasid.event": eventTypeName(event.type),
    "ioasid.seq": Number(event.seq),
    "ioasid.ioasid": event.ioasid,
    "ioasid.generation": event.generation,
    "ioasid.set_id": event.setId,
  };
}

/**
 * Starts a PRODUCER span per traced delivery of a batch (`deliver FREE`, child of the committing
 * operation) and sets the message's trace headers: `traceparent` of the first delivery's span and,
 * for a batch of several, `Ioasid-Traceparents`. A batch with no traced delivery gets an
 * unsampled `traceparent` of its own (the header is part of the delivery contract).
 */
export function startDeliverySpans(
  items: readonly TracedDelivery[],
  channel: { readonly id: { readonly name: string; readonly instance: string }; readonly subject: string },
  headers: MsgHdrs,
): void {
  let traced = false;
  for (const item of items) {
    if (item.trace === undefined) continue;
    traced = true;
    item.span = tracer.startSpan(
      `deliver ${eventTypeName(item.event.type)}`,
      {
        kind: SpanKind.PRODUCER,
        attributes: {
          ...eventAttributes(item.event),
          "ioasid.subscriber": `${channel.id.name}/${channel.id.instance}`,
          "ioasid.registration_id": item.registrationId,
          "ioasid.attempt": item.attempt,
          ...(item.priority === undefined ? {} : { "ioasid.priority": item.priority, "ioasid.tier": TIERS[item.priority] ?? String(item.priority) }),
          "messaging.system": "nats",
          "messaging.destination.name": channel.subject,
          "messaging.batch.message_count": items.length,
        },
      },
      item.trace,
    );
  }
  if (!traced) {
    headers.set(Headers.TRACEPARENT, untracedTraceparent());
    return;
  }
  const contexts = items.map((i) => (i.span === undefined ? undefined : trace.setSpan(i.trace!, i.span)));
  headers.set(Headers.TRACEPARENT, (contexts[0] === undefined ? undefined : toTraceparent(contexts[0])) ?? untracedTraceparent());
  if (items.length > 1) headers.set(Headers.TRACEPARENTS, formatTraceparentList(contexts));
}

/**
 * Reads the subscribers' ack contexts from a reply's headers into the deliveries (by position).
 * The headers are not looked at (nats.js decodes them on first access) unless a delivery is traced.
 */
export function readAckTraces(items: readonly TracedDelivery[], reply: { readonly headers?: MsgHdrs | undefined }): void {
  if (!items.some((i) => i.span !== undefined)) return;
  const headers = reply.headers;
  if (headers === undefined) return;
  const contexts =
    items.length === 1 ? [fromTraceparent(headers.get(Headers.TRACEPARENT))] : parseTraceparentList(headers.get(Headers.TRACEPARENTS), items.length);
  for (let i = 0; i < items.length; i++) if (contexts[i] !== undefined) items[i]!.ackTrace = contexts[i];
}

/**
 * Ends a delivery's span with what became of it; for an ack, returns the context the core's
 * handling of it continues (the subscriber's ack span, else the delivery's).
 */
export function endDeliverySpan(item: TracedDelivery, outcome: "acked" | "missed", detail?: string): Context | undefined {
  const span = item.span;
  if (span === undefined) return undefined;
  item.span = undefined;
  span.setAttribute("ioasid.delivery.outcome", outcome);
  if (outcome === "missed") span.setStatus({ code: SpanStatusCode.ERROR, message: `missed: ${detail ?? "unknown"}` });
  span.end();
  const ack = item.ackTrace;
  item.ackTrace = undefined;
  return ack ?? trace.setSpan(item.trace ?? context.active(), span);
}

// A batch nobody traces still carries a well-formed, unsampled traceparent (the delivery contract
// names the header): a per-process random part and a counter, so no random bytes per message.
const untracedPrefix = randomBytes(8).toString("hex");
let untracedCounter = 0;
function untracedTraceparent(): string {
  const n = (++untracedCounter).toString(16).padStart(16, "0");
  return `00-${untracedPrefix}${n}-${n}-00`;
}

/** The subscriber's side of one batch: a span per delivery's handling and per ack. */
export interface BatchTrace {
  /** Runs `handle` (the delivery's handling) with its `handle <EVENT>` span active. */
  handle(index: number, delivery: bus.Delivery, handle: () => bus.Ack | Promise<bus.Ack>): bus.Ack | Promise<bus.Ack>;
  /** Ends the ack spans and returns the reply's trace headers. */
  reply(acks: readonly bus.Ack[], headers: () => MsgHdrs): MsgHdrs | undefined;
}

/**
 * The trace of a batch a subscriber received (`msg`: the NATS message), or undefined when this
 * process does not trace or the message carries no trace context. Each delivery's handling is a CONSUMER span, child of its
 * delivery span; its ack is a span under the handling, whose context goes back in the reply.
 */
export function receiveBatchTrace(
  msg: { readonly headers?: MsgHdrs | undefined },
  count: number,
  subscriber: { readonly name: string; readonly instance: string },
): BatchTrace | undefined {
  // The headers are decoded on first access: not at all while this process does not trace.
  if (!tracingStarted() || count === 0) return undefined;
  const headers = msg.headers;
  if (headers === undefined) return undefined;
  const first = fromTraceparent(headers.get(Headers.TRACEPARENT));
  if (first === undefined) return undefined;
  const parents = count === 1 ? [first] : parseTraceparentList(headers.get(Headers.TRACEPARENTS), count);
  parents[0] ??= first;
  const ackSpans = new Array<Span | undefined>(count);
  return {
    handle(index, delivery, handle) {
      const parent = parents[index];
      const event = delivery.event;
      if (parent === undefined || event === undefined) return handle();
      const type = eventTypeName(event.type);
      const span = tracer.startSpan(
        `handle ${type}`,
        {
          kind: SpanKind.CONSUMER,
          attributes: {
            ...eventAttributes(event),
            "ioasid.subscriber": `${subscriber.name}/${subscriber.instance}`,
            "ioasid.registration_id": delivery.registrationId,
            "ioasid.attempt": delivery.attempt,
            "messaging.system": "nats",
            "messaging.batch.message_count": count,
          },
        },
        parent,
      );
      const ctx = trace.setSpan(parent, span);
      const settle = (ack: bus.Ack): bus.Ack => {
        if (ack.status !== bus.AckStatus.ACK_STATUS_SETTLED) span.setStatus({ code: SpanStatusCode.ERROR, message: ack.error });
        span.end();
        ackSpans[index] = tracer.startSpan(
          `ack ${type}`,
          {
            kind: SpanKind.PRODUCER,
            attributes: {
              "ioasid.seq": Number(event.seq),
              "ioasid.ack.status": bus.ackStatusToJSON(ack.status),
              "ioasid.ack.releases": ack.releases.map((r) => r.purpose),
              "ioasid.ack.detach_spid": ack.detachSpid,
            },
          },
          ctx,
        );
        return ack;
      };
      const result = context.with(ctx, handle);
      return result instanceof Promise ? result.then(settle) : settle(result);
    },
    reply(_acks, makeHeaders) {
      if (!ackSpans.some((s) => s !== undefined)) return undefined;
      const contexts = ackSpans.map((s) => (s === undefined ? undefined : trace.setSpan(context.active(), s)));
      for (const s of ackSpans) s?.end();
      const h = makeHeaders();
      const firstAck = contexts[0] === undefined ? undefined : toTraceparent(contexts[0]);
      if (firstAck !== undefined) h.set(Headers.TRACEPARENT, firstAck);
      if (count > 1) h.set(Headers.TRACEPARENTS, formatTraceparentList(contexts));
      return h;
    },
  };
}
