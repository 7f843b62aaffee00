import { Code, DomainError, INTERNAL_REASON } from "@ioasid/errors";
import { EventType, Priority, TokenType, type Holder, type RegisterOptions, type Subscriber } from "@ioasid/ioasid";
import { events, oplog, type core } from "@ioasid/proto";
import { scopeFromWire, scopeToWire } from "@ioasid/role-kit";
import { ReusedWriter } from "@ioasid/bus";
import { fromEventType, fromPriority, fromTokenType, toEventType, toPriority } from "./convert.js";
import type { AckRelease, CommittedOperation, DeliveryAck, DeliveryRef, Operation, OperatorAudit } from "./operation.js";

// The one place where the operation log's wire format (proto/ioasid/oplog/v1/oplog.proto) meets the
// domain's operations: the core and its log speak Operation, JetStream holds ioasid.oplog.v1.

/** Header naming the message a JetStream message of the op log holds. */
export const OP_LOG_FORMAT_HEADER = "Ioasid-Format";

/** The values of {@link OP_LOG_FORMAT_HEADER}: the protobuf message (full name) in the payload. */
export const OpLogFormat = {
  /** The operations of one group commit. */
  BATCH: "ioasid.oplog.v1.OpBatch",
  /** A restarted core's takeover mark. */
  SEAL: "ioasid.oplog.v1.Seal",
  /** A snapshot committed: it replaces every earlier message of the op-log subject. */
  SNAPSHOT_MARKER: "ioasid.oplog.v1.SnapshotMarker",
  /** One slice of a snapshot (on a snapshot subject, not the op-log subject). */
  SNAPSHOT_CHUNK: "ioasid.oplog.v1.SnapshotChunk",
} as const;
export type OpLogFormat = (typeof OpLogFormat)[keyof typeof OpLogFormat];

/**
 * A message of the operation log this core refuses to read: written before format v1 (JSON), in a
 * format it does not know, or damaged. The core refuses to start rather than misread its state
 * (an operation misread is state lost or an IOASID handed out twice); the message says what to do.
 * Never sent to a client (INTERNAL): it stops the process at start.
 */
export class OpLogFormatError extends DomainError {
  constructor(
    message: string,
    /** The stream and the message's stream sequence. */
    readonly at: { readonly stream: string; readonly seq: number },
  ) {
    super(Code.INTERNAL, INTERNAL_REASON, message, { metadata: { stream: at.stream, seq: String(at.seq) } });
  }
}

/**
 * One writer for every operation encoded (reused-writer.ts in @ioasid/bus): a new writer per
 * operation starts small and grows, allocating and copying on every operation (issue 15).
 */
const operationWriter = new ReusedWriter();

/** One operation in the wire form (an `Operation` message), for {@link encodeBatch}. */
export function encodeOperation(op: CommittedOperation): Uint8Array {
  return operationWriter.encode((w) => oplog.Operation.encode({ commitTime: new Date(op.commitTimeMs), kind: toWireKind(op) }, w));
}

/**
 * The payload of one group commit (an `OpBatch`) from operations encoded by
 * {@link encodeOperation}, so that the log can size a message before it writes it. OpBatch is
 * `repeated Operation operations = 1`: each one is field 1, length-delimited, exactly what
 * `OpBatch.encode` writes.
 */
export function encodeBatch(operations: readonly Uint8Array[]): Uint8Array {
  const writer = oplog.OpBatch.encode({ operations: [] });
  for (const bytes of operations) writer.uint32((1 << 3) | 2).bytes(bytes);
  return writer.finish();
}

/** Bytes {@link encodeBatch} adds to an encoded operation at most (tag + length varint). */
export const BATCH_FRAMING_BYTES = 6;

/** The payload of a seal (a `Seal`). */
export function encodeSeal(time: Date): Uint8Array {
  return oplog.Seal.encode({ sealTime: time }).finish();
}

