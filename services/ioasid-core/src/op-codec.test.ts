import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { EventType, Priority, TokenType } from "@ioasid/ioasid";
import { oplog, type events } from "@ioasid/proto";
import { decodeMessage, encodeBatch, encodeOperation, encodeSeal, OpLogFormat, OpLogFormatError, type StoredMessage } from "./op-codec.js";
import type { CommittedOperation, OperationKind } from "./operation.js";

// The op log's wire format (ioasid.oplog.v1) against the operations the model applies: what the
// core writes is read back exactly as it was applied (replay applies the same operations), and
// anything else is refused — never misread.

const T = 1_700_000_000_123;
const kvm = { role: "kvm", instance: "vm-7", purpose: "vmcs" };
const U32 = 0xffffffff;

/** Every kind of operation, with edge values (one record per kind: adding a kind without one fails to compile). */
const EXAMPLES: Record<OperationKind, CommittedOperation[]> = {
  createSet: [
    { kind: "createSet", token: { type: TokenType.MM, value: 0xffff_ffff_ffff_ffffn }, quota: 0, commitTimeMs: T },
    { kind: "createSet", token: { type: TokenType.NONE, value: 5n }, quota: 16, commitTimeMs: T },
  ],
  adjustSet: [{ kind: "adjustSet", setId: 3, quota: U32, commitTimeMs: T }],
  destroySet: [{ kind: "destroySet", setId: 1, commitTimeMs: T }],
  freeSet: [{ kind: "freeSet", setId: 2, commitTimeMs: T }],
  alloc: [
    { kind: "alloc", setId: 1, commitTimeMs: T },
    { kind: "alloc", setId: 1, min: 0, max: 0, privateData: Buffer.alloc(0), allocatorIoasid: 0, commitTimeMs: T },
    { kind: "alloc", setId: 1, min: 100, max: U32, privateData: Buffer.from([1, 2, 3]), allocatorIoasid: 77, commitTimeMs: T },
  ],
  batchAlloc: [
    { kind: "batchAlloc", setId: 1, count: 64, commitTimeMs: T },
    { kind: "batchAlloc", setId: 1, count: 2, min: 10, max: 20, commitTimeMs: T },
  ],
  free: [{ kind: "free", setId: 1, ioasid: 201, generation: 0, commitTimeMs: T }],
  get: [{ kind: "get", setId: 1, ioasid: 201, holder: kvm, generation: 3, commitTimeMs: T }],
  put: [
    { kind: "put", setId: 1, ioasid: 201, holder: kvm, generation: 0, commitTimeMs: T },
    // An operator's force-release: its audit travels in the log (issue 14).
    {
      kind: "put",
      setId: 1,
      ioasid: 201,
      holder: kvm,
      generation: 4,
      audit: { operator: "operator/alice", reason: "vm-7 is gone", onBehalfOf: "" },
      commitTimeMs: T,
    },
  ],
  findBySpid: [{ kind: "findBySpid", setId: 1, spid: 9, holder: kvm, commitTimeMs: T }],
  attachSpid: [{ kind: "attachSpid", setId: 1, ioasid: 201, spid: 9, generation: 2, commitTimeMs: T }],
  detachSpid: [{ kind: "detachSpid", setId: 1, ioasid: 201, generation: 2, commitTimeMs: T }],
  attachData: [
    { kind: "attachData", setId: 1, ioasid: 201, data: Buffer.from("ctx"), generation: 0, commitTimeMs: T },
    { kind: "attachData", setId: 1, ioasid: 201, data: Buffer.alloc(0), generation: 0, commitTimeMs: T },
  ],
  detachData: [{ kind: "detachData", setId: 1, ioasid: 201, generation: 1, commitTimeMs: T }],
  register: [
    {
      kind: "register",
      options: { subscriber: { name: "kvm", instance: "vm-7" }, priority: Priority.CPU, scope: { kind: "mm", token: 0xdead_beef_0000_0001n }, events: [] },
      commitTimeMs: T,
    },
    {
      kind: "register",
      options: {
        subscriber: { name: "iommu", instance: "dmar0" },
        priority: Priority.IOMMU,
        scope: { kind: "global" },
        events: [EventType.FREE, EventType.SET_FREE],
      },
      commitTimeMs: T,
    },
    {
      kind: "register",
      options: { subscriber: { name: "vdcm", instance: "idxd0" }, priority: Priority.LAST, scope: { kind: "set", setId: 0 }, events: [EventType.ALLOC] },
      commitTimeMs: T,
    },
  ],
  unregister: [{ kind: "unregister", registrationId: 4, commitTimeMs: T }],
  registerAllocator: [
    { kind: "registerAllocator", name: "vcmd", address: "127.0.0.1:50999", commitTimeMs: T },
    {
      kind: "registerAllocator",
      name: "vcmd",
      address: "127.0.0.1:50999",
      audit: { operator: "operator/ops-1", reason: "", onBehalfOf: "ticket 42" },
      commitTimeMs: T,
    },
  ],
  unregisterAllocator: [
    { kind: "unregisterAllocator", name: "vcmd", commitTimeMs: T },
    { kind: "unregisterAllocator", name: "vcmd", audit: { operator: "operator/ops-1", reason: "back to the default", onBehalfOf: "" }, commitTimeMs: T },
  ],
  acks: [
    {
      kind: "acks",
      subscriber: { name: "iommu", instance: "dmar0" },
      acks: [
        { seq: 12, registrationId: 3 },
        { seq: Number.MAX_SAFE_INTEGER, registrationId: 4, release: { setId: 1, ioasid: 201, generation: 2, detachSpid: true, purposes: [] } },
        { seq: 14, registrationId: 3, release: { setId: 1, ioasid: 202, generation: 1, detachSpid: false, purposes: ["bind:dev3", "pasid-table"] } },
      ],
      commitTimeMs: T,
    },
  ],
  misses: [
    {
      kind: "misses",
      misses: [
        { seq: 1, registrationId: 2 },
        { seq: 2, registrationId: 2 },
      ],
      commitTimeMs: T,
    },
  ],
};
const ALL = Object.values(EXAMPLES).flat();

