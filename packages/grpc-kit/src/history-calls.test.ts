import { testing } from "@ioasid/proto";
import { decodePositions, POSITION_METADATA, receivedCursor, registerPosition, takeReceived, type HistoryLink } from "@ioasid/trace";
import { afterEach, describe, expect, it } from "vitest";
import { createClient, type PromiseClient } from "./create-client.js";
import { createEchoHandlers } from "./echo-server.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";

// Order without clocks (issue 18): a gRPC call carries the caller's history positions in its
// metadata, and its status the server's as they stand when the call ends, so that the records each
// side makes afterwards can name what they follow. (Client and server share this test's process,
// and so its position registry: the roles below tell them apart.)

describe("history positions on gRPC calls", () => {
  let server: GrpcServer | undefined;
  let client: PromiseClient<typeof testing.EchoServiceService> | undefined;

  afterEach(async () => {
    client?.close();
    await server?.shutdown(100);
    server = client = undefined;
  });

  it("sends the caller's positions with the call and brings back the server's as of the call's end", async () => {
    const link = (role: string, publisherSeq: number): HistoryLink | undefined =>
      publisherSeq === 0 ? undefined : { role, instance: "i", incarnation: "run", publisherSeq };
    let serverSeq = 0;
    // Held here: the registry holds recorders weakly.
    const caller = { position: () => link("caller", 3) };
    const callee = { position: () => link("callee", serverSeq) };
    registerPosition("caller", "i", caller);
    registerPosition("callee", "i", callee);
    let sent: HistoryLink[] = [];
    server = createGrpcServer({ service: "history-test", reflection: false }).addService(testing.EchoServiceService, {
      ...createEchoHandlers(),
      echo: async (request, ctx) => {
        sent = ctx.metadata.get(POSITION_METADATA).flatMap((v) => decodePositions(String(v)));
        serverSeq = 5; // the handler recorded: the answer covers it
        return { payload: request.payload };
      },
    });
    client = createClient(testing.EchoServiceClient, `127.0.0.1:${await server.listen()}`);
    const seen = receivedCursor();

    await client.echo({ payload: Buffer.from("x") });
    expect(sent).toContainEqual({ role: "caller", instance: "i", incarnation: "run", publisherSeq: 3 });
    // The server noted the caller's position; the caller noted the server's from the status.
    const received = takeReceived(seen);
    expect(received).toContainEqual({ role: "caller", instance: "i", incarnation: "run", publisherSeq: 3 });
    expect(received).toContainEqual({ role: "callee", instance: "i", incarnation: "run", publisherSeq: 5 });
    // Taken once per recorder: the next record names only what is newer.
    expect(takeReceived(seen)).toEqual([]);
    expect([caller.position(), callee.position()]).toHaveLength(2); // kept alive to here
  });
});
