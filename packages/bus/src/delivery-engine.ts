import type { Context } from "@opentelemetry/api";
import { headers as natsHeaders, type Msg, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { bus, events } from "@ioasid/proto";
import { endDeliverySpan, readAckTraces, startDeliverySpans, type TracedDelivery } from "./delivery-trace.js";
import { decodePositions, encodePositions, POSITION_HEADER, type HistoryLink } from "@ioasid/trace";
import { DEFAULT_PREFIX, deliverySubject, Headers, helloSubject } from "./subjects.js";
import { ReplyInbox, type RequestOptions } from "./pub-ack-inbox.js";
import { ReusedWriter } from "./reused-writer.js";

/** Who receives deliveries: a subscriber is a role's name and instance. */
export interface SubscriberId {
  readonly name: string;
  readonly instance: string;
}

/** One registration an event goes to, with its place in the call order. */
export interface DeliveryTarget {
  readonly registrationId: number;
  readonly subscriber: SubscriberId;
  /** Call order: higher first (CPU=3 … LAST=0). */
  readonly priority: number;
}

/** What became of one delivery. */
export type DeliveryOutcome = "acked" | "missed";

/** One committed event and the registrations it goes to. */
export interface Chain {
  readonly seq: number;
  /** Events with the same key are delivered in sequence order, one chain at a time (per IOASID). */
  readonly key: string;
  readonly event: events.IoasidEvent;
  readonly targets: readonly DeliveryTarget[];
  /** Outcomes already recorded (a chain resumed after a core restart skips these targets). */
  readonly done?: ReadonlyMap<number, DeliveryOutcome>;
  /** Trace context of the operation that committed the event: its deliveries continue that trace (DESIGN §13). */
  readonly trace?: Context | undefined;
}

/** A settled acknowledgement, as the engine reports it. */
export interface SettledAck {
  readonly seq: number;
  readonly registrationId: number;
  readonly subscriber: SubscriberId;
  readonly event: events.IoasidEvent;
  /** Purposes of the subscriber's references released with the ack. */
  readonly releases: readonly string[];
  /** Detach the IOASID's SPID with the ack. */
  readonly detachSpid: boolean;
  /** True for a redelivery of a missed event (the chain had moved on). */
  readonly late: boolean;
  /** Trace context the core's handling of the ack continues (the subscriber's ack span), when traced. */
  readonly trace?: Context | undefined;
  /**
   * The subscriber's history position when it acknowledged (its reply's header), when it sent
   * one: the core's `delivery_acked` record follows those records (issue 18: order without clocks).
   */
  readonly after?: readonly HistoryLink[];
}

/** A missed delivery, as the engine reports it. */
export interface MissedDelivery {
  readonly seq: number;
  readonly registrationId: number;
  readonly subscriber: SubscriberId;
  readonly reason: string;
}

/** How the engine sends a batch and waits for its answer (a {@link ReplyInbox}'s request). */
export interface DeliveryRequests {
  request(subject: string, data: Uint8Array, options: RequestOptions): Promise<Pick<Msg, "data" | "headers">>;
}

/** Options of {@link DeliveryEngine}. */
export interface DeliveryEngineOptions {
  readonly nc: NatsConnection;
  /** How batches are sent and answered (tests answer by hand). @default a {@link ReplyInbox} on `nc` */
  readonly requests?: DeliveryRequests;
  /** Subject prefix. @default "ioasid.v1" */
  readonly prefix?: string;
  /** Time a subscriber gets to acknowledge a batch, in ms. @default 2000 */
  readonly deadlineMs?: number;
  /** How often missed deliveries are retried, in ms. @default 1000 */
  readonly retryMs?: number;
  /** Most deliveries in one message. @default 1000 */
  readonly maxBatch?: number;
  /**
   * Most deliveries sent to one subscriber name (a role) and not yet answered, across its
   * instances; more wait in the core, in the order they became ready. One process usually serves
   * every instance of a name (KVM's `vm-<id>` subscribers), so without this a crowd of instances
   * hands that process more work at once than it can answer within the deadline (issue 15: 1,000
   * crashed VMs' 64,000 FREEs sent to KVM together, 189,440 deliveries recorded missed). A batch is
   * always sent when nothing else is in flight for its name. A batch of the name that misses its
   * deadline lifts the bound until the name answers again: a hung process is then found out in one
   * more deadline, not one deadline per bound's worth of deliveries. @default 2048
   */
  readonly maxInFlightPerName?: number;
  /**
   * Called synchronously with every acknowledgement of one reply (apply the releases and record
   * them in the same step, so the order of state changes is the order of the record).
   */
  readonly onAcks: (acks: readonly SettledAck[]) => void;
  /**
   * The core's history position, sent with every delivery batch: a subscriber's records of its
   * handling follow the core's records up to it (issue 18: order without clocks). @default none
   */
  readonly position?: () => HistoryLink | undefined;
  /** Called with deliveries that missed their deadline, were refused, or failed. */
  readonly onMissed: (missed: readonly MissedDelivery[]) => void;
  /** Called when every target of a chain has acked or missed. */
  readonly onChainDone?: (seq: number) => void;
  /**
   * Told how each delivery of a chain ended and how long it took, from its turn in the chain (its
   * tier's) to its acknowledgement or miss, in seconds: the core's delivery metrics. @default none
   */
  readonly onDelivered?: (target: DeliveryTarget, outcome: DeliveryOutcome, seconds: number) => void;
  /** Where the engine reports transport trouble. @default no logging */
  readonly log?: (level: "info" | "warn", msg: string, fields?: Record<string, unknown>) => void;
}

interface Item extends TracedDelivery {
  readonly seq: number;
  readonly key: string;
  readonly registrationId: number;
  readonly event: events.IoasidEvent;
  /** The event encoded once per chain, shared by its deliveries to every tier. */
  readonly eventBytes: Uint8Array;
  /** Times it was sent. */
  attempt: number;
  resolve?: (outcome: DeliveryOutcome) => void;
}

/**
 * The core side of ordered, acknowledged delivery (DESIGN §4). For each committed event it
 * delivers to the registrations in priority tiers, highest first: no registration of a lower
 * priority receives the event before every live subscriber of each higher priority acknowledged it
 * (equal priorities run in parallel). Events of one key (one IOASID) run one chain at a time, in
 * sequence order; chains of different keys are pipelined, and deliveries waiting for the same
 * subscriber are batched into one message.
 *
 * A subscriber that misses a deadline, has no responder, or fails a handler is recorded as missed
 * and stops being live: the chains move on without it, and everything for it goes to its backlog,
 * in order, until a retry (every `retryMs`, or at once when it says hello) delivers the backlog.
 */
export class DeliveryEngine {
  private readonly nc: NatsConnection;
  private readonly replies: DeliveryRequests;
  private readonly prefix: string;
  private readonly deadlineMs: number;
  private readonly retryMs: number;
  private readonly maxBatch: number;
  private readonly options: DeliveryEngineOptions;
  private readonly channels = new Map<string, Channel>();
  private readonly rooms = new Map<string, Room>();
  private readonly maxInFlightPerName: number;
  private readonly tails = new Map<string, Promise<void>>();
  private running = 0;
  private waiters: Array<{ below: number; resolve: () => void }> = [];
  private timer: NodeJS.Timeout | undefined;
  private helloSub: Subscription | undefined;
  private stopped = false;

  constructor(options: DeliveryEngineOptions) {
    this.options = options;
    this.nc = options.nc;
    this.replies = options.requests ?? new ReplyInbox(options.nc);
    this.prefix = options.prefix ?? DEFAULT_PREFIX;
    this.deadlineMs = options.deadlineMs ?? 2000;
    this.retryMs = options.retryMs ?? 1000;
    this.maxBatch = options.maxBatch ?? 1000;
    this.maxInFlightPerName = options.maxInFlightPerName ?? 2048;
    if (!(this.maxInFlightPerName >= 1)) throw new RangeError(`maxInFlightPerName must be at least 1, not ${this.maxInFlightPerName}`);
  }

  /** Starts answering hellos and retrying missed deliveries. */
  start(): void {
    this.helloSub = this.nc.subscribe(helloSubject(this.prefix), {
      callback: (err, msg) => {
        if (err === null) this.onHello(msg);
      },
    });
    this.timer = setInterval(() => this.retryAll(), this.retryMs);
    this.timer.unref();
  }

  /** Stops the timers and the hello subscription; chains in flight are abandoned. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const room of this.rooms.values()) room.abandon();
    if (this.timer !== undefined) clearInterval(this.timer);
    this.helloSub?.unsubscribe();
  }

  /** Queues a chain behind the earlier chains of its key. */
  submit(chain: Chain): void {
    // Most chains are new (no outcomes yet): their targets as they are, without a filtered copy.
    const done = chain.done;
    const pending = done === undefined || done.size === 0 ? chain.targets : chain.targets.filter((t) => !done.has(t.registrationId));
    if (pending.length === 0) {
      this.options.onChainDone?.(chain.seq);
      return;
    }
    this.running++;
    const prev = this.tails.get(chain.key);
    const run = (): Promise<void> => this.runChain(chain, pending);
    const next = (prev === undefined ? run() : prev.then(run)).finally(() => {
      if (this.tails.get(chain.key) === next) this.tails.delete(chain.key);
      this.running--;
      if (this.waiters.length > 0) this.wakeWaiters();
    });
    this.tails.set(chain.key, next);
  }

  /**
   * Puts deliveries a subscriber missed before a core restart back in its backlog (in order).
   * The subscriber is not live until they are delivered.
   */
  restoreBacklog(
    subscriber: SubscriberId,
    items: ReadonlyArray<{ seq: number; key: string; registrationId: number; event: events.IoasidEvent; trace?: Context | undefined }>,
  ): void {
    const channel = this.channel(subscriber);
    channel.live = false;
    // Sent at least once before the restart, or it would not have been missed.
    for (const i of items) channel.backlog.push({ ...i, eventBytes: events.IoasidEvent.encode(i.event).finish(), attempt: 1 });
  }

  /**
   * Drops what waits in the backlogs for a registration that was removed (Unregister): nobody
   * acknowledges for it any more, and a subscriber that never comes back would keep them for good.
   * Deliveries already sent settle on their own (acknowledged or missed).
   * @returns how many backlog entries were dropped
   */
  forgetRegistration(registrationId: number): number {
    let dropped = 0;
    for (const channel of this.channels.values()) {
      const kept = channel.backlog.filter((i) => i.registrationId !== registrationId);
      dropped += channel.backlog.length - kept.length;
      channel.backlog = kept;
    }
    return dropped;
  }

  /** Resolves when no chain is running (backlogs may remain). */
  idle(): Promise<void> {
    return this.runningBelow(1);
  }

  /** Resolves when fewer than `n` chains are running (backpressure for producers). */
  runningBelow(n: number): Promise<void> {
    if (this.running < n) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ below: n, resolve }));
  }

  private wakeWaiters(): void {
    const still: Array<{ below: number; resolve: () => void }> = [];
    for (const w of this.waiters) {
      if (this.running < w.below) w.resolve();
      else still.push(w);
    }
    this.waiters = still;
  }

  /** Per subscriber name: deliveries sent and not yet answered, and batches waiting for room. */
  inFlight(): Array<{ name: string; deliveries: number; waitingBatches: number }> {
    return [...this.rooms].map(([name, room]) => ({ name, deliveries: room.taken, waitingBatches: room.waitingCount }));
  }

  /** Per subscriber: live or not, and how many deliveries wait in its backlog. */
  status(): Array<{ subscriber: SubscriberId; live: boolean; backlog: number }> {
    return [...this.channels.values()].map((c) => ({ subscriber: c.id, live: c.live, backlog: c.backlog.length }));
  }

  /** Chains not yet finished. */
  get runningChains(): number {
    return this.running;
  }

  private async runChain(chain: Chain, pending: readonly DeliveryTarget[]): Promise<void> {
    // Tiers in call order: CPU → DEVICE → IOMMU → LAST (higher priority first).
    const ordered = isDescending(pending) ? pending : [...pending].sort((a, b) => b.priority - a.priority);
    // Encoded once per chain, shared by its deliveries to every tier.
    const eventBytes = eventWriter.encode((w) => events.IoasidEvent.encode(chain.event, w));
    for (let i = 0; i < ordered.length;) {
      let j = i + 1;
      while (j < ordered.length && ordered[j]!.priority === ordered[i]!.priority) j++;
      if (j === i + 1) await this.deliver(chain, eventBytes, ordered[i]!);
      else await Promise.all(ordered.slice(i, j).map((t) => this.deliver(chain, eventBytes, t)));
      i = j;
    }
    this.options.onChainDone?.(chain.seq);
  }

  private deliver(chain: Chain, eventBytes: Uint8Array, target: DeliveryTarget): Promise<DeliveryOutcome> {
    const observe = this.options.onDelivered;
    if (observe === undefined) return this.enqueue(chain, eventBytes, target);
    const started = performance.now();
    return this.enqueue(chain, eventBytes, target).then((outcome) => {
      observe(target, outcome, (performance.now() - started) / 1000);
      return outcome;
    });
  }

  private enqueue(chain: Chain, eventBytes: Uint8Array, target: DeliveryTarget): Promise<DeliveryOutcome> {
    const channel = this.channel(target.subscriber);
    const item: Item = {
      seq: chain.seq,
      key: chain.key,
      registrationId: target.registrationId,
      event: chain.event,
      eventBytes,
      attempt: 0,
      trace: chain.trace,
      priority: target.priority,
    };
    if (!channel.live || this.stopped) {
      channel.backlog.push(item);
      this.options.onMissed([{ seq: item.seq, registrationId: item.registrationId, subscriber: channel.id, reason: "not live" }]);
      return Promise.resolve("missed");
    }
    return new Promise((resolve) => {
      item.resolve = resolve;
      channel.queue.push(item);
      if (!channel.pumpScheduled && !channel.inFlight) {
        channel.pumpScheduled = true;
        // Let every chain step of this turn join the batch before it is sent.
        queueMicrotask(() => {
          channel.pumpScheduled = false;
          this.pump(channel);
        });
      }
    });
  }

  private channel(id: SubscriberId): Channel {
    const key = `${id.name}/${id.instance}`;
    let channel = this.channels.get(key);
    if (channel === undefined) {
      let room = this.rooms.get(id.name);
      if (room === undefined) {
        room = new Room(this.maxInFlightPerName);
        this.rooms.set(id.name, room);
      }
      channel = {
        id: { name: id.name, instance: id.instance },
        subject: deliverySubject(this.prefix, id.name, id.instance),
        room,
        live: true,
        queue: [],
        backlog: [],
        inFlight: false,
        pumpScheduled: false,
      };
      this.channels.set(key, channel);
    }
    return channel;
  }

  private pump(channel: Channel): void {
    if (channel.inFlight || this.stopped) return;
    if (!channel.live) {
      // Items queued before the subscriber stopped being live go to its backlog, in order.
      const queued = channel.queue.splice(0);
      for (const item of queued) this.miss(channel, item, "not live");
      void this.drain(channel);
      return;
    }
    if (channel.queue.length === 0) return;
    const want = Math.min(channel.queue.length, this.maxBatch);
    channel.inFlight = true;
    if (channel.room.tryTake(want)) {
      this.sendQueued(channel, want);
      return;
    }
    // The name's process has enough to answer: wait for room (items queued meanwhile join a later batch).
    void channel.room.take(want).then(() => {
      if (this.stopped || !channel.live) {
        // Not sent: the room goes back, and pump takes the not-live path (the backlog).
        channel.room.give(want);
        channel.inFlight = false;
        this.pump(channel);
        return;
      }
      this.sendQueued(channel, want);
    });
  }

  /** Sends the first `n` queued items of a channel that holds room for them. */
  private sendQueued(channel: Channel, n: number): void {
    const items = channel.queue.splice(0, n);
    this.send(channel, items)
      .then(({ acks: acked, after }) => {
        channel.room.bound(); // the name answers: it gets what it can take again
        const settled: SettledAck[] = [];
        for (let i = 0; i < items.length; i++) {
          const ack = acked[i];
          if (ack !== undefined && ack.status === bus.AckStatus.ACK_STATUS_SETTLED) {
            settled.push(toSettled(channel, items[i]!, ack, false, after));
          }
        }
        if (settled.length > 0) this.options.onAcks(settled);
        for (let i = 0; i < items.length; i++) {
          const item = items[i]!;
          const ack = acked[i];
          if (ack !== undefined && ack.status === bus.AckStatus.ACK_STATUS_SETTLED) item.resolve?.("acked");
          else this.miss(channel, item, ack === undefined ? "no ack" : `handler failed: ${ack.error}`);
        }
      })
      .catch((err: unknown) => {
        const reason = describe(err);
        if (reason === DEADLINE_EXCEEDED) channel.room.unbound();
        for (const item of items) this.miss(channel, item, reason);
      })
      .finally(() => {
        channel.room.give(items.length);
        channel.inFlight = false;
        this.pump(channel);
      });
  }

  private miss(channel: Channel, item: Item, reason: string): void {
    if (channel.live) {
      channel.live = false;
      this.options.log?.("warn", "subscriber missed a delivery; chains move on without it", {
        subscriber: `${channel.id.name}/${channel.id.instance}`,
        seq: item.seq,
        reason,
      });
    }
    channel.backlog.push(item);
    endDeliverySpan(item, "missed", reason);
    this.options.onMissed([{ seq: item.seq, registrationId: item.registrationId, subscriber: channel.id, reason }]);
    item.resolve?.("missed");
    item.resolve = undefined;
  }

  /** Sends what a subscriber missed, oldest first, one event per key per message. */
  private async drain(channel: Channel): Promise<void> {
    if (channel.inFlight || channel.live || this.stopped) return;
    channel.inFlight = true;
    try {
      while (channel.backlog.length > 0 && !this.stopped) {
        const seen = new Set<string>();
        const batch: Item[] = [];
        for (const item of channel.backlog) {
          if (batch.length >= this.maxBatch) break;
          if (!seen.has(item.key)) batch.push(item);
          seen.add(item.key); // a key's later items wait for its earlier one
        }
        let acked: Array<bus.Ack | undefined>;
        let after: readonly HistoryLink[];
        if (!channel.room.tryTake(batch.length)) await channel.room.take(batch.length);
        try {
          if (this.stopped) return;
          ({ acks: acked, after } = await this.send(channel, batch));
          channel.room.bound();
        } catch (err) {
          const reason = describe(err);
          if (reason === DEADLINE_EXCEEDED) channel.room.unbound();
          for (const item of batch) endDeliverySpan(item, "missed", reason);
          return; // still away: the next retry or hello tries again
        } finally {
          channel.room.give(batch.length);
        }
        const settled: SettledAck[] = [];
        const done = new Set<Item>();
        for (let i = 0; i < batch.length; i++) {
          const item = batch[i]!;
          const ack = acked[i];
          if (ack?.status === bus.AckStatus.ACK_STATUS_SETTLED) {
            settled.push(toSettled(channel, item, ack, true, after));
            done.add(item);
          } else endDeliverySpan(item, "missed", ack === undefined ? "no ack" : `handler failed: ${ack.error}`);
        }
        if (settled.length > 0) this.options.onAcks(settled);
        channel.backlog = channel.backlog.filter((i) => !done.has(i));
        if (done.size < batch.length) return; // some failed again: retry later
      }
      if (channel.backlog.length === 0 && !this.stopped) {
        channel.live = true;
        this.options.log?.("info", "subscriber caught up and is live again", { subscriber: `${channel.id.name}/${channel.id.instance}` });
      }
    } finally {
      channel.inFlight = false;
      if (channel.live) this.pump(channel);
    }
  }

  private async send(channel: Channel, items: readonly Item[]): Promise<{ acks: Array<bus.Ack | undefined>; after: readonly HistoryLink[] }> {
    for (const item of items) item.attempt++;
    const h = natsHeaders();
    // Taken when sent: every record the core made before (a higher tier's ack among them) precedes the handling.
    const position = this.options.position?.();
    if (position !== undefined) h.set(POSITION_HEADER, encodePositions([position]));
    h.set(Headers.FIRST_SEQ, String(items[0]!.seq));
    h.set(Headers.LAST_SEQ, String(items[items.length - 1]!.seq));
    h.set(Headers.COUNT, String(items.length));
    startDeliverySpans(items, channel, h);
    // Through the connection's reply inbox, not nats.js's request: no Error built per batch (pub-ack-inbox.ts).
    const reply = await this.replies.request(channel.subject, encodeDeliveryBatch(items), { timeoutMs: this.deadlineMs, headers: h });
    readAckTraces(items, reply);
    const after = decodePositions(reply.headers?.get(POSITION_HEADER));
    return { acks: matchAcks(items, bus.AckBatch.decode(reply.data).acks), after };
  }

  private onHello(msg: Msg): void {
    let hello: bus.Hello;
    try {
      hello = bus.Hello.decode(msg.data);
    } catch {
      return;
    }
    const channel = this.channel({ name: hello.name, instance: hello.instance });
    msg.respond(bus.HelloReply.encode({ backlog: channel.backlog.length }).finish());
    if (!channel.live || channel.backlog.length > 0) {
      channel.live = false;
      void this.drain(channel);
    }
  }

  private retryAll(): void {
    for (const channel of this.channels.values()) {
      if (!channel.live && !channel.inFlight) void this.drain(channel);
    }
  }
}

