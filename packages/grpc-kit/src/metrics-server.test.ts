import { Code } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { Counter } from "prom-client";
import { afterEach, describe, expect, it } from "vitest";
import { createGrpcMetrics, splitMethodPath } from "./call-metrics.js";
import { createClient } from "./create-client.js";
import { createLogger } from "./create-logger.js";
import { createEchoServer } from "./echo-server.js";
import type { GrpcServer } from "./grpc-server.js";
import { loadConfig } from "./load-config.js";
import { metricsConfig, metricsListen } from "./metrics-config.js";
import { createMetricsRegistry, startMetricsServer, type MetricsServer } from "./metrics-server.js";

const silent = createLogger("metrics-test", { level: "silent" });

describe("startMetricsServer", () => {
  let metrics: MetricsServer | undefined;
  let server: GrpcServer | undefined;
  afterEach(async () => {
    await metrics?.close();
    await server?.shutdown(200);
    metrics = server = undefined;
  });

  it("serves the registry as Prometheus text on GET /metrics of 127.0.0.1, 404 elsewhere, 405 for other methods", async () => {
    const registry = createMetricsRegistry();
    new Counter({ name: "ioasid_test_total", help: "A test counter.", registers: [registry] }).inc(3);
    metrics = await startMetricsServer({ registry, logger: silent });
    expect(metrics.url).toBe(`http://127.0.0.1:${metrics.port}/metrics`);
    const res = await fetch(metrics.url);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await res.text();
    expect(text).toContain("# TYPE ioasid_test_total counter\nioasid_test_total 3\n");
    expect(text).toMatch(/^process_cpu_user_seconds_total /m);
    expect((await fetch(`http://127.0.0.1:${metrics.port}/`)).status).toBe(404);
    expect((await fetch(metrics.url, { method: "POST" })).status).toBe(405);
  });

  it("refuses a port that is taken, saying which", async () => {
    metrics = await startMetricsServer({ registry: createMetricsRegistry() });
    await expect(startMetricsServer({ registry: createMetricsRegistry(), port: metrics.port })).rejects.toThrow(
      `cannot listen for metrics on 127.0.0.1:${metrics.port}`,
    );
  });

  it("counts a GrpcServer's calls by method and status code once observed", async () => {
    const registry = createMetricsRegistry();
    server = createEchoServer({ logger: silent }).observeCalls(createGrpcMetrics(registry));
    const client = createClient(testing.EchoServiceClient, `127.0.0.1:${await server.listen()}`);
    try {
      await client.echo({ payload: Buffer.from("a") });
      await client.echo({ payload: Buffer.from("b") });
      await expect(client.fail({ code: Code.NOT_FOUND, reason: "GONE", message: "gone" })).rejects.toMatchObject({ code: Code.NOT_FOUND });
    } finally {
      client.close();
    }
    const text = await registry.metrics();
    expect(text).toContain('ioasid_grpc_server_handled_total{grpc_service="ioasid.testing.v1.EchoService",grpc_method="Echo",grpc_code="OK"} 2');
    expect(text).toContain('ioasid_grpc_server_handled_total{grpc_service="ioasid.testing.v1.EchoService",grpc_method="Fail",grpc_code="NOT_FOUND"} 1');
    expect(text).toContain('ioasid_grpc_server_handling_seconds_count{grpc_service="ioasid.testing.v1.EchoService",grpc_method="Echo"} 2');
  });
});

describe("metricsConfig", () => {
  const schema = metricsConfig(50056);
  it("listens on loopback at the service's default port unless told otherwise", () => {
    expect(metricsListen(loadConfig(schema, {}))).toEqual({ host: "127.0.0.1", port: 50056 });
    expect(metricsListen(loadConfig(schema, { IOASID_METRICS_PORT: "0", IOASID_METRICS_HOST: "0.0.0.0" }))).toEqual({ host: "0.0.0.0", port: 0 });
  });
  it("takes off (any case) for no endpoint, and refuses what is neither a port nor off", () => {
    expect(metricsListen(loadConfig(schema, { IOASID_METRICS_PORT: "OFF" }))).toBeUndefined();
    expect(() => loadConfig(schema, { IOASID_METRICS_PORT: "70000" })).toThrow(
      /IOASID_METRICS_PORT="70000": expected an integer port 0\.\.65535 \(0: an ephemeral port\), or off/,
    );
    expect(() => loadConfig(schema, { IOASID_METRICS_PORT: "no" })).toThrow(/IOASID_METRICS_PORT/);
  });
});

describe("splitMethodPath", () => {
  it("splits a method path into its service and method", () => {
    expect(splitMethodPath("/ioasid.core.v1.CoreService/Free")).toEqual({ service: "ioasid.core.v1.CoreService", method: "Free" });
    expect(splitMethodPath("junk")).toEqual({ service: "unknown", method: "unknown" });
  });
});
