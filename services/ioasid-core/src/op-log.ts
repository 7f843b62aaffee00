import { randomUUID } from "node:crypto";
import {
  jetstream,
  jetstreamManager,
  StorageType,
  RetentionPolicy,
  DiscardPolicy,
  type JetStreamClient,
  type JetStreamManager,
  type PubAck,
} from "@nats-io/jetstream";
import { headers, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import {
  BATCH_FRAMING_BYTES,
  decodeMarker,
  decodeMessage,
  encodeBatch,
  encodeOperation,
  encodeSeal,
  OP_LOG_FORMAT_HEADER,
  OpLogFormat,
  OpLogFormatError,
  type StoredMarker,
} from "./op-codec.js";
import type { CommittedOperation } from "./operation.js";
import { PubAckInbox } from "@ioasid/bus";
import { decodeChunk, decodeSnapshot, encodeChunk, encodeMarker, MARKER_OVERHEAD_BYTES, snapshotDigest, type CoreSnapshot } from "./snapshot-codec.js";

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
  /**
   * Subject prefix of snapshot chunks, in the same stream: snapshots alternate between
   * `<snapshotSubject>.a` and `.b`. @default the op-log subject with `.ops` replaced by `.snapshot`
   *   (`ioasid.v1.core.snapshot`), or with `.snapshot` added
   */
  readonly snapshotSubject?: string;
  /**
   * Write a snapshot once this many IOASID operations were appended since the last one (a batch
   * allocation counts its IOASIDs); 0: never by count. @default {@link DEFAULT_SNAPSHOT_EVERY_OPS}
   */
  readonly snapshotEveryOps?: number;
  /** Write a snapshot once this many bytes were appended since the last one; 0: never by size. @default {@link DEFAULT_SNAPSHOT_EVERY_BYTES} */
  readonly snapshotEveryBytes?: number;
  /** Largest slice of a snapshot in one chunk message. @default just under 512 KiB */
  readonly snapshotChunkBytes?: number;
  /**
   * Called at each step of writing a snapshot, and awaited: a test seam (the crash-during-snapshot
   * tests stop the core there), not a switch. A throw aborts the snapshot like a failed write.
   */
  readonly onSnapshotStep?: (step: SnapshotStep) => void | Promise<void>;
  /**
   * How long a write JetStream could not take for a moment (its cluster electing a new leader after
   * a nats-server died, the connection moving to another server: 503 "JetStream not enabled", no
   * responders, a timeout) is retried before the core fail-stops, in ms (issue 18). @default {@link DEFAULT_WRITE_RETRY_MS}
   */
  readonly writeRetryMs?: number;
  /** Called before each retry of a write, with why the last attempt failed (logging). */
  readonly onWriteRetry?: (err: unknown, attempt: number) => void;
}

/** How long one try of an operation-log message waits for JetStream's acknowledgement (nats.js's `js.publish` default). */
export const PUBLISH_ACK_TIMEOUT_MS = 5000;

/** Default of {@link OpLogOptions.writeRetryMs}: a JetStream cluster's leader election and a client's reconnect take a few seconds. */
export const DEFAULT_WRITE_RETRY_MS = 10_000;

/**
 * Whether a failed publish may succeed if tried again: JetStream failing over (503 — "JetStream not
 * enabled" from a server whose cluster has no meta or stream leader yet, no responders), a timeout,
 * or the connection between servers. Anything else — above all a wrong last sequence, which is the
 * fence (another core wrote) — is final.
 */
export function isTransientWriteError(err: unknown): boolean {
  const text = String(err);
  if (/wrong last sequence|last sequence mismatch/i.test(text)) return false;
  return (
    (err as { code?: unknown })?.code === 503 ||
    /JetStreamNotEnabled|jetstream is not enabled|no responders|503|timeout|temporarily unavailable|disconnect|reconnect/i.test(text)
  );
}

