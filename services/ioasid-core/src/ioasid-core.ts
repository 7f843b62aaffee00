import { coreError, IoasidSpace, MAX_BATCH_ALLOC, type Allocation, type IoasidEvent, type IoasidSpaceOptions, type Registration } from "@ioasid/ioasid";
import {
  eventTypeOf,
  type Chain,
  type DeliveryEngine,
  type DeliveryTarget,
  type HistoryActionInput,
  type HistoryFields,
  type HistoryLink,
  type MissedDelivery,
  type SettledAck,
} from "@ioasid/bus";
import { quote } from "@ioasid/errors";
import type { events } from "@ioasid/proto";
import { fromCommittedEvent } from "./convert.js";
import { EventLog } from "./event-log.js";
import type { OpLog } from "./op-log.js";
import {
  applyOperation,
  chainKey,
  StashedAllocator,
  type ApplyContext,
  type CommittedOperation,
  type DeliveryAck,
  type Operation,
  type OperatorAudit,
} from "./operation.js";
import { auditRecordOf } from "./audit-record.js";
import { OpLogFormatError } from "./op-codec.js";
import { DeliveryOutcome, encodeSnapshot, type CoreSnapshot } from "./snapshot-codec.js";
import { toEventType } from "./convert.js";
import { OperationTrace } from "./operation-trace.js";

/**
 * An external allocator as the core sees it: asynchronous (it lives in another process). The
 * transport supplies the implementation (a gRPC AllocatorService client).
 */
export interface ExternalAllocator {
  readonly name: string;
  /** An IOASID in [min, max], or 0 when it has none. */
  allocate(min: number, max: number): Promise<number>;
  /** Tells the allocator an IOASID it gave is reclaimed (fire and forget). */
  release(ioasid: number): void;
  /** Drops the connection. */
  close(): void;
}

/** Options of {@link IoasidCore}. */
export interface IoasidCoreOptions {
  /** Size of the IOASID namespace. @default 2^20 */
  readonly capacity?: number;
  /** Committed events kept for WatchEvents readers. @default 100_000 */
  readonly retain?: number;
  /** Reaches an external allocator (a gRPC client in the service). */
  readonly externalAllocator?: (name: string, address: string) => ExternalAllocator;
  /** Called when the operation log cannot be written: the process must stop (fail-stop). */
  readonly onFatal?: (err: unknown) => void;
  /**
   * Receives the core's history (events and reference changes) once the operation that made it is
   * durable: the service publishes it on NATS for the timeline and the checker. `opSeq` is the
   * operation log message that holds the operation (absent without a log). Replay publishes only
   * what {@link IoasidCore.recover} is told may be missing, marked `recovered`.
   */
  readonly history?: (action: HistoryActionInput, fields: HistoryFields, ts?: number, opSeq?: number) => void;
  /**
   * Numbers a history record when the core makes it (the recorder's `stamp`): its place in the
   * core's own order, taken before the operation is durable and its records published, so that a
   * delivery sent meanwhile carries a position that covers it (issue 18: order without clocks).
   */
  readonly historyStamp?: (fields: HistoryFields) => HistoryFields;
  /** Where the core reports what it does not return (refused releases, missed deliveries). */
  readonly log?: (level: "info" | "warn" | "error", msg: string, fields?: Record<string, unknown>) => void;
  /**
   * Makes the model from the options the core gives it. @default `new IoasidSpace(options)`.
   * A composition seam, not a switch: the conformance kit's test-only broken cores wrap one method.
   */
  readonly space?: (options: IoasidSpaceOptions) => IoasidSpace;
}

const PENDING = DeliveryOutcome.PENDING;
const ACKED = DeliveryOutcome.ACKED;
const MISSED = DeliveryOutcome.MISSED;
/** The registration was removed before it acknowledged: nothing waits for it any more. */
const DROPPED = DeliveryOutcome.DROPPED;

/** Delivery progress of one committed event: an outcome per target, in target order. */
interface DeliveryRecord {
  readonly event: events.IoasidEvent;
  readonly key: string;
  readonly targets: readonly DeliveryTarget[];
  readonly outcomes: Uint8Array;
  /** Targets not acknowledged yet (pending or missed). */
  unacked: number;
}