interface Channel {
  readonly id: SubscriberId;
  readonly subject: string;
  /** Shared by every instance of the subscriber's name. */
  readonly room: Room;
  live: boolean;
  queue: Item[];
  backlog: Item[];
  inFlight: boolean;
  pumpScheduled: boolean;
}

/**
 * How many deliveries one subscriber name may have sent and unanswered: a weighted semaphore,
 * first come first served (a large batch is not passed by smaller ones behind it). A batch is
 * admitted whatever its size when nothing is taken, so a batch larger than the room still goes.
 */
class Room {
  private used = 0;
  private waiting: Array<{ readonly n: number; readonly resolve: () => void }> = [];
  /** No bound: a batch of the name missed its deadline, and none was answered since. */
  private unbounded = false;

  constructor(private readonly max: number) {}

  get taken(): number {
    return this.used;
  }

  get waitingCount(): number {
    return this.waiting.length;
  }

  /**
   * A batch missed its deadline with at most the bound's worth out: the process is hung or cut off
   * more likely than slow. Everything waiting goes now, so that it is found missed in one more
   * deadline (with 64,000 deliveries waiting behind a bound of 2,048, 32 deadlines in a row).
   */
  unbound(): void {
    this.unbounded = true;
    this.admit();
  }

  /** The name answered a batch: bounded again. */
  bound(): void {
    this.unbounded = false;
  }

