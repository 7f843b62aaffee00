import { afterEach, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { historyOutbox } from "@ioasid/bus";
import { startCoreServer } from "@ioasid/ioasid-core";
import { createLogger } from "@ioasid/grpc-kit";
import { startNats, type NatsServer } from "@ioasid/testkit";

// The core binary starts again on the same connection when a start fails while JetStream fails
// over (main.ts): a failed start must leave nothing behind that the next one adds to.

let nats: NatsServer | undefined;
let nc: NatsConnection | undefined;
afterEach(async () => {
  await nc?.close();
  await nats?.stop();
  nc = undefined;
  nats = undefined;
});

describe("a core started again on the same connection", () => {
  it("listens for history losses once: a failed start (JetStream refusing, or the port taken) and a closed server remove their listener", async () => {
    nats = await startNats();
    nc = await connect({ servers: nats.url });
    const logger = createLogger("ioasid-core", { level: "silent" });
    const outbox = historyOutbox(nc);
    expect(outbox.lossListeners).toBe(0);
    // Fails after the listener is added: nats.js refuses a stream name with a dot.
    for (let attempt = 0; attempt < 3; attempt++) {
      await expect(startCoreServer({ logger, nats: { nc, stream: "bad.name" } })).rejects.toThrow();
      expect(outbox.lossListeners, `after failed start ${attempt + 1}`).toBe(0);
    }
    const running = await startCoreServer({ logger, nats: { nc } });
    expect(outbox.lossListeners).toBe(1);
    // A second core on the first one's port cannot listen: it leaves nothing behind either.
    await expect(startCoreServer({ logger, port: running.port, nats: { nc } })).rejects.toThrow();
    expect(outbox.lossListeners).toBe(1);
    await running.close();
    expect(outbox.lossListeners).toBe(0);
  });
});
