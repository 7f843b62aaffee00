import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, type IncomingHttpHeaders } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { context, SpanKind, trace } from "@opentelemetry/api";
import { afterEach, describe, expect, it } from "vitest";
import { parseSpanRecords } from "./file-span-exporter.js";
import { startTracing, tracer, tracingStarted, type Tracing } from "./start-tracing.js";

describe("startTracing", () => {
  let tracing: Tracing | undefined;
  const dirs: string[] = [];
  afterEach(async () => {
    await tracing?.shutdown();
    tracing = undefined;
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  it("registers nothing when no exporter is configured: spans are the API's no-ops", async () => {
    expect(await startTracing({ service: "t", file: "  " })).toBeUndefined();
    expect(tracingStarted()).toBe(false);
    const span = tracer.startSpan("nothing");
    expect(span.isRecording()).toBe(false);
    expect(trace.isSpanContextValid(span.spanContext())).toBe(false);
    span.end();
  });

  it("with a file, appends each finished span as a JSON line: ids, parent, kind, service, attributes, status", async () => {
    const dir = mkdtempSync(join(tmpdir(), "trace-test-"));
    dirs.push(dir);
    const file = join(dir, "sub", "spans.jsonl");
    tracing = await startTracing({ service: "kvm", file, exportDelayMs: 10 });
    expect(tracing?.exporters).toEqual([`file:${file}`]);
    expect(tracingStarted()).toBe(true);
    const parent = tracer.startSpan("parent", { kind: SpanKind.SERVER, attributes: { "ioasid.ioasid": 7 } });
    // The context manager carries the active span into async work.
    await context.with(trace.setSpan(context.active(), parent), async () => {
      await new Promise((r) => setTimeout(r, 1));
      tracer.startSpan("child").end();
    });
    parent.end();
    await tracing!.forceFlush();
    const records = parseSpanRecords(readFileSync(file, "utf8"));
    const p = records.find((r) => r.name === "parent")!;
    const c = records.find((r) => r.name === "child")!;
    expect(p).toMatchObject({ kind: "SERVER", service: "kvm", attributes: { "ioasid.ioasid": 7 }, status: { code: "UNSET" } });
    expect(p.parentSpanId).toBeUndefined();
    expect(c).toMatchObject({ traceId: p.traceId, parentSpanId: p.spanId, kind: "INTERNAL" });
  });

  it("with an OTLP endpoint, posts finished spans to <endpoint>/v1/traces", async () => {
    const received: Array<{ url: string | undefined; headers: IncomingHttpHeaders; body: string }> = [];
    const collector = createServer((req, res) => {
      let body = "";
      req.on("data", (chunk: Buffer) => (body += chunk.toString("utf8")));
      req.on("end", () => {
        received.push({ url: req.url, headers: req.headers, body });
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
      });
    });
    await new Promise<void>((resolve) => collector.listen(0, "127.0.0.1", resolve));
    try {
      const { port } = collector.address() as AddressInfo;
      tracing = await startTracing({ service: "vdcm", otlpEndpoint: `http://127.0.0.1:${port}/`, exportDelayMs: 10 });
      expect(tracing?.exporters).toEqual([`otlp:http://127.0.0.1:${port}/v1/traces`]);
      tracer.startSpan("handle FREE", { attributes: { "ioasid.seq": 4 } }).end();
      await tracing!.forceFlush();
      expect(received).toHaveLength(1);
      expect(received[0]!.url).toBe("/v1/traces");
      expect(received[0]!.body).toContain("handle FREE");
      expect(received[0]!.body).toContain("vdcm");
    } finally {
      await tracing?.shutdown();
      await new Promise((resolve) => collector.close(resolve));
    }
  });

  it("stops on shutdown: the API's no-ops again", async () => {
    const dir = mkdtempSync(join(tmpdir(), "trace-test-"));
    dirs.push(dir);
    tracing = await startTracing({ service: "t", file: join(dir, "s.jsonl") });
    await tracing!.shutdown();
    expect(tracingStarted()).toBe(false);
    expect(tracer.startSpan("after").isRecording()).toBe(false);
  });

  it("refuses a second start in one process", async () => {
    const dir = mkdtempSync(join(tmpdir(), "trace-test-"));
    dirs.push(dir);
    tracing = await startTracing({ service: "t", file: join(dir, "s.jsonl") });
    await expect(startTracing({ service: "t", file: join(dir, "t.jsonl") })).rejects.toThrow(/already started/);
  });
});
