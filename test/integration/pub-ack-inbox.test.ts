import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  ClosedConnectionError,
  connect,
  headers,
  NoRespondersError,
  PermissionViolationError,
  TimeoutError,
  type NatsConnection,
} from "@nats-io/transport-node";
import { JetStreamApiError, jetstreamManager } from "@nats-io/jetstream";
import { isTransientWriteError } from "@ioasid/ioasid-core";
import { PubAckInbox, pubAckInbox, ReplyInbox } from "@ioasid/bus";
import { natsConnectOptions } from "@ioasid/security";
import { startNats, type NatsServer } from "@ioasid/testkit";

// The operation log's acknowledgements on one inbox subscription (issue 15, the sequential durable
// Alloc): each answer must mean what nats.js's `js.publish` makes of it, because the op log tells
// a transient failure from the fence by the error (op-log.ts isTransientWriteError).

let nats: NatsServer;
let nc: NatsConnection;
beforeAll(async () => {
  nats = await startNats();
  nc = await connect({ servers: nats.url, inboxPrefix: "_INBOX.core.core" });
  await (await jetstreamManager(nc)).streams.add({ name: "PUBACK_TEST", subjects: ["puback.test"], storage: "file" });
});
afterAll(async () => {
  await nc?.close();
  await nats?.stop();
});

/** A connection as a role's user (KVM's VM 1), held to its permissions. */
async function connectAsKvm(options: { inboxPrefix?: string } = {}): Promise<NatsConnection> {
  const made = await nats.credentials("kvm", "vm-1");
  if (made === undefined) throw new Error("the test's nats-server has no authorization");
  return connect({ servers: nats.url, ...natsConnectOptions(made.credential), ...options });
}

