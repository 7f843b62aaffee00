import { Code, DomainError, ERROR_DOMAIN, INTERNAL_REASON } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { afterEach, describe, expect, it } from "vitest";
import { createClient, type PromiseClient } from "./create-client.js";
import { createEchoHandlers } from "./echo-server.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";
import { createLogger } from "./create-logger.js";
import { STATUS_DETAILS_KEY, decodeRpcStatus, findErrorInfo } from "./rpc-status.js";
import { toDomainError } from "./to-domain-error.js";

function memoryLogger(): { logger: ReturnType<typeof createLogger>; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger("test", { level: "debug", destination: { write: (s: string) => void lines.push(JSON.parse(s)) } });
  return { logger, lines };
}

type Echo = PromiseClient<typeof testing.EchoServiceService>;

describe("the error model on the wire", () => {
  let server: GrpcServer | undefined;
  let client: Echo | undefined;

  afterEach(async () => {
    client?.close();
    await server?.shutdown(100);
    server = undefined;
    client = undefined;
  });

  async function start(handlers = createEchoHandlers()): Promise<{ client: Echo; lines: Record<string, unknown>[] }> {
    const { logger, lines } = memoryLogger();
    server = createGrpcServer({ service: "echo-test", logger, reflection: false }).addService(testing.EchoServiceService, handlers);
    const port = await server.listen();
    client = createClient(testing.EchoServiceClient, `127.0.0.1:${port}`);
    return { client, lines };
  }

  it("delivers a DomainError thrown by a handler with the same code, reason, message and metadata", async () => {
    const { client } = await start({
      ...createEchoHandlers(),
      echo: () => {
        throw new DomainError(Code.NOT_FOUND, "IOASID_FREE_PENDING", "IOASID 201 is being freed", {
          metadata: { ioasid: "201" },
        });
      },
    });
    const err = await client.echo({ payload: Buffer.alloc(0) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DomainError);
    expect(err).toMatchObject({
      code: Code.NOT_FOUND,
      reason: "IOASID_FREE_PENDING",
      message: "IOASID 201 is being freed",
      metadata: { ioasid: "201" },
    });
  });

  it("carries the reason as google.rpc.ErrorInfo of domain ioasid.dev in grpc-status-details-bin", async () => {
    const { client } = await start();
    const err = await client.fail({ code: Code.ALREADY_EXISTS, reason: "TOKEN_IN_USE", message: "token 7 has a set" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DomainError);
    const serviceError = (err as DomainError).cause as { metadata: { get(key: string): unknown[] } };
    const raw = serviceError.metadata.get(STATUS_DETAILS_KEY)[0] as Buffer;
    const status = decodeRpcStatus(raw);
    expect(status).toMatchObject({ code: Code.ALREADY_EXISTS, message: "token 7 has a set" });
    expect(findErrorInfo(status)).toEqual({ reason: "TOKEN_IN_USE", domain: ERROR_DOMAIN, metadata: {} });
  });

  it('turns a plain Error into INTERNAL "internal error" and logs, never sends, the cause', async () => {
    const { client, lines } = await start({
      ...createEchoHandlers(),
      echo: async () => {
        throw new Error("secret: /var/lib/ioasid/state.db is corrupt");
      },
    });
    const err = await client.echo({ payload: Buffer.alloc(0) }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: Code.INTERNAL, reason: INTERNAL_REASON, message: "internal error" });
    expect(JSON.stringify((err as DomainError).cause, Object.getOwnPropertyNames((err as DomainError).cause))).not.toContain("secret");
    const logged = lines.find((l) => l["msg"] === "internal error");
    expect(JSON.stringify(logged)).toContain("secret: /var/lib/ioasid/state.db is corrupt");
    expect(logged?.["method"]).toBe("/ioasid.testing.v1.EchoService/Echo");
  });

  it("treats a synchronous throw like a rejection", async () => {
    const { client } = await start({
      ...createEchoHandlers(),
      echo: () => {
        throw new TypeError("boom");
      },
    });
    await expect(client.echo({ payload: Buffer.alloc(0) })).rejects.toMatchObject({ code: Code.INTERNAL, message: "internal error" });
  });

  it("names a status without details by its code: UNAVAILABLE when nobody listens", async () => {
    client = createClient(testing.EchoServiceClient, "127.0.0.1:1", { deadlineMs: 2000 });
    await expect(client.echo({ payload: Buffer.alloc(0) })).rejects.toMatchObject({ code: Code.UNAVAILABLE, reason: "UNAVAILABLE" });
  });

  it("passes a DomainError through and normalises anything else", () => {
    const domain = new DomainError(Code.NOT_FOUND, "X", "y");
    expect(toDomainError(domain)).toBe(domain);
    expect(toDomainError(new Error("local"))).toMatchObject({ code: Code.INTERNAL, reason: INTERNAL_REASON });
  });
});
