import { jetstream, jetstreamManager, DeliverPolicy, StorageType, RetentionPolicy, DiscardPolicy } from "@nats-io/jetstream";
import { headers, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { history as h } from "@ioasid/proto";
import {
  checkHistoryRecord,
  createHistoryRecord,
  historyFormatError,
  type HistoryActionInput,
  type HistoryFields,
  type TypedHistoryRecord,
} from "./history-catalogue.js";
import { PROCESS_INCARNATION, receivedCursor, registerPosition, takeReceived, touchPosition, type HistoryLink } from "@ioasid/trace";
import { DEFAULT_PREFIX, encodeToken } from "./subjects.js";
import { isTransientJetStreamError, retryTransient } from "./jetstream-retry.js";
import { historyOutbox, type HistoryOutbox } from "./history-outbox.js";
import { ReusedWriter } from "./reused-writer.js";

/** Subject of a role's history records: `<prefix>.history.<role>.<instance>`. */
export function historySubject(prefix: string, role: string, instance: string): string {
  return `${prefix}.history.${encodeToken(role)}.${encodeToken(instance)}`;
}

/** The JetStream stream that keeps the history (limits: 1 M records or 7 days). */
export function historyStreamName(prefix: string): string {
  return `${prefix.replace(/[^A-Za-z0-9_-]/g, "_").toUpperCase()}_HISTORY`;
}

/** Creates the history stream if it does not exist (the core does at start). */
export async function ensureHistoryStream(nc: NatsConnection, prefix = DEFAULT_PREFIX, replicas = 1): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const name = historyStreamName(prefix);
  try {
    await jsm.streams.info(name);
  } catch {
    await jsm.streams.add({
      name,
      subjects: [`${prefix}.history.>`],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      discard: DiscardPolicy.Old,
      max_msgs: 1_000_000,
      max_age: 7 * 24 * 3600 * 1_000_000_000,
      num_replicas: replicas,
    });
  }
}

/**
 * Each publisher's (role, instance) last `publisher_seq` in this process (see HistoryRecorder), and
 * its last plain message's number (its `Nats-Msg-Id`).
 */
const PUBLISHER_SEQS = new Map<string, { last: number; messages: number }>();

/** Options of a {@link HistoryRecorder}. */
export interface HistoryRecorderOptions {
  /**
   * How long grouped records ({@link HistoryRecorder.recordIn}) wait for company before they are
   * published, ms; plain records ({@link HistoryRecorder.record}) still go out at the end of their
   * turn, with whatever waits. 0 (the default): at the end of the turn they were made in. The core,
   * whose grouped records name their op-log message and are published again at a start when a
   * crash took them, waits a little: a burst of sequential calls then shares one message and one
   * acknowledgement instead of one per call (issue 15).
   */
  readonly flushDelayMs?: number;
}

/**
 * Publishes a component's history records without holding up the work they record. Records of one
 * turn of the event loop go out as one message (a binary `ioasid.history.v1.HistoryBatch`), so a
 * burst (a set freed, a batch of deliveries) costs a few messages, not one per record. Messages go
 * through the connection's {@link HistoryOutbox}: acknowledged by the history stream, and sent again
 * (same `Nats-Msg-Id`, stored once) when a server's death or a leader election lost them.
 */
export class HistoryRecorder {
  readonly subject: string;
  /**
   * Records not yet published, built but not yet encoded: they are encoded when they go out, at
   * the end of the turn or later, so the work they record — an acknowledgement, a delivery to the
   * next tier — leaves first (issue 15: the core's records of a set freed cost more than its
   * delivery to KVM, and were encoded before it was sent).
   */
  private pending: h.HistoryRecord[] = [];
  /** Records of named groups (see recordIn), published one group per message. */
  private readonly groups = new Map<string, { headers: Record<string, string>; records: h.HistoryRecord[] }>();
  /** A flush at the end of this turn is scheduled. */
  private scheduled = false;
  /** A flush after `flushDelayMs` is scheduled (grouped records only). */
  private flushTimer: ReturnType<typeof setTimeout> | undefined;
  /**
   * The last `publisher_seq` given (0: none yet), shared by every recorder of this publisher (role,
   * instance) in the process: the incarnation is the process's, so a second recorder of the same
   * publisher — a core whose start JetStream cut and that starts again — numbers on, never twice.
   */
  private readonly seq: { last: number; messages: number };
  /** Id of this publisher's plain messages before their number: `history:<role>:<instance>:<incarnation>:`. */
  private readonly msgIdPrefix: string;
  private outboxOf: HistoryOutbox | undefined;
  /** The connection's outbox (made at the first publish: numbering alone needs no connection). */
  private get outbox(): HistoryOutbox {
    return (this.outboxOf ??= historyOutbox(this.nc));
  }
  private get lastSeq(): number {
    return this.seq.last;
  }
  /** How far this recorder named in `after` what its process received. */
  private readonly linked = receivedCursor();
  constructor(
    private readonly nc: NatsConnection,
    readonly role: string,
    readonly instance: string,
    prefix = DEFAULT_PREFIX,
    private readonly options: HistoryRecorderOptions = {},
  ) {
    this.subject = historySubject(prefix, role, instance);
    const key = `${role}\u0000${instance}`;
    let seq = PUBLISHER_SEQS.get(key);
    if (seq === undefined) PUBLISHER_SEQS.set(key, (seq = { last: 0, messages: 0 }));
    this.seq = seq;
    this.msgIdPrefix = `history:${role}:${instance}:${PROCESS_INCARNATION}:`;
    registerPosition(role, instance, this);
  }