interface Commit {
  ready: boolean;
  /** The operation log message that holds it, once durable. */
  opSeq?: number;
  readonly chains: Chain[];
  /** The operation's history records (with when they happened), published once it is durable. */
  readonly history: Array<[HistoryActionInput, HistoryFields, number]>;
}

/**
 * The IOASID core of one host: the domain model, its operation log (durability), its event log
 * (WatchEvents), and the delivery of committed events to notifier subscribers.
 *
 * Every state change is an operation: applied to the model synchronously, appended to the log in
 * the same step, and answered when the append is acknowledged. Events are delivered only once the
 * operation that emitted them is durable, in commit order. After a crash, {@link recover} replays
 * the log: the same state, the same events, and delivery resumes where it stopped (acknowledged
 * and missed deliveries are operations too).
 */
export class IoasidCore {
  readonly space: IoasidSpace;
  readonly log: EventLog;
  private readonly ctx: ApplyContext;
  private readonly options: IoasidCoreOptions;
  private readonly externals = new Map<string, ExternalAllocator>();
  /** Where each external allocator made so far listens (a snapshot names the one in force). */
  private readonly allocatorAddresses = new Map<string, string>();
  private readonly deliveries = new Map<number, DeliveryRecord>();
  private readonly commits: Commit[] = [];
  private opLog: OpLog | undefined;
  private engine: DeliveryEngine | undefined;
  private captured: Chain[] = [];
  private readonly targetCache = new WeakMap<readonly Registration[], readonly DeliveryTarget[]>();
  /** History of events emitted by the operation being applied, published after its reference change. */
  private pendingEventHistory: Array<[HistoryActionInput, HistoryFields]> = [];
  /** History records of the operation being executed (see emitHistory). */
  private historyCapture: Array<[HistoryActionInput, HistoryFields, number]> | undefined;
  private currentTs = 0;
  private replaying = false;
  /** Subscribers' history positions of the acknowledgements being applied, by `seq:registration`. */
  private ackLinks: Map<string, readonly HistoryLink[]> | undefined;
  /** History records the last recover() published for operations its predecessor had not recorded. */
  republished = 0;
  /** Durability of the last operation appended (and so of every one before it). */
  private lastDurable: Promise<unknown> = Promise.resolve();
  /** Spans of operations and reclaims, and the trace each chain continues (DESIGN §13). */
  private readonly opTrace = new OperationTrace();

  constructor(options: IoasidCoreOptions = {}) {
    this.options = options;
    this.log = new EventLog(options.retain === undefined ? {} : { retain: options.retain });
    const spaceOptions: IoasidSpaceOptions = {
      ...(options.capacity === undefined ? {} : { capacity: options.capacity }),
      onEvent: (e) => this.onEvent(e),
    };
    this.space = options.space?.(spaceOptions) ?? new IoasidSpace(spaceOptions);
    this.ctx = {
      space: this.space,
      allocator: undefined,
      makeAllocator: (name, address) => {
        this.allocatorAddresses.set(name, address);
        const external = options.externalAllocator?.(name, address);
        if (external !== undefined) this.externals.set(name, external);
        // A reclaim during replay already happened once: the allocator was told then.
        return new StashedAllocator(name, (id) => {
          if (!this.replaying) this.externals.get(name)?.release(id);
        });
      },
      onReleaseRefused: (ioasid, holder, reason) => this.options.log?.("warn", "release with an acknowledgement refused", { ioasid, holder, reason }),
      onRef: (r) => {
        if (!this.recording) return;
        const change = { holder: { role: r.holder.role, instance: r.holder.instance, purpose: r.holder.purpose } };
        this.emitHistory(r.kind === "get" ? { $case: "ioasidGet", value: change } : { $case: "ioasidPut", value: change }, {
          ioasid: r.ioasid,
          generation: r.generation,
          setId: r.setId,
          refcount: r.refcount,
          ...(r.seq === undefined ? {} : { seq: r.seq }),
        });
        // Events the put set off (a RECLAIM) come after the put in the history.
        this.flushEventHistory();
      },
    };
  }

