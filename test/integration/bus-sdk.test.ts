import { afterEach, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { deliverySubject, encodeDeliveryBatch, encodeToken, startSubscriber } from "@ioasid/bus";
import { bus, events } from "@ioasid/proto";
import { startNats, type NatsServer } from "@ioasid/testkit";

// The subscriber SDK against a real nats-server, driven by hand-made deliveries (the core's side
// is exercised by delivery.test.ts).

let nats: NatsServer | undefined;
const conns: NatsConnection[] = [];
afterEach(async () => {
  for (const nc of conns.splice(0)) await nc.close();
  await nats?.stop();
  nats = undefined;
});

function event(seq: bigint, ioasid: number): events.IoasidEvent {
  return {
    seq,
    type: events.EventType.EVENT_TYPE_FREE,
    ioasid,
    generation: 1,
    spid: 0,
    setId: 1,
    tokenType: events.TokenType.TOKEN_TYPE_MM,
    token: 1n,
    privateData: Buffer.alloc(0),
    refcount: 2,
    commitTime: new Date(),
  };
}

async function deliver(nc: NatsConnection, subject: string, deliveries: Array<{ seq: bigint; ioasid: number; reg: number }>): Promise<bus.Ack[]> {
  const bytes = encodeDeliveryBatch(
    deliveries.map((d) => ({ registrationId: d.reg, attempt: 1, eventBytes: events.IoasidEvent.encode(event(d.seq, d.ioasid)).finish() })),
  );
  const reply = await nc.request(subject, bytes, { timeout: 2000 });
  return bus.AckBatch.decode(reply.data).acks;
}

describe("subscriber SDK", () => {
  it("answers a redelivered event from its memory without running the handler again", async () => {
    nats = await startNats();
    const [core, subConn] = await Promise.all([connect({ servers: nats.url }), connect({ servers: nats.url })]);
    conns.push(core, subConn);
    const calls: bigint[] = [];
    const sub = await startSubscriber({
      nc: subConn,
      name: "kvm",
      instance: "vm.1",
      handler: (e) => {
        calls.push(e.seq);
        return { release: ["vmcs"] };
      },
    });
    const subject = deliverySubject("ioasid.v1", "kvm", "vm.1");
    const first = await deliver(core, subject, [
      { seq: 5n, ioasid: 201, reg: 3 },
      { seq: 6n, ioasid: 202, reg: 3 },
    ]);
    const again = await deliver(core, subject, [{ seq: 5n, ioasid: 201, reg: 3 }]);
    expect(calls).toEqual([5n, 6n]);
    expect(again).toEqual([first[0]]);
    expect(first.map((a) => [a.seq, a.status, a.releases.map((r) => r.purpose)])).toEqual([
      [5n, bus.AckStatus.ACK_STATUS_SETTLED, ["vmcs"]],
      [6n, bus.AckStatus.ACK_STATUS_SETTLED, ["vmcs"]],
    ]);
    expect(sub.duplicates).toBe(1);
    expect(sub.handled).toBe(2);
    // The same sequence for another registration is another delivery.
    await deliver(core, subject, [{ seq: 5n, ioasid: 201, reg: 4 }]);
    expect(calls).toEqual([5n, 6n, 5n]);
  });

  it("acknowledges in delivery order, reports a failed handler as FAILED, and retries it next time", async () => {
    nats = await startNats();
    const [core, subConn] = await Promise.all([connect({ servers: nats.url }), connect({ servers: nats.url })]);
    conns.push(core, subConn);
    let fail = true;
    await startSubscriber({
      nc: subConn,
      name: "vdcm",
      instance: "idxd0",
      handler: async (e) => {
        await new Promise((r) => setTimeout(r, e.ioasid === 1 ? 30 : 1)); // out-of-order completion
        if (e.ioasid === 2 && fail) throw new Error("device busy");
      },
    });
    const subject = deliverySubject("ioasid.v1", "vdcm", "idxd0");
    const acks = await deliver(core, subject, [
      { seq: 1n, ioasid: 1, reg: 1 },
      { seq: 2n, ioasid: 2, reg: 1 },
      { seq: 3n, ioasid: 3, reg: 1 },
    ]);
    expect(acks.map((a) => [a.seq, a.status])).toEqual([
      [1n, bus.AckStatus.ACK_STATUS_SETTLED],
      [2n, bus.AckStatus.ACK_STATUS_FAILED],
      [3n, bus.AckStatus.ACK_STATUS_SETTLED],
    ]);
    expect(acks[1]!.error).toBe("device busy");
    fail = false;
    const retried = await deliver(core, subject, [{ seq: 2n, ioasid: 2, reg: 1 }]);
    expect(retried[0]!.status).toBe(bus.AckStatus.ACK_STATUS_SETTLED);
  });

  it("answers a redelivery that comes while the first handling still runs with that handling's ack: the handler runs once", async () => {
    nats = await startNats();
    const [core, subConn] = await Promise.all([connect({ servers: nats.url }), connect({ servers: nats.url })]);
    conns.push(core, subConn);
    let calls = 0;
    let finish: () => void = () => undefined;
    const sub = await startSubscriber({
      nc: subConn,
      name: "iommu",
      instance: "0",
      handler: async () => {
        calls++;
        await new Promise<void>((r) => (finish = r));
        return { release: ["bind"] };
      },
    });
    const subject = deliverySubject("ioasid.v1", "iommu", "0");
    const first = deliver(core, subject, [{ seq: 9n, ioasid: 301, reg: 2 }]);
    // The first handling has begun (and waits) before the redelivery is sent.
    while (calls === 0) await new Promise((r) => setTimeout(r, 5));
    const again = deliver(core, subject, [{ seq: 9n, ioasid: 301, reg: 2 }]);
    await new Promise((r) => setTimeout(r, 50));
    expect(calls).toBe(1);
    finish();
    const [a, b] = await Promise.all([first, again]);
    expect(b).toEqual(a);
    expect(a[0]).toMatchObject({ seq: 9n, status: bus.AckStatus.ACK_STATUS_SETTLED, releases: [{ purpose: "bind" }] });
    expect(calls).toBe(1);
    expect(sub.handled).toBe(1);
  });

  it("handles as new an event whose sequence is beyond 2^53 (a number could not tell it from its neighbours)", async () => {
    nats = await startNats();
    const [core, subConn] = await Promise.all([connect({ servers: nats.url }), connect({ servers: nats.url })]);
    conns.push(core, subConn);
    const calls: bigint[] = [];
    await startSubscriber({
      nc: subConn,
      name: "kvm",
      instance: "big",
      handler: (e) => void calls.push(e.seq),
    });
    const subject = deliverySubject("ioasid.v1", "kvm", "big");
    // 2^53 and 2^53 + 1 are two sequences, and one number (2^53) once converted.
    await deliver(core, subject, [{ seq: 2n ** 53n, ioasid: 1, reg: 1 }]);
    await deliver(core, subject, [{ seq: 2n ** 53n + 1n, ioasid: 2, reg: 1 }]);
    expect(calls).toEqual([2n ** 53n, 2n ** 53n + 1n]);
  });

  it("keeps names with dots and other characters inside one subject token", () => {
    expect(encodeToken("vm.1/a b")).toBe("vm~2e1~2fa~20b");
    expect(deliverySubject("ioasid.v1", "kvm", "vm.1").split(".")).toHaveLength(5);
  });
});