const batch = (ops: readonly CommittedOperation[], seq = 1): StoredMessage => ({ seq, format: OpLogFormat.BATCH, data: encodeBatch(ops.map(encodeOperation)) });

/** The refusal decodeMessage throws for a message. */
function refusal(message: StoredMessage): OpLogFormatError {
  try {
    decodeMessage(message, "IOASID_CORE_OPS");
  } catch (err) {
    expect(err).toBeInstanceOf(OpLogFormatError);
    return err as OpLogFormatError;
  }
  throw new Error("expected a refusal");
}

describe("op-log codec (ioasid.oplog.v1)", () => {
  it("reads back every kind of operation exactly as it was written, in order, in one batch", () => {
    expect(decodeMessage(batch(ALL), "S")).toEqual(ALL);
    for (const op of ALL) expect(decodeMessage(batch([op]), "S")).toEqual([op]);
  });

  it("reads back random batches exactly (numbers, bytes, tokens and releases at any value)", () => {
    const u32 = fc.integer({ min: 0, max: U32 });
    const opArb: fc.Arbitrary<CommittedOperation> = fc.oneof(
      fc.record(
        {
          kind: fc.constant("alloc" as const),
          setId: u32,
          min: u32,
          max: u32,
          privateData: fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
          allocatorIoasid: u32,
          commitTimeMs: fc.integer({ min: 0, max: 4_102_444_800_000 }),
        },
        { requiredKeys: ["kind", "setId", "commitTimeMs"] },
      ),
      fc.record({
        kind: fc.constant("createSet" as const),
        token: fc.record({ type: fc.constantFrom(TokenType.NONE, TokenType.MM), value: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }) }),
        quota: u32,
        commitTimeMs: fc.nat(),
      }),
      fc.record({
        kind: fc.constant("acks" as const),
        subscriber: fc.record({ name: fc.string(), instance: fc.string() }),
        acks: fc.array(
          fc.record(
            {
              seq: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
              registrationId: u32,
              release: fc.record({ setId: u32, ioasid: u32, generation: u32, detachSpid: fc.boolean(), purposes: fc.array(fc.string()) }),
            },
            { requiredKeys: ["seq", "registrationId"] },
          ),
        ),
        commitTimeMs: fc.nat(),
      }),
    );
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 20 }), (ops) => {
        expect(decodeMessage(batch(ops), "S")).toEqual(ops);
      }),
    );
  });

  it("reads a seal as no operation", () => {
    expect(decodeMessage({ seq: 3, format: OpLogFormat.SEAL, data: encodeSeal(new Date(T)) }, "S")).toBeUndefined();
  });

  it("refuses the JSON records of the format before v1, saying the store predates v1 and how to start from an empty one", () => {
    const old = JSON.stringify([
      { t: "createSet", tt: "MM", tok: "5", q: 4, ts: T },
      { t: "acks", n: "iommu", in: "dmar0", a: [[3, 1, 1, 201, 1, 1, "bind"]], ts: T },
    ]);
    for (const data of [old, JSON.stringify({ seal: T }), JSON.stringify({ t: "free", s: 1, i: 201, g: 0, ts: T })]) {
      const err = refusal({ seq: 1, format: undefined, data: Buffer.from(data) });
      expect(err.message).toContain("predates format v1 of the op log");
      expect(err.message).toContain("ioasidctl down --purge");
      expect(err.message).toContain("docker compose down -v");
      expect(err.message).toContain("nats stream rm IOASID_CORE_OPS");
      expect(err.at).toEqual({ stream: "IOASID_CORE_OPS", seq: 1 });
    }
  });

  it("refuses a message without the format header that is not the old JSON either", () => {
    // A valid OpBatch without its header is refused too: the header is the format marker.
    for (const data of [Buffer.from([0xff, 0x00, 0x13, 0x37]), Buffer.from("hello"), Buffer.from(batch(ALL).data)]) {
      expect(refusal({ seq: 4, format: undefined, data }).message).toContain(
        "message 4 of the operation log (JetStream stream IOASID_CORE_OPS) is not an op-log message",
      );
    }
  });

  it("refuses a format it does not read (a newer core's)", () => {
    const err = refusal({ ...batch(ALL), format: "ioasid.oplog.v2.OpBatch" });
    expect(err.message).toContain('"ioasid.oplog.v2.OpBatch", which this ioasid-core does not read');
  });

  it("refuses a v1 message that does not decode, carries unknown fields, or lacks a part", () => {
    const cases: Array<[Uint8Array, string]> = [
      [Buffer.from([0x0a, 0x50, 0x01]), "does not decode"],
      // A field this core does not know (field 15, varint) after a valid batch: a newer writer's.
      [Buffer.concat([batch([ALL[0]!]).data, Buffer.from([0x78, 0x01])]), "fields this core does not know"],
      [encodeBatch([]), "holds no operation"],
      [encodeBatch([oplog.Operation.encode({ commitTime: new Date(T), kind: undefined }).finish()]), "operation 1: it has no kind"],
      [encodeBatch([oplog.Operation.encode({ commitTime: undefined, kind: { $case: "freeSet", value: { setId: 1 } } }).finish()]), "it has no commit time"],
      [
        encodeBatch([
          oplog.Operation.encode({
            commitTime: new Date(T),
            kind: { $case: "put", value: { setId: 1, ioasid: 2, holder: undefined, generation: 0, audit: undefined } },
          }).finish(),
        ]),
        "put: it has no holder",
      ],
      [
        encodeBatch([
          oplog.Operation.encode({
            commitTime: new Date(T),
            kind: {
              $case: "register",
              value: { subscriber: { name: "a", instance: "b" }, priority: 9 as events.Priority, scope: { $case: "global", value: true }, events: [] },
            },
          }).finish(),
        ]),
        "priority 9",
      ],
    ];
    for (const [data, problem] of cases) {
      const err = refusal({ seq: 9, format: OpLogFormat.BATCH, data });
      expect(err.message).toContain("is marked ioasid.oplog.v1.OpBatch but is not a valid one");
      expect(err.message).toContain(problem);
    }
    expect(refusal({ seq: 9, format: OpLogFormat.SEAL, data: Buffer.from([0x0a, 0x50]) }).message).toContain("does not decode");
  });
});