  /**
   * Makes the core durable and delivering: replays `opLog` (if given) to rebuild the state, then
   * hands every unfinished delivery to `engine` (backlogs first, then chains in sequence order).
   *
   * A core publishes an operation's history only once it knows the operation durable, so one that
   * stopped with a write unacknowledged (its append timed out through a nats-server restart, and
   * it fail-stopped) never published the records of that write — which JetStream may have stored
   * all the same. The replay publishes, marked `recovered` and stamped with the operation's time,
   * the records of every message after `republishAfter`: the newest message whose history is known
   * to be stored. Found by the chaos soak (seed 41): a free reclaimed an IOASID durably, its record
   * never appeared, and the next generation's allocation looked like a double allocation.
   * @param republishAfter op-log sequence; undefined publishes nothing
   * @returns the number of operations replayed
   */
  async recover(opLog: OpLog | undefined, engine: DeliveryEngine | undefined, republishAfter?: number): Promise<number> {
    let n = 0;
    if (opLog !== undefined) {
      this.replaying = true;
      const history = this.options.history;
      try {
        n = await opLog.replay(
          (op, seq) => {
            this.currentTs = op.commitTimeMs;
            const republish = history !== undefined && republishAfter !== undefined && seq > republishAfter;
            const records: Array<[HistoryActionInput, HistoryFields, number]> = [];
            if (republish) this.historyCapture = records;
            try {
              this.applyRecord(op);
            } finally {
              this.historyCapture = undefined;
            }
            this.captured = [];
            for (const [action, fields, ts] of records) history?.(action, { ...fields, recovered: true }, ts, seq);
            this.republished += records.length;
          },
          (snapshot, seq) => this.restoreSnapshot(snapshot, opLog.stream, seq),
        );
      } finally {
        this.replaying = false;
      }
      // Snapshots are taken from here on: the state is whole, and every later operation is appended.
      opLog.snapshotSource = () => this.captureSnapshot();
      opLog.onSnapshot = (info) => this.options.log?.("info", "snapshot written; the op log before it is trimmed", { ...info, ms: Math.round(info.ms) });
      opLog.onSnapshotFailed = (err) => {
        this.options.log?.("error", "snapshot write failed: stopping (fail-stop)", { err: String(err) });
        this.options.onFatal?.(err);
      };
    }
    this.opLog = opLog;
    this.engine = engine;
    if (engine !== undefined) {
      // The causing operations' trace contexts were in the old process's memory: a new trace.
      const resumed = this.opTrace.recovery(this.deliveries.size);
      const backlogs = new Map<string, { subscriber: DeliveryTarget["subscriber"]; items: Parameters<DeliveryEngine["restoreBacklog"]>[1][number][] }>();
      for (const [seq, rec] of this.deliveries) {
        for (let i = 0; i < rec.targets.length; i++) {
          const t = rec.targets[i]!;
          if (rec.outcomes[i] !== MISSED) continue;
          const k = `${t.subscriber.name}/${t.subscriber.instance}`;
          let b = backlogs.get(k);
          if (b === undefined) backlogs.set(k, (b = { subscriber: t.subscriber, items: [] }));
          b.items.push({ seq, key: rec.key, registrationId: t.registrationId, event: rec.event, trace: resumed });
        }
      }
      for (const b of backlogs.values()) engine.restoreBacklog(b.subscriber, b.items);
      for (const [seq, rec] of this.deliveries) {
        const done = new Map<number, "acked" | "missed">();
        rec.targets.forEach((t, i) => {
          if (rec.outcomes[i] !== PENDING) done.set(t.registrationId, rec.outcomes[i] === MISSED ? "missed" : "acked");
        });
        engine.submit({ seq, key: rec.key, event: rec.event, targets: rec.targets, done, trace: resumed });
      }
    }
    return n;
  }

  /**
   * Applies an operation, appends it to the log, and resolves once it is durable (at once without
   * a log). Throws the model's DomainError when the model refuses it: nothing is then recorded.
   */
  async commit(op: Operation): Promise<unknown> {
    const { result, durable } = this.execute(op);
    await durable;
    return result;
  }

