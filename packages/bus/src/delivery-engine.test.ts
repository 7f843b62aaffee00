import { describe, expect, it } from "vitest";
import { bus, events } from "@ioasid/proto";
import { encodeDeliveryBatch } from "./delivery-engine.js";

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
