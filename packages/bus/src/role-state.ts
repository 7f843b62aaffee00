import {
  jetstream,
  jetstreamManager,
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiError,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from "@nats-io/jetstream";
import { headers as natsHeaders, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { Code, DomainError } from "@ioasid/errors";
import { bus } from "@ioasid/proto";
import { isTransientJetStreamError } from "./jetstream-retry.js";
import { pubAckInbox } from "./pub-ack-inbox.js";
import { DEFAULT_PREFIX, encodeToken } from "./subjects.js";

// A role's own state (its modelled hardware: VMCS tables, device PASID entries, IOMMU PASID tables)
// kept in JetStream so it survives kill -9 of the role (DESIGN §4.6 for the core; issue 6 for the
// roles). One stream per prefix; each role instance writes one subject per entry and only the last
// message of a subject is kept (max_msgs_per_subject 1): a key-value store on plain JetStream, with
// an empty payload meaning "deleted". Each message holds one entry of the role's proto state
// message (`ioasid.<role>.v1.<Role>StateEntry`), encoded by the role's {@link StateCodec} and
// marked with its format, so that nothing is ever misread (DESIGN §2 "Contracts first").

/** Header names on role-state messages. */
export const RoleStateHeaders = {
  /** Full name of the proto message the payload is, e.g. `ioasid.kvm.v1.KvmStateEntry`. */
  FORMAT: "Ioasid-Format",
  /** The entry's key (subjects encode it: the header keeps it readable as written). */
  KEY: "Ioasid-State-Key",
  /** On a journal message: the full name of its entries' message (the role's `<Role>StateEntry`). */
  ENTRY_FORMAT: "Ioasid-Entry-Format",
} as const;

/** The `Ioasid-Format` of a journal message (several entries in one message). */
export const ROLE_STATE_JOURNAL_FORMAT = "ioasid.bus.v1.RoleStateJournal";

/** Stable reason of a {@link DomainError} for a kept state this role cannot read. */
export const ROLE_STATE_UNREADABLE = "ROLE_STATE_UNREADABLE";

/**
 * How a role's kept entries become bytes and back: the encode/decode of its proto state entry
 * message, with the conversion from and to the role's domain tables (one codec module per role).
 */
export interface StateCodec<T> {
  /** Full proto name of the entry message (the format marker), e.g. `ioasid.kvm.v1.KvmStateEntry`. */
  readonly format: string;
  /** The entry as proto bytes; never empty (an empty payload means "deleted"). */
  encode(entry: T): Uint8Array;
  /** The entry back from {@link encode}'s bytes. @throws when the bytes are not such an entry */
  decode(bytes: Uint8Array): T;
}

/** A ts-proto message type: what {@link protoStateCodec} needs of it. */
export interface ProtoMessageFns<M> {
  encode(message: M): { finish(): Uint8Array };
  decode(input: Uint8Array): M;
}

/**
 * A {@link StateCodec} over a ts-proto entry message: `toMessage`/`fromMessage` convert between the
 * role's domain entry and the message (`fromMessage` throws on an entry without its oneof).
 *
 * @example
 * const codec = protoStateCodec("ioasid.kvm.v1.KvmStateEntry", kvmState.KvmStateEntry, toEntryMessage, fromEntryMessage);
 */
export function protoStateCodec<T, M>(format: string, fns: ProtoMessageFns<M>, toMessage: (entry: T) => M, fromMessage: (message: M) => T): StateCodec<T> {
  return {
    format,
    encode: (entry) => fns.encode(toMessage(entry)).finish(),
    decode: (bytes) => fromMessage(fns.decode(bytes)),
  };
}

/**
 * A field a kept entry must have (a message field proto leaves unset when it is missing), for the
 * codecs' `fromMessage`.
 * @throws Error naming the field, so {@link RoleState.load} refuses the entry instead of misreading it
 */
export function requireField<V>(value: V | undefined, field: string): V {
  if (value === undefined) throw new Error(`${field} is missing`);
  return value;
}

/** One change of a role's state: `value` undefined deletes the key. */
export interface StateChange<T = unknown> {
  readonly key: string;
  readonly value: T | undefined;
}

/** Where a role writes its state (tests pass an in-memory one). */
export interface RoleStatePort<T = unknown> {
  /** Writes the changes, in order, and resolves once the server stored every one of them. */
  write(changes: readonly StateChange<T>[]): Promise<void>;
}

/** The JetStream stream of every role's state under a prefix. */
export function roleStateStreamName(prefix: string): string {
  return `${prefix.replace(/[^A-Za-z0-9_-]/g, "_").toUpperCase()}_ROLESTATE`;
}

/** Subject of one key of a role instance's state. */
export function roleStateSubject(prefix: string, role: string, instance: string, key: string): string {
  return `${roleStatePrefix(prefix, role, instance)}.${encodeToken(key)}`;
}

function roleStatePrefix(prefix: string, role: string, instance: string): string {
  return `${prefix}.rolestate.${encodeToken(role)}.${encodeToken(instance)}`;
}

/**
 * Subject of one journal slot of a role instance's state: `<…>.~j.<slot>`. Two tokens, and `~j` is
 * no encoded key (encodeToken writes `~` only before two hex digits or `u`), so no key's subject
 * is a slot's.
 */
export function roleStateJournalSubject(prefix: string, role: string, instance: string, slot: number): string {
  return `${roleStatePrefix(prefix, role, instance)}.~j.${slot}`;
}

/**
 * Creates the role-state stream if it does not exist. The core does at start: with authorization
 * on (DESIGN §11) a role may not create streams, so the stream must be there before the roles.
 * @throws Error saying so when the stream is missing and this user may not create it
 */
export async function ensureRoleStateStream(nc: NatsConnection, prefix = DEFAULT_PREFIX, replicas = 1): Promise<void> {
  await ensureRoleStateStreamWith(await jetstreamManager(nc), prefix, replicas);
}

/** The part of a JetStream manager {@link ensureRoleStateStreamWith} uses. */
export interface RoleStateStreamAdmin {
  readonly streams: {
    info(name: string): Promise<unknown>;
    add(config: Partial<StreamConfig>): Promise<unknown>;
  };
}

/** {@link ensureRoleStateStream} on a given manager (tests give one that fails as a cluster without quorum does). */
export async function ensureRoleStateStreamWith(jsm: RoleStateStreamAdmin, prefix = DEFAULT_PREFIX, replicas = 1): Promise<void> {
  const name = roleStateStreamName(prefix);
  try {
    await jsm.streams.info(name);
    return;
  } catch (err) {
    // A cluster without a JetStream quorum answers 503 or not at all: that is not "missing", and
    // the caller (a role's start, under retryTransient) waits for it rather than creating.
    if (isTransientJetStreamError(err)) throw err;
    // Missing (or not readable): try to create it.
  }
  try {
    await jsm.streams.add({
      name,
      subjects: [`${prefix}.rolestate.>`],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      discard: DiscardPolicy.Old,
      max_msgs_per_subject: 1,
      num_replicas: replicas,
    });
  } catch (err) {
    // Another role created it meanwhile, or this user may not: then it must exist already.
    await jsm.streams.info(name).catch((infoErr: unknown) => {
      // "Already in use" says the stream exists: an info that still fails is the cluster without
      // a leader for it (CI saw this with two of three servers down), so a transient failure the
      // caller waits out, not a verdict that the role may not start.
      if (isTransientJetStreamError(infoErr) || /already in use/i.test(String(err))) {
        // The info's own text stays in `cause`: "stream not found" in the message would read as permanent.
        throw new Error(`the role-state stream ${name} exists but JetStream cannot answer for it now: temporarily unavailable (the add: ${String(err)})`, {
          cause: infoErr,
        });
      }
      throw new Error(
        `the role-state stream ${name} does not exist and this connection cannot create it (${String(err)}); ioasid-core creates it at start: start the core first`,
        { cause: err },
      );
    });
  }
}

/** Options of {@link RoleState.open}. */
export interface RoleStateOptions<T> {
  /** The role, e.g. "kvm" (the subject token after `rolestate`). */
  readonly role: string;
  /** The role instance, e.g. "kvm0". */
  readonly instance: string;
  /** How the role's entries are encoded (its proto state entry message). */
  readonly codec: StateCodec<T>;
  /** @default {@link DEFAULT_PREFIX} */
  readonly prefix?: string;
  /** Replicas of the stream when this call creates it. @default 1 */
  readonly replicas?: number;
  /** How a failed write is retried before it is given up (see {@link StateWriteRetryOptions}). */
  readonly retry?: StateWriteRetryOptions;
  /** The journal's shape (tests make it small). */
  readonly journal?: RoleStateJournalOptions;
}

/**
 * How {@link RoleState} groups writes into journal messages (issue 15: "one store write per batch,
 * not per entry").
 */
export interface RoleStateJournalOptions {
  /** Journal slots (subjects) reused in a ring (at most `slots × maxBytes` kept in journals per instance). @default 64 */
  readonly slots?: number;
  /** Most bytes of entries in one journal message (a larger write takes several). @default 262144 */
  readonly maxBytes?: number;
  /** A write of fewer distinct keys than this is published one message per key. @default 3 */
  readonly minKeys?: number;
}

/**
 * How {@link RoleState.write} retries a write JetStream did not acknowledge (issue 15: one
 * JetStream write that timed out under load made KVM fail-stop, with nothing to restart it).
 */
export interface StateWriteRetryOptions {
  /** How long one attempt waits for JetStream's acknowledgement, ms. @default 5000 (the JetStream client's) */
  readonly attemptTimeoutMs?: number;
  /**
   * How long after its first failure a write is retried before {@link RoleState.write} rejects with
   * a {@link StateWriteError} (each attempt's wait is cut to what is left), ms; 0: never retried. @default 20000
   */
  readonly retryMs?: number;
  /** Wait before the first retry, doubled at each one up to 2 s, ms. @default 100 */
  readonly initialDelayMs?: number;
  /**
   * Told before each retry (a role logs it); the retry waits for the promise it returns, if any
   * (a test holds it back to order other writes before it).
   */
  readonly onRetry?: (retry: StateWriteRetry) => void | Promise<void>;
}

/** One retry of a state write, as {@link StateWriteRetryOptions.onRetry} is told it. */
export interface StateWriteRetry {
  /** The attempt about to be made (2 for the first retry). */
  readonly attempt: number;
  /** The keys it writes again (their latest values). */
  readonly keys: readonly string[];
  /** Why the previous attempt failed. */
  readonly error: unknown;
  /** Time since the first failure, ms. */
  readonly elapsedMs: number;
}

/** A state write that was not kept within its bound: the role must stop (see {@link failStopOnWriteError}). */
export class StateWriteError extends Error {
  constructor(
    message: string,
    /** Attempts made. */
    readonly attempts: number,
    options: { cause: unknown },
  ) {
    super(message, options);
    this.name = "StateWriteError";
  }
}

/**
 * The state of one role instance in JetStream, in the role's proto format.
 *
 * Writes are grouped (issue 15: "one store write per batch, not per entry"; the crashed-guest bench
 * spent most of its time in one JetStream publish per entry): one group is published at a time, in
 * call order, and every write made meanwhile joins the next group. A group of a few keys is
 * published one message per key (`<…>.<key>`); a larger one as one {@link bus.RoleStateJournal}
 * message on a journal slot (`<…>.~j.<slot>`), the slots reused in a ring. Before a slot is reused,
 * every entry whose latest change only that slot holds is published on its own key's subject. A
 * reader applies the last message of every subject in stream-sequence order (see {@link load}).
 *
 * @example
 * const store = await RoleState.open(nc, { role: "vdcm", instance: "vdcm0", codec: vdcmStateCodec });
 * const saved = await store.load();          // key → entry, as last written
 * await store.write([{ key: "entry/dsa0/1", value: { kind: "pasidEntry", ... } }]);
 */
export class RoleState<T> implements RoleStatePort<T> {
  /** Writes waiting for the next group. */
  #waiting: Array<{ readonly changes: readonly EncodedChange[]; readonly resolve: () => void; readonly reject: (err: unknown) => void }> = [];
  #publishing = false;
  /** The journal's bookkeeping, from {@link load} (or a scan before the first group). */
  #index: JournalIndex | undefined;
  readonly #slots: number;
  readonly #maxBytes: number;
  readonly #minKeys: number;

  private constructor(
    private readonly nc: NatsConnection,
    private readonly prefix: string,
    private readonly role: string,
    private readonly instance: string,
    private readonly codec: StateCodec<T>,
    private readonly retry: StateWriteRetryOptions,
    journal: RoleStateJournalOptions,
  ) {
    this.#slots = Math.max(1, journal.slots ?? 64);
    const maxPayload = nc.info?.max_payload ?? 1024 * 1024;
    this.#maxBytes = Math.max(1024, Math.min(journal.maxBytes ?? 256 * 1024, Math.floor(maxPayload / 2)));
    this.#minKeys = journal.minKeys ?? 3;
  }

  /** Opens (creating the stream when missing) the state of `role`/`instance`. */
  static async open<T>(nc: NatsConnection, options: RoleStateOptions<T>): Promise<RoleState<T>> {
    const prefix = options.prefix ?? DEFAULT_PREFIX;
    await ensureRoleStateStream(nc, prefix, options.replicas ?? 1);
    return new RoleState(nc, prefix, options.role, options.instance, options.codec, options.retry ?? {}, options.journal ?? {});
  }

  /** The subjects of this instance's keys and journal slots (a filter). */
  get subjects(): string {
    return `${roleStatePrefix(this.prefix, this.role, this.instance)}.>`;
  }

  /**
   * Every key of this instance with its last entry (deleted keys left out): the last message of
   * each subject — per-key messages and journal slots — applied in stream-sequence order.
   * @throws DomainError FAILED_PRECONDITION {@link ROLE_STATE_UNREADABLE} when an entry is not in
   *   this role's format (the JSON written before the typed format, another format, or bytes that
   *   do not decode): the message says how to start the role from an empty state. Nothing is
   *   guessed: a misread table would bring back entries the role never had.
   */
  async load(): Promise<Map<string, T>> {
    const { latest, index, unreadable } = await this.#scan();
    const out = new Map<string, T>();
    for (const [key, data] of latest) {
      try {
        out.set(key, this.codec.decode(data));
      } catch (err) {
        unreadable.push({
          subject: `${this.subjects.slice(0, -1)}${encodeToken(key)}`,
          format: this.codec.format,
          json: false,
          error: err instanceof Error ? err.message : String(err),
        });
      }
    }
    if (unreadable.length > 0) throw this.#unreadableError(roleStateStreamName(this.prefix), this.subjects, unreadable);
    this.#index = index;
    return out;
  }

  /**
   * Reads the last message of every subject of this instance, in stream-sequence order, into each
   * key's latest bytes (deleted keys left out) and the journal's bookkeeping.
   */
  async #scan(): Promise<{ latest: Map<string, Uint8Array>; index: JournalIndex; unreadable: Unreadable[] }> {
    const name = roleStateStreamName(this.prefix);
    const index = new JournalIndex(this.#slots);
    const latest = new Map<string, Uint8Array>();
    const unreadable: Unreadable[] = [];
    const jsm = await jetstreamManager(this.nc);
    const filter = this.subjects;
    const info = await jsm.streams.info(name, { subjects_filter: filter });
    if (Object.keys(info.state.subjects ?? {}).length === 0) return { latest, index, unreadable };
    const js = jetstream(this.nc);
    const messages: Array<{ seq: number; subject: string; data: Uint8Array; headers: MsgHdrs | undefined }> = [];
    // An ephemeral consumer of the last message of each subject (one filter: nats-server 2.9 has no
    // filter_subjects), read to its end.
    const ci = await jsm.consumers.add(name, {
      filter_subject: filter,
      deliver_policy: DeliverPolicy.LastPerSubject,
      ack_policy: AckPolicy.None,
      inactive_threshold: 30_000_000_000,
      mem_storage: true,
    });
    try {
      const consumer = await js.consumers.get(name, ci.name);
      let pending = ci.num_pending;
      while (pending > 0) {
        const batch = await consumer.fetch({ max_messages: Math.min(pending, 1000), expires: 2000 });
        let got = 0;
        for await (const m of batch) {
          got++;
          pending = m.info.pending;
          messages.push({ seq: m.seq, subject: m.subject, data: m.data, headers: m.headers });
        }
        if (got === 0) throw new Error(`role state of ${this.role}/${this.instance}: the stream stopped answering with ${pending} left`);
      }
    } finally {
      await jsm.consumers.delete(name, ci.name).catch(() => undefined);
    }
    // The last change of a key wins wherever it was written: apply in the order JetStream stored them.
    messages.sort((a, b) => a.seq - b.seq);
    const slotPrefix = `${roleStatePrefix(this.prefix, this.role, this.instance)}.~j.`;
    for (const m of messages) {
      const format = m.headers?.get(RoleStateHeaders.FORMAT) ?? "";
      if (m.subject.startsWith(slotPrefix)) {
        const slot = Number(m.subject.slice(slotPrefix.length));
        const entryFormat = m.headers?.get(RoleStateHeaders.ENTRY_FORMAT) ?? "";
        if (format !== ROLE_STATE_JOURNAL_FORMAT || entryFormat !== this.codec.format || !Number.isInteger(slot)) {
          unreadable.push({ subject: m.subject, format: format === ROLE_STATE_JOURNAL_FORMAT ? entryFormat : format, json: false });
          continue;
        }
        let journal: bus.RoleStateJournal;
        try {
          journal = bus.RoleStateJournal.decode(m.data);
        } catch (err) {
          unreadable.push({ subject: m.subject, format, json: false, error: err instanceof Error ? err.message : String(err) });
          continue;
        }
        const keys = new Set<string>();
        for (const e of journal.entries) {
          keys.add(e.key);
          if (e.entry.length === 0) latest.delete(e.key);
          else latest.set(e.key, e.entry);
          index.journaled(e.key, slot, e.entry);
        }
        index.filled(slot, keys);
        continue;
      }
      const key = m.headers?.get(RoleStateHeaders.KEY) ?? "";
      if (m.data.length === 0) {
        latest.delete(key);
        index.keyed(key, true);
        continue;
      }
      if (format !== this.codec.format || key === "") {
        unreadable.push({ subject: m.subject, format, json: format === "" && m.data[0] === 0x7b /* { */ });
        continue;
      }
      latest.set(key, m.data);
      index.keyed(key, true);
    }
    return { latest, index, unreadable };
  }

  #unreadableError(stream: string, filter: string, unreadable: readonly Unreadable[]): DomainError {
    const n = unreadable.length;
    const entries = `${n} entr${n === 1 ? "y" : "ies"} of the kept state of ${this.role}/${this.instance} (stream ${stream}, subjects ${filter})`;
    const first = unreadable[0]!;
    const why = unreadable.every((u) => u.json)
      ? `predate${n === 1 ? "s" : ""} the typed state format (JSON written by an earlier version, not ${this.codec.format})`
      : first.error !== undefined
        ? `do${n === 1 ? "es" : ""} not decode as ${this.codec.format} (${first.subject}: ${first.error.slice(0, 120)})`
        : `${n === 1 ? "is" : "are"} not in ${this.codec.format} (${first.subject}: ${first.format === "" ? (first.json ? "JSON without a format marker" : "no format marker") : `format ${first.format}`})`;
    return new DomainError(
      Code.FAILED_PRECONDITION,
      ROLE_STATE_UNREADABLE,
      `${entries} ${why}: ${n === 1 ? "it" : "they"} cannot be read, and ${this.role} will not guess. Start ${this.role} from an empty state: ` +
        `delete those subjects (nats stream purge ${stream} --subject '${filter}' --force; for a local stack, ioasidctl down --purge clears the whole store), ` +
        `then start it again: it reconciles with ioasid-core as after a lost store.`,
      { metadata: { role: this.role, instance: this.instance, stream, subjects: filter, expected: this.codec.format } },
    );
  }

  /**
   * @see RoleStatePort.write
   *
   * Grouped: the write joins the next group to be published (one group in flight at a time, in
   * call order), and resolves once its group was acknowledged — so a later write never overtakes an
   * earlier one, and each key's stored value is the one written last.
   *
   * A group JetStream did not acknowledge (its wait timed out: the server slow or briefly stopped;
   * no JetStream answered) is published again, after 100 ms doubling to 2 s, until it is
   * acknowledged or `retry.retryMs` passed since its first failure; then its writes reject with a
   * {@link StateWriteError}. A group the server refused (a JetStream API error: the same bytes would
   * be refused again) rejects at once.
   */
  write(changes: readonly StateChange<T>[]): Promise<void> {
    if (changes.length === 0) return Promise.resolve();
    // Encoded before anything is published: a change that cannot be encoded publishes nothing.
    const encoded = changes.map((c): EncodedChange => {
      const data = c.value === undefined ? new Uint8Array() : this.codec.encode(c.value);
      if (c.value !== undefined && data.length === 0)
        throw new Error(`role state of ${this.role}/${this.instance}: entry ${c.key} encodes to nothing (its kind is not set)`);
      return { key: c.key, data };
    });
    return new Promise<void>((resolve, reject) => {
      this.#waiting.push({ changes: encoded, resolve, reject });
      if (this.#publishing) return;
      this.#publishing = true;
      // After this turn: every write the same delivery batch's handlers make joins the group.
      setImmediate(() => void this.#publishGroups());
    });
  }

  /** Publishes the waiting writes as groups, one at a time, until none waits. */
  async #publishGroups(): Promise<void> {
    try {
      while (this.#waiting.length > 0) {
        const group = this.#waiting.splice(0);
        try {
          // The last change of a key within the group is its latest value.
          const latest = new Map<string, Uint8Array>();
          for (const w of group) for (const c of w.changes) latest.set(c.key, c.data);
          await this.#publishUntilKept(latest);
          for (const w of group) w.resolve();
        } catch (err) {
          // The kept state is now unknown to the bookkeeping: the next group scans again.
          this.#index = undefined;
          for (const w of group) w.reject(err);
        }
      }
    } finally {
      this.#publishing = false;
    }
  }

  /**
   * The messages of one group, in publish order, with the bookkeeping updated as if they were kept.
   * A journal needs the bookkeeping: the first one after a start (or a failed group) reads it.
   */
  async #plan(latest: ReadonlyMap<string, Uint8Array>): Promise<PlannedMessage[]> {
    const keyMessage = (key: string, data: Uint8Array): PlannedMessage => {
      const h = natsHeaders();
      h.set(RoleStateHeaders.FORMAT, this.codec.format);
      h.set(RoleStateHeaders.KEY, key);
      this.#index?.keyed(key, true);
      return { subject: roleStateSubject(this.prefix, this.role, this.instance, key), data, headers: h };
    };
    const out: PlannedMessage[] = [];
    if (latest.size < this.#minKeys) {
      for (const [key, data] of latest) out.push(keyMessage(key, data));
      return out;
    }
    const index = (this.#index ??= (await this.#scan()).index);
    let chunk: Array<[string, Uint8Array]> = [];
    let bytes = 0;
    const flush = (): void => {
      if (chunk.length === 0) return;
      const slot = index.takeSlot();
      const inChunk = new Set(chunk.map(([key]) => key));
      // Entries whose latest change only this slot holds go to their own subjects first.
      for (const [key, data] of index.evict(slot)) {
        if (inChunk.has(key)) continue;
        if (data.length > 0 || index.hasKeyMessage(key)) out.push(keyMessage(key, data));
        else index.keyed(key, false); // deleted, and no message of its own to cover: nothing to keep
      }
      for (const [key, data] of chunk) index.journaled(key, slot, data);
      index.filled(slot, inChunk);
      const h = natsHeaders();
      h.set(RoleStateHeaders.FORMAT, ROLE_STATE_JOURNAL_FORMAT);
      h.set(RoleStateHeaders.ENTRY_FORMAT, this.codec.format);
      const data = bus.RoleStateJournal.encode({
        entries: chunk.map(([key, entry]) => ({ key, entry: Buffer.from(entry.buffer, entry.byteOffset, entry.byteLength) })),
      }).finish();
      out.push({ subject: roleStateJournalSubject(this.prefix, this.role, this.instance, slot), data, headers: h });
      chunk = [];
      bytes = 0;
    };
    for (const [key, data] of latest) {
      const size = key.length + data.length + 8;
      if (bytes + size > this.#maxBytes) flush();
      chunk.push([key, data]);
      bytes += size;
    }
    flush();
    return out;
  }

  /** Publishes a group's messages, and the same messages again after a failure, within the retry bound. */
  async #publishUntilKept(latest: ReadonlyMap<string, Uint8Array>): Promise<void> {
    const keys = latest.size;
    let messages: PlannedMessage[] | undefined;
    // Acknowledgements through the connection's one inbox, not a nats.js request each: a
    // `js.publish` builds an Error even when it succeeds (pub-ack-inbox.ts), about 50 µs of latency
    // and 35 µs of CPU per write here, and the IO page fault's round trip waits for three writes.
    const acks = pubAckInbox(this.nc);
    const attemptTimeoutMs = this.retry.attemptTimeoutMs ?? 5000;
    const retryMs = this.retry.retryMs ?? 20_000;
    let firstFailure: number | undefined;
    let delayMs = this.retry.initialDelayMs ?? 100;
    for (let attempt = 1; ; attempt++) {
      const left = firstFailure === undefined ? attemptTimeoutMs : retryMs - (Date.now() - firstFailure);
      try {
        // Published in order, synchronously (one connection keeps it); acknowledged together.
        const timeout = Math.max(1, Math.min(attemptTimeoutMs, left));
        messages ??= await this.#plan(latest);
        await Promise.all(messages.map((m) => acks.publish(m.subject, m.data, m.headers, { timeoutMs: timeout })));
        return;
      } catch (err) {
        firstFailure ??= Date.now();
        const elapsedMs = Date.now() - firstFailure;
        if (err instanceof JetStreamApiError || elapsedMs + delayMs >= retryMs) {
          const what = `role state of ${this.role}/${this.instance}: a write of ${keys} key${keys === 1 ? "" : "s"}`;
          throw new StateWriteError(
            err instanceof JetStreamApiError
              ? `${what} was refused by JetStream: ${String(err)}`
              : `${what} was not acknowledged after ${attempt} attempt${attempt === 1 ? "" : "s"} over ${elapsedMs} ms (bound ${retryMs} ms): ${String(err)}`,
            attempt,
            { cause: err },
          );
        }
        await new Promise((r) => setTimeout(r, delayMs));
        delayMs = Math.min(delayMs * 2, 2000);
        await this.retry.onRetry?.({ attempt: attempt + 1, keys: [...latest.keys()], error: err, elapsedMs: Date.now() - firstFailure });
      }
    }
  }

  /** Deletes every key of this instance (a role told to start from nothing). */
  async clear(): Promise<void> {
    const jsm = await jetstreamManager(this.nc);
    await jsm.streams.purge(roleStateStreamName(this.prefix), { filter: this.subjects });
    this.#index = new JournalIndex(this.#slots);
  }
}

/** One change, encoded (empty: deleted). */
interface EncodedChange {
  readonly key: string;
  readonly data: Uint8Array;
}

/** One message of a group. */
interface PlannedMessage {
  readonly subject: string;
  readonly data: Uint8Array;
  readonly headers: MsgHdrs;
}

/**
 * What a writer must know of its journal: which slot comes next, which keys each slot holds, and
 * for each key whose latest change only a slot holds, that slot and the change (to publish on the
 * key's own subject before the slot is reused). Also which keys have a message of their own (a
 * deletion must cover it; a key that never had one needs no tombstone).
 */
class JournalIndex {
  readonly #slotKeys: Array<Set<string> | undefined>;
  readonly #home = new Map<string, { slot: number; data: Uint8Array }>();
  readonly #keyMessages = new Set<string>();
  #next = 0;

  constructor(readonly slots: number) {
    this.#slotKeys = new Array(slots);
  }

  /** A journal message on `slot` (as read or as written): the next slot is the one after it. */
  filled(slot: number, keys: Set<string>): void {
    if (slot < this.slots) this.#slotKeys[slot] = keys;
    this.#next = (slot + 1) % this.slots;
  }

  /** The latest change of `key` is in `slot`'s journal message. */
  journaled(key: string, slot: number, data: Uint8Array): void {
    this.#home.set(key, { slot, data });
  }

  /** The latest change of `key` is on its own subject (`present`: a message is there). */
  keyed(key: string, present: boolean): void {
    this.#home.delete(key);
    if (present) this.#keyMessages.add(key);
    else this.#keyMessages.delete(key);
  }

  hasKeyMessage(key: string): boolean {
    return this.#keyMessages.has(key);
  }

  takeSlot(): number {
    return this.#next;
  }

  /** The changes only `slot` holds (to publish elsewhere before it is reused); forgets its keys. */
  *evict(slot: number): Generator<[string, Uint8Array]> {
    const keys = this.#slotKeys[slot];
    this.#slotKeys[slot] = undefined;
    if (keys === undefined) return;
    for (const key of keys) {
      const home = this.#home.get(key);
      if (home?.slot === slot) yield [key, home.data];
    }
  }
}

/** A kept message {@link RoleState.load} could not read. */
interface Unreadable {
  readonly subject: string;
  /** Its format marker ("" when it has none). */
  readonly format: string;
  /** No marker and a payload that starts like JSON: written before the typed format. */
  readonly json: boolean;
  /** Why it did not decode, when it had the right marker. */
  readonly error?: string;
}

/**
 * A store whose failed write stops the process: the role's tables in memory are then ahead of what
 * it kept, and going on would let a later crash bring back a state the role already told others was
 * gone (found by the chaos soak: an IOMMU entry torn down in memory, its deletion's write failed,
 * then a restart restored the entry after its IOASID was reclaimed). A restart restores the kept
 * tables and reconciles them with the core, as after any crash (the core's operation log does the
 * same: fail-stop). A {@link RoleState} has already retried the write within its bound by then
 * ({@link StateWriteRetryOptions}). While `stopping` says the role is already shutting down, the error is passed
 * to the caller instead.
 */
export function failStopOnWriteError<T>(
  store: RoleStatePort<T>,
  onFatal: (err: unknown) => void,
  options: { stopping?: () => boolean } = {},
): RoleStatePort<T> {
  return {
    write: (changes) =>
      store.write(changes).catch((err: unknown) => {
        // A role already stopping on a signal is not stopped again: the write's caller gets the
        // error (its teardown goes on), and the next start reconciles from what was kept.
        if (options.stopping?.() === true) throw err;
        onFatal(err);
        // The process is going: nothing that waited for this write may go on as if it were kept.
        return new Promise<never>(() => undefined);
      }),
  };
}

/**
 * A {@link RoleStatePort} in memory (tests). Every entry goes through the role's codec, as to
 * JetStream: `saved` is what a restarted role would load, so a unit test catches a field the codec
 * forgets.
 */
export class MemoryRoleState<T> implements RoleStatePort<T> {
  readonly #bytes = new Map<string, Uint8Array>();
  readonly #codec: StateCodec<T>;
  /**
   * The last entry of every key, decoded from the bytes written (a live view: it shows later
   * writes too, and decodes afresh on every read, so no caller shares an entry with another; copy
   * it with `new Map(store.saved)` to compare it whole).
   */
  readonly saved: ReadonlyMap<string, T>;

  constructor(codec: StateCodec<T>) {
    this.#codec = codec;
    this.saved = new DecodedEntries(this.#bytes, codec);
  }

  async write(changes: readonly StateChange<T>[]): Promise<void> {
    // Encoded first: a change that cannot be encoded writes nothing, as with RoleState.
    const encoded = changes.map((c) => {
      const data = c.value === undefined ? undefined : this.#codec.encode(c.value);
      if (data !== undefined && data.length === 0) throw new Error(`entry ${c.key} encodes to nothing (its kind is not set)`);
      return { key: c.key, data };
    });
    for (const c of encoded) {
      if (c.data === undefined) this.#bytes.delete(c.key);
      else this.#bytes.set(c.key, c.data);
    }
  }
}

/** A read-only map of encoded entries, decoded on each read. */
class DecodedEntries<T> implements ReadonlyMap<string, T> {
  constructor(
    private readonly bytes: ReadonlyMap<string, Uint8Array>,
    private readonly codec: StateCodec<T>,
  ) {}

  get size(): number {
    return this.bytes.size;
  }

  get(key: string): T | undefined {
    const data = this.bytes.get(key);
    return data === undefined ? undefined : this.codec.decode(data);
  }

  has(key: string): boolean {
    return this.bytes.has(key);
  }

  *entries(): MapIterator<[string, T]> {
    for (const [key, data] of this.bytes) yield [key, this.codec.decode(data)];
  }

  keys(): MapIterator<string> {
    return this.bytes.keys();
  }

  *values(): MapIterator<T> {
    for (const [, value] of this.entries()) yield value;
  }

  forEach(callback: (value: T, key: string, map: ReadonlyMap<string, T>) => void, thisArg?: unknown): void {
    for (const [key, value] of this.entries()) callback.call(thisArg, value, key, this);
  }

  [Symbol.iterator](): MapIterator<[string, T]> {
    return this.entries();
  }
}
