import { jetstream, jetstreamManager, DeliverPolicy, StorageType, RetentionPolicy, DiscardPolicy } from "@nats-io/jetstream";
import { headers, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { DEFAULT_PREFIX, encodeToken } from "./subjects.js";

/**
 * One step of the recorded history: something a component did to an IOASID or to its own
 * "hardware" (a VMCS entry written, a device PASID drained, a PASID entry torn down, a reference
 * taken). The timeline (the kernel document's column table) and the invariant checker read them.
 */
export interface HistoryRecord {
  /** Wall-clock time, ms since the epoch, with sub-ms precision. */
  readonly ts: number;
  /** The column: "vfio", "iommu", "kvm", "vdcm", "ioasid" (the core), or a tool. */
  readonly role: string;
  /** Which instance of the role ("vm-7", "idxd0"). */
  readonly instance: string;
  /** What happened, in the kernel's words where it has one ("ioasid_get", "vmcs_update", "vdev_write"…). */
  readonly action: string;
  readonly ioasid?: number;
  readonly generation?: number;
  readonly setId?: number;
  readonly spid?: number;
  /** The IOASID's reference count right after the step, when the step changed it. */
  readonly refcount?: number;
  /** The core event sequence the step belongs to (a delivery being handled). */
  readonly seq?: number;
  /** Anything else worth showing ("device idxd0 wq 1", "holder kvm/vm-1/vmcs"). */
  readonly detail?: string;
  /**
   * Published by a later incarnation than the one that did the step: a restarted core replaying
   * an operation whose records its predecessor never got to publish (it stopped first).
   */
  readonly recovered?: boolean;
}

/** What a history record carries besides its time, component and action. */
export type HistoryFields = Omit<HistoryRecord, "ts" | "role" | "instance" | "action">;

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
 * Publishes a component's history records (fire and forget: history never holds up the work it
 * records). Records of one turn of the event loop go out as one message (a JSON array), so a burst
 * (a set freed, a batch of deliveries) costs a few messages, not one per record. The history
 * stream stores them when it exists.
 */
export class HistoryRecorder {
  readonly subject: string;
  private pending: string[] = [];
  /** Records of named groups (see recordIn), published one group per message. */
  private readonly groups = new Map<string, { headers: Record<string, string>; records: string[] }>();
  private pendingBytes = 0;
  private scheduled = false;
  constructor(
    private readonly nc: NatsConnection,
    readonly role: string,
    readonly instance: string,
    prefix = DEFAULT_PREFIX,
  ) {
    this.subject = historySubject(prefix, role, instance);
  }

  /** Records one step (at `ts`: now, or when it happened, for a step published later). */
  record(action: string, fields: HistoryFields = {}, ts: number = performance.timeOrigin + performance.now()): void {
    const rec: HistoryRecord = { ts, role: this.role, instance: this.instance, action, ...fields };
    const json = JSON.stringify(rec);
    this.pending.push(json);
    this.pendingBytes += json.length + 1;
    if (this.pendingBytes > MAX_HISTORY_MESSAGE) this.flush();
    else if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /**
   * Records one step that belongs to a named group: the records of a group are published in their
   * own messages (of at most {@link GROUP_PART_RECORDS} records each), each with the JetStream
   * message id `<group>:<part>` and `headers`. Publishing the same group twice — an incarnation
   * that replays what its predecessor may or may not have published — then stores it once (within
   * the stream's duplicate window). A group's records must all be recorded in one turn.
   */
  recordIn(group: string, headers: Record<string, string>, action: string, fields: HistoryFields, ts: number): void {
    const rec: HistoryRecord = { ts, role: this.role, instance: this.instance, action, ...fields };
    let g = this.groups.get(group);
    if (g === undefined) this.groups.set(group, (g = { headers, records: [] }));
    g.records.push(JSON.stringify(rec));
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /** Publishes what is pending now. */
  flush(): void {
    this.scheduled = false;
    if (this.pending.length > 0) {
      const body = `[${this.pending.join(",")}]`;
      this.pending = [];
      this.pendingBytes = 0;
      this.publish(body);
    }
    for (const [group, g] of this.groups) {
      for (let part = 0; part * GROUP_PART_RECORDS < g.records.length; part++) {
        const h = headers();
        for (const [k, v] of Object.entries(g.headers)) h.set(k, v);
        h.set("Nats-Msg-Id", `${group}:${part}`);
        this.publish(`[${g.records.slice(part * GROUP_PART_RECORDS, (part + 1) * GROUP_PART_RECORDS).join(",")}]`, h);
      }
    }
    this.groups.clear();
  }

  private publish(body: string, h?: MsgHdrs): void {
    try {
      this.nc.publish(this.subject, body, h === undefined ? undefined : { headers: h });
    } catch {
      // A closed connection loses the records, never the work.
    }
  }
}

/** Records per message of a group (by count, so a replay splits a group as the original did). */
const GROUP_PART_RECORDS = 500;

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
 * Reads the stored history, oldest first, from `sinceMs` (a wall-clock time) on.
 * @returns the records, sorted by time
 */
export async function readHistory(nc: NatsConnection, options: { prefix?: string; sinceMs?: number } = {}): Promise<HistoryRecord[]> {
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  const name = historyStreamName(prefix);
  const jsm = await jetstreamManager(nc);
  const info = await jsm.streams.info(name);
  const out: HistoryRecord[] = [];
  if (info.state.messages === 0) return out;
  const last = info.state.last_seq;
  const js = jetstream(nc);
  const consumer = await js.consumers.get(
    name,
    options.sinceMs === undefined
      ? {}
      : { deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(options.sinceMs - 1000).toISOString() },
  );
  const messages = await consumer.consume({ max_messages: 10_000, expires: 2000 });
  try {
    for await (const m of messages) {
      try {
        const parsed = JSON.parse(m.string()) as HistoryRecord | HistoryRecord[];
        for (const rec of Array.isArray(parsed) ? parsed : [parsed]) {
          if (options.sinceMs === undefined || rec.ts >= options.sinceMs) out.push(rec);
        }
      } catch {
        // not a history record
      }
      if (m.seq >= last) break;
    }
  } finally {
    messages.stop();
  }
  return out.sort((a, b) => a.ts - b.ts);
}
