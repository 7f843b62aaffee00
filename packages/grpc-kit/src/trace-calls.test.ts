import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { context, ROOT_CONTEXT, trace } from "@opentelemetry/api";
import { Code } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { parseSpanRecords, startTracing, tracer, type SpanRecord, type Tracing } from "@ioasid/trace";
import { afterEach, describe, expect, it } from "vitest";
import { createClient, type PromiseClient } from "./create-client.js";
import { createLogger } from "./create-logger.js";
import { createEchoHandlers } from "./echo-server.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";

// DESIGN §13: W3C trace context on gRPC metadata, a span per call on both sides with the method and
// the status code, and the trace in the log lines written while serving a call.

describe("traces of gRPC calls", () => {
  let server: GrpcServer | undefined;
  let client: PromiseClient<typeof testing.EchoServiceService> | undefined;
  let tracing: Tracing | undefined;
  let dir: string | undefined;
  const lines: Array<Record<string, unknown>> = [];
  const seen: { traceparent?: string[]; activeTrace?: string | undefined } = {};

  afterEach(async () => {
    client?.close();
    await server?.shutdown(100);
    await tracing?.shutdown();
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
    server = client = tracing = dir = undefined;
    lines.length = 0;
  });

  async function start(traced: boolean): Promise<void> {
    if (traced) {
      dir = mkdtempSync(join(tmpdir(), "grpc-trace-"));
      tracing = await startTracing({ service: "grpc-test", file: join(dir, "spans.jsonl"), exportDelayMs: 10 });
    }
    const destination = new Writable({
      write(chunk: Buffer, _enc, done) {
        for (const l of chunk.toString().split("\n")) if (l !== "") lines.push(JSON.parse(l) as Record<string, unknown>);
        done();
      },
    });
    const logger = createLogger("grpc-test", { level: "info", destination });
    server = createGrpcServer({ service: "grpc-test", logger, reflection: false }).addService(testing.EchoServiceService, {
      ...createEchoHandlers(),
      echo: async (request, ctx) => {
        seen.traceparent = ctx.metadata.get("traceparent").map(String);
        await new Promise((r) => setTimeout(r, 1));
        seen.activeTrace = trace.getSpanContext(context.active())?.traceId;
        logger.info("serving echo");
        return { payload: request.payload };
      },
    });
    client = createClient(testing.EchoServiceClient, `127.0.0.1:${await server.listen()}`);
  }

  async function spans(): Promise<SpanRecord[]> {
    await tracing!.forceFlush();
    return parseSpanRecords(readFileSync(join(dir!, "spans.jsonl"), "utf8"));
  }

  it("carries the caller's context: CLIENT span under it, SERVER span under that, handler and log lines inside", async () => {
    await start(true);
    const parent = tracer.startSpan("caller");
    await context.with(trace.setSpan(ROOT_CONTEXT, parent), () => client!.echo({ payload: Buffer.from("x") }));
    parent.end();
    const all = await spans();
    const c = all.find((s) => s.kind === "CLIENT")!;
    const s = all.find((x) => x.kind === "SERVER")!;
    const p = all.find((x) => x.name === "caller")!;
    expect(c).toMatchObject({ name: "ioasid.testing.v1.EchoService/Echo", traceId: p.traceId, parentSpanId: p.spanId });
    expect(c.attributes).toMatchObject({
      "rpc.system": "grpc",
      "rpc.service": "ioasid.testing.v1.EchoService",
      "rpc.method": "Echo",
      "rpc.grpc.status_code": 0,
    });
    expect(s).toMatchObject({ name: "ioasid.testing.v1.EchoService/Echo", traceId: p.traceId, parentSpanId: c.spanId, status: { code: "UNSET" } });
    expect(seen.traceparent).toEqual([`00-${c.traceId}-${c.spanId}-01`]);
    expect(seen.activeTrace).toBe(p.traceId);
    const served = lines.find((l) => l["msg"] === "serving echo")!;
    expect(served).toMatchObject({ trace_id: p.traceId, span_id: s.spanId });
    // Outside any span a line has no trace fields.
    expect(lines.find((l) => l["msg"] === "listening")).not.toHaveProperty("trace_id");
  });

  it("records the status code of a refused call: an error on the caller's side, the caller's problem on the server's", async () => {
    await start(true);
    await expect(client!.fail({ code: Code.FAILED_PRECONDITION, reason: "NOPE", message: "no" })).rejects.toMatchObject({ code: Code.FAILED_PRECONDITION });
    await expect(client!.fail({ code: Code.INTERNAL, reason: "BROKEN", message: "broken" })).rejects.toMatchObject({ code: Code.INTERNAL });
    const all = (await spans()).filter((s) => s.name.endsWith("/Fail"));
    const of = (kind: string, code: number) => all.find((s) => s.kind === kind && s.attributes["rpc.grpc.status_code"] === code)!;
    expect(of("CLIENT", Code.FAILED_PRECONDITION).status.code).toBe("ERROR");
    expect(of("SERVER", Code.FAILED_PRECONDITION).status.code).toBe("UNSET");
    expect(of("CLIENT", Code.INTERNAL).status.code).toBe("ERROR");
    expect(of("SERVER", Code.INTERNAL).status.code).toBe("ERROR");
    // Without a caller's span the client span is the root of its trace.
    expect(of("CLIENT", Code.INTERNAL).parentSpanId).toBeUndefined();
  });

  it("sends no trace context and logs no trace fields while tracing is not started", async () => {
    await start(false);
    await client!.echo({ payload: Buffer.from("x") });
    expect(seen.traceparent).toEqual([]);
    expect(seen.activeTrace).toBeUndefined();
    expect(lines.find((l) => l["msg"] === "serving echo")).not.toHaveProperty("trace_id");
  });
});