  /**
   * Resolves once every operation applied so far is durable; never, when one cannot be written
   * (the core is then stopping). An answer that reads the state — a query, or a refusal — waits
   * for it, so no caller is told anything that rests on an operation a crash may take back (chaos
   * soak, seed 10: a put whose write hung was retried, the retry was refused NO_REFERENCE_HELD on
   * the strength of the first, the core fail-stopped, and its successor still held the reference).
   */
  settled(): Promise<void> {
    return this.lastDurable.then(
      () => undefined,
      () => new Promise<never>(() => undefined),
    );
  }

  /** Allocates one IOASID, through the external allocator when one is registered. */
  async alloc(setId: number, options: { min?: number; max?: number; privateData?: Uint8Array }): Promise<Allocation> {
    const bounds = {
      ...(options.min === undefined ? {} : { min: options.min }),
      ...(options.max === undefined ? {} : { max: options.max }),
    };
    const pd = options.privateData === undefined ? {} : { privateData: options.privateData };
    const bridge = this.ctx.allocator;
    if (bridge === undefined) return (await this.commit({ kind: "alloc", setId, ...bounds, ...pd })) as Allocation;
    const external = this.externals.get(bridge.name);
    if (!this.space.listSets().some((s) => s.id === setId)) throw coreError("SET_UNKNOWN", `no IOASID set ${setId}`);
    let x: number;
    try {
      x = external === undefined ? 0 : await external.allocate(options.min ?? 1, options.max ?? this.space.capacity - 1);
    } catch (err) {
      throw coreError("ALLOCATOR_FAILED", `allocator ${bridge.name} did not answer: ${quote(err instanceof Error ? err.message : String(err))}`);
    }
    if (this.ctx.allocator !== bridge) {
      if (x !== 0) external?.release(x);
      throw coreError("ALLOCATOR_FAILED", `allocator ${bridge.name} was unregistered during the allocation`);
    }
    let executed: { result: unknown; durable: Promise<unknown> };
    try {
      executed = this.execute({ kind: "alloc", setId, ...bounds, ...pd, ...(x === 0 ? {} : { allocatorIoasid: x }) });
    } catch (err) {
      if (x !== 0) external?.release(x); // the model refused: give the ID back
      throw err;
    }
    await executed.durable;
    return executed.result as Allocation;
  }

  /** Allocates `count` IOASIDs, all or nothing. */
  async allocMany(setId: number, count: number, options: { min?: number; max?: number }): Promise<Allocation[]> {
    const bounds = {
      ...(options.min === undefined ? {} : { min: options.min }),
      ...(options.max === undefined ? {} : { max: options.max }),
    };
    if (this.ctx.allocator === undefined) return (await this.commit({ kind: "batchAlloc", setId, count, ...bounds })) as Allocation[];
    if (!Number.isInteger(count) || count < 1 || count > MAX_BATCH_ALLOC) {
      throw coreError("COUNT_INVALID", `count ${count} is outside 1..${MAX_BATCH_ALLOC}`);
    }
    const set = this.space.listSets().find((s) => s.id === setId);
    if (set === undefined) throw coreError("SET_UNKNOWN", `no IOASID set ${setId}`);
    if (set.inUse + count > set.quota) {
      throw coreError("SET_QUOTA_EXCEEDED", `set ${setId} has ${set.quota - set.inUse} of its quota of ${set.quota} left; ${count} asked`);
    }
    // A custom allocator cannot be asked ahead: one at a time, undone on failure.
    const done: Allocation[] = [];
    try {
      for (let i = 0; i < count; i++) done.push(await this.alloc(setId, options));
    } catch (err) {
      for (const a of done) await this.commit({ kind: "free", setId, ioasid: a.ioasid, generation: a.generation });
      throw err;
    }
    return done;
  }