  /**
   * Numbers a record now, where it falls in this recorder's order (issue 18: order without clocks):
   * its `publisher_seq` and incarnation, and in `after` the positions this process received since
   * the previous record. A record numbered already is returned as it is. Components that publish a
   * record later than they make it (the core, once its operation is durable; a role through its
   * HistoryGate) number it when they make it, so that a position sent meanwhile covers it.
   */
  stamp(fields: HistoryFields = {}): HistoryFields {
    if (fields.publisherSeq !== undefined) return fields;
    const after = takeReceived(this.linked);
    touchPosition(this.role, this.instance);
    const stamped: HistoryFields = { ...fields };
    stamped.publisherSeq = ++this.seq.last;
    stamped.incarnation = PROCESS_INCARNATION;
    if (after.length > 0) stamped.after = fields.after === undefined ? after : [...fields.after, ...after];
    return stamped;
  }

  /** This recorder's position: its last numbered record (undefined before the first). */
  position(): HistoryLink | undefined {
    return this.lastSeq === 0 ? undefined : { role: this.role, instance: this.instance, incarnation: PROCESS_INCARNATION, publisherSeq: this.lastSeq };
  }

  /**
   * Records one step (at `ts`: now, or when it happened, for a step published later): an action
   * of the catalogue and what it is about.
   * @example recorder.record({ $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL, gpasid: 101, hpasid: 201 } }, { ioasid: 201 })
   */
  record(action: HistoryActionInput, fields: HistoryFields = {}, ts: number = performance.timeOrigin + performance.now()): void {
    this.pending.push(this.build(action, fields, ts));
    if (this.pending.length >= MAX_PENDING_RECORDS) this.flush();
    else this.schedule(0);
  }

  /**
   * Records one step that belongs to a named group: the records of a group are published in their
   * own messages (of at most {@link GROUP_PART_RECORDS} records each), each with the JetStream
   * message id `<group>:<part>` and `headers`. Publishing the same group twice — an incarnation
   * that replays what its predecessor may or may not have published — then stores it once (within
   * the stream's duplicate window). A group's records must all be recorded in one turn.
   */
  recordIn(group: string, headers: Record<string, string>, action: HistoryActionInput, fields: HistoryFields, ts: number): void {
    let g = this.groups.get(group);
    if (g === undefined) this.groups.set(group, (g = { headers, records: [] }));
    g.records.push(this.build(action, fields, ts));
    this.schedule(this.options.flushDelayMs ?? 0);
  }

  /**
   * Publishes everything pending at the end of this turn (`delayMs` 0), or once `delayMs` passed
   * (see {@link HistoryRecorderOptions}); the earlier of the two when both are asked for.
   */
  private schedule(delayMs: number): void {
    if (this.scheduled) return;
    if (delayMs > 0) {
      this.flushTimer ??= setTimeout(() => this.flush(), delayMs);
      return;
    }
    this.scheduled = true;
    setImmediate(() => {
      if (this.scheduled) this.flush();
    });
  }

  /** Publishes what is pending now. */
  flush(): void {
    this.scheduled = false;
    if (this.flushTimer !== undefined) clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    if (this.pending.length > 0) {
      const records = this.pending;
      this.pending = [];
      // Plain messages of at most MAX_HISTORY_MESSAGE bytes each, in record order: a run of
      // records encoded as one batch (one pass, one copy), or one by one when it is too large.
      for (let i = 0; i < records.length; i += PLAIN_PART_RECORDS) {
        const part = records.slice(i, i + PLAIN_PART_RECORDS);
        const body = encodeBatchOf(part);
        if (body.length <= MAX_HISTORY_MESSAGE) this.publishPlain(body);
        else this.publishSplit(part);
      }
    }
    for (const [group, g] of this.groups) {
      for (let part = 0; part * GROUP_PART_RECORDS < g.records.length; part++) {
        const hd = headers();
        for (const [k, v] of Object.entries(g.headers)) hd.set(k, v);
        hd.set("Nats-Msg-Id", `${group}:${part}`);
        this.publish(encodeBatchOf(g.records.slice(part * GROUP_PART_RECORDS, (part + 1) * GROUP_PART_RECORDS)), hd);
      }
    }
    this.groups.clear();
  }