/** Default of {@link OpLogOptions.snapshotEveryOps}: a restart replays at most about this many operations. */
export const DEFAULT_SNAPSHOT_EVERY_OPS = 100_000;
/** Default of {@link OpLogOptions.snapshotEveryBytes}. */
export const DEFAULT_SNAPSHOT_EVERY_BYTES = 16 * 1024 * 1024;

/** A step of writing a snapshot (see {@link OpLogOptions.onSnapshotStep}). */
export type SnapshotStep =
  | { readonly kind: "captured"; readonly position: number; readonly bytes: number }
  | { readonly kind: "chunk"; readonly index: number; readonly of: number; readonly seq: number }
  | { readonly kind: "before-marker"; readonly tailOperations: number }
  | { readonly kind: "committed"; readonly markerSeq: number };

/** What one snapshot wrote. */
export interface SnapshotInfo {
  /** The last op-log message (stream sequence) whose operations the snapshot itself holds. */
  readonly position: number;
  /** The marker's stream sequence: every earlier op-log message is gone. */
  readonly markerSeq: number;
  readonly bytes: number;
  readonly chunks: number;
  /** Operations written meanwhile, carried in the marker. */
  readonly tailOperations: number;
  /** Appends were held from the capture to the marker (the tail did not fit the marker). */
  readonly held: boolean;
  readonly ms: number;
}

