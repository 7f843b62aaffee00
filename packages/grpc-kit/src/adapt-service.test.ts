import { Code, DomainError } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import { afterEach, describe, expect, it } from "vitest";
import { adaptService, type CallContext } from "./adapt-service.js";
import { createClient } from "./create-client.js";
import { createEchoHandlers } from "./echo-server.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";
import { createLogger } from "./create-logger.js";

const logger = createLogger("test", { level: "silent" });

const encodeEcho = (v: testing.EchoRequest): Buffer => Buffer.from(testing.EchoRequest.encode(v).finish());
const decodeEcho = (b: Buffer): testing.EchoRequest => testing.EchoRequest.decode(b);

/** A service with the two streaming kinds EchoService lacks, built from its messages. */
const StreamTestService = {
  ticks: {
    path: "/ioasid.testing.v1.StreamTest/Ticks",
    requestStream: false,
    responseStream: true,
    requestSerialize: encodeEcho,
    requestDeserialize: decodeEcho,
    responseSerialize: encodeEcho,
    responseDeserialize: decodeEcho,
  },
  collect: {
    path: "/ioasid.testing.v1.StreamTest/Collect",
    requestStream: true,
    responseStream: false,
    requestSerialize: encodeEcho,
    requestDeserialize: decodeEcho,
    responseSerialize: encodeEcho,
    responseDeserialize: decodeEcho,
  },
} as const;

const text = (s: string): testing.EchoRequest => ({ payload: Buffer.from(s) });

/** Resolves with the abort reason of `ctx.signal` once the server side of a call is aborted. */
function onAbort(ctx: CallContext): Promise<unknown> {
  return new Promise((resolve) => {
    if (ctx.signal.aborted) resolve(ctx.signal.reason);
    else ctx.signal.addEventListener("abort", () => resolve(ctx.signal.reason), { once: true });
  });
}

describe("adaptService", () => {
  it("refuses at adapt time a handler for a method the service does not have", () => {
    expect(() => adaptService(testing.EchoServiceService, { ...createEchoHandlers(), ech0: () => ({}) } as never, { logger })).toThrow(
      /"ech0" is not a method of ioasid.testing.v1.EchoService/,
    );
  });

  it("refuses at adapt time a service with a method left without handler", () => {
    const { fail: _fail, ...partial } = createEchoHandlers();
    expect(() => adaptService(testing.EchoServiceService, partial as never, { logger })).toThrow(/no handler for .*\.fail/);
  });
});