describe("PubAckInbox", () => {
  it("resolves with the stream's acknowledgement; the same message id again is a duplicate, stored once", async () => {
    const acks = new PubAckInbox(nc);
    const first = await acks.publish("puback.test", new Uint8Array([1]), headers(), { msgID: "w:0", lastSequence: 0, timeoutMs: 5000 });
    expect(first).toMatchObject({ stream: "PUBACK_TEST", seq: 1, duplicate: false });
    const again = await acks.publish("puback.test", new Uint8Array([1]), headers(), { msgID: "w:0", lastSequence: 0, timeoutMs: 5000 });
    expect(again).toMatchObject({ stream: "PUBACK_TEST", seq: 1, duplicate: true });
    // Pipelined: answers find their own waiters.
    const many = await Promise.all(
      [1, 2, 3].map((n) => acks.publish("puback.test", new Uint8Array([n]), headers(), { msgID: `w:${n}`, lastSequence: n, timeoutMs: 5000 })),
    );
    expect(many.map((a) => a.seq)).toEqual([2, 3, 4]);
    expect(acks.waiting).toBe(0);
    acks.close();
  });

  it("rejects a write after another sequence with JetStream's error: final, the fence", async () => {
    const acks = new PubAckInbox(nc);
    const err = await acks
      .publish("puback.test", new Uint8Array([9]), headers(), { msgID: "w:late", lastSequence: 1, timeoutMs: 5000 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(JetStreamApiError);
    expect(String(err)).toMatch(/wrong last sequence/);
    expect(isTransientWriteError(err)).toBe(false);
    acks.close();
  });

  it("rejects when no stream takes the subject (no responders) and when nothing answers in time: both transient", async () => {
    const acks = new PubAckInbox(nc);
    const none = await acks
      .publish("puback.nostream", new Uint8Array([1]), headers(), { msgID: "n:0", lastSequence: 0, timeoutMs: 5000 })
      .catch((e: unknown) => e);
    expect(String(none)).toMatch(/jetstream is not enabled/);
    expect(isTransientWriteError(none)).toBe(true);
    // A plain subscriber takes the subject and never answers.
    const silent = nc.subscribe("puback.silent");
    const late = await acks
      .publish("puback.silent", new Uint8Array([1]), headers(), { msgID: "s:0", lastSequence: 0, timeoutMs: 200 })
      .catch((e: unknown) => e);
    expect(late).toBeInstanceOf(TimeoutError);
    expect(isTransientWriteError(late)).toBe(true);
    expect(acks.waiting).toBe(0);
    silent.unsubscribe();
    acks.close();
  });

  it("asks for answers under the connection's own inbox prefix (a role's user may subscribe only there)", async () => {
    const seen = nc.subscribe("puback.silent2", { max: 1 });
    const acks = new PubAckInbox(nc);
    const pending = acks.publish("puback.silent2", new Uint8Array([1]), headers(), { msgID: "p:0", lastSequence: 0, timeoutMs: 5000 });
    for await (const m of seen) expect(m.reply).toMatch(/^_INBOX\.core\.core\./);
    acks.close();
    await expect(pending).rejects.toThrow(/closed/);
  });

  it("publishes without JetStream's headers when given none (a role's state write), and is acknowledged", async () => {
    const seen = nc.subscribe("puback.test", { max: 1 });
    const h = headers();
    h.set("Ioasid-Key", "gp/30/200000");
    const ack = await pubAckInbox(nc).publish("puback.test", new Uint8Array([7]), h, { timeoutMs: 5000 });
    expect(ack).toMatchObject({ stream: "PUBACK_TEST", duplicate: false });
    for await (const m of seen) {
      expect(m.headers?.get("Ioasid-Key")).toBe("gp/30/200000");
      expect(m.headers?.has("Nats-Msg-Id")).toBe(false);
      expect(m.headers?.has("Nats-Expected-Last-Sequence")).toBe(false);
    }
  });

  it("is one per connection (pubAckInbox), another for another connection", async () => {
    const other = await connect({ servers: nats.url, inboxPrefix: "_INBOX.core.core" });
    try {
      expect(pubAckInbox(nc)).toBe(pubAckInbox(nc));
      expect(pubAckInbox(other)).not.toBe(pubAckInbox(nc));
    } finally {
      await other.close();
    }
  });

  it("rejects a write still unanswered when its connection closes with ClosedConnectionError, as nats.js rejects a request, not at its timeout", async () => {
    const other = await connect({ servers: nats.url, inboxPrefix: "_INBOX.core.core" });
    const silent = nc.subscribe("puback.silent3");
    await nc.flush(); // the server knows the subscriber before the other connection publishes
    const acks = new PubAckInbox(other);
    // A timeout far beyond the test's own: only the close can end the wait in time.
    const pending = acks.publish("puback.silent3", new Uint8Array([1]), headers(), { timeoutMs: 10 * 60_000 }).catch((e: unknown) => e);
    await other.flush();
    await other.close();
    expect(await pending).toBeInstanceOf(ClosedConnectionError);
    expect(acks.waiting).toBe(0);
    silent.unsubscribe();
  });
});

// The delivery engine's batches go through a ReplyInbox; it tells a subscriber that is gone ("no
// responders") from one that does not answer in time (DEADLINE_EXCEEDED) by these errors' messages.
describe("ReplyInbox", () => {
  it("resolves with the reply, its headers kept; pipelined replies find their own requests", async () => {
    const responder = nc.subscribe("reply.echo", {
      callback: (_e, m) => {
        const h = headers();
        h.set("Echoed", String(m.data[0]));
        m.respond(m.data, { headers: h });
      },
    });
    await nc.flush();
    const replies = new ReplyInbox(nc);
    const answers = await Promise.all([3, 1, 2].map((n) => replies.request("reply.echo", new Uint8Array([n]), { timeoutMs: 5000 })));
    expect(answers.map((m) => [m.data[0], m.headers?.get("Echoed")])).toEqual([
      [3, "3"],
      [1, "1"],
      [2, "2"],
    ]);
    expect(replies.waiting).toBe(0);
    responder.unsubscribe();
    replies.close();
  });

  it("rejects with NoRespondersError when nobody takes the subject, and TimeoutError when nobody answers in time", async () => {
    const replies = new ReplyInbox(nc);
    const none = await replies.request("reply.nobody", new Uint8Array([1]), { timeoutMs: 5000 }).catch((e: unknown) => e);
    expect(none).toBeInstanceOf(NoRespondersError);
    expect(String(none)).toMatch(/no responders: 'reply\.nobody'/);
    const silent = nc.subscribe("reply.silent");
    await nc.flush();
    const late = await replies.request("reply.silent", new Uint8Array([1]), { timeoutMs: 100 }).catch((e: unknown) => e);
    expect(late).toBeInstanceOf(TimeoutError);
    expect(String(late)).toMatch(/timeout/);
    expect(replies.waiting).toBe(0);
    silent.unsubscribe();
    replies.close();
  });

  it("rejects at once with the server's PermissionViolationError a request its user may not publish, as nats.js does", async () => {
    // A role's user (KVM's VM 1) may not publish on the subject: the server refuses the publish and
    // says so on the connection; nothing would ever answer.
    const kvm = await connectAsKvm();
    try {
      const replies = new ReplyInbox(kvm);
      // A timeout far beyond the test's own: only the server's refusal can end the wait in time.
      const refused = await replies.request("reply.forbidden", new Uint8Array([1]), { timeoutMs: 10 * 60_000 }).catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(PermissionViolationError);
      expect(refused).toMatchObject({ operation: "publish", subject: "reply.forbidden" });
      expect(replies.waiting).toBe(0);
      replies.close();
    } finally {
      await kvm.close();
    }
  });

  it("fails what waits when the server refuses its inbox subscription, and subscribes again for the next request", async () => {
    // The same user asking for replies outside its own inbox prefix: the subscription is refused.
    const kvm = await connectAsKvm({ inboxPrefix: "_INBOX.other" });
    try {
      const replies = new ReplyInbox(kvm);
      for (const attempt of [1, 2]) {
        // Each attempt's subscription is refused at once; a dead one kept would let the second wait ten minutes.
        const refused = await replies.request(`reply.refused${attempt}`, new Uint8Array([1]), { timeoutMs: 10 * 60_000 }).catch((e: unknown) => e);
        expect(refused).toBeInstanceOf(PermissionViolationError);
        expect(refused).toMatchObject({ operation: "subscription" });
      }
      expect(replies.waiting).toBe(0);
      replies.close();
    } finally {
      await kvm.close();
    }
  });
});