/** Largest message the log writes (nats-server's default max_payload is 1 MiB). */
const MAX_MESSAGE_BYTES = 512 * 1024;
/** JetStream's header that rolls a subject up: the message replaces every earlier one on its subject. */
const ROLLUP_HEADER = "Nats-Rollup";

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
 * (its publish timed out through a slow link, nats-server restarted with it in flight) no later one
 * is stored after a gap — found by the chaos suite: an operation on a set whose creation was lost
 * made every later replay fail. A write that failed is tried again, in order, under the same
 * message id (so a first try that was stored unanswered is acknowledged as a duplicate), while
 * JetStream is failing over, within `writeRetryMs` (issue 18: a NATS cluster electing a leader);
 * after that, or on a wrong last sequence once its predecessor is stored (the fence: another core
 * wrote), the core stops (fail-stop), and its restart replays a log without holes.
 *
 * Snapshots (issue 15, DESIGN §9 "core restart bounded by live state"): every
 * `snapshotEveryOps` operations or `snapshotEveryBytes` bytes the log asks its
 * {@link snapshotSource} for the core's state, at a point where every operation applied is in a
 * message already published, and writes it as chunks on a snapshot subject of the same stream, then
 * a marker on the op-log subject with `Nats-Rollup: sub`, which JetStream stores and, in the same
 * step, uses to drop every earlier op-log message. Every chunk and the marker take their place in
 * the same chain of expected sequences as the operations, so a fenced core can slip neither a chunk
 * nor a marker in (a chunk store of its own, or a stream-admin purge, would need another fence or
 * the admin API the core's user is denied, DESIGN §11). Operations keep being written while the
 * chunks are; those messages are rolled up with the rest, so the marker carries their operations
 * (its `tail`); a tail too big for one message makes the log try once more with appends held from
 * the capture to the marker. A crash before the marker leaves the log as it was (orphan chunks, which
 * the next snapshot's first chunk rolls up with its slot); after it, the marker names everything.
 * Snapshots alternate between two slots, so the one a marker names is never rolled up before a
 * newer marker replaces it.
 */
export class OpLog {
  private queue: Array<{ op: CommittedOperation; resolve: (seq: number) => void; reject: (err: unknown) => void }> = [];
  private urgentScheduled = false;
  private lazyTimer: NodeJS.Timeout | undefined;
  /** Messages written (each one JetStream publish). */
  messages = 0;
  private readonly inflight = new Set<Promise<unknown>>();
  /** The last message's write, retries included: the next message's retry waits for it (the chain). */
  private lastWrite: Promise<unknown> = Promise.resolve();
  /** This log writer's own id in message ids: a fenced core's retry is never taken as this one's duplicate. */
  private readonly writerId = randomUUID();
  /** Where the chain's messages are acknowledged (one inbox subscription, not a nats.js request each). */
  private readonly acks: PubAckInbox;
  /** A seal or snapshot marker being written: appends wait for it (see hold). */
  private barrier: Promise<void> | undefined;
  /** A flush came while the barrier stood: flush when it falls. */
  private flushAfterBarrier = false;
  /**
   * The core's state, encoded, at this moment (called synchronously, right after every operation
   * applied so far was published). Snapshots are written only once it is set.
   */
  snapshotSource: (() => Uint8Array) | undefined;
  /** A snapshot could not be written: the log is no longer known to be a prefix (fail-stop). */
  onSnapshotFailed: ((err: unknown) => void) | undefined;
  /** A snapshot was written. */
  onSnapshot: ((info: SnapshotInfo) => void) | undefined;
  /** A message of operations was written and acknowledged, after `seconds` (the core's metrics). */
  onWrite: ((seconds: number) => void) | undefined;
  /** Why this log takes no snapshots (a stream that cannot roll up), or undefined. */
  readonly snapshotsDisabled: string | undefined;
  /** Snapshots written by this log. */
  snapshots = 0;
  /** The snapshot written now, if any. */
  private snapshotRun: Promise<SnapshotInfo | undefined> | undefined;
  /** Operation messages published while a snapshot is written (its marker carries them). */
  private tail: Uint8Array[] | undefined;
  private tailBytes = 0;
  /** Operations (IOASIDs for a batch allocation) and bytes appended since the last snapshot. */
  private opsSinceSnapshot = 0;
  private bytesSinceSnapshot = 0;
  /** The chunk subject the marker in force names (the next snapshot writes the other one). */
  private committedSlot: string | undefined;
  /** What the last replay found: a snapshot restored, and operations replayed after it. */
  lastReplay: { snapshotMs: number; snapshotBytes: number; snapshotSeq: number; tailOperations: number } | undefined;

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
    private readonly jsm: JetStreamManager,
    private readonly snapshotSubject: string,
    private readonly options: OpLogOptions,
    snapshotsDisabled: string | undefined,
  ) {
    this.snapshotsDisabled = snapshotsDisabled;
    this.acks = new PubAckInbox(nc);
  }

  /** The sequence of the last message written, or found at open or replay. */
  get head(): number {
    return this.lastSeq;
  }

  /**
   * Opens (creating if needed) the stream. A new stream holds the op-log subject and the snapshot
   * subjects and allows rollups. A stream made before snapshots (the op-log subject alone, no
   * rollups) is updated to that when this connection may (insecure stacks, the operator); under
   * NATS permissions the core's user may not update a stream (DESIGN §11), so the log then works
   * as before — full replay, no snapshots — and {@link snapshotsDisabled} says what an operator runs.
   */
  static async open(nc: NatsConnection, options: OpLogOptions = {}): Promise<OpLog> {
    const stream = options.stream ?? "IOASID_CORE_OPS";
    const subject = options.subject ?? "ioasid.v1.core.ops";
    const snapshotSubject = options.snapshotSubject ?? (subject.endsWith(".ops") ? `${subject.slice(0, -4)}.snapshot` : `${subject}.snapshot`);
    const subjects = [subject, `${snapshotSubject}.*`];
    const jsm = await jetstreamManager(nc);
    let lastSeq = 0;
    let created: string;
    let disabled: string | undefined;
    try {
      const info = await jsm.streams.info(stream);
      lastSeq = info.state.last_seq;
      created = info.created;
      const c = info.config;
      const missing = subjects.filter((x) => !c.subjects.includes(x));
      if (missing.length > 0 || c.allow_rollup_hdrs !== true || c.deny_purge === true) {
        try {
          await jsm.streams.update(stream, { subjects: [...c.subjects, ...missing], allow_rollup_hdrs: true, deny_purge: false });
        } catch (err) {
          disabled =
            `stream ${stream} predates snapshots (subjects ${c.subjects.join(", ")}, rollups ${c.allow_rollup_hdrs === true ? "allowed" : "not allowed"}) ` +
            `and this core may not update it (${String(err)}): restarts replay the whole log. An operator enables snapshots with ` +
            `\`nats stream edit ${stream} --subjects ${[...c.subjects, ...missing].join(",")} --allow-rollup --no-deny-purge\``;
        }
      }
    } catch (err) {
      if (!isStreamNotFound(err)) throw err;
      const info = await jsm.streams.add({
        name: stream,
        subjects,
        storage: StorageType.File,
        retention: RetentionPolicy.Limits,
        discard: DiscardPolicy.New,
        num_replicas: options.replicas ?? 1,
        max_msgs: -1,
        max_bytes: -1,
        allow_rollup_hdrs: true,
      });
      created = info.created;
    }
    return new OpLog(jetstream(nc), nc, stream, subject, created, options.lazyMs ?? 20, lastSeq, jsm, snapshotSubject, options, disabled);
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
    // Nothing may be written with the sequence the seal or marker in flight takes: write after it.
    if (this.barrier !== undefined) {
      this.flushAfterBarrier = true;
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
        this.opsSinceSnapshot += next.op.kind === "batchAlloc" ? next.op.count : 1;
        this.queue.shift();
      }
      this.messages++;
      this.bytesSinceSnapshot += bytes;
      if (this.tail !== undefined) {
        this.tail.push(...parts);
        this.tailBytes += bytes;
      }
      const started = performance.now();
      const written = this.publishChained(this.subject, encodeBatch(parts), formatHeaders(OpLogFormat.BATCH));
      written.then(
        (ack) => {
          this.onWrite?.((performance.now() - started) / 1000);
          for (const w of waiters) w.resolve(ack.seq);
        },
        (err: unknown) => {
          for (const w of waiters) w.reject(err);
        },
      );
    }
    this.snapshotIfDue();
  }

  /** Writes what is queued and waits until every write is acknowledged (graceful stop). */
  async drain(): Promise<void> {
    await this.snapshotRun?.catch(() => undefined);
    this.flush();
    await Promise.allSettled([...this.inflight]);
  }

  /**
   * Reads every operation recorded so far, in order, and hands each to `apply` with the sequence
   * of the message that holds it. A message is read whole before any of its operations is applied.
   * When the log starts with a snapshot marker, the snapshot it names goes to `restore` first (the
   * model must be new), and the marker's tail operations are applied with the marker's sequence.
   * @returns the number of operations read (a snapshot's state not counted)
   * @throws OpLogFormatError at the first message that is not ioasid.oplog.v1 (a store written
   *   before format v1, by a newer core, or damaged), or a snapshot that is missing or damaged:
   *   nothing after it is read
   */
  async replay(apply: (op: CommittedOperation, seq: number) => void, restore?: (snapshot: CoreSnapshot, seq: number) => void): Promise<number> {
    const info = await this.jsm.streams.info(this.stream);
    // The chain of expected sequences runs over the whole stream (chunks included).
    this.lastSeq = info.state.last_seq;
    if (info.state.messages === 0) return 0;
    const last = await this.lastSeqOf(this.subject);
    if (last === 0) return 0;
    const consumer = await this.js.consumers.get(this.stream, { filter_subjects: this.subject });
    const messages = await consumer.consume({ max_messages: 10_000 });
    let n = 0;
    let first = true;
    try {
      for await (const m of messages) {
        const header = m.headers?.get(OP_LOG_FORMAT_HEADER);
        const format = header === undefined || header === "" ? undefined : header;
        if (format === OpLogFormat.SNAPSHOT_MARKER) {
          // A rollup leaves the marker first; one after operations means the stream did not roll up.
          if (!first) {
            throw new OpLogFormatError(
              `message ${m.seq} of the operation log (JetStream stream ${this.stream}) is a snapshot marker after operations: the stream ` +
                `did not roll up (allow_rollup_hdrs off?), and the core refuses to guess which state is right`,
              { stream: this.stream, seq: m.seq },
            );
          }
          const stored = decodeMarker({ seq: m.seq, format, data: m.data }, this.stream);
          const t0 = performance.now();
          const snapshot = await this.readSnapshot(stored, m.seq);
          if (restore === undefined) throw new Error("the log starts with a snapshot and no restore was given");
          restore(snapshot.state, m.seq);
          for (const op of stored.tail) {
            apply(op, m.seq);
            n++;
          }
          this.committedSlot = stored.marker.chunkSubject;
          this.opsSinceSnapshot = stored.tail.length;
          this.lastReplay = { snapshotMs: performance.now() - t0, snapshotBytes: snapshot.bytes, snapshotSeq: m.seq, tailOperations: stored.tail.length };
        } else {
          const operations = decodeMessage({ seq: m.seq, format, data: m.data }, this.stream);
          // undefined: a core's takeover mark, not an operation
          for (const op of operations ?? []) {
            apply(op, m.seq);
            n++;
            this.opsSinceSnapshot += op.kind === "batchAlloc" ? op.count : 1;
          }
          this.bytesSinceSnapshot += m.data.length;
        }
        first = false;
        if (m.seq >= last) break;
      }
    } finally {
      messages.stop();
    }
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
    // Operations appended meanwhile (the first misses of a recovered delivery) wait for it (chaos
    // soak, seed 4: written with the sequence the seal took, through a slow link, they were refused
    // and the core fail-stopped at every start until the link healed).
    const release = this.hold();
    try {
      await this.publishChained(this.subject, encodeSeal(new Date()), formatHeaders(OpLogFormat.SEAL));
    } finally {
      release();
    }
  }

  /**
   * Writes a snapshot now (else when the thresholds say so): the state {@link snapshotSource}
   * gives, chunks, then the marker. Resolves with what it wrote, or undefined when it cannot
   * (no source, snapshots disabled, one already being written).
   * @throws what a write threw; {@link onSnapshotFailed} is told too (the core stops)
   */
  snapshot(): Promise<SnapshotInfo | undefined> {
    if (this.snapshotSource === undefined || this.snapshotsDisabled !== undefined || this.snapshotRun !== undefined) return Promise.resolve(undefined);
    const run = this.writeSnapshot(false).finally(() => {
      this.snapshotRun = undefined;
    });
    this.snapshotRun = run;
    run.then(
      (info) => info !== undefined && this.onSnapshot?.(info),
      (err: unknown) => this.onSnapshotFailed?.(err),
    );
    return run;
  }

  private snapshotIfDue(): void {
    if (this.snapshotRun !== undefined || this.snapshotSource === undefined || this.snapshotsDisabled !== undefined) return;
    const everyOps = this.options.snapshotEveryOps ?? DEFAULT_SNAPSHOT_EVERY_OPS;
    const everyBytes = this.options.snapshotEveryBytes ?? DEFAULT_SNAPSHOT_EVERY_BYTES;
    if ((everyOps > 0 && this.opsSinceSnapshot >= everyOps) || (everyBytes > 0 && this.bytesSinceSnapshot >= everyBytes)) {
      // Not inside flush: the capture flushes itself, in a turn of its own.
      const run = new Promise<void>((resolve) => setImmediate(resolve)).then(() => this.writeSnapshot(false));
      this.snapshotRun = run.finally(() => {
        this.snapshotRun = undefined;
      });
      run.then(
        (info) => info !== undefined && this.onSnapshot?.(info),
        (err: unknown) => this.onSnapshotFailed?.(err),
      );
    }
  }

  private async writeSnapshot(held: boolean): Promise<SnapshotInfo | undefined> {
    const source = this.snapshotSource;
    if (source === undefined) return undefined;
    const t0 = performance.now();
    const step = this.options.onSnapshotStep ?? (() => undefined);
    // A seal or another marker in flight first: the capture must follow every message before it.
    while (this.barrier !== undefined) await this.barrier;
    // Every operation applied so far goes into a message now, so the state taken below is exactly
    // the state after `position` (everything later is in the tail or after the marker).
    this.flush();
    let release = held ? this.hold() : undefined;
    try {
      const position = this.lastSeq;
      const bytes = source();
      this.opsSinceSnapshot = 0;
      this.bytesSinceSnapshot = 0;
      if (!held) {
        this.tail = [];
        this.tailBytes = 0;
      }
      await step({ kind: "captured", position, bytes: bytes.length });
      const slot = this.committedSlot === `${this.snapshotSubject}.a` ? `${this.snapshotSubject}.b` : `${this.snapshotSubject}.a`;
      const chunkBytes = Math.min(this.options.snapshotChunkBytes ?? MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES) - 64;
      const count = Math.max(1, Math.ceil(bytes.length / chunkBytes));
      const chunkSeqs: bigint[] = [];
      for (let i = 0; i < count; i++) {
        const h = formatHeaders(OpLogFormat.SNAPSHOT_CHUNK);
        // The first chunk drops what the slot held: a superseded snapshot or a failed one's chunks.
        if (i === 0) h.set(ROLLUP_HEADER, "sub");
        const ack = await this.publishChained(slot, encodeChunk(i, bytes.subarray(i * chunkBytes, (i + 1) * chunkBytes)), h);
        chunkSeqs.push(BigInt(ack.seq));
        await step({ kind: "chunk", index: i, of: count, seq: ack.seq });
      }
      release ??= this.hold();
      const tail = this.tail ?? [];
      this.tail = undefined;
      if (this.tailBytes + tail.length * BATCH_FRAMING_BYTES + MARKER_OVERHEAD_BYTES > MAX_MESSAGE_BYTES) {
        // Too much was written meanwhile for one marker: once more, appends held throughout.
        release();
        release = undefined;
        return await this.writeSnapshot(true);
      }
      await step({ kind: "before-marker", tailOperations: tail.length });
      const marker = encodeMarker(
        {
          snapshotTime: new Date(),
          position: BigInt(position),
          chunkSubject: slot,
          chunkSeqs,
          snapshotBytes: BigInt(bytes.length),
          sha256: snapshotDigest(bytes),
        },
        tail,
      );
      const h = formatHeaders(OpLogFormat.SNAPSHOT_MARKER);
      h.set(ROLLUP_HEADER, "sub");
      // The core's history of the operations rolled up went out on this connection before the
      // marker: let the server have it first (a restart republishes history only from the marker on).
      await this.nc.flush();
      const ack = await this.publishChained(this.subject, marker, h);
      this.committedSlot = slot;
      this.snapshots++;
      await step({ kind: "committed", markerSeq: ack.seq });
      return { position, markerSeq: ack.seq, bytes: bytes.length, chunks: count, tailOperations: tail.length, held, ms: performance.now() - t0 };
    } finally {
      this.tail = undefined;
      release?.();
    }
  }

  /** Reads the snapshot a marker names: its chunks, checked against the marker, decoded. */
  private async readSnapshot(stored: StoredMarker, seq: number): Promise<{ state: CoreSnapshot; bytes: number }> {
    const at = { stream: this.stream, seq };
    const m = stored.marker;
    const parts = await Promise.all(
      m.chunkSeqs.map(async (chunkSeq, i) => {
        const chunkAt = { stream: this.stream, seq: Number(chunkSeq) };
        const sm = await this.jsm.streams
          .getMessage(this.stream, { seq: Number(chunkSeq) })
          .then((x) => x ?? Promise.reject(new Error("no message found")))
          .catch((err: unknown) => {
            throw new OpLogFormatError(
              `snapshot chunk ${chunkSeq} named by message ${seq} of the operation log (JetStream stream ${this.stream}) cannot be read ` +
                `(${String(err)}): the snapshot is lost, and the core refuses to start without it. Restore the stream from a backup, or start ` +
                `from an empty store (\`ioasidctl down --purge\`).`,
              chunkAt,
            );
          });
        if (sm.subject !== m.chunkSubject || sm.header.get(OP_LOG_FORMAT_HEADER) !== OpLogFormat.SNAPSHOT_CHUNK) {
          throw new OpLogFormatError(`message ${chunkSeq} is not a chunk on ${m.chunkSubject}, as message ${seq} of the operation log says`, chunkAt);
        }
        return decodeChunk(sm.data, i, chunkAt);
      }),
    );
    const bytes = Buffer.concat(parts);
    if (bytes.length !== Number(m.snapshotBytes) || !snapshotDigest(bytes).equals(Buffer.from(m.sha256))) {
      throw new OpLogFormatError(
        `the snapshot named by message ${seq} of the operation log (JetStream stream ${this.stream}) does not match its marker ` +
          `(${bytes.length} bytes where ${m.snapshotBytes} are named, or another digest): the core refuses it rather than misread its state`,
        at,
      );
    }
    return { state: decodeSnapshot(bytes, at), bytes: bytes.length };
  }

  /** Stream sequence of the last message on `subject`, 0 when there is none. */
  private async lastSeqOf(subject: string): Promise<number> {
    try {
      return (await this.jsm.streams.getMessage(this.stream, { last_by_subj: subject }))?.seq ?? 0;
    } catch (err) {
      if (/no message found/i.test(String(err))) return 0;
      throw err;
    }
  }

  /**
   * Publishes the next message of the chain: it must follow every message this log wrote or found.
   * Messages are pipelined. One that fails is tried again once its predecessor is stored (it could
   * not be stored before: the expected last sequence), and again while JetStream is failing over,
   * within `writeRetryMs`; every try has the same message id (`<writer>:<expected>`), so a first try
   * that was stored but whose answer was lost is acknowledged as a duplicate, not written twice. A
   * wrong last sequence after the predecessor is stored is the fence: final.
   */
  private publishChained(subject: string, data: Uint8Array, hd: MsgHdrs): Promise<PubAck> {
    const expected = this.lastSeq++;
    const msgID = `${this.writerId}:${expected}`;
    const previous = this.lastWrite;
    const publish = () => this.acks.publish(subject, data, hd, { msgID, lastSequence: expected, timeoutMs: PUBLISH_ACK_TIMEOUT_MS });
    const written = publish().catch(async (first: unknown) => {
      // A predecessor that failed for good breaks the chain: this one fails with it.
      await previous;
      const deadline = Date.now() + (this.options.writeRetryMs ?? DEFAULT_WRITE_RETRY_MS);
      let err = first;
      let wait = 50;
      for (let attempt = 1; ; attempt++) {
        // The first retry is owed whatever the first try met (its predecessor may have been missing then).
        if (attempt > 1 && (!isTransientWriteError(err) || Date.now() >= deadline)) throw err;
        this.options.onWriteRetry?.(err, attempt);
        if (attempt > 1) {
          await new Promise((r) => setTimeout(r, wait));
          wait = Math.min(wait * 2, 1000);
        }
        try {
          return await publish();
        } catch (again) {
          err = again;
        }
      }
    });
    this.lastWrite = written;
    this.inflight.add(written);
    void written.finally(() => this.inflight.delete(written)).catch(() => undefined);
    return written;
  }

  /** Holds appends (they queue) until the returned function is called; then writes them. */
  private hold(): () => void {
    let release!: () => void;
    const barrier = new Promise<void>((resolve) => (release = resolve));
    this.barrier = barrier;
    return () => {
      if (this.barrier === barrier) this.barrier = undefined;
      release();
      if (this.flushAfterBarrier) {
        this.flushAfterBarrier = false;
        this.flush();
      }
    };
  }
}

function isStreamNotFound(err: unknown): boolean {
  return (
    /stream not found/i.test(String(err)) ||
    (err as { code?: unknown })?.code === 404 ||
    (err as { api_error?: { err_code?: number } })?.api_error?.err_code === 10059
  );
}

/** Headers of an op-log message: which ioasid.oplog.v1 message it holds. */
function formatHeaders(format: OpLogFormat) {
  const h = headers();
  h.set(OP_LOG_FORMAT_HEADER, format);
  return h;
}
