import { Code, DomainError } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { afterEach, describe, expect, it } from "vitest";
import { createClient, waitForReady } from "./create-client.js";
import { createEchoHandlers } from "./echo-server.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";
import { createLogger } from "./create-logger.js";

const logger = createLogger("test", { level: "silent" });
const empty: testing.EchoRequest = { payload: Buffer.alloc(0) };

describe("createClient", () => {
  let server: GrpcServer | undefined;
  const clients: { close(): void }[] = [];

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await server?.shutdown(100);
    server = undefined;
  });

  /** An echo server whose Echo waits until the call is aborted, then fails with the reason. */
  async function startHanging(onMetadata?: (values: unknown[]) => void): Promise<string> {
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(testing.EchoServiceService, {
      ...createEchoHandlers(),
      echo: (_request, ctx) => {
        onMetadata?.(ctx.metadata.get("x-vm"));
        return new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason), { once: true }));
      },
    });
    return `127.0.0.1:${await server.listen()}`;
  }

  it("gives every unary call the client's default deadline", async () => {
    const client = createClient(testing.EchoServiceClient, await startHanging(), { deadlineMs: 100 });
    clients.push(client);
    const started = Date.now();
    await expect(client.echo(empty)).rejects.toMatchObject({ code: Code.DEADLINE_EXCEEDED, reason: "DEADLINE_EXCEEDED" });
    expect(Date.now() - started).toBeLessThan(2000);
  });

  it("lets one call override the deadline", async () => {
    const client = createClient(testing.EchoServiceClient, await startHanging(), { deadlineMs: 60_000 });
    clients.push(client);
    await expect(client.echo(empty, { deadlineMs: 50 })).rejects.toMatchObject({ code: Code.DEADLINE_EXCEEDED });
  });

  it("cancels a unary call when its AbortSignal aborts", async () => {
    const client = createClient(testing.EchoServiceClient, await startHanging());
    clients.push(client);
    const controller = new AbortController();
    const call = client.echo(empty, { signal: controller.signal });
    await waitForReady(client, 2000);
    controller.abort();
    await expect(call).rejects.toMatchObject({ code: Code.CANCELLED, reason: "CANCELLED" });
    await expect(client.echo(empty, { signal: controller.signal })).rejects.toBeInstanceOf(DomainError);
  });

  it("sends request metadata given as a plain record", async () => {
    let seen: unknown[] | undefined;
    const client = createClient(testing.EchoServiceClient, await startHanging((v) => (seen = v)));
    clients.push(client);
    await expect(client.echo(empty, { deadlineMs: 200, metadata: { "x-vm": "vm-7" } })).rejects.toBeInstanceOf(DomainError);
    expect(seen).toEqual(["vm-7"]);
  });

  it("answers with the server's response", async () => {
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(testing.EchoServiceService, createEchoHandlers());
    const client = createClient(testing.EchoServiceClient, `127.0.0.1:${await server.listen()}`);
    clients.push(client);
    const res = await client.echo({ payload: Buffer.from("pasid 201") });
    expect(res.payload.toString()).toBe("pasid 201");
  });

  it("waitForReady fails with UNAVAILABLE within its deadline when nothing listens", async () => {
    const client = createClient(testing.EchoServiceClient, "127.0.0.1:1");
    clients.push(client);
    await expect(waitForReady(client, 200)).rejects.toMatchObject({ code: Code.UNAVAILABLE });
  });
});
