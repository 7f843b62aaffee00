import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { OpLog } from "@ioasid/ioasid-core";
import { startNats, type NatsServer } from "@ioasid/testkit";

// The core's operation log stays a prefix of what the core applied: every message is written with
// the stream sequence it must follow, so a write that does not follow the last one the log knows
// (a message lost in between, or a second writer) is refused instead of stored after a gap.

let nats: NatsServer;
let nc: NatsConnection;
beforeAll(async () => {
  nats = await startNats();
  nc = await connect({ servers: nats.url });
});
afterAll(async () => {
  await nc?.close();
  await nats?.stop();
});

const op = (n: number) => ({ t: "test", n }) as never;

describe("OpLog", () => {
  it("writes in order and refuses to write after a message it did not write (no gap, no interleaving)", async () => {
    const log = await OpLog.open(nc, { stream: "OPLOG_TEST", subject: "oplog.test" });
    await Promise.all([log.append(op(1)), log.append(op(2))]);
    await log.append(op(3));
    // Something else lands in the stream: the log's idea of the last sequence is now wrong.
    await jetstream(nc).publish("oplog.test", "[]");
    await expect(log.append(op(4))).rejects.toThrow(/sequence/i);
    const replayed: unknown[] = [];
    const again = await OpLog.open(nc, { stream: "OPLOG_TEST", subject: "oplog.test" });
    await again.replay((o) => replayed.push(o));
    expect(replayed).toEqual([op(1), op(2), op(3)]);
    // A log opened now continues after the last message.
    await again.append(op(5));
  });
});