/** One JetStream message of the op log as read back. */
export interface StoredMessage {
  /** Its stream sequence. */
  readonly seq: number;
  /** Its {@link OP_LOG_FORMAT_HEADER} header, if any. */
  readonly format: string | undefined;
  readonly data: Uint8Array;
}

/**
 * Reads one message of the op log: its operations, in order, or `undefined` for a seal.
 * @throws OpLogFormatError for anything but a well-formed ioasid.oplog.v1 message: the JSON of the
 *   format before v1, a message without the header, another format, a payload that does not decode
 *   or carries fields this core does not know (a newer writer's), an operation without its parts
 */
export function decodeMessage(message: StoredMessage, stream: string): readonly CommittedOperation[] | undefined {
  const at = { stream, seq: message.seq };
  const where = `message ${message.seq} of the operation log (JetStream stream ${stream})`;
  if (message.format === undefined) {
    if (isJson(message.data)) {
      throw new OpLogFormatError(
        `the operation log (JetStream stream ${stream}) predates format v1 of the op log: its message ${message.seq} is the JSON ` +
          `of an earlier ioasid-core, and this core reads only ${OpLogFormat.BATCH} (binary protobuf, header ${OP_LOG_FORMAT_HEADER}); ` +
          `it refuses the store rather than misread it. ${START_EMPTY(stream)}; or run the earlier ioasid-core on it.`,
        at,
      );
    }
    throw new OpLogFormatError(
      `${where} is not an op-log message (no ${OP_LOG_FORMAT_HEADER} header, and not the JSON of an earlier ioasid-core): ` +
        `something else published on the op-log subject? The core refuses the store rather than misread it. If that message is ` +
        `not the core's, delete it (nats stream rmm ${stream} ${message.seq}) and start the core again; otherwise ${lower(START_EMPTY(stream))}.`,
      at,
    );
  }
  if (message.format === OpLogFormat.SEAL) {
    decodeStrictly(oplog.Seal, message.data, where, message.format, stream, at);
    return undefined;
  }
  if (message.format !== OpLogFormat.BATCH) {
    throw new OpLogFormatError(
      `${where} is ${OP_LOG_FORMAT_HEADER} ${JSON.stringify(message.format)}, which this ioasid-core does not read (it reads ` +
        `${OpLogFormat.BATCH}): written by a newer ioasid-core? Run that version on this store, or ${lower(START_EMPTY(stream))}.`,
      at,
    );
  }
  const batch = decodeStrictly(oplog.OpBatch, message.data, where, message.format, stream, at);
  try {
    if (batch.operations.length === 0) throw new Error("it holds no operation");
    return batch.operations.map((op, i) => {
      try {
        return fromWire(op);
      } catch (err) {
        throw new Error(`operation ${i + 1}: ${(err as Error).message}`);
      }
    });
  } catch (err) {
    throw damaged(where, message.format, (err as Error).message, stream, at);
  }
}

/** A snapshot marker as read back: what it names, and the operations it carries. */
export interface StoredMarker {
  readonly marker: Omit<oplog.SnapshotMarker, "tail">;
  readonly tail: readonly CommittedOperation[];
}

/**
 * Reads a snapshot marker (a message with format {@link OpLogFormat.SNAPSHOT_MARKER}).
 * @throws OpLogFormatError when it does not decode, carries unknown fields, names no chunk, or
 *   carries an operation without its parts
 */
export function decodeMarker(message: StoredMessage, stream: string): StoredMarker {
  const at = { stream, seq: message.seq };
  const where = `message ${message.seq} of the operation log (JetStream stream ${stream})`;
  const m = decodeStrictly(oplog.SnapshotMarker, message.data, where, OpLogFormat.SNAPSHOT_MARKER, stream, at);
  try {
    if (m.chunkSeqs.length === 0) throw new Error("it names no snapshot chunk");
    const tail = m.tail.map((op, i) => {
      try {
        return fromWire(op);
      } catch (err) {
        throw new Error(`tail operation ${i + 1}: ${(err as Error).message}`);
      }
    });
    return { marker: { ...m, tail: undefined } as Omit<oplog.SnapshotMarker, "tail">, tail };
  } catch (err) {
    throw damaged(where, OpLogFormat.SNAPSHOT_MARKER, (err as Error).message, stream, at);
  }
}