describe("streams through adaptService and createClient", () => {
  let server: GrpcServer | undefined;
  const clients: { close(): void }[] = [];

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await server?.shutdown(100);
    server = undefined;
  });

  /** Listens on an ephemeral port of the server the test created; returns its address. */
  async function start(): Promise<string> {
    if (server === undefined) throw new Error("create the server first");
    return `127.0.0.1:${await server.listen()}`;
  }

  it("echoes a bidi stream message by message", async () => {
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(testing.EchoServiceService, createEchoHandlers());
    const address = await start();
    const client = createClient(testing.EchoServiceClient, address);
    clients.push(client);
    const stream = client.echoStream();
    const seen: string[] = [];
    const it = stream.responses[Symbol.asyncIterator]();
    for (const word of ["alloc", "bind", "free"]) {
      await stream.send(text(word));
      const next = await it.next();
      seen.push(next.done === true ? "<end>" : next.value.payload.toString());
    }
    stream.end();
    expect(await it.next()).toEqual({ done: true, value: undefined });
    expect(seen).toEqual(["alloc", "bind", "free"]);
  });

  it("streams server responses and ends the stream when the handler resolves", async () => {
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(StreamTestService, {
      ticks: async (request, _ctx, send) => {
        const n = Number(request.payload.toString());
        for (let i = 0; i < n; i++) await send(text(String(i)));
      },
      collect: async () => text(""),
    });
    const client = createClient(StreamTestService, await start());
    clients.push(client);
    const got: string[] = [];
    for await (const msg of client.ticks(text("5"))) got.push(msg.payload.toString());
    expect(got).toEqual(["0", "1", "2", "3", "4"]);
  });

  it("delivers a DomainError thrown in the middle of a server stream after the messages sent before it", async () => {
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(StreamTestService, {
      ticks: async (_request, _ctx, send) => {
        await send(text("a"));
        await send(text("b"));
        throw new DomainError(Code.FAILED_PRECONDITION, "STALE_GENERATION", "generation 3 is stale");
      },
      collect: async () => text(""),
    });
    const client = createClient(StreamTestService, await start());
    clients.push(client);
    const got: string[] = [];
    const err = await (async () => {
      for await (const msg of client.ticks(text(""))) got.push(msg.payload.toString());
    })().catch((e: unknown) => e);
    expect(got).toEqual(["a", "b"]);
    expect(err).toBeInstanceOf(DomainError);
    expect(err).toMatchObject({ code: Code.FAILED_PRECONDITION, reason: "STALE_GENERATION", message: "generation 3 is stale" });
  });

  it("aborts the server's ctx.signal with CANCELLED when the client leaves a server stream", async () => {
    let serverAborted!: Promise<unknown>;
    let handlerSettled!: Promise<unknown>;
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(StreamTestService, {
      ticks: (_request, ctx, send) => {
        serverAborted = onAbort(ctx);
        const run = (async () => {
          for (let i = 0; !ctx.signal.aborted; i++) await send(text(String(i)));
        })();
        handlerSettled = run.then(
          () => "resolved",
          (e: unknown) => e,
        );
        return run;
      },
      collect: async () => text(""),
    });
    const client = createClient(StreamTestService, await start());
    clients.push(client);
    let count = 0;
    for await (const _msg of client.ticks(text(""))) if (++count === 3) break;
    const reason = await serverAborted;
    expect(reason).toBeInstanceOf(DomainError);
    expect(reason).toMatchObject({ code: Code.CANCELLED });
    // The handler's pending send() is released rather than left waiting for a drain that never comes.
    await handlerSettled;
  });

  it("cancels a server stream when the client's AbortSignal aborts, and reports CANCELLED", async () => {
    let serverAborted!: Promise<unknown>;
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(StreamTestService, {
      ticks: async (_request, ctx, send) => {
        serverAborted = onAbort(ctx);
        await send(text("first"));
        await serverAborted;
      },
      collect: async () => text(""),
    });
    const client = createClient(StreamTestService, await start());
    clients.push(client);
    const controller = new AbortController();
    const err = await (async () => {
      for await (const _msg of client.ticks(text(""), { signal: controller.signal })) controller.abort();
    })().catch((e: unknown) => e);
    expect(err).toMatchObject({ code: Code.CANCELLED, reason: "CANCELLED" });
    expect(await serverAborted).toMatchObject({ code: Code.CANCELLED });
  });

  it("reads a client stream to its end and answers once", async () => {
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(StreamTestService, {
      ticks: async () => {},
      collect: async (requests) => {
        const parts: string[] = [];
        for await (const r of requests) parts.push(r.payload.toString());
        return text(parts.join("+"));
      },
    });
    const client = createClient(StreamTestService, await start());
    clients.push(client);
    const call = client.collect();
    await call.send(text("kvm"));
    await call.send(text("vdcm"));
    await call.send(text("iommu"));
    expect((await call.end()).payload.toString()).toBe("kvm+vdcm+iommu");
  });

  it("aborts ctx.signal with DEADLINE_EXCEEDED when the caller's deadline passes", async () => {
    let serverAborted!: Promise<unknown>;
    let deadline: Date | undefined;
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(testing.EchoServiceService, {
      ...createEchoHandlers(),
      echo: async (_request, ctx) => {
        deadline = ctx.deadline;
        serverAborted = onAbort(ctx);
        throw await serverAborted;
      },
    });
    const client = createClient(testing.EchoServiceClient, await start());
    clients.push(client);
    const before = Date.now();
    await expect(client.echo(text("slow"), { deadlineMs: 100 })).rejects.toMatchObject({
      code: Code.DEADLINE_EXCEEDED,
      reason: "DEADLINE_EXCEEDED",
    });
    expect(await serverAborted).toMatchObject({ code: Code.DEADLINE_EXCEEDED });
    expect(deadline?.getTime()).toBeGreaterThanOrEqual(before);
  });
});
