import { BinaryReader } from "@bufbuild/protobuf/wire";
import type { bus, events } from "@ioasid/proto";

/**
 * `bus.DeliveryBatch.decode`, written out for the subscriber's hot path: the same messages, field
 * for field (decode-delivery-batch.test.ts compares the two on random batches with unknown fields
 * at every level, on fields sent twice and on random bytes). Profiled at 1,000 IOASIDs in flight (issue 15), the generated decoder
 * was the largest part of a subscriber's time per delivery: a recursion-depth property set and
 * restored on the reader for each message, a `Buffer.alloc(0)` per event for its private data
 * before the wire's replaces it, and the commit time read as a Timestamp object whose bigint
 * seconds become a Date through a decimal string. Here the commit time goes from the wire to the
 * Date with the same arithmetic, and an event's empty private data is made only when the wire has
 * none.
 *
 * Field numbers (proto/ioasid/bus/v1/bus.proto, events/v1/events.proto, google.protobuf.Timestamp):
 * DeliveryBatch.deliveries = 1; Delivery.registration_id = 1, event = 2, attempt = 3;
 * IoasidEvent.seq = 1 … refcount = 10, commit_time = 11; Timestamp.seconds = 1, nanos = 2.
 */
export function decodeDeliveryBatch(bytes: Uint8Array): bus.DeliveryBatch {
  const reader = new BinaryReader(bytes);
  const deliveries: bus.Delivery[] = [];
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (tag === 10) {
      deliveries.push(readDelivery(reader, reader.uint32()));
      continue;
    }
    if (endOfMessage(tag)) break;
    reader.skip(tag & 7);
  }
  return { deliveries };
}

/** The generated decoders stop at an end-group tag or a zero tag, else skip the unknown field. */
function endOfMessage(tag: number): boolean {
  return (tag & 7) === 4 || tag === 0;
}

function readDelivery(reader: BinaryReader, length: number): bus.Delivery {
  const end = reader.pos + length;
  const message: bus.Delivery = { registrationId: 0, event: undefined, attempt: 0 };
  while (reader.pos < end) {
    const tag = reader.uint32();
    switch (tag) {
      case 8:
        message.registrationId = reader.uint32();
        continue;
      case 18:
        message.event = readEvent(reader, reader.uint32());
        continue;
      case 24:
        message.attempt = reader.uint32();
        continue;
    }
    if (endOfMessage(tag)) break;
    reader.skip(tag & 7);
  }
  return message;
}

function readEvent(reader: BinaryReader, length: number): events.IoasidEvent {
  const end = reader.pos + length;
  const message: events.IoasidEvent = {
    seq: 0n,
    type: 0,
    ioasid: 0,
    generation: 0,
    spid: 0,
    setId: 0,
    tokenType: 0,
    token: 0n,
    privateData: undefined as unknown as Buffer,
    refcount: 0,
    commitTime: undefined,
  };
  while (reader.pos < end) {
    const tag = reader.uint32();
    switch (tag) {
      case 8:
        message.seq = reader.uint64() as bigint;
        continue;
      case 16:
        message.type = reader.int32() as events.EventType;
        continue;
      case 24:
        message.ioasid = reader.uint32();
        continue;
      case 32:
        message.generation = reader.uint32();
        continue;
      case 40:
        message.spid = reader.uint32();
        continue;
      case 48:
        message.setId = reader.uint32();
        continue;
      case 56:
        message.tokenType = reader.int32() as events.TokenType;
        continue;
      case 64:
        message.token = reader.uint64() as bigint;
        continue;
      case 74:
        // A copy, as the generated decoder makes: a handler may keep it past the batch's buffer.
        message.privateData = Buffer.from(reader.bytes());
        continue;
      case 80:
        message.refcount = reader.uint32();
        continue;
      case 90:
        message.commitTime = readTimestamp(reader, reader.uint32());
        continue;
    }
    if (endOfMessage(tag)) break;
    reader.skip(tag & 7);
  }
  // An empty Buffer of its own, as the generated decoder gives (made only when the wire had none).
  message.privateData ??= Buffer.alloc(0);
  return message;
}

/** A google.protobuf.Timestamp as the Date ts-proto's `fromTimestamp` makes of it. */
function readTimestamp(reader: BinaryReader, length: number): Date {
  const end = reader.pos + length;
  let seconds = 0n;
  let nanos = 0;
  while (reader.pos < end) {
    const tag = reader.uint32();
    if (tag === 8) {
      seconds = reader.int64() as bigint;
      continue;
    }
    if (tag === 16) {
      nanos = reader.int32();
      continue;
    }
    if (endOfMessage(tag)) break;
    reader.skip(tag & 7);
  }
  // fromTimestamp: (Number(seconds.toString()) || 0) * 1_000 + (nanos || 0) / 1_000_000.
  let millis = (Number(seconds) || 0) * 1_000;
  millis += (nanos || 0) / 1_000_000;
  return new Date(millis);
}