  private fits(n: number): boolean {
    return this.unbounded || this.used === 0 || this.used + n <= this.max;
  }

  /** Takes room for `n` at once if there is some and nobody waits before. */
  tryTake(n: number): boolean {
    if (this.waiting.length > 0 || !this.fits(n)) return false;
    this.used += n;
    return true;
  }

  /** Resolves once room for `n` is taken, after everyone who waited before. */
  take(n: number): Promise<void> {
    if (this.tryTake(n)) return Promise.resolve();
    return new Promise((resolve) => this.waiting.push({ n, resolve }));
  }

  give(n: number): void {
    this.used -= n;
    this.admit();
  }

  private admit(): void {
    while (this.waiting.length > 0 && this.fits(this.waiting[0]!.n)) {
      const w = this.waiting.shift()!;
      this.used += w.n;
      w.resolve();
    }
  }

  /** The engine stops: everyone waiting goes on (and finds it stopped). */
  abandon(): void {
    const waiting = this.waiting;
    this.waiting = [];
    for (const w of waiting) {
      this.used += w.n;
      w.resolve();
    }
  }
}

function isDescending(targets: readonly DeliveryTarget[]): boolean {
  for (let i = 1; i < targets.length; i++) if (targets[i]!.priority > targets[i - 1]!.priority) return false;
  return true;
}

