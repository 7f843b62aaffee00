import { jetstream, jetstreamManager, StorageType, RetentionPolicy, DiscardPolicy, type JetStreamClient } from "@nats-io/jetstream";
import { headers, type NatsConnection } from "@nats-io/transport-node";
import { BATCH_FRAMING_BYTES, decodeMessage, encodeBatch, encodeOperation, encodeSeal, OP_LOG_FORMAT_HEADER, OpLogFormat } from "./op-codec.js";
import type { CommittedOperation } from "./operation.js";

/** Options of {@link OpLog.open}. */
export interface OpLogOptions {
  /** JetStream stream name. @default "IOASID_CORE_OPS" */
  readonly stream?: string;
  /** Subject the operations are published on. @default "ioasid.v1.core.ops" */
  readonly subject?: string;
  /** Stream replicas: 1 on one server, 3 in a NATS cluster (configuration only). @default 1 */
  readonly replicas?: number;
  /**
   * How long records nobody waits for (delivery acknowledgements, misses) may sit before they are
   * written, in ms; any record somebody waits for writes them at once, in order. @default 20
   */
  readonly lazyMs?: number;
}

/** Largest message the log writes (nats-server's default max_payload is 1 MiB). */
const MAX_MESSAGE_BYTES = 512 * 1024;

/**
 * The core's operation log: a JetStream stream with file storage. The core appends every operation
 * its model accepted, in the order it applied them, and a restarted core replays the stream to
 * rebuild its state (DESIGN §4.6).
 *
 * Format: each message is binary protobuf, an `ioasid.oplog.v1.OpBatch` or a `Seal`, named by its
 * `Ioasid-Format` header (`proto/ioasid/oplog/v1/oplog.proto`; `op-codec.ts` converts). Replay
 * refuses anything else — the JSON of the format before v1 included — with an
 * {@link OpLogFormatError} that says what to do: a store is never misread.
 *
 * Group commit: appends queue up in call order and are written as one message (an OpBatch) at the
 * end of the current turn of the event loop, so a burst of operations costs one
 * JetStream round trip. Messages are published in order on one connection, so the stream order is
 * the application order, and an operation acknowledged durable makes every earlier one durable too.
 * Records nobody waits for may wait up to `lazyMs` for company.
 *
 * The log is always a prefix of what the core applied: each message is published with the stream
 * sequence it must follow (JetStream's expected-last-sequence check), so when one message is lost
 * (its publish timed out through a slow link, nats-server restarted with it in flight) every later
 * one is refused instead of being stored after a gap. The core then stops (fail-stop), and its
 * restart replays a log without holes — found by the chaos suite: an operation on a set whose
 * creation was lost made every later replay fail.
 */
export class OpLog {
  private queue: Array<{ op: CommittedOperation; resolve: (seq: number) => void; reject: (err: unknown) => void }> = [];
  private urgentScheduled = false;
  private lazyTimer: NodeJS.Timeout | undefined;
  /** Messages written (each one JetStream publish). */
  messages = 0;
  private readonly inflight = new Set<Promise<unknown>>();
  /** The seal being written (see seal): appends wait for it. */
  private sealing: Promise<void> | undefined;

  private constructor(
    private readonly js: JetStreamClient,
    private readonly nc: NatsConnection,
    readonly stream: string,
    readonly subject: string,
    /**
     * Which log this is: the stream's creation time. Stream sequences restart with a new stream, so
     * anything keyed by sequence (the core's history messages) is keyed by this too.
     */
    readonly logId: string,
    private readonly lazyMs: number,
    /** The stream sequence of the last message written (or found at open). */
    private lastSeq: number,
  ) {}

  /** The sequence of the last message written, or found at open or replay. */
  get head(): number {
    return this.lastSeq;
  }

  /** Opens (creating if needed) the stream. */
  static async open(nc: NatsConnection, options: OpLogOptions = {}): Promise<OpLog> {
    const stream = options.stream ?? "IOASID_CORE_OPS";
    const subject = options.subject ?? "ioasid.v1.core.ops";
    const jsm = await jetstreamManager(nc);
    let lastSeq = 0;
    let created: string;
    try {
      const info = await jsm.streams.info(stream);
      lastSeq = info.state.last_seq;
      created = info.created;
    } catch {
      const info = await jsm.streams.add({
        name: stream,
        subjects: [subject],
        storage: StorageType.File,
        retention: RetentionPolicy.Limits,
        discard: DiscardPolicy.New,
        num_replicas: options.replicas ?? 1,
        max_msgs: -1,
        max_bytes: -1,
      });
      created = info.created;
    }
    return new OpLog(jetstream(nc), nc, stream, subject, created, options.lazyMs ?? 20, lastSeq);
  }