  /** Registers an external allocator reachable at `address`; `audit`: the operator who did it. */
  async registerAllocator(name: string, address: string, audit?: OperatorAudit): Promise<void> {
    try {
      await this.commit({ kind: "registerAllocator", name, address, ...(audit === undefined ? {} : { audit }) });
    } catch (err) {
      this.externals.get(name)?.close();
      if (this.ctx.allocator?.name !== name) this.externals.delete(name);
      throw err;
    }
  }

  /** Returns to the default allocator; `audit`: the operator who did it. */
  async unregisterAllocator(name: string, audit?: OperatorAudit): Promise<void> {
    await this.commit({ kind: "unregisterAllocator", name, ...(audit === undefined ? {} : { audit }) });
    this.externals.get(name)?.close();
    this.externals.delete(name);
  }

  /** Name of the external allocator in force, if any. */
  get externalAllocator(): string | undefined {
    return this.ctx.allocator?.name;
  }

  /** The delivery engine's callback for acknowledgements: releases and records them in one step. */
  onAcks(acks: readonly SettledAck[]): void {
    const bySubscriber = new Map<string, { subscriber: { name: string; instance: string }; acks: DeliveryAck[] }>();
    for (const k of acks) {
      const id = `${k.subscriber.name}/${k.subscriber.instance}`;
      let group = bySubscriber.get(id);
      if (group === undefined) bySubscriber.set(id, (group = { subscriber: { name: k.subscriber.name, instance: k.subscriber.instance }, acks: [] }));
      group.acks.push(
        k.releases.length === 0 && !k.detachSpid
          ? { seq: k.seq, registrationId: k.registrationId }
          : {
              seq: k.seq,
              registrationId: k.registrationId,
              release: { setId: k.event.setId, ioasid: k.event.ioasid, generation: k.event.generation, detachSpid: k.detachSpid, purposes: [...k.releases] },
            },
      );
    }
    // Not urgent even with releases: the record is queued in application order, so anything that
    // depends on a release (a reclaim, a re-allocation) is written after it; a crash before it is
    // written only means the delivery is made again and the SDK answers from its memory.
    // A reclaim set off by an ack continues the trace of that ack.
    // Each ack's history position (not logged: a replayed ack's record has none).
    this.ackLinks = new Map();
    for (const k of acks) if (k.after !== undefined) this.ackLinks.set(`${k.seq}:${k.registrationId}`, k.after);
    try {
      this.opTrace.withAcks(acks, () => {
        for (const group of bySubscriber.values()) this.execute({ kind: "acks", ...group }, false);
      });
    } finally {
      this.ackLinks = undefined;
    }
  }

  /** The delivery engine's callback for missed deliveries. */
  onMissed(missed: readonly MissedDelivery[]): void {
    for (const m of missed) {
      this.options.log?.("warn", "delivery missed", {
        seq: m.seq,
        registration: m.registrationId,
        subscriber: `${m.subscriber.name}/${m.subscriber.instance}`,
        reason: m.reason,
      });
    }
    this.execute({ kind: "misses", misses: missed.map((m) => ({ seq: m.seq, registrationId: m.registrationId })) }, false);
  }

  /** Deliveries not yet acknowledged by every target (pending or missed), by event sequence. */
  pendingDeliveries(): Array<{ seq: number; pending: number; missed: number }> {
    return [...this.deliveries].map(([seq, r]) => {
      let pending = 0;
      let missed = 0;
      for (const o of r.outcomes) {
        if (o === PENDING) pending++;
        else if (o === MISSED) missed++;
      }
      return { seq, pending, missed };
    });
  }

  /**
   * The whole state, encoded (an `ioasid.oplog.v1.Snapshot`): the model, the allocator in force and
   * every delivery not acknowledged by all its targets — what a replay of every operation applied
   * so far rebuilds. Synchronous, so no operation slips in between (the op log calls it right after
   * publishing every operation applied).
   */
  captureSnapshot(): Uint8Array {
    const space = this.space.exportState();
    const deliveries = [...this.deliveries.values()].map((r) => ({ event: r.event, targets: r.targets, outcomes: r.outcomes }));
    const allocator = this.ctx.allocator?.name;
    return encodeSnapshot({ space, allocatorAddress: allocator === undefined ? undefined : this.allocatorAddresses.get(allocator), deliveries });
  }

