import { describe, expect, it } from "vitest";
import { bus, events } from "@ioasid/proto";
import {
  checkExample,
  exampleMessage,
  formatFailures,
  messageCodec,
  parseMessageContract,
  verifyInteraction,
  verifyMessage,
  type CapturedMessage,
  type MessageInteraction,
} from "./message-contract.js";

const FREE_EVENT = { seq: "44", type: "EVENT_TYPE_FREE", ioasid: 3, generation: 1, spid: 6, setId: 2 };

/** A consumer of FREE deliveries, in the shape of contracts/messages/*.delivery.json. */
const FREE: MessageInteraction = {
  description: "FREE",
  given: "an IOASID is freed",
  messageType: "ioasid.bus.v1.DeliveryBatch",
  subject: "<prefix>.deliver.vdcm.<instance>",
  headers: {
    "Ioasid-First-Seq": { type: "uint64", sameAs: "deliveries[0].event.seq" },
    "Ioasid-Count": { countOf: "deliveries" },
  },
  matchers: {
    deliveries: { minItems: 1 },
    "deliveries[*].event.type": { type: "enum", oneOf: ["EVENT_TYPE_FREE"] },
    "deliveries[*].event.ioasid": { type: "uint32", min: 1 },
    "deliveries[*].event.seq": { type: "uint64", min: 1 },
  },
  example: {
    subject: "<prefix>.deliver.vdcm.vdcm0",
    headers: { "Ioasid-First-Seq": "44", "Ioasid-Count": "1" },
    message: { deliveries: [{ registrationId: 8, event: FREE_EVENT, attempt: 1 }] },
  },
};

function batch(...evs: Array<Partial<events.IoasidEvent>>): Uint8Array {
  return bus.DeliveryBatch.encode({ deliveries: evs.map((e) => ({ registrationId: 8, attempt: 1, event: events.IoasidEvent.fromPartial(e) })) }).finish();
}

function captured(data: Uint8Array, headers: Record<string, string>, subject = "ioasid.v1.deliver.vdcm.vdcm0"): CapturedMessage {
  return { subject, headers, data };
}

const free = (seq: bigint, ioasid: number): Partial<events.IoasidEvent> => ({ seq, type: events.EventType.EVENT_TYPE_FREE, ioasid, generation: 1, setId: 2 });

describe("verifyMessage", () => {
  it("accepts a message that meets every matcher and header", () => {
    const data = batch(free(44n, 3), free(45n, 4));
    expect(verifyMessage(FREE, captured(data, { "Ioasid-First-Seq": "44", "Ioasid-Count": "2" }))).toEqual([]);
  });

  it("names the concrete path, what was expected and what came", () => {
    const data = batch(free(44n, 3), { ...free(45n, 0), type: events.EventType.EVENT_TYPE_BIND });
    const failures = verifyMessage(FREE, captured(data, { "Ioasid-First-Seq": "44", "Ioasid-Count": "2" }));
    expect(failures).toEqual([
      { interaction: "FREE", path: "deliveries[1].event.type", expected: "one of EVENT_TYPE_FREE", got: '"EVENT_TYPE_BIND"' },
      // proto3 JSON leaves a 0 out; the matcher's type says what that means.
      { interaction: "FREE", path: "deliveries[1].event.ioasid", expected: "an integer in [1, …]", got: "0" },
    ]);
    expect(formatFailures(failures)).toContain("FREE: deliveries[1].event.type: expected one of EVENT_TYPE_FREE, got");
    expect(formatFailures([failures[0]!, failures[0]!])).toMatch(/got "EVENT_TYPE_BIND" \(in 2 messages\)$/);
  });

  it("checks headers against the body, and a missing header", () => {
    const data = batch(free(44n, 3));
    expect(verifyMessage(FREE, captured(data, { "Ioasid-First-Seq": "43" }))).toEqual([
      { interaction: "FREE", path: "header Ioasid-First-Seq", expected: 'the same as deliveries[0].event.seq ("44")', got: '"43"' },
      { interaction: "FREE", path: "header Ioasid-Count", expected: "a value", got: "no such header" },
    ]);
  });

  it("refuses a wildcard over an empty list, and a message on another subject", () => {
    const failures = verifyMessage(FREE, captured(new Uint8Array(), { "Ioasid-First-Seq": "0", "Ioasid-Count": "0" }, "ioasid.v1.deliver.kvm.vm-1"));
    expect(failures.map((f) => f.path)).toEqual(["subject", "deliveries", "deliveries[*]", "deliveries[*]", "deliveries[*]"]);
  });

  it("reads a reply against the request it answers ($request, with [*] aligned)", () => {
    const ack: MessageInteraction = {
      description: "ack",
      given: "settles",
      messageType: "ioasid.bus.v1.AckBatch",
      replyTo: "<prefix>.deliver.<name>.<instance>",
      requestType: "ioasid.bus.v1.DeliveryBatch",
      matchers: {
        acks: { countOf: "$request.deliveries" },
        "acks[*].seq": { type: "uint64", sameAs: "$request.deliveries[*].event.seq" },
        "acks[*].status": { type: "enum", oneOf: ["ACK_STATUS_SETTLED"] },
      },
      example: { subject: "<prefix>.deliver.vdcm.vdcm0", request: FREE.example.message, message: { acks: [{ seq: "1", status: "ACK_STATUS_SETTLED" }] } },
    };
    const request = { subject: "ioasid.v1.deliver.vdcm.vdcm0", data: batch(free(44n, 3), free(45n, 4)) };
    const settled = bus.AckStatus.ACK_STATUS_SETTLED;
    const reply = (acks: Array<Partial<bus.Ack>>) => bus.AckBatch.encode(bus.AckBatch.fromPartial({ acks })).finish();
    const good = reply([
      { seq: 44n, status: settled },
      { seq: 45n, status: settled },
    ]);
    expect(verifyMessage(ack, { subject: "_INBOX.x", headers: {}, data: good, request })).toEqual([]);
    const swapped = reply([
      { seq: 45n, status: settled },
      { seq: 44n, status: bus.AckStatus.ACK_STATUS_FAILED },
    ]);
    expect(verifyMessage(ack, { subject: "_INBOX.x", headers: {}, data: swapped, request }).map((f) => `${f.path}: ${f.got}`)).toEqual([
      'acks[0].seq: "45"',
      'acks[1].seq: "44"',
      'acks[1].status: "ACK_STATUS_FAILED"',
    ]);
    // The example answers the request it is given: its seq comes from the request.
    const answer = exampleMessage(ack, { request: { subject: request.subject, headers: {}, data: batch(free(77n, 3)) } });
    expect(bus.AckBatch.decode(answer.data).acks[0]!.seq).toBe(77n);
    expect(checkExample(ack)).toEqual([]);
  });
});