  /**
   * Queues an operation; it is written after every operation queued before it. The promise
   * settles when JetStream acknowledged the message holding it, with that message's sequence.
   * @param urgent somebody waits for it: write at the end of this turn (else within `lazyMs`)
   */
  append(op: CommittedOperation, urgent = true): Promise<number> {
    const done = new Promise<number>((resolve, reject) => this.queue.push({ op, resolve, reject }));
    if (urgent) {
      if (!this.urgentScheduled) {
        this.urgentScheduled = true;
        setImmediate(() => {
          this.urgentScheduled = false;
          this.flush();
        });
      }
    } else if (this.lazyTimer === undefined) {
      this.lazyTimer = setTimeout(() => this.flush(), this.lazyMs);
    }
    return done;
  }

  /** Writes everything queued now, in order (synchronously issued publishes). */
  flush(): void {
    if (this.lazyTimer !== undefined) {
      clearTimeout(this.lazyTimer);
      this.lazyTimer = undefined;
    }
    // Nothing may be written with the sequence the seal in flight takes: write after it.
    if (this.sealing !== undefined) {
      void this.sealing.then(
        () => this.flush(),
        () => undefined,
      );
      return;
    }
    while (this.queue.length > 0) {
      const parts: Uint8Array[] = [];
      const waiters: Array<{ resolve: (seq: number) => void; reject: (err: unknown) => void }> = [];
      let bytes = 0;
      while (this.queue.length > 0) {
        const next = this.queue[0]!;
        const encoded = encodeOperation(next.op);
        if (parts.length > 0 && bytes + encoded.length + BATCH_FRAMING_BYTES > MAX_MESSAGE_BYTES) break;
        parts.push(encoded);
        waiters.push(next);
        bytes += encoded.length + BATCH_FRAMING_BYTES;
        this.queue.shift();
      }
      this.messages++;
      const expected = this.lastSeq++;
      const written = this.js.publish(this.subject, encodeBatch(parts), { headers: formatHeaders(OpLogFormat.BATCH), expect: { lastSequence: expected } });
      this.inflight.add(written);
      void written.finally(() => this.inflight.delete(written)).catch(() => undefined);
      written.then(
        (ack) => {
          for (const w of waiters) w.resolve(ack.seq);
        },
        (err: unknown) => {
          for (const w of waiters) w.reject(err);
        },
      );
    }
  }

  /** Writes what is queued and waits until every write is acknowledged (graceful stop). */
  async drain(): Promise<void> {
    this.flush();
    await Promise.allSettled([...this.inflight]);
  }

  /**
   * Reads every operation recorded so far, in order, and hands each to `apply` with the sequence
   * of the message that holds it. A message is read whole before any of its operations is applied.
   * @returns the number of operations read
   * @throws OpLogFormatError at the first message that is not ioasid.oplog.v1 (a store written
   *   before format v1, by a newer core, or damaged): nothing after it is read
   */
  async replay(apply: (op: CommittedOperation, seq: number) => void): Promise<number> {
    const jsm = await jetstreamManager(this.nc);
    const info = await jsm.streams.info(this.stream);
    const last = info.state.last_seq;
    if (info.state.messages === 0) return 0;
    const consumer = await this.js.consumers.get(this.stream);
    const messages = await consumer.consume({ max_messages: 10_000 });
    let n = 0;
    try {
      for await (const m of messages) {
        const format = m.headers?.get(OP_LOG_FORMAT_HEADER);
        const operations = decodeMessage({ seq: m.seq, format: format === undefined || format === "" ? undefined : format, data: m.data }, this.stream);
        // undefined: a core's takeover mark, not an operation
        for (const op of operations ?? []) {
          apply(op, m.seq);
          n++;
        }
        if (m.seq >= last) break;
      }
    } finally {
      messages.stop();
    }
    this.lastSeq = last;
    return n;
  }

  /**
   * Takes the log over after a replay: writes a mark that must follow the last message replayed.
   * A write of an earlier core still on its way (held in a slow link when that core stopped) then
   * either lands before the mark — the mark is refused and this core stops, so its restart replays
   * that write too — or after it, and is refused. Either way no operation gets into the log that
   * the running core did not replay (fencing; found by the chaos soak, seed 10: a dead core's
   * delayed append stored after its successor's replay).
   * @throws when the log moved on since the replay
   */
  async seal(): Promise<void> {
    const expected = this.lastSeq;
    // Operations appended meanwhile (the first misses of a recovered delivery) wait for it (chaos
    // soak, seed 4: written with the sequence the seal took, through a slow link, they were refused
    // and the core fail-stopped at every start until the link healed).
    const sealing = this.js
      .publish(this.subject, encodeSeal(new Date()), { headers: formatHeaders(OpLogFormat.SEAL), expect: { lastSequence: expected } })
      .then(() => {
        this.lastSeq = expected + 1;
      });
    this.sealing = sealing;
    try {
      await sealing;
    } finally {
      this.sealing = undefined;
    }
  }
}

/** Headers of an op-log message: which ioasid.oplog.v1 message it holds. */
function formatHeaders(format: OpLogFormat) {
  const h = headers();
  h.set(OP_LOG_FORMAT_HEADER, format);
  return h;
}