  /**
   * Rebuilds the state a snapshot holds into this new core (the replay's first step when the log
   * starts with a snapshot): the model, the external allocator (connected again), the deliveries.
   * @throws OpLogFormatError when the model refuses the state (a damaged snapshot)
   */
  private restoreSnapshot(snapshot: CoreSnapshot, stream: string, seq: number): void {
    const name = snapshot.space.allocator;
    const bridge = name === undefined ? undefined : this.ctx.makeAllocator(name, snapshot.allocatorAddress ?? "");
    try {
      this.space.restore(snapshot.space, bridge);
    } catch (err) {
      throw new OpLogFormatError(
        `the snapshot named by message ${seq} of the operation log (JetStream stream ${stream}) is not a state the core can hold ` +
          `(${(err as Error).message}): it refuses it rather than misread its state`,
        { stream, seq },
      );
    }
    this.ctx.allocator = bridge;
    for (const d of snapshot.deliveries) {
      const event = d.event;
      let unacked = 0;
      for (const o of d.outcomes) if (o === PENDING || o === MISSED) unacked++;
      if (unacked === 0) continue;
      const key = chainKey({ type: toEventType(event.type), ioasid: event.ioasid, setId: event.setId });
      this.deliveries.set(Number(event.seq), { event, key, targets: Object.freeze([...d.targets]), outcomes: Uint8Array.from(d.outcomes), unacked });
    }
  }

  /** Releases external allocator connections. */
  close(): void {
    for (const e of this.externals.values()) e.close();
  }

  /**
   * @param urgent somebody waits for the record (a client's reply): write it at the end of this
   *   turn; delivery bookkeeping may wait for company (at-least-once covers a crash meanwhile).
   */
  private execute(op: Operation, urgent = true): { result: unknown; durable: Promise<unknown> } {
    const record: CommittedOperation = { ...op, commitTimeMs: Date.now() };
    this.currentTs = record.commitTimeMs;
    let result: unknown;
    const history: Array<[HistoryActionInput, HistoryFields, number]> = [];
    this.historyCapture = history;
    this.opTrace.begin(op);
    try {
      result = this.applyRecord(record);
    } catch (err) {
      this.captured = [];
      this.opTrace.end(undefined, err);
      throw err;
    } finally {
      this.historyCapture = undefined;
    }
    const commit: Commit = { ready: false, chains: this.captured, history };
    this.captured = [];
    const durable: Promise<number | undefined> = this.opLog === undefined ? Promise.resolve(undefined) : this.opLog.append(record, urgent);
    this.lastDurable = durable;
    this.opTrace.end(durable);
    this.commits.push(commit);
    durable.then(
      (opSeq) => {
        if (opSeq !== undefined) commit.opSeq = opSeq;
        commit.ready = true;
        this.flushCommits();
      },
      (err: unknown) => {
        this.options.log?.("error", "operation log append failed: stopping (fail-stop)", { err: String(err), op: record.kind });
        this.options.onFatal?.(err);
      },
    );
    return { result, durable };
  }

  /** Submits the chains of durable operations, in commit order. */
  private flushCommits(): void {
    while (this.commits.length > 0 && this.commits[0]!.ready) {
      const commit = this.commits.shift()!;
      // Published once durable, stamped with when they happened (the history is read by time).
      for (const [action, fields, ts] of commit.history) this.options.history?.(action, fields, ts, commit.opSeq);
      if (this.engine !== undefined) for (const chain of commit.chains) this.engine.submit(chain);
    }
  }

  /**
   * A history record of the operation being executed: held with its commit and published once the
   * operation is durable, so the history never shows an operation a crash then took back (found
   * by the chaos suite: an ALLOC recorded, its append lost with a nats-server restart, the same
   * generation allocated again after the core's fail-stop).
   */
  private emitHistory(action: HistoryActionInput, fields: HistoryFields): void {
    // A replayed operation's records keep the time the operation was applied.
    const ts = this.replaying ? this.currentTs : performance.timeOrigin + performance.now();
    const stamped = this.options.historyStamp?.(fields) ?? fields;
    if (this.historyCapture !== undefined) this.historyCapture.push([action, stamped, ts]);
    else this.options.history?.(action, stamped);
  }