  /** Plain records too large for one message, in messages of at most MAX_HISTORY_MESSAGE bytes. */
  private publishSplit(records: readonly h.HistoryRecord[]): void {
    let part: Uint8Array[] = [];
    let bytes = 0;
    for (const r of records) {
      const encoded = encodeRecord(r);
      if (part.length > 0 && bytes + encoded.length + 6 > MAX_HISTORY_MESSAGE) {
        this.publishPlain(encodeBatch(part));
        part = [];
        bytes = 0;
      }
      part.push(encoded);
      bytes += encoded.length + 6;
    }
    this.publishPlain(encodeBatch(part));
  }

  /**
   * A record built now — numbered, its fields and action copied, so a caller may reuse them — and
   * encoded when it is published.
   */
  private build(action: HistoryActionInput, fields: HistoryFields, ts: number): h.HistoryRecord {
    return createHistoryRecord(this, action, this.stamp(fields), ts);
  }

  private publishPlain(body: Uint8Array): void {
    const hd = headers();
    hd.set("Nats-Msg-Id", `${this.msgIdPrefix}${++this.seq.messages}`);
    this.publish(body, hd);
  }

  private publish(body: Uint8Array, hd: MsgHdrs): void {
    this.outbox.send(this.subject, body, hd);
  }
}

/**
 * One writer for every record this process encodes (reused-writer.ts): a new writer per record
 * started at 128 bytes and grew, two allocations and a copy per record — with about ten records per
 * reclaimed IOASID, the core's largest cost after its own model in a crowd's teardown (issue 15).
 */
const recordWriter = new ReusedWriter();

function encodeRecord(record: h.HistoryRecord): Uint8Array {
  return recordWriter.encode((w) => h.HistoryRecord.encode(record, w));
}

/** A HistoryBatch of `records`, encoded in one pass (the bytes of encodeBatch(records.map(encodeRecord))). */
function encodeBatchOf(records: readonly h.HistoryRecord[]): Uint8Array {
  return recordWriter.encode((w) => {
    for (const r of records) h.HistoryRecord.encode(r, w.uint32(10).fork()).join();
    return w;
  });
}

/** A HistoryBatch of records encoded one by one (field 1, repeated, each length-delimited), sized once. */
function encodeBatch(records: readonly Uint8Array[]): Uint8Array {
  let size = 0;
  for (const r of records) size += 1 + varintSize(r.length) + r.length;
  const out = new Uint8Array(size);
  let pos = 0;
  for (const r of records) {
    out[pos++] = 10;
    for (let n = r.length; ; n >>>= 7) {
      if (n < 0x80) {
        out[pos++] = n;
        break;
      }
      out[pos++] = (n & 0x7f) | 0x80;
    }
    out.set(r, pos);
    pos += r.length;
  }
  return out;
}

function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n >>>= 7;
    size++;
  }
  return size;
}

/**
 * The records of one history message (a binary HistoryBatch).
 * @throws DomainError FAILED_PRECONDITION `HISTORY_FORMAT_UNSUPPORTED` for a message of the old
 * JSON format, one that does not decode, or a record whose action is unset or unknown
 */
export function decodeHistoryBatch(body: Uint8Array, where: string): TypedHistoryRecord[] {
  // The old format was a JSON array (or object): '[' or '{'. A HistoryBatch starts with its field
  // 1 tag (0x0a), so the two never meet.
  if (body.length > 0 && (body[0] === 0x5b || body[0] === 0x7b)) {
    throw historyFormatError(
      where,
      "a history message of the old JSON format (from before the typed history catalogue): this version reads only ioasid.history.v1.HistoryBatch; start from an empty store (`ioasidctl down`, then remove its NATS store `<dir>/nats`, default `.ioasid/nats`; or delete the history stream)",
    );
  }
  let batch: h.HistoryBatch;
  try {
    batch = h.HistoryBatch.decode(new BinaryReader(body));
  } catch (err) {
    throw historyFormatError(where, `not an ioasid.history.v1.HistoryBatch (${err instanceof Error ? err.message : String(err)})`);
  }
  return batch.records.map((r) => checkHistoryRecord(r, where));
}