const eventWriter = new ReusedWriter();

const batchWriter = new ReusedWriter();

/**
 * A DeliveryBatch on the wire, built from events encoded once per chain: a sub-message is a
 * length-delimited field, so the stored bytes go in as they are (bus.proto field numbers:
 * DeliveryBatch.deliveries = 1; Delivery.registration_id = 1, event = 2, attempt = 3).
 */
export function encodeDeliveryBatch(items: ReadonlyArray<{ registrationId: number; eventBytes: Uint8Array; attempt: number }>): Uint8Array {
  return batchWriter.encode((w) => {
    for (const item of items) {
      w.uint32(10).fork();
      if (item.registrationId !== 0) w.uint32(8).uint32(item.registrationId);
      w.uint32(18).bytes(item.eventBytes);
      if (item.attempt !== 0) w.uint32(24).uint32(item.attempt);
      w.join();
    }
    return w;
  });
}

/**
 * The ack of each item, by position. The SDK answers in delivery order, so position i normally
 * holds item i's ack; anything else is matched by (seq, registration), and an item without an ack
 * gets undefined.
 */
function matchAcks(items: readonly Item[], acks: readonly bus.Ack[]): Array<bus.Ack | undefined> {
  const out: Array<bus.Ack | undefined> = new Array(items.length);
  let mismatch = acks.length !== items.length;
  for (let i = 0; i < items.length && !mismatch; i++) {
    const a = acks[i]!;
    const item = items[i]!;
    if (Number(a.seq) === item.seq && a.registrationId === item.registrationId) out[i] = a;
    else mismatch = true;
  }
  if (!mismatch) return out;
  const byKey = new Map<string, bus.Ack>();
  for (const a of acks) byKey.set(`${a.seq}:${a.registrationId}`, a);
  return items.map((item) => byKey.get(`${item.seq}:${item.registrationId}`));
}

function toSettled(channel: Channel, item: Item, ack: bus.Ack, late: boolean, after: readonly HistoryLink[]): SettledAck {
  return {
    seq: item.seq,
    registrationId: item.registrationId,
    subscriber: channel.id,
    event: item.event,
    releases: ack.releases.map((r) => r.purpose),
    detachSpid: ack.detachSpid,
    late,
    trace: endDeliverySpan(item, "acked"),
    ...(after.length === 0 ? {} : { after }),
  };
}

const DEADLINE_EXCEEDED = "deadline exceeded";

function describe(err: unknown): string {
  const e = err as { code?: string; message?: string };
  if (typeof e?.message === "string" && /no responders/i.test(e.message)) return "no responders";
  if (typeof e?.message === "string" && /timeout/i.test(e.message)) return DEADLINE_EXCEEDED;
  return e?.message ?? String(err);
}
