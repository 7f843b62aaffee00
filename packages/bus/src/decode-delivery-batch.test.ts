import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { bus, events } from "@ioasid/proto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decodeDeliveryBatch } from "./decode-delivery-batch.js";
import { encodeDeliveryBatch } from "./delivery-engine.js";

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
// Dates a Timestamp can carry and a Date can hold (±8.64e15 ms), at millisecond and finer steps.
const commitTime = fc.option(fc.record({ seconds: fc.integer({ min: -8_000_000_000, max: 8_000_000_000 }), nanos: fc.integer({ min: 0, max: 999_999_999 }) }), {
  nil: undefined,
});

const event = fc.record({
  seq: u64,
  type: fc.integer({ min: 0, max: 6 }),
  ioasid: u32,
  generation: u32,
  spid: u32,
  setId: u32,
  tokenType: fc.integer({ min: 0, max: 3 }),
  token: u64,
  privateData: fc.uint8Array({ maxLength: 40 }),
  refcount: u32,
  commitTime,
});

/** An event's bytes as the core writes them (ts-proto), with its commit time from (seconds, nanos). */
type GeneratedEvent = typeof event extends fc.Arbitrary<infer T> ? T : never;

function eventBytes(e: GeneratedEvent, extra: number): Uint8Array {
  const w = new BinaryWriter();
  events.IoasidEvent.encode({ ...e, privateData: Buffer.from(e.privateData), commitTime: undefined }, w);
  if (e.commitTime !== undefined) {
    // Written by hand so that nanos below a millisecond and negative seconds reach the decoder as
    // sent, with unknown fields inside the Timestamp too.
    w.uint32(90).fork();
    if (e.commitTime.seconds !== 0) w.uint32(8).int64(e.commitTime.seconds);
    w.raw(unknownFields(extra >> 4));
    if (e.commitTime.nanos !== 0) w.uint32(16).int32(e.commitTime.nanos);
    w.join();
  }
  w.raw(unknownFields(extra));
  return w.finish();
}

interface GeneratedDelivery {
  readonly registrationId: number;
  readonly attempt: number;
  readonly event: GeneratedEvent;
  readonly extra: number;
  /** A second registration id sent after the first (the last one counts), or none. */
  readonly again: number | undefined;
}

/** A DeliveryBatch with unknown fields at every level (batch, delivery, event, timestamp) and fields sent twice. */
function batchBytes(items: readonly GeneratedDelivery[], extra: number): Uint8Array {
  const w = new BinaryWriter();
  w.raw(unknownFields(extra));
  for (const i of items) {
    w.uint32(10).fork();
    if (i.registrationId !== 0) w.uint32(8).uint32(i.registrationId);
    w.uint32(18).bytes(eventBytes(i.event, i.extra));
    w.raw(unknownFields(i.extra >> 2));
    if (i.attempt !== 0) w.uint32(24).uint32(i.attempt);
    if (i.again !== undefined) w.uint32(8).uint32(i.again);
    w.join();
  }
  w.raw(unknownFields(extra >> 2));
  return w.finish();
}

/** An unknown field of each wire type (varint, fixed64, length-delimited, fixed32), numbered past the known ones. */
function unknownFields(which: number): Uint8Array {
  const w = new BinaryWriter();
  if (which & 1) w.uint32((20 << 3) | 0).uint64(123456789012345n);
  if (which & 2) w.uint32((21 << 3) | 1).fixed64(7n);
  if (which & 4) w.uint32((22 << 3) | 2).bytes(new Uint8Array([1, 2, 3]));
  if (which & 8) w.uint32((23 << 3) | 5).fixed32(9);
  return w.finish();
}

