import { Code } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { afterEach, describe, expect, it } from "vitest";
import { checkHealth, watchHealth } from "./check-health.js";
import { createLogger } from "./create-logger.js";
import { createEchoServer } from "./echo-server.js";
import { HEALTH_SERVICE_NAME, ServingStatus, type GrpcServer } from "./grpc-server.js";
import { listServices } from "./list-services.js";

const ECHO = "ioasid.testing.v1.EchoService";

function memoryLogger(): { logger: ReturnType<typeof createLogger>; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger("echo", { level: "info", destination: { write: (s: string) => void lines.push(JSON.parse(s)) } });
  return { logger, lines };
}

describe("GrpcServer", () => {
  let server: GrpcServer | undefined;
  const controllers: AbortController[] = [];

  afterEach(async () => {
    for (const c of controllers.splice(0)) c.abort();
    await server?.shutdown(200);
    server = undefined;
  });

  it("listens on an ephemeral port of 127.0.0.1 and logs one listening line with address and service", async () => {
    const { logger, lines } = memoryLogger();
    server = createEchoServer({ service: "echo", logger });
    const port = await server.listen();
    expect(port).toBeGreaterThan(0);
    expect(server.address).toBe(`127.0.0.1:${port}`);
    const listening = lines.filter((l) => l["msg"] === "listening");
    expect(listening).toEqual([expect.objectContaining({ address: `127.0.0.1:${port}`, service: "echo" })]);
  });

  it("reports SERVING for the server and each service once listening, SERVICE_UNKNOWN for others", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    expect(server.servingStatus()).toBe(ServingStatus.NOT_SERVING);
    const address = `127.0.0.1:${await server.listen()}`;
    expect(await checkHealth(address)).toBe(ServingStatus.SERVING);
    expect(await checkHealth(address, ECHO)).toBe(ServingStatus.SERVING);
    expect(await checkHealth(address, "ioasid.nothing.v1.Nope")).toBe(ServingStatus.SERVICE_UNKNOWN);
  });

  it("turns NOT_SERVING when shutdown starts, then refuses connections", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    const address = `127.0.0.1:${await server.listen()}`;
    const controller = new AbortController();
    controllers.push(controller);
    const watch = watchHealth(address, ECHO, { signal: controller.signal })[Symbol.asyncIterator]();
    expect(await watch.next()).toEqual({ done: false, value: ServingStatus.SERVING });

    const stopped = server.shutdown(5000);
    expect(await watch.next()).toEqual({ done: false, value: ServingStatus.NOT_SERVING });
    // Leaving the watch lets the graceful shutdown finish without waiting for the grace period.
    controller.abort();
    expect(await watch.next()).toEqual({ done: true, value: undefined });
    await stopped;
    await expect(checkHealth(address, "", { deadlineMs: 1000 })).rejects.toMatchObject({ code: Code.UNAVAILABLE });
  });

  it("answers server reflection with the services it serves", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    const address = `127.0.0.1:${await server.listen()}`;
    expect(await listServices(address)).toEqual([HEALTH_SERVICE_NAME, ECHO].sort());
  });

  it("shuts down idempotently, and completes even if it never listened", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    const first = server.shutdown(100);
    expect(server.shutdown(100)).toBe(first);
    await first;
  });

  it("refuses addService after listen", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    await server.listen();
    expect(() => server?.addService(testing.EchoServiceService, {} as never)).toThrow(/after listen/);
  });
});
