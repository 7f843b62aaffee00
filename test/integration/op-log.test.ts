import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { OpLog, OpLogFormatError, type CommittedOperation } from "@ioasid/ioasid-core";
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

/** A distinct operation (the log stores and returns it; nothing applies it here). */
const op = (n: number): CommittedOperation => ({ kind: "unregister", registrationId: n, commitTimeMs: 1_700_000_000_000 + n });

describe("OpLog", () => {
  it("writes in order and refuses to write after a message it did not write (no gap, no interleaving)", async () => {
    const log = await OpLog.open(nc, { stream: "OPLOG_TEST", subject: "oplog.test" });
    await Promise.all([log.append(op(1)), log.append(op(2))]);
    await log.append(op(3));
    // Something else lands in the stream (another writer's seal, which holds no operation): the
    // log's idea of the last sequence is now wrong.
    await (await OpLog.open(nc, { stream: "OPLOG_TEST", subject: "oplog.test" })).seal();
    await expect(log.append(op(4))).rejects.toThrow(/sequence/i);
    const replayed: unknown[] = [];
    const again = await OpLog.open(nc, { stream: "OPLOG_TEST", subject: "oplog.test" });
    await again.replay((o) => replayed.push(o));
    expect(replayed).toEqual([op(1), op(2), op(3)]);
    // A log opened now continues after the last message.
    await again.append(op(5));
  });

  it("is sealed after a replay: a write of an earlier incarnation arriving later is refused, and one that arrived first refuses the seal", async () => {
    const first = await OpLog.open(nc, { stream: "OPLOG_SEAL", subject: "oplog.seal" });
    await first.append(op(1));
    // A successor takes over: it replays and seals.
    const second = await OpLog.open(nc, { stream: "OPLOG_SEAL", subject: "oplog.seal" });
    const seen: unknown[] = [];
    await second.replay((o) => seen.push(o));
    await second.seal();
    // The first core's write, delayed in a slow link, lands now: refused.
    await expect(first.append(op(2))).rejects.toThrow(/sequence/i);
    await second.append(op(3));
    // A third one whose replay misses a write that lands before its seal: the seal is refused.
    const third = await OpLog.open(nc, { stream: "OPLOG_SEAL", subject: "oplog.seal" });
    await third.replay(() => undefined);
    await second.append(op(4));
    await expect(third.seal()).rejects.toThrow(/sequence/i);
    const all: unknown[] = [];
    await (await OpLog.open(nc, { stream: "OPLOG_SEAL", subject: "oplog.seal" })).replay((o) => all.push(o));
    expect(all).toEqual([op(1), op(3), op(4)]);
  });

  it("writes an operation appended while the seal is on its way after the seal", async () => {
    // Chaos soak, seed 4: a restarted core's first misses (subscribers not live) were appended
    // while its seal was still in flight through a slow link; written with the sequence the seal
    // then took, they were refused, and the core fail-stopped at every start until the link healed.
    const first = await OpLog.open(nc, { stream: "OPLOG_SEAL_RACE", subject: "oplog.sealrace" });
    await first.append(op(1));
    const log = await OpLog.open(nc, { stream: "OPLOG_SEAL_RACE", subject: "oplog.sealrace" });
    await log.replay(() => undefined);
    const sealed = log.seal();
    const appended = log.append(op(2), false);
    log.flush();
    await sealed;
    await appended;
    await log.append(op(3));
    const all: unknown[] = [];
    await (await OpLog.open(nc, { stream: "OPLOG_SEAL_RACE", subject: "oplog.sealrace" })).replay((o) => all.push(o));
    expect(all).toEqual([op(1), op(2), op(3)]);
  });

  it("retries writes JetStream could not take for a while, in order, and stores each once even when a first try landed unanswered", async () => {
    // Issue 18: a nats-server that stops answering (a cluster failing over looks the same to the
    // writer) made the core fail-stop at the first timed-out write. Now each write is tried again,
    // under the same message id, once its predecessor is stored.
    const retries: string[] = [];
    const log = await OpLog.open(nc, {
      stream: "OPLOG_RETRY",
      subject: "oplog.retry",
      writeRetryMs: 60_000,
      onWriteRetry: (err) => retries.push(String(err)),
    });
    await log.append(op(1));
    await nats.kill("SIGSTOP");
    const pending = [log.append(op(2)), log.append(op(3))];
    // Longer than a JetStream publish waits for its answer (5 s): the first tries time out, while
    // their messages wait in the stopped server's socket and are stored once it runs again.
    await new Promise((r) => setTimeout(r, 6_000));
    await nats.kill("SIGCONT");
    const seqs = await Promise.all(pending);
    await log.append(op(4));
    expect(retries.length, "the timed-out writes were retried").toBeGreaterThan(0);
    expect(seqs[1]).toBeGreaterThanOrEqual(seqs[0]!); // one message when they were written together (group commit)
    const all: unknown[] = [];
    await (await OpLog.open(nc, { stream: "OPLOG_RETRY", subject: "oplog.retry" })).replay((o) => all.push(o));
    expect(all, "every operation once, in order").toEqual([op(1), op(2), op(3), op(4)]);
  }, 60_000);

  it("replays up to a message that is not ioasid.oplog.v1 and refuses it, whole, naming its stream and sequence", async () => {
    const log = await OpLog.open(nc, { stream: "OPLOG_FORMAT", subject: "oplog.format" });
    await log.append(op(1));
    // The JSON records of the format before v1: none of them is applied.
    await jetstream(nc).publish("oplog.format", JSON.stringify([{ t: "unregister", r: 2, ts: 1 }]));
    const replayed: unknown[] = [];
    const err = await (await OpLog.open(nc, { stream: "OPLOG_FORMAT", subject: "oplog.format" })).replay((o) => replayed.push(o)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpLogFormatError);
    expect((err as OpLogFormatError).at).toEqual({ stream: "OPLOG_FORMAT", seq: 2 });
    expect((err as OpLogFormatError).message).toContain("predates format v1 of the op log");
    expect(replayed).toEqual([op(1)]);
  });
});
