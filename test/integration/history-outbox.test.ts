import { afterEach, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { ensureHistoryStream, historyOutbox, HistoryRecorder, readHistory, type HistoryLoss, type HistoryRecord } from "@ioasid/bus";
import { natsConnectOptions } from "@ioasid/security";
import { startNats, waitFor, type NatsServer } from "@ioasid/testkit";

// History is published with JetStream acknowledgements and sent again until stored (issue 15: the
// compose cluster's checker found a teardown's records missing after the history stream's leader
// was killed — the records had been published fire and forget). These run against a real
// nats-server: what the server acknowledges, refuses or never answers.

let nats: NatsServer | undefined;
const opened: NatsConnection[] = [];
afterEach(async () => {
  for (const nc of opened.splice(0)) await nc.close().catch(() => undefined);
  await nats?.stop();
  nats = undefined;
});

async function open(server: NatsServer, options: object = {}): Promise<NatsConnection> {
  const nc = await connect({ servers: server.url, ...options });
  opened.push(nc);
  return nc;
}

/** The stored records whose note starts with `tag`, once `n` of them are stored (or 10 s). */
async function notesStored(nc: NatsConnection, since: number, tag: string, n: number): Promise<string[]> {
  let notes: string[] = [];
  await waitFor(
    async () => {
      const records: HistoryRecord[] = await readHistory(nc, { sinceMs: since });
      notes = records.flatMap((r) => (r.action?.$case === "chaosNote" && r.action.value.note.startsWith(tag) ? [r.action.value.note] : []));
      return notes.length >= n;
    },
    { timeoutMs: 10_000, message: `${n} records tagged ${tag}` },
  );
  return notes;
}

describe("history outbox", () => {
  it("stores records published before the history stream existed, once it exists (they were lost)", async () => {
    nats = await startNats();
    const nc = await open(nats);
    const outbox = historyOutbox(nc, { ackWaitMs: 100 });
    const since = Date.now();
    const recorder = new HistoryRecorder(nc, "chaos", "outbox-early");
    for (let i = 0; i < 5; i++) recorder.record({ $case: "chaosNote", value: { note: `early-${i}` } }, {}, since + i);
    recorder.flush();
    // No stream takes the subject yet: JetStream answers no responders, and the message waits.
    await waitFor(() => outbox.resent > 0, { timeoutMs: 10_000, message: "the outbox to send the message again" });
    expect(outbox.waiting).toBe(1);
    await ensureHistoryStream(nc);
    expect(await outbox.settled(10_000)).toBe(true);
    const notes = await notesStored(nc, since, "early-", 5);
    expect(notes).toEqual(["early-0", "early-1", "early-2", "early-3", "early-4"]);
    expect(outbox.lost).toBe(0);
  });

  it("stores a message sent again before its acknowledgement came once (its Nats-Msg-Id)", async () => {
    nats = await startNats();
    const nc = await open(nats);
    await ensureHistoryStream(nc);
    // Every message is sent again at every tick until acknowledged.
    const outbox = historyOutbox(nc, { ackWaitMs: 0 });
    const since = Date.now();
    const recorder = new HistoryRecorder(nc, "chaos", "outbox-twice");
    for (let m = 0; m < 20; m++) {
      recorder.record({ $case: "chaosNote", value: { note: `twice-${m}` } }, {}, since + m);
      recorder.recordIn(`outbox-test:${m}`, {}, { $case: "chaosNote", value: { note: `twice-group-${m}` } }, {}, since + 100 + m);
      recorder.flush();
    }
    // Hold the event loop past a tick: Node runs due timers before it reads the socket, so the
    // tick sends every message again before any acknowledgement is read.
    const until = performance.now() + 50;
    while (performance.now() < until);
    expect(await outbox.settled(10_000)).toBe(true);
    expect(outbox.resent).toBeGreaterThan(0);
    const notes = await notesStored(nc, since, "twice-", 40);
    expect(notes).toHaveLength(40);
    expect(new Set(notes).size).toBe(40);
  });

  it("gives up on what is never stored within its bound, and says so", async () => {
    nats = await startNats();
    const nc = await open(nats);
    // The age bound is far beyond JetStream's "no responders" answer (milliseconds), so the loss
    // names it even on a busy machine.
    const outbox = historyOutbox(nc, { ackWaitMs: 50, maxAgeMs: 3000 });
    const losses: HistoryLoss[] = [];
    outbox.onLost((l) => losses.push(l));
    const recorder = new HistoryRecorder(nc, "chaos", "outbox-never");
    recorder.record({ $case: "chaosNote", value: { note: "never" } }, {});
    recorder.flush();
    await waitFor(() => losses.length > 0, { timeoutMs: 10_000, message: "the outbox to give the message up" });
    expect(losses).toEqual([{ messages: 1, reason: expect.stringMatching(/not stored within 3000 ms \(jetstream is not enabled \(no responders\)\)/) }]);
    expect(outbox.waiting).toBe(0);
    expect(outbox.lost).toBe(1);
  });

  it("drops the oldest beyond its byte bound, and says so", async () => {
    nats = await startNats();
    const nc = await open(nats);
    const outbox = historyOutbox(nc, { ackWaitMs: 60_000, maxBytes: 1000 });
    const losses: HistoryLoss[] = [];
    outbox.onLost((l) => losses.push(l));
    const recorder = new HistoryRecorder(nc, "chaos", "outbox-full");
    // No stream: nothing is acknowledged, so every message waits.
    for (let i = 0; i < 4; i++) {
      recorder.record({ $case: "chaosNote", value: { note: "x".repeat(400) } }, {});
      recorder.flush();
    }
    expect(losses.map((l) => l.messages).reduce((a, b) => a + b, 0)).toBe(2);
    expect(losses[0]!.reason).toMatch(/more than 1000 bytes waited/);
    expect(outbox.waiting).toBe(2);
  });

  it("takes its acknowledgements under a role's own inbox when the server authorizes by role", async () => {
    nats = await startNats({ auth: { anonymous: "refuse" } });
    const operator = await open(nats, { user: nats.operator!.user, pass: nats.operator!.pass });
    await ensureHistoryStream(operator);
    const kvm = (await nats.credentials("kvm", "kvm0"))!;
    const nc = await open(nats, natsConnectOptions(kvm.credential));
    // Never sent again within the test: only an acknowledgement received under the role's inbox
    // empties the outbox (however slow a busy machine makes it).
    const outbox = historyOutbox(nc, { ackWaitMs: 60_000 });
    const since = Date.now();
    const recorder = new HistoryRecorder(nc, "kvm", "kvm0");
    recorder.record({ $case: "chaosNote", value: { note: "as-kvm" } }, {}, since);
    recorder.flush();
    // Acknowledged: nothing waits, nothing was sent again (an ack the role may not receive would
    // leave the message waiting).
    expect(await outbox.settled(10_000)).toBe(true);
    expect(outbox.resent).toBe(0);
    expect(await notesStored(operator, since, "as-kvm", 1)).toEqual(["as-kvm"]);
  });
});