/** Records per message of a group (by count, so a replay splits a group as the original did). */
const GROUP_PART_RECORDS = 500;
/** Plain records encoded together, as one message unless they are larger than MAX_HISTORY_MESSAGE. */
const PLAIN_PART_RECORDS = 1000;

/**
 * The headers of the newest stored history message on one component's subject, or undefined when
 * the stream holds none (or cannot be read).
 */
export async function lastHistoryHeaders(
  nc: NatsConnection,
  role: string,
  instance: string,
  prefix = DEFAULT_PREFIX,
): Promise<Record<string, string> | undefined> {
  try {
    const jsm = await jetstreamManager(nc);
    const m = await jsm.streams.getMessage(historyStreamName(prefix), { last_by_subj: historySubject(prefix, role, instance) });
    if (m === null) return undefined;
    const out: Record<string, string> = {};
    if (m.header !== undefined) for (const [k, v] of m.header) out[k] = v[0] ?? "";
    return out;
  } catch {
    return undefined;
  }
}

/** Largest history message (nats-server's default max_payload is 1 MiB). */
const MAX_HISTORY_MESSAGE = 256 * 1024;
/**
 * Plain records waiting for their turn's end before they are published at once (a burst within
 * one turn is not held in memory whole; their encoding, not their count, sizes each message).
 */
const MAX_PENDING_RECORDS = 4096;

/**
 * Reads the stored history, oldest first, from `sinceMs` (a wall-clock time) on. A read that
 * JetStream's failover cuts (a timeout, no responder, a 503) is made again from the start within
 * `retryMs` (default 10 s).
 * @returns the records, sorted by time
 * @throws DomainError FAILED_PRECONDITION `HISTORY_FORMAT_UNSUPPORTED` when a message is not a
 * HistoryBatch of this catalogue (see {@link decodeHistoryBatch})
 */
export async function readHistory(nc: NatsConnection, options: { prefix?: string; sinceMs?: number; retryMs?: number } = {}): Promise<TypedHistoryRecord[]> {
  // A read cut by JetStream failing over (a cluster electing leaders after a server's death) is
  // read again from the start, within `retryMs` (default 10 s); see retryTransient.
  return retryTransient(() => readHistoryOnce(nc, options), {
    ...(options.retryMs === undefined ? {} : { retryMs: options.retryMs }),
    isTransient: (err) => err instanceof HistoryReadCut || isTransientJetStreamError(err),
  });
}

/** A read of the history that ended before the stream's last message, or stalled: read again. */
class HistoryReadCut extends Error {
  override readonly name = "HistoryReadCut";
}

/** How long a read of the history waits for its next message before it counts as cut, ms. */
const HISTORY_READ_IDLE_MS = 10_000;

async function readHistoryOnce(nc: NatsConnection, options: { prefix?: string; sinceMs?: number }): Promise<TypedHistoryRecord[]> {
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  const name = historyStreamName(prefix);
  const jsm = await jetstreamManager(nc);
  const info = await jsm.streams.info(name);
  const out: TypedHistoryRecord[] = [];
  if (info.state.messages === 0) return out;
  const last = info.state.last_seq;
  const js = jetstream(nc);
  const consumer = await js.consumers.get(
    name,
    options.sinceMs === undefined ? {} : { deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(options.sinceMs - 1000).toISOString() },
  );
  const messages = await consumer.consume({ max_messages: 10_000, expires: 2000 });
  // Bounded: a consumer that delivers nothing for a while (its stream's leader gone) is stopped,
  // and the read is made again; so is one that ended before the last message (a hole the checker
  // must never judge as a whole history).
  let seen = 0;
  let idle = false;
  let timer: NodeJS.Timeout | undefined;
  const armIdle = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      idle = true;
      messages.stop();
    }, HISTORY_READ_IDLE_MS);
  };
  armIdle();
  try {
    for await (const m of messages) {
      seen = m.seq;
      armIdle();
      // A message that is not a history batch is refused, never skipped: a checker that read
      // past it would judge a history with a hole.
      for (const rec of decodeHistoryBatch(m.data, `history stream ${name}, message ${m.seq} (${m.subject})`)) {
        if (options.sinceMs === undefined || rec.ts >= options.sinceMs) out.push(rec);
      }
      if (m.seq >= last) break;
    }
  } finally {
    clearTimeout(timer);
    messages.stop();
  }
  if (seen < last) {
    throw new HistoryReadCut(
      idle
        ? `history read stalled: nothing delivered for ${HISTORY_READ_IDLE_MS} ms after message ${seen} of ${last} of ${name}`
        : `history read ended at message ${seen} of ${last} of ${name}`,
    );
  }
  return out.sort((a, b) => a.ts - b.ts);
}