/** What to do with a store the core refuses, said once. */
const START_EMPTY = (stream: string) =>
  `Start from an empty store (the IOASID state it holds is lost): \`ioasidctl down --purge\` then \`ioasidctl up\` for a local ` +
  `stack, \`docker compose down -v\` for the compose stack, or delete the stream alone (\`nats stream rm ${stream}\`)`;

function lower(s: string): string {
  return s.charAt(0).toLowerCase() + s.slice(1);
}

function damaged(where: string, format: string, problem: string, stream: string, at: OpLogFormatError["at"]): OpLogFormatError {
  return new OpLogFormatError(
    `${where} is marked ${format} but is not a valid one (${problem}): the log is damaged, and the core refuses it rather than ` +
      `misread it. ${START_EMPTY(stream)}.`,
    at,
  );
}

/**
 * Decodes, and refuses what re-encodes differently: protobuf readers skip fields they do not know,
 * and an operation with a field this core would ignore is an operation misread.
 */
function decodeStrictly<T>(fns: oplog.MessageFns<T>, data: Uint8Array, where: string, format: string, stream: string, at: OpLogFormatError["at"]): T {
  let decoded: T;
  try {
    decoded = fns.decode(data);
  } catch (err) {
    throw damaged(where, format, `it does not decode: ${(err as Error).message}`, stream, at);
  }
  if (fns.encode(decoded).finish().length !== data.length) {
    throw damaged(where, format, "it carries fields this core does not know: written by a newer ioasid-core?", stream, at);
  }
  return decoded;
}

