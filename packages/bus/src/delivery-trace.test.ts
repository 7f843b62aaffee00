import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { context, ROOT_CONTEXT, trace, type Span } from "@opentelemetry/api";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { bus, events } from "@ioasid/proto";
import { parseSpanRecords, spanContextOf, startTracing, toTraceparent, tracer, type SpanRecord, type Tracing } from "@ioasid/trace";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { endDeliverySpan, readAckTraces, receiveBatchTrace, startDeliverySpans, type TracedDelivery } from "./delivery-trace.js";
import { Headers } from "./subjects.js";

// DESIGN §13: a delivery continues the trace of the operation that committed its event, even in a
// batch that mixes operations; the subscriber's handling and ack continue the delivery; the ack's
// context comes back to the core in the reply.

let dir: string;
let tracing: Tracing | undefined;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "delivery-trace-"));
  tracing = await startTracing({ service: "bus-test", file: join(dir, "spans.jsonl"), exportDelayMs: 10 });
});
afterAll(async () => {
  await tracing?.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

async function exported(): Promise<SpanRecord[]> {
  await tracing!.forceFlush();
  return parseSpanRecords(readFileSync(join(dir, "spans.jsonl"), "utf8"));
}

const free = (seq: number, ioasid: number): events.IoasidEvent =>
  events.IoasidEvent.fromPartial({ seq: BigInt(seq), type: events.EventType.EVENT_TYPE_FREE, ioasid, generation: 1, setId: 2 });
const settled = (d: bus.Delivery, purpose: string): bus.Ack =>
  bus.Ack.fromPartial({ seq: d.event!.seq, registrationId: d.registrationId, status: bus.AckStatus.ACK_STATUS_SETTLED, releases: [{ purpose }] });
const opContext = (name: string): { span: Span; ctx: ReturnType<typeof trace.setSpan> } => {
  const span = tracer.startSpan(name);
  return { span, ctx: trace.setSpan(ROOT_CONTEXT, span) };
};
const target = { name: "kvm", instance: "vm-1" };
const channel = { id: target, subject: "ioasid.v1.deliver.kvm.vm-1" };

describe("delivery traces", () => {
  it("a batch of deliveries from different operations carries each one's own trace to its handling and ack, and each ack's back", async () => {
    const opA = opContext("op A");
    const opB = opContext("op B");
    const items: TracedDelivery[] = [
      { seq: 11, registrationId: 7, event: free(11, 3), attempt: 1, trace: opA.ctx, priority: 3 },
      { seq: 12, registrationId: 7, event: free(12, 4), attempt: 1 }, // committed by an untraced operation
      { seq: 13, registrationId: 7, event: free(13, 5), attempt: 1, trace: opB.ctx, priority: 3 },
    ];
    const h = natsHeaders();
    startDeliverySpans(items, channel, h);
    const [d0, d1, d2] = items.map((i) => i.span);
    expect(d1).toBeUndefined();
    expect(h.get(Headers.TRACEPARENT)).toBe(toTraceparent(trace.setSpan(ROOT_CONTEXT, d0!)));
    const list = h.get(Headers.TRACEPARENTS).split(",");
    expect(list).toEqual([toTraceparent(trace.setSpan(ROOT_CONTEXT, d0!)), "-", toTraceparent(trace.setSpan(ROOT_CONTEXT, d2!))]);

    // The subscriber's side: each handler runs with its handling span active.
    const deliveries = items.map((i) => bus.Delivery.fromPartial({ registrationId: i.registrationId, event: i.event, attempt: i.attempt }));
    const received = receiveBatchTrace({ headers: h }, deliveries.length, target)!;
    expect(received).toBeDefined();
    const activeInHandler: Array<string | undefined> = [];
    const acks = await Promise.all(
      deliveries.map((d, i) =>
        received.handle(i, d, async () => {
          await new Promise((r) => setTimeout(r, 1));
          activeInHandler.push(spanContextOf(context.active())?.traceId);
          return settled(d, "vmcs");
        }),
      ),
    );
    const reply = received.reply(acks, natsHeaders)!;
    readAckTraces(items, { headers: reply });
    const back = items.map((i) => endDeliverySpan(i, "acked"));
    opA.span.end();
    opB.span.end();

    const spans = await exported();
    const traceA = opA.span.spanContext().traceId;
    const traceB = opB.span.spanContext().traceId;
    expect(activeInHandler.sort()).toEqual([traceA, traceB, undefined].sort());
    const deliver = spans.filter((s) => s.name === "deliver FREE");
    const handle = spans.filter((s) => s.name === "handle FREE");
    const ack = spans.filter((s) => s.name === "ack FREE");
    expect(deliver.map((s) => s.attributes["ioasid.seq"]).sort()).toEqual([11, 13]);
    expect(handle).toHaveLength(2);
    expect(ack).toHaveLength(2);
    for (const [op, seq] of [
      [opA, 11],
      [opB, 13],
    ] as const) {
      const dl = deliver.find((s) => s.attributes["ioasid.seq"] === seq)!;
      expect(dl).toMatchObject({ traceId: op.span.spanContext().traceId, parentSpanId: op.span.spanContext().spanId, kind: "PRODUCER" });
      expect(dl.attributes).toMatchObject({ "ioasid.tier": "CPU", "ioasid.subscriber": "kvm/vm-1", "ioasid.delivery.outcome": "acked" });
      const hd = handle.find((s) => s.attributes["ioasid.seq"] === seq)!;
      expect(hd).toMatchObject({ traceId: dl.traceId, parentSpanId: dl.spanId, kind: "CONSUMER" });
      const ak = ack.find((s) => s.attributes["ioasid.seq"] === seq)!;
      expect(ak).toMatchObject({ traceId: dl.traceId, parentSpanId: hd.spanId });
      expect(ak.attributes["ioasid.ack.releases"]).toEqual(["vmcs"]);
    }
    // What the core's handling of each ack continues: that ack's span.
    expect(spanContextOf(back[0]!)?.spanId).toBe(ack.find((s) => s.attributes["ioasid.seq"] === 11)!.spanId);
    expect(back[1]).toBeUndefined();
    expect(spanContextOf(back[2]!)?.spanId).toBe(ack.find((s) => s.attributes["ioasid.seq"] === 13)!.spanId);
  });

  it("a batch nobody traces still carries an unsampled traceparent, and the subscriber records nothing for it", () => {
    const items: TracedDelivery[] = [
      { seq: 21, registrationId: 1, event: free(21, 8), attempt: 1 },
      { seq: 22, registrationId: 1, event: free(22, 9), attempt: 1 },
    ];
    const h = natsHeaders();
    startDeliverySpans(items, channel, h);
    expect(h.get(Headers.TRACEPARENT)).toMatch(/^00-[0-9a-f]{32}-[0-9a-f]{16}-00$/);
    expect(h.has(Headers.TRACEPARENTS)).toBe(false);
    const received = receiveBatchTrace({ headers: h }, 2, target)!;
    const d = bus.Delivery.fromPartial({ registrationId: 1, event: items[0]!.event, attempt: 1 });
    let recording: boolean | undefined;
    void received.handle(0, d, () => {
      recording = trace.getSpan(context.active())?.isRecording();
      return settled(d, "x");
    });
    expect(recording).toBe(false);
  });

  it("a missed delivery's span ends with an error status and the reason", async () => {
    const op = opContext("op C");
    const item: TracedDelivery = { seq: 31, registrationId: 2, event: free(31, 10), attempt: 1, trace: op.ctx, priority: 2 };
    startDeliverySpans([item], { id: { name: "vdcm", instance: "vdcm0" }, subject: "s" }, natsHeaders());
    endDeliverySpan(item, "missed", "deadline exceeded");
    op.span.end();
    const dl = (await exported()).find((s) => s.name === "deliver FREE" && s.attributes["ioasid.seq"] === 31)!;
    expect(dl.status).toEqual({ code: "ERROR", message: "missed: deadline exceeded" });
    expect(dl.attributes).toMatchObject({ "ioasid.delivery.outcome": "missed", "ioasid.tier": "DEVICE" });
  });
});
