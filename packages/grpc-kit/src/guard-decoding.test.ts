import { Client, credentials, type ServiceError } from "@grpc/grpc-js";
import { Code, DomainError, MAX_STATUS_MESSAGE_CHARS } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { afterEach, describe, expect, it } from "vitest";
import { createClient } from "./create-client.js";
import { createLogger } from "./create-logger.js";
import { createEchoServer } from "./echo-server.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";
import { toDomainError } from "./to-domain-error.js";

const logger = createLogger("test", { level: "silent" });
const same = (b: Buffer): Buffer => b;

// Field 1 (payload, length-delimited) announcing 5 bytes and carrying 1: the decoder runs off the end.
const TRUNCATED = Buffer.from([0x0a, 0x05, 0x01]);
// Field 1 with wire type 7, which does not exist.
const BAD_WIRE_TYPE = Buffer.from([0x0f, 0x01]);

const ECHO = "/ioasid.testing.v1.EchoService/Echo";
const ECHO_STREAM = "/ioasid.testing.v1.EchoService/EchoStream";

/** A grpc-js client that sends bytes as they are (no serializer of ours in between). */
function rawUnary(client: Client, path: string, bytes: Buffer): Promise<DomainError | Buffer> {
  return new Promise((resolve) => {
    client.makeUnaryRequest(path, same, same, bytes, (err: ServiceError | null, res?: Buffer) => resolve(err === null ? res! : toDomainError(err)));
  });
}

function rawBidi(client: Client, path: string, frames: readonly Buffer[]): Promise<{ got: number; err: DomainError | undefined }> {
  return new Promise((resolve) => {
    const call = client.makeBidiStreamRequest(path, same, same);
    let got = 0;
    call.on("data", () => got++);
    call.on("error", (err: ServiceError) => resolve({ got, err: toDomainError(err) }));
    call.on("end", () => resolve({ got, err: undefined }));
    for (const f of frames) call.write(f);
    call.end();
  });
}

describe("guardDecoding (through GrpcServer)", () => {
  let server: GrpcServer | undefined;
  const clients: Client[] = [];

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await server?.shutdown(100);
    server = undefined;
  });

  async function start(s: GrpcServer): Promise<Client> {
    server = s;
    const client = new Client(`127.0.0.1:${await s.listen()}`, credentials.createInsecure());
    clients.push(client);
    return client;
  }

  it("answers a unary request whose bytes do not decode with INVALID_ARGUMENT REQUEST_UNDECODABLE, not INTERNAL", async () => {
    let calls = 0;
    const client = await start(
      createGrpcServer({ service: "t", logger, reflection: false }).addService(testing.EchoServiceService, {
        echo: (req) => {
          calls++;
          return { payload: req.payload };
        },
        echoStream: async () => {},
        fail: () => ({}),
      }),
    );
    for (const bytes of [TRUNCATED, BAD_WIRE_TYPE]) {
      const err = await rawUnary(client, ECHO, bytes);
      expect(err).toBeInstanceOf(DomainError);
      expect(err).toMatchObject({ code: Code.INVALID_ARGUMENT, reason: "REQUEST_UNDECODABLE" });
      expect((err as DomainError).message).toContain(ECHO);
    }
    expect(calls).toBe(0);
    // A request that decodes still reaches the handler.
    expect(await rawUnary(client, ECHO, Buffer.from(testing.EchoRequest.encode({ payload: Buffer.from("ok") }).finish()))).toBeInstanceOf(Buffer);
    expect(calls).toBe(1);
  });

  it("ends a bidi stream with INVALID_ARGUMENT at the first message that does not decode", async () => {
    const client = await start(createEchoServer({ logger, reflection: false }));
    const good = Buffer.from(testing.EchoStreamRequest.encode({ payload: Buffer.from("a") }).finish());
    const { got, err } = await rawBidi(client, ECHO_STREAM, [good, TRUNCATED, good]);
    expect(got).toBe(1);
    expect(err).toMatchObject({ code: Code.INVALID_ARGUMENT, reason: "REQUEST_UNDECODABLE" });
  });
});

describe("status messages on the wire", () => {
  let server: GrpcServer | undefined;
  afterEach(async () => {
    await server?.shutdown(100);
    server = undefined;
  });

  it("are cut at MAX_STATUS_MESSAGE_CHARS, whatever a handler built", async () => {
    server = createEchoServer({ logger, reflection: false });
    const client = createClient(testing.EchoServiceClient, `127.0.0.1:${await server.listen()}`);
    try {
      const huge = "n".repeat(50_000);
      const err = await client.fail({ code: Code.NOT_FOUND, reason: "SET_NOT_FOUND", message: huge }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: Code.NOT_FOUND, reason: "SET_NOT_FOUND" });
      const message = (err as DomainError).message;
      expect(message.length).toBeLessThanOrEqual(MAX_STATUS_MESSAGE_CHARS);
      expect(message).toContain("50000 characters");
    } finally {
      client.close();
    }
  });
});
