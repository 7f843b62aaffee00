import { jetstream, jetstreamManager, StorageType, RetentionPolicy, DiscardPolicy, type JetStreamClient } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import type { OpRecord } from "./ops.js";

/** Options of {@link OpLog.open}. */
export interface OpLogOptions {
  /** JetStream stream name. @default "IOASID_CORE_OPS" */
  readonly stream?: string;
  /** Subject the operations are published on. @default "ioasid.v1.core.ops" */
  readonly subject?: string;
  /** Stream replicas: 1 on one server, 3 in a NATS cluster (configuration only). @default 1 */
  readonly replicas?: number;
}

/**
 * The core's operation log: a JetStream stream with file storage. The core appends every operation
 * its model accepted, in the order it applied them, and a restarted core replays the stream to
 * rebuild its state (DESIGN §4.6). Appends are published in call order on one connection, so the
 * stream order is the application order; an operation's reply waits for its append to be
 * acknowledged, which makes every earlier operation durable too.
 */
export class OpLog {
  private constructor(
    private readonly js: JetStreamClient,
    private readonly nc: NatsConnection,
    readonly stream: string,
    readonly subject: string,
  ) {}

  /** Opens (creating if needed) the stream. */
  static async open(nc: NatsConnection, options: OpLogOptions = {}): Promise<OpLog> {
    const stream = options.stream ?? "IOASID_CORE_OPS";
    const subject = options.subject ?? "ioasid.v1.core.ops";
    const jsm = await jetstreamManager(nc);
    try {
      await jsm.streams.info(stream);
    } catch {
      await jsm.streams.add({
        name: stream,
        subjects: [subject],
        storage: StorageType.File,
        retention: RetentionPolicy.Limits,
        discard: DiscardPolicy.New,
        num_replicas: options.replicas ?? 1,
        max_msgs: -1,
        max_bytes: -1,
      });
    }
    return new OpLog(jetstream(nc), nc, stream, subject);
  }

  /**
   * Appends an operation. The publish is issued synchronously (so call order is stream order);
   * the promise settles when JetStream acknowledged it.
   */
  append(op: OpRecord): Promise<void> {
    return this.js.publish(this.subject, JSON.stringify(op)).then(() => undefined);
  }

  /**
   * Reads every operation recorded so far, in order, and hands each to `apply`.
   * @returns the number of operations read
   */
  async replay(apply: (op: OpRecord) => void): Promise<number> {
    const jsm = await jetstreamManager(this.nc);
    const info = await jsm.streams.info(this.stream);
    const last = info.state.last_seq;
    if (info.state.messages === 0) return 0;
    const consumer = await this.js.consumers.get(this.stream);
    const messages = await consumer.consume({ max_messages: 10_000 });
    let n = 0;
    try {
      for await (const m of messages) {
        apply(JSON.parse(m.string()) as OpRecord);
        n++;
        if (m.seq >= last) break;
      }
    } finally {
      messages.stop();
    }
    return n;
  }
}