  /** Whether history is being recorded: live, or replaying an operation whose records may be missing. */
  private get recording(): boolean {
    return this.options.history !== undefined && (!this.replaying || this.historyCapture !== undefined);
  }

  private flushEventHistory(): void {
    for (const [action, fields] of this.pendingEventHistory) this.emitHistory(action, fields);
    this.pendingEventHistory = [];
  }

  private applyRecord(op: Operation): unknown {
    let result: unknown;
    // An operator action's audit record comes first, so it precedes the reference change it explains
    // (and goes with the operation's records: dropped if the model refuses, published once durable).
    const audit = this.recording ? auditRecordOf(op) : undefined;
    if (audit !== undefined) this.emitHistory(audit[0], audit[1]);
    // Each settled acknowledgement, before the references it releases (and the reclaim they set
    // off): the history then shows every delivery of an event in tier order, a subscriber that had
    // nothing to do for it too (issue 17: the timeline draws each delivery and its ack).
    if (op.kind === "acks" && this.recording) this.recordAcks(op.subscriber, op.acks);
    try {
      result = applyOperation(this.ctx, op);
    } finally {
      this.flushEventHistory();
    }
    if (op.kind === "register" && this.recording) {
      // The life-cycle tables' step 1: ioasid_register_notifier/_mm().
      const o = op.options;
      const reg = result as Registration;
      const value = {
        subscriber: o.subscriber.name,
        instance: o.subscriber.instance,
        scope:
          o.scope.kind === "global"
            ? { $case: "global" as const, value: true }
            : o.scope.kind === "set"
              ? { $case: "scopeSetId" as const, value: o.scope.setId }
              : { $case: "mmToken" as const, value: BigInt(o.scope.token) },
        priority: o.priority,
        pending: !reg.active,
      };
      this.emitHistory(
        o.scope.kind === "mm" ? { $case: "ioasidRegisterNotifierMm", value } : { $case: "ioasidRegisterNotifier", value },
        reg.setId === 0 ? {} : { setId: reg.setId },
      );
    }
    if (op.kind === "unregister") this.dropRegistration(op.registrationId);
    if (op.kind === "acks") {
      for (const { seq, registrationId: reg } of op.acks) this.mark(seq, reg, ACKED);
    } else if (op.kind === "misses") {
      for (const { seq, registrationId: reg } of op.misses) {
        const passed = this.mark(seq, reg, MISSED);
        // DESIGN §4.4: the missed subscriber is recorded, then the chain moves on. The record
        // is what lets a checker tell a passed-over tier from a teardown out of order.
        if (passed !== undefined && this.recording) {
          const e = passed.rec.event;
          this.emitHistory(
            { $case: "deliveryMissed", value: { subscriber: passed.target.subscriber.name, instance: passed.target.subscriber.instance, type: e.type } },
            { ...(e.ioasid === 0xffffffff ? {} : { ioasid: e.ioasid, generation: e.generation }), setId: e.setId, seq },
          );
        }
      }
    }
    return result;
  }

  /**
   * An unregistered subscriber's deliveries are settled for good: its missed (or pending) ones no
   * longer count as missed (`deliveries_missed` stayed 1 for good after Unregister, issue 14), and
   * the engine forgets its backlog. Applied at replay too, so a restarted core agrees.
   */
  private dropRegistration(registrationId: number): void {
    for (const [seq, rec] of this.deliveries) {
      const i = targetIndex(rec.targets, registrationId);
      if (i < 0 || rec.outcomes[i] === ACKED || rec.outcomes[i] === DROPPED) continue;
      rec.outcomes[i] = DROPPED;
      if (--rec.unacked === 0) this.deliveries.delete(seq);
    }
    this.engine?.forgetRegistration(registrationId);
  }

