import { describe, expect, it } from "vitest";
import { bus, events } from "@ioasid/proto";
import { DeliveryEngine, encodeDeliveryBatch } from "./delivery-engine.js";

describe("encodeDeliveryBatch", () => {
  it("writes the same bytes a DeliveryBatch encodes to, from events encoded once", () => {
    const event = (seq: bigint, ioasid: number): events.IoasidEvent => ({
      seq,
      type: events.EventType.EVENT_TYPE_FREE,
      ioasid,
      generation: 3,
      spid: 101,
      setId: 7,
      tokenType: events.TokenType.TOKEN_TYPE_MM,
      token: 0xffff_ffff_ffffn,
      privateData: Buffer.from("pd"),
      refcount: 4,
      commitTime: new Date(1_795_000_000_123),
    });
    const deliveries = [
      { registrationId: 1, event: event(10n, 201), attempt: 1 },
      { registrationId: 300, event: event(11n, 202), attempt: 7 },
    ];
    const ours = encodeDeliveryBatch(deliveries.map((d) => ({ ...d, eventBytes: events.IoasidEvent.encode(d.event).finish() })));
    expect(Buffer.from(ours)).toEqual(Buffer.from(bus.DeliveryBatch.encode({ deliveries }).finish()));
    expect(bus.DeliveryBatch.decode(ours)).toEqual({ deliveries });
  });
});

describe("DeliveryEngine flow control per subscriber name (issue 15)", () => {
  /** A connection whose requests (the engine's `requests`) the test answers or fails by hand. */
  class ManualRequests {
    readonly open: Array<{ subject: string; batch: bus.DeliveryBatch; answer: () => void; timeOut: () => void }> = [];
    request(subject: string, data: Uint8Array): Promise<{ data: Uint8Array; headers: undefined }> {
      const batch = bus.DeliveryBatch.decode(data);
      return new Promise((resolve, reject) => {
        const entry = {
          subject,
          batch,
          answer: () => {
            this.open.splice(this.open.indexOf(entry), 1);
            const acks = batch.deliveries.map((d) => ({ seq: d.event!.seq, registrationId: d.registrationId, status: bus.AckStatus.ACK_STATUS_SETTLED }));
            resolve({ data: bus.AckBatch.encode(bus.AckBatch.fromPartial({ acks })).finish(), headers: undefined });
          },
          timeOut: () => {
            this.open.splice(this.open.indexOf(entry), 1);
            reject(new Error("TIMEOUT"));
          },
        };
        this.open.push(entry);
      });
    }
    subscribe(): { unsubscribe(): void } {
      return { unsubscribe: () => undefined };
    }
    outstanding(): number {
      return this.open.reduce((n, r) => n + r.batch.deliveries.length, 0);
    }
  }
  const settle = () => new Promise((r) => setTimeout(r, 0));

  /** 40 instances of "kvm" (one process, as KVM's VMs), 40 events each: batches of 40. */
  function crowd(maxInFlightPerName: number) {
    const nc = new ManualRequests();
    const missed: number[] = [];
    const acked: number[] = [];
    const engine = new DeliveryEngine({
      nc: nc as unknown as ConstructorParameters<typeof DeliveryEngine>[0]["nc"],
      requests: nc,
      maxInFlightPerName,
      retryMs: 5,
      onAcks: (acks) => acked.push(...acks.map((a) => a.seq)),
      onMissed: (m) => missed.push(...m.map((x) => x.seq)),
    });
    let seq = 0;
    const submit = (vms: number) => {
      for (let vm = 1; vm <= vms; vm++) {
        for (let i = 0; i < 40; i++) {
          seq++;
          engine.submit({
            seq,
            key: `ioasid:${seq}`,
            event: events.IoasidEvent.fromPartial({ seq: BigInt(seq), type: events.EventType.EVENT_TYPE_FREE, ioasid: seq }),
            targets: [{ registrationId: vm, subscriber: { name: "kvm", instance: `vm-${vm}` }, priority: 3 }],
          });
        }
      }
    };
    submit(40);
    return { nc, engine, missed, acked, submit };
  }

  it("keeps at most the bound out to one name across its instances, and sends what waits as answers come, in order", async () => {
    const { nc, engine, acked, missed } = crowd(100);
    await settle();
    // Two batches of 40 fit in 100; the third waits.
    expect(nc.open.map((r) => r.subject.split(".").at(-1))).toEqual(["vm-1", "vm-2"]);
    expect(engine.inFlight()).toEqual([{ name: "kvm", deliveries: 80, waitingBatches: 38 }]);
    let rounds = 0;
    while (nc.open.length > 0 && rounds++ < 40) {
      expect(nc.outstanding()).toBeLessThanOrEqual(100);
      for (const r of [...nc.open]) r.answer();
      await settle();
    }
    expect(rounds).toBe(20); // two batches of 40 a round
    expect(nc.open).toEqual([]);
    expect(acked).toHaveLength(1600);
    expect(missed).toEqual([]);
    await engine.idle();
  });

  it("lifts the bound once a batch misses its deadline (a hung process found out in one more deadline), and bounds again once the name answers", async () => {
    const { nc, engine, missed, acked, submit } = crowd(100);
    await settle();
    expect(nc.outstanding()).toBe(80);
    nc.open[0]!.timeOut();
    await settle();
    // Everything that waited is out at once: the 39 other instances' batches, and vm-1's missed
    // batch again (its backlog, drained at once while the name is unbounded).
    expect(missed).toHaveLength(40);
    expect(nc.outstanding()).toBe(1600);
    expect(engine.inFlight()).toEqual([{ name: "kvm", deliveries: 1600, waitingBatches: 0 }]);
    for (const r of [...nc.open]) r.timeOut();
    await settle();
    expect(missed).toHaveLength(1600);
    // The process answers again: every backlog drained (vm-1's, whose drain timed out too, by the
    // engine's retry), and answers bound the name again…
    engine.start();
    let rounds = 0;
    while (new Set(acked).size < 1600 && rounds++ < 500) {
      for (const r of [...nc.open]) r.answer();
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(new Set(acked).size).toBe(1600);
    expect(nc.open).toEqual([]);
    // …so new work is bounded: three instances' batches of 40, two out.
    submit(3);
    await settle();
    expect(nc.outstanding()).toBe(80);
    expect(engine.inFlight()).toEqual([{ name: "kvm", deliveries: 80, waitingBatches: 1 }]);
    await engine.stop();
  });
});