describe("verifyInteraction", () => {
  it("needs at least one message on the interaction's subject", () => {
    const other = captured(batch(free(44n, 3)), {}, "ioasid.v1.deliver.kvm.vm-1");
    expect(verifyInteraction(FREE, [other])).toEqual([
      {
        interaction: "FREE",
        path: "subject",
        expected: 'a message on <prefix>.deliver.vdcm.<instance> given "an IOASID is freed"',
        got: "only ioasid.v1.deliver.kvm.vm-1",
      },
    ]);
    expect(verifyInteraction(FREE, [other], { prefix: "other.v2" })[0]!.got).toBe("only ioasid.v1.deliver.kvm.vm-1");
  });
});

describe("checkExample", () => {
  it("passes an example that shows every field relied on and meets its interaction", () => {
    expect(checkExample(FREE)).toEqual([]);
    expect(exampleMessage(FREE, { prefix: "p.v9" }).subject).toBe("p.v9.deliver.vdcm.vdcm0");
  });

  it("refuses an example that is not canonical proto3 JSON: a misspelt key, or a default written out", () => {
    const misspelt = {
      ...FREE,
      example: { ...FREE.example, message: { deliveries: [{ registrationId: 8, event: { ...FREE_EVENT, set_id: 2 }, attempt: 1 }] } },
    };
    expect(checkExample(misspelt).map((f) => f.path)).toEqual(["example.message.deliveries[0].event.set_id"]);
    const zero = { ...FREE, example: { ...FREE.example, message: { deliveries: [{ registrationId: 8, event: { ...FREE_EVENT, refcount: 0 }, attempt: 1 }] } } };
    expect(checkExample(zero).map((f) => f.path)).toEqual(["example.message.deliveries[0].event.refcount"]);
  });

  it("refuses a matcher on a field the example does not show (a misspelt path)", () => {
    const typo = { ...FREE, matchers: { ...FREE.matchers, "deliveries[*].event.ioasld": { type: "uint32" as const } } };
    expect(checkExample(typo)).toEqual([
      { interaction: "FREE", path: "example.message.deliveries[*].event.ioasld", expected: "shown in the example", got: "absent" },
    ]);
  });
});

describe("parseMessageContract", () => {
  const contract = { format: "ioasid-message-contract/1", consumer: "vdcm", provider: "core", description: "d", interactions: [FREE] };

  it("takes a well-formed contract", () => {
    expect(parseMessageContract(structuredClone(contract)).interactions).toHaveLength(1);
  });

  it("lists every problem: unknown matcher keys, bad paths, unknown message types", () => {
    const bad = structuredClone(contract) as unknown as { interactions: Array<Record<string, unknown>> };
    bad.interactions[0]!["messageType"] = "ioasid.bus.v1.Nope";
    bad.interactions[0]!["matchers"] = { "deliveries[x]": { type: "uint32" }, deliveries: { minitems: 1 } };
    expect(() => parseMessageContract(bad, "x.json")).toThrow(
      /x\.json: invalid message contract:\n {2}- interactions\[0\]\.messageType: unknown message type ioasid\.bus\.v1\.Nope.*\n.*bad path "deliveries\[x\]".*\n.*unknown matcher key "minitems"/,
    );
  });
});

describe("messageCodec", () => {
  it("finds a generated codec by its full name", () => {
    expect(messageCodec("ioasid.bus.v1.HelloReply")).toBe(bus.HelloReply);
    expect(messageCodec("ioasid.events.v1.IoasidEvent")).toBe(events.IoasidEvent);
    expect(() => messageCodec("ioasid.bus.v9.Hello")).toThrow(/unknown message type/);
  });
});