  /** Marks one target's outcome; returns the delivery and target when a pending one was missed. */
  /** `delivery_acked` records of an acknowledgement operation's acks not settled before. */
  private recordAcks(subscriber: { readonly name: string; readonly instance: string }, acks: readonly DeliveryAck[]): void {
    // Once per acknowledgement (four per reclaimed IOASID): no closure, no spread.
    const links = this.ackLinks !== undefined && this.ackLinks.size > 0 ? this.ackLinks : undefined;
    for (const ack of acks) {
      const rec = this.deliveries.get(ack.seq);
      if (rec === undefined) continue;
      const i = targetIndex(rec.targets, ack.registrationId);
      if (i < 0 || rec.outcomes[i] === ACKED || rec.outcomes[i] === DROPPED) continue;
      const e = rec.event;
      const fields: HistoryFields = {};
      if (e.ioasid !== 0xffffffff) {
        fields.ioasid = e.ioasid;
        fields.generation = e.generation;
      }
      fields.setId = e.setId;
      fields.seq = ack.seq;
      // The subscriber's records up to its ack precede this one (issue 18: order without clocks).
      const after = links?.get(`${ack.seq}:${ack.registrationId}`);
      if (after !== undefined) fields.after = [...after];
      this.emitHistory(
        {
          $case: "deliveryAcked",
          value: {
            subscriber: subscriber.name,
            instance: subscriber.instance,
            type: e.type,
            releases: ack.release === undefined ? [] : [...ack.release.purposes],
            late: rec.outcomes[i] === MISSED,
          },
        },
        fields,
      );
    }
  }

  private mark(seq: number, reg: number, outcome: typeof ACKED | typeof MISSED): { rec: DeliveryRecord; target: DeliveryTarget } | undefined {
    const rec = this.deliveries.get(seq);
    if (rec === undefined) return undefined;
    const i = targetIndex(rec.targets, reg);
    if (i < 0 || rec.outcomes[i] === ACKED || rec.outcomes[i] === DROPPED) return undefined;
    const was = rec.outcomes[i];
    rec.outcomes[i] = outcome;
    if (outcome === ACKED && --rec.unacked === 0) this.deliveries.delete(seq);
    return outcome === MISSED && was === PENDING ? { rec, target: rec.targets[i]! } : undefined;
  }

  private onEvent(e: IoasidEvent): void {
    const committed = this.log.append(e, this.currentTs);
    if (this.recording) {
      const fields: HistoryFields = {};
      if (e.ioasid !== 0xffffffff) {
        fields.ioasid = e.ioasid;
        fields.generation = e.generation;
      }
      fields.setId = e.setId;
      if (e.spid !== 0) fields.spid = e.spid;
      fields.refcount = e.refcount;
      fields.seq = e.seq;
      this.pendingEventHistory.push([{ $case: "ioasidNotify", value: { type: eventTypeOf(e.type) } }, fields]);
    }
    // Before the early return: a RECLAIM's span is started whether or not anyone receives it.
    const trace = this.opTrace.eventTrace(e);
    const targets = this.targetsOf(this.space.recipients(e));
    if (targets.length === 0) return;
    const event = fromCommittedEvent(committed);
    const key = chainKey(e);
    this.deliveries.set(e.seq, { event, key, targets, outcomes: new Uint8Array(targets.length), unacked: targets.length });
    this.captured.push({ seq: e.seq, key, event, targets, trace });
  }

  /** Delivery targets of a recipients() answer (the model caches those, so this caches by identity). */
  private targetsOf(recipients: readonly Registration[]): readonly DeliveryTarget[] {
    let targets = this.targetCache.get(recipients);
    if (targets === undefined) {
      targets = Object.freeze(recipients.map((r) => ({ registrationId: r.id, subscriber: r.subscriber, priority: r.priority })));
      this.targetCache.set(recipients, targets);
    }
    return targets;
  }
}

/** The index of the target registered as `registrationId` (-1 if none): every acknowledgement and every dropped registration looks one up. */
function targetIndex(targets: readonly DeliveryTarget[], registrationId: number): number {
  for (let i = 0; i < targets.length; i++) if (targets[i]!.registrationId === registrationId) return i;
  return -1;
}