function isJson(data: Uint8Array): boolean {
  try {
    const value: unknown = JSON.parse(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8"));
    return typeof value === "object" && value !== null;
  } catch {
    return false;
  }
}

// --- domain → wire ---

function toWireKind(op: Operation): oplog.Operation["kind"] {
  switch (op.kind) {
    case "createSet":
      return { $case: op.kind, value: { tokenType: fromTokenType(op.token.type), token: op.token.value, quota: op.quota } };
    case "adjustSet":
      return { $case: op.kind, value: { setId: op.setId, quota: op.quota } };
    case "destroySet":
    case "freeSet":
      return { $case: op.kind, value: { setId: op.setId } };
    case "alloc":
      return {
        $case: op.kind,
        value: {
          setId: op.setId,
          ...optionalBounds(op),
          ...(op.privateData === undefined ? {} : { privateData: toBytes(op.privateData) }),
          ...(op.allocatorIoasid === undefined ? {} : { allocatorIoasid: op.allocatorIoasid }),
        },
      };
    case "batchAlloc":
      return { $case: op.kind, value: { setId: op.setId, count: op.count, ...optionalBounds(op) } };
    case "free":
    case "detachSpid":
    case "detachData":
      return { $case: op.kind, value: { setId: op.setId, ioasid: op.ioasid, generation: op.generation } };
    case "get":
      return { $case: op.kind, value: { setId: op.setId, ioasid: op.ioasid, holder: toWireHolder(op.holder), generation: op.generation } };
    case "put":
      return {
        $case: op.kind,
        value: {
          setId: op.setId,
          ioasid: op.ioasid,
          holder: toWireHolder(op.holder),
          generation: op.generation,
          audit: op.audit === undefined ? undefined : { ...op.audit },
        },
      };
    case "findBySpid":
      return { $case: op.kind, value: { setId: op.setId, spid: op.spid, holder: toWireHolder(op.holder) } };
    case "attachSpid":
      return { $case: op.kind, value: { setId: op.setId, ioasid: op.ioasid, spid: op.spid, generation: op.generation } };
    case "attachData":
      return { $case: op.kind, value: { setId: op.setId, ioasid: op.ioasid, data: toBytes(op.data), generation: op.generation } };
    case "register":
      return { $case: op.kind, value: toWireRegister(op.options) };
    case "unregister":
      return { $case: op.kind, value: { registrationId: op.registrationId } };
    case "registerAllocator":
      return { $case: op.kind, value: { name: op.name, address: op.address, audit: op.audit === undefined ? undefined : { ...op.audit } } };
    case "unregisterAllocator":
      return { $case: op.kind, value: { name: op.name, audit: op.audit === undefined ? undefined : { ...op.audit } } };
    case "acks":
      return {
        $case: op.kind,
        value: {
          subscriber: { name: op.subscriber.name, instance: op.subscriber.instance },
          acks: op.acks.map((a) => ({
            seq: BigInt(a.seq),
            registrationId: a.registrationId,
            release: a.release === undefined ? undefined : { ...a.release, purposes: [...a.release.purposes] },
          })),
        },
      };
    case "misses":
      return { $case: op.kind, value: { misses: op.misses.map((m) => ({ seq: BigInt(m.seq), registrationId: m.registrationId })) } };
  }
}

function optionalBounds(op: { readonly min?: number; readonly max?: number }): { min?: number; max?: number } {
  return { ...(op.min === undefined ? {} : { min: op.min }), ...(op.max === undefined ? {} : { max: op.max }) };
}

function toBytes(data: Uint8Array): Buffer {
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

function toWireHolder(h: Holder): core.Holder {
  return { role: h.role, instance: h.instance, purpose: h.purpose };
}

function toWireRegister(o: RegisterOptions): oplog.Register {
  return {
    subscriber: { name: o.subscriber.name, instance: o.subscriber.instance },
    priority: fromPriority(o.priority),
    scope: scopeToWire(o.scope),
    events: (o.events ?? []).map(fromEventType),
  };
}

// --- wire → domain (each part checked: an operation is applied only as it was recorded) ---

function fromWire(op: oplog.Operation): CommittedOperation {
  if (op.commitTime === undefined) throw new Error("it has no commit time");
  const commitTimeMs = op.commitTime.getTime();
  const kind = op.kind;
  if (kind === undefined) throw new Error("it has no kind (an operation this core does not know?)");
  return { ...fromWireKind(kind), commitTimeMs };
}

function fromWireKind(kind: NonNullable<oplog.Operation["kind"]>): Operation {
  switch (kind.$case) {
    case "createSet": {
      const v = kind.value;
      const type =
        v.tokenType === events.TokenType.TOKEN_TYPE_MM ? TokenType.MM : v.tokenType === events.TokenType.TOKEN_TYPE_NONE ? TokenType.NONE : undefined;
      if (type === undefined) throw new Error(`createSet: token type ${v.tokenType} is not NONE or MM`);
      return { kind: kind.$case, token: { type, value: v.token }, quota: v.quota };
    }
    case "adjustSet":
      return { kind: kind.$case, setId: kind.value.setId, quota: kind.value.quota };
    case "destroySet":
    case "freeSet":
      return { kind: kind.$case, setId: kind.value.setId };
    case "alloc": {
      const v = kind.value;
      return {
        kind: kind.$case,
        setId: v.setId,
        ...optionalBounds(v),
        ...(v.privateData === undefined ? {} : { privateData: v.privateData }),
        ...(v.allocatorIoasid === undefined ? {} : { allocatorIoasid: v.allocatorIoasid }),
      };
    }
    case "batchAlloc":
      return { kind: kind.$case, setId: kind.value.setId, count: kind.value.count, ...optionalBounds(kind.value) };
    case "free":
    case "detachSpid":
    case "detachData":
      return { kind: kind.$case, setId: kind.value.setId, ioasid: kind.value.ioasid, generation: kind.value.generation };
    case "get":
      return {
        kind: kind.$case,
        setId: kind.value.setId,
        ioasid: kind.value.ioasid,
        holder: holderOf(kind.$case, kind.value.holder),
        generation: kind.value.generation,
      };
    case "put":
      return {
        kind: kind.$case,
        setId: kind.value.setId,
        ioasid: kind.value.ioasid,
        holder: holderOf(kind.$case, kind.value.holder),
        generation: kind.value.generation,
        ...auditOf(kind.value.audit),
      };
    case "findBySpid":
      return { kind: kind.$case, setId: kind.value.setId, spid: kind.value.spid, holder: holderOf(kind.$case, kind.value.holder) };
    case "attachSpid":
      return { kind: kind.$case, setId: kind.value.setId, ioasid: kind.value.ioasid, spid: kind.value.spid, generation: kind.value.generation };
    case "attachData":
      return { kind: kind.$case, setId: kind.value.setId, ioasid: kind.value.ioasid, data: kind.value.data, generation: kind.value.generation };
    case "register":
      return { kind: kind.$case, options: fromWireRegister(kind.value) };
    case "unregister":
      return { kind: kind.$case, registrationId: kind.value.registrationId };
    case "registerAllocator":
      return { kind: kind.$case, name: kind.value.name, address: kind.value.address, ...auditOf(kind.value.audit) };
    case "unregisterAllocator":
      return { kind: kind.$case, name: kind.value.name, ...auditOf(kind.value.audit) };
    case "acks":
      return { kind: kind.$case, subscriber: subscriberOf(kind.$case, kind.value.subscriber), acks: kind.value.acks.map(fromWireAck) };
    case "misses":
      return { kind: kind.$case, misses: kind.value.misses.map((m): DeliveryRef => ({ seq: seqOf(m.seq), registrationId: m.registrationId })) };
  }
}

function holderOf(kind: string, h: core.Holder | undefined): Holder {
  if (h === undefined) throw new Error(`${kind}: it has no holder`);
  return { role: h.role, instance: h.instance, purpose: h.purpose };
}

function subscriberOf(kind: string, s: core.Subscriber | undefined): Subscriber {
  if (s === undefined) throw new Error(`${kind}: it has no subscriber`);
  return { name: s.name, instance: s.instance };
}

function seqOf(seq: bigint): number {
  if (seq > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`event sequence ${seq} is beyond 2^53`);
  return Number(seq);
}

function fromWireAck(a: oplog.Ack): DeliveryAck {
  const r = a.release;
  const release: AckRelease | undefined =
    r === undefined ? undefined : { setId: r.setId, ioasid: r.ioasid, generation: r.generation, detachSpid: r.detachSpid, purposes: r.purposes };
  return { seq: seqOf(a.seq), registrationId: a.registrationId, ...(release === undefined ? {} : { release }) };
}

const PRIORITIES: ReadonlySet<number> = new Set(Object.values(Priority));
const EVENT_TYPES: ReadonlySet<string> = new Set(Object.values(EventType));

function fromWireRegister(r: oplog.Register): RegisterOptions {
  const subscriber = subscriberOf("register", r.subscriber);
  const priority = toPriority(r.priority);
  if (!PRIORITIES.has(priority)) throw new Error(`register: priority ${r.priority} is not one of events.v1.Priority`);
  const eventTypes = r.events.map((t) => {
    const type = toEventType(t);
    if (!EVENT_TYPES.has(type)) throw new Error(`register: event type ${t} is not one of events.v1.EventType`);
    return type;
  });
  const scope = scopeFromWire(r.scope);
  if (scope === undefined) throw new Error("register: it has no scope");
  return { subscriber, priority, scope, events: eventTypes };
}

/** An operation's audit field, when the log holds one (an operation recorded before audits had none). */
function auditOf(audit: oplog.OperatorAudit | undefined): { audit?: OperatorAudit } {
  return audit === undefined ? {} : { audit: { operator: audit.operator, reason: audit.reason, onBehalfOf: audit.onBehalfOf } };
}
