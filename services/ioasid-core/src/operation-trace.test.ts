import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { context, ROOT_CONTEXT, trace, type Context } from "@opentelemetry/api";
import type { Chain, DeliveryEngine, SettledAck } from "@ioasid/bus";
import { Priority, TokenType, type SetInfo } from "@ioasid/ioasid";
import { parseSpanRecords, spanContextOf, startTracing, tracer, type SpanRecord, type Tracing } from "@ioasid/trace";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IoasidCore } from "./ioasid-core.js";

// DESIGN §13, the core's part of a trace: an operation a caller asked for is a span under the
// caller's, the deliveries of its events continue it, a reclaim continues the ack whose release
// was the last reference, and deliveries resumed after a restart start a trace of their own.

let dir: string;
let tracing: Tracing | undefined;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "core-trace-"));
  tracing = await startTracing({ service: "core-test", file: join(dir, "spans.jsonl"), exportDelayMs: 10 });
});
afterAll(async () => {
  await tracing?.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

async function exported(): Promise<SpanRecord[]> {
  await tracing!.forceFlush();
  return parseSpanRecords(readFileSync(join(dir, "spans.jsonl"), "utf8"));
}

/** What the core hands its delivery engine (an in-memory stand-in: the engine is tested on its own). */
function engineStandIn(): { engine: DeliveryEngine; submitted: Chain[]; backlogs: unknown[] } {
  const submitted: Chain[] = [];
  const backlogs: unknown[] = [];
  const engine = {
    submit: (chain: Chain) => void submitted.push(chain),
    restoreBacklog: (_s: unknown, items: unknown[]) => void backlogs.push(...items),
    forgetRegistration: () => 0,
  } as unknown as DeliveryEngine;
  return { engine, submitted, backlogs };
}

const KVM = { name: "kvm", instance: "vm-1" };

/** A set with KVM registered for its FREEs, and an IOASID KVM holds a reference on. */
async function guestWithBoundPasid(core: IoasidCore): Promise<{ setId: number; ioasid: number; generation: number }> {
  const set = (await core.commit({ kind: "createSet", token: { type: TokenType.NONE, value: 42n }, quota: 4 })) as SetInfo;
  await core.commit({ kind: "register", options: { subscriber: KVM, priority: Priority.CPU, scope: { kind: "set", setId: set.id } } });
  const a = (await core.commit({ kind: "alloc", setId: set.id })) as { ioasid: number; generation: number };
  await core.commit({ kind: "get", setId: set.id, ioasid: a.ioasid, generation: a.generation, holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } });
  return { setId: set.id, ...a };
}

describe("the core's part of a trace", () => {
  it("a caller's free is an op span under the caller's; its FREE's chain continues it; the reclaim continues the ack that released the last reference", async () => {
    const core = new IoasidCore();
    const { engine, submitted } = engineStandIn();
    await core.recover(undefined, engine);
    const g = await guestWithBoundPasid(core);
    expect(
      submitted.every((c) => c.trace === undefined),
      "operations outside a span are not traced",
    ).toBe(true);

    const caller = tracer.startSpan("CoreService/Free");
    await context.with(trace.setSpan(ROOT_CONTEXT, caller), () => core.commit({ kind: "free", setId: g.setId, ioasid: g.ioasid, generation: g.generation }));
    caller.end();
    const chain = submitted.find(
      (c) => c.event.ioasid === g.ioasid && c.event.generation === g.generation && spanContextOf(c.trace ?? ROOT_CONTEXT) !== undefined,
    )!;
    expect(chain).toBeDefined();

    // KVM's ack, released with it: the last reference, so the IOASID is reclaimed under the ack.
    const ackSpan = tracer.startSpan("ack FREE", {}, chain.trace);
    const ackContext: Context = trace.setSpan(chain.trace!, ackSpan);
    ackSpan.end();
    const ack: SettledAck = {
      seq: Number(chain.event.seq),
      registrationId: chain.targets[0]!.registrationId,
      subscriber: KVM,
      event: chain.event,
      releases: ["vmcs"],
      detachSpid: false,
      late: false,
      trace: ackContext,
    };
    core.onAcks([ack]);
    await core.settled();

    const spans = await exported();
    const op = spans.find((s) => s.name === "op free")!;
    expect(op).toMatchObject({ parentSpanId: caller.spanContext().spanId, traceId: caller.spanContext().traceId });
    expect(op.attributes).toMatchObject({ "ioasid.op": "free", "ioasid.ioasid": g.ioasid, "ioasid.generation": g.generation });
    expect(spanContextOf(chain.trace!)?.spanId).toBe(op.spanId);
    const reclaim = spans.find((s) => s.name === "reclaim" && s.attributes["ioasid.ioasid"] === g.ioasid)!;
    expect(reclaim).toMatchObject({ traceId: op.traceId, parentSpanId: ackSpan.spanContext().spanId });
    expect(core.space.listIoasids(g.setId)).toEqual([]);
  });

  it("deliveries a restarted core resumes start a new trace, rooted at 'recover deliveries'", async () => {
    const core = new IoasidCore();
    await core.recover(undefined, undefined);
    const g = await guestWithBoundPasid(core);
    const caller = tracer.startSpan("CoreService/Free");
    await context.with(trace.setSpan(ROOT_CONTEXT, caller), () => core.commit({ kind: "free", setId: g.setId, ioasid: g.ioasid, generation: g.generation }));
    caller.end();
    // The deliveries are pending (no engine took them); a core that resumes them has no context for them.
    const { engine, submitted } = engineStandIn();
    await core.recover(undefined, engine);
    const free = submitted.find((c) => c.event.ioasid === g.ioasid && c.event.generation === g.generation)!;
    const recovery = (await exported()).find((s) => s.name === "recover deliveries")!;
    expect(recovery.parentSpanId).toBeUndefined();
    expect(recovery.traceId).not.toBe(caller.spanContext().traceId);
    expect(spanContextOf(free.trace!)?.spanId).toBe(recovery.spanId);
  });
});