describe("decodeDeliveryBatch", () => {
  it("decodes what bus.DeliveryBatch.decode decodes, field for field, on random batches", () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            registrationId: u32,
            attempt: u32,
            event,
            extra: fc.integer({ min: 0, max: 255 }),
            again: fc.option(u32, { nil: undefined }),
          }),
          { maxLength: 12 },
        ),
        fc.integer({ min: 0, max: 63 }),
        (items, extra) => {
          const bytes = batchBytes(items, extra);
          expect(decodeDeliveryBatch(bytes)).toStrictEqual(bus.DeliveryBatch.decode(bytes));
        },
      ),
      { numRuns: 300 },
    );
  });

  it("decodes as the engine encodes (encodeDeliveryBatch), and agrees with the generated decoder on random bytes: the same batch or both refuse", () => {
    fc.assert(
      fc.property(fc.array(fc.record({ registrationId: u32, attempt: u32, event }), { maxLength: 6 }), (items) => {
        const bytes = encodeDeliveryBatch(items.map((i) => ({ registrationId: i.registrationId, attempt: i.attempt, eventBytes: eventBytes(i.event, 0) })));
        expect(decodeDeliveryBatch(bytes)).toStrictEqual(bus.DeliveryBatch.decode(bytes));
      }),
      { numRuns: 100 },
    );
    const outcome = (decode: () => unknown): unknown => {
      try {
        return { value: decode() };
      } catch {
        return "refused";
      }
    };
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), (bytes) => {
        expect(outcome(() => decodeDeliveryBatch(bytes))).toStrictEqual(outcome(() => bus.DeliveryBatch.decode(bytes)));
      }),
      { numRuns: 2000 },
    );
  });

  it("gives each delivery the values the core sent: the commit time as the Date ts-proto makes, private data as a copy", () => {
    const bytes = encodeDeliveryBatch([
      {
        registrationId: 7,
        attempt: 2,
        eventBytes: events.IoasidEvent.encode({
          seq: 2n ** 53n + 5n,
          type: events.EventType.EVENT_TYPE_FREE,
          ioasid: 201,
          generation: 3,
          spid: 9,
          setId: 4,
          tokenType: events.TokenType.TOKEN_TYPE_MM,
          token: 2n ** 64n - 1n,
          privateData: Buffer.from([5, 6]),
          refcount: 1,
          commitTime: new Date(1_796_675_889_014),
        }).finish(),
      },
      { registrationId: 8, attempt: 1, eventBytes: events.IoasidEvent.encode({ ...events.IoasidEvent.fromPartial({}), seq: 1n }).finish() },
    ]);
    const [first, second] = decodeDeliveryBatch(bytes).deliveries;
    expect(first).toMatchObject({ registrationId: 7, attempt: 2 });
    expect(first!.event).toMatchObject({ seq: 2n ** 53n + 5n, ioasid: 201, token: 2n ** 64n - 1n, refcount: 1 });
    expect(first!.event!.commitTime!.getTime()).toBe(1_796_675_889_014);
    expect(Buffer.isBuffer(first!.event!.privateData)).toBe(true);
    expect([...first!.event!.privateData]).toEqual([5, 6]);
    expect(first!.event!.privateData.buffer).not.toBe(bytes.buffer);
    expect(second!.event).toMatchObject({ seq: 1n, commitTime: undefined });
    expect(second!.event!.privateData.length).toBe(0);
  });

  it("keeps the last of a field sent twice and skips a known field number with the wrong wire type, as the generated decoder does", () => {
    const w = new BinaryWriter();
    w.uint32(10).fork();
    w.uint32(8).uint32(1); // registration 1 …
    w.uint32(8).uint32(2); // … then 2: the last wins
    w.uint32((3 << 3) | 2).bytes(new Uint8Array([9])); // attempt as bytes: skipped
    w.join();
    const bytes = w.finish();
    expect(decodeDeliveryBatch(bytes)).toStrictEqual(bus.DeliveryBatch.decode(bytes));
    expect(decodeDeliveryBatch(bytes).deliveries[0]).toMatchObject({ registrationId: 2, attempt: 0 });
  });
});
