import type { Msg, NatsConnection, Subscription } from "@nats-io/transport-node";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { bus, type events } from "@ioasid/proto";
import { receiveBatchTrace } from "./delivery-trace.js";
import { decodePositions, encodePositions, noteReceived, POSITION_HEADER, positionOf } from "@ioasid/trace";
import { DEFAULT_PREFIX, deliverySubject, helloSubject, queueGroup } from "./subjects.js";
import { AckMemory } from "./ack-memory.js";
import { ReusedWriter } from "./reused-writer.js";
import { decodeDeliveryBatch } from "./decode-delivery-batch.js";

/** What a handler knows about the delivery it handles. */
export interface DeliveryContext {
  readonly registrationId: number;
  /** 1 for the first attempt; more when the event is redelivered after a miss. */
  readonly attempt: number;
  /** Deliveries in the message this one came in (batching shows here). */
  readonly batchSize: number;
}

/**
 * What a handler returns: nothing (the event is settled), or the purposes of the subscriber's own
 * references on the event's IOASID to release together with the acknowledgement.
 */
export interface HandlerResult {
  readonly release?: readonly string[];
  /** Detach the IOASID's SPID with the acknowledgement (one message instead of a DetachSpid call). */
  readonly detachSpid?: boolean;
}

/**
 * Handles one event. Returning settles it: the subscriber's context for that IOASID is cleared
 * (DESIGN §4.3); throwing makes the delivery count as missed, to be retried.
 */
export type EventHandler = (event: events.IoasidEvent, ctx: DeliveryContext) => Promise<HandlerResult | void> | HandlerResult | void;

/** Options of {@link startSubscriber}. */
export interface SubscriberOptions {
  readonly nc: NatsConnection;
  /** Subscriber name: the role ("kvm"). Also the holder role of the references it releases. */
  readonly name: string;
  /** Instance ("vm-7"); replicas of one instance share its deliveries. */
  readonly instance: string;
  readonly handler: EventHandler;
  /** @default "ioasid.v1" */
  readonly prefix?: string;
  /**
   * Acknowledgements remembered for deduplication by (sequence, registration): a whole number ≥ 0
   * (0: none), or Infinity (every one); anything else is refused with a RangeError. @default 100000
   */
  readonly dedupeWindow?: number;
}

/** A running subscriber. */
export interface Subscriber {
  /** Deliveries handled (not counting duplicates answered from the dedupe cache). */
  readonly handled: number;
  /** Duplicates answered from the dedupe cache without calling the handler. */
  readonly duplicates: number;
  /** Announces the subscriber again (after a reconnect): the core sends what it missed. */
  hello(): Promise<number>;
  /** Stops receiving (pending handlers finish). */
  stop(): Promise<void>;
}

/** Every subscriber of the process encodes its acknowledgements with one writer (reused-writer.ts). */
const ackWriter = new ReusedWriter();

/**
 * The subscriber side of ordered, acknowledged delivery: receives DeliveryBatches on its subject
 * (queue group shared by its replicas), runs the handler for each delivery — deliveries of one
 * batch concern different IOASIDs, so they run concurrently — and answers with an AckBatch.
 * Delivery is at-least-once: the SDK remembers recent acknowledgements by (sequence,
 * registration) and answers a redelivered event from that memory without calling the handler.
 *
 * Registration with the core (priority, scope) is the caller's: CoreService.Register.
 *
 * @example
 * const sub = await startSubscriber({ nc, name: "kvm", instance: "vm-7", handler: async (e) => {
 *   clearVmcsEntry(e.ioasid);
 *   return { release: ["vmcs"] };
 * }});
 */
export async function startSubscriber(options: SubscriberOptions): Promise<Subscriber> {
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  const window = options.dedupeWindow ?? 100_000;
  const done = new AckMemory<bus.Ack>(window);
  // Handlings still running (an asynchronous handler), by registration then sequence: a
  // redelivery meanwhile waits for the same handling.
  const inProgress = new Map<number, Map<number, Promise<bus.Ack>>>();
  let handled = 0;
  let duplicates = 0;

  const settle = (exact: boolean, seq: number, event: events.IoasidEvent, d: bus.Delivery, result: HandlerResult | void): bus.Ack => {
    const ack: bus.Ack = {
      seq: event.seq,
      registrationId: d.registrationId,
      status: bus.AckStatus.ACK_STATUS_SETTLED,
      releases: result?.release === undefined ? [] : result.release.map((purpose) => ({ purpose })),
      error: "",
      detachSpid: result?.detachSpid === true,
    };
    handled++;
    if (exact) done.set(seq, d.registrationId, ack);
    return ack;
  };
  const failed = (event: events.IoasidEvent, d: bus.Delivery, err: unknown): bus.Ack => ({
    seq: event.seq,
    registrationId: d.registrationId,
    status: bus.AckStatus.ACK_STATUS_FAILED,
    releases: [],
    error: err instanceof Error ? err.message : String(err),
    detachSpid: false,
  });

  /** The ack of one delivery: from the dedupe memory, at once for a synchronous handler, or later. */
  const handleOne = (d: bus.Delivery, batchSize: number): bus.Ack | Promise<bus.Ack> => {
    const event = d.event!;
    const seq = Number(event.seq);
    const registrationId = d.registrationId;
    // The core's sequences are numbers below 2^53; one beyond would not be told from its
    // neighbours as a number, so it is neither looked up nor remembered (handled as new).
    const exact = Number.isSafeInteger(seq);
    const cached = exact ? done.get(seq, registrationId) : undefined;
    if (cached !== undefined) {
      duplicates++;
      return cached;
    }
    const running = inProgress.size === 0 || !exact ? undefined : inProgress.get(registrationId)?.get(seq);
    if (running !== undefined) return running;
    let result: ReturnType<EventHandler>;
    try {
      result = options.handler(event, { registrationId, attempt: d.attempt, batchSize });
    } catch (err) {
      return failed(event, d, err);
    }
    if (!(result instanceof Promise)) return settle(exact, seq, event, d, result);
    const work = result.then(
      (r) => settle(exact, seq, event, d, r),
      (err: unknown) => failed(event, d, err),
    );
    if (!exact) return work;
    const bySeq = inProgress.get(registrationId) ?? new Map<number, Promise<bus.Ack>>();
    inProgress.set(registrationId, bySeq);
    bySeq.set(seq, work);
    void work.finally(() => {
      bySeq.delete(seq);
      if (bySeq.size === 0 && inProgress.get(registrationId) === bySeq) inProgress.delete(registrationId);
    });
    return work;
  };

  const onBatch = async (msg: Msg): Promise<void> => {
    let batch: bus.DeliveryBatch;
    try {
      batch = decodeDeliveryBatch(msg.data);
    } catch {
      return; // not ours: no answer, the sender's deadline expires
    }
    // Acks in delivery order (the engine matches them by position); handlers of one batch run
    // concurrently (their deliveries concern different IOASIDs).
    const n = batch.deliveries.length;
    // Order without clocks (issue 18): the records this process makes from here on follow the
    // core's up to the position the batch carries, and the ack carries this subscriber's own.
    if (msg.headers !== undefined) noteReceived(decodePositions(msg.headers.get(POSITION_HEADER)));
    // Traced (DESIGN §13): each handling continues its delivery's trace, each ack its handling's.
    const traced = receiveBatchTrace(msg, n, options);
    const results =
      traced === undefined ? batch.deliveries.map((d) => handleOne(d, n)) : batch.deliveries.map((d, i) => traced.handle(i, d, () => handleOne(d, n)));
    const acks = results.some((r) => r instanceof Promise) ? await Promise.all(results) : (results as bus.Ack[]);
    let headers = traced?.reply(acks, natsHeaders);
    const position = positionOf(options.name, options.instance);
    if (position !== undefined) (headers ??= natsHeaders()).set(POSITION_HEADER, encodePositions([position]));
    msg.respond(
      ackWriter.encode((w) => bus.AckBatch.encode({ acks }, w)),
      headers === undefined ? undefined : { headers },
    );
  };

  const sub: Subscription = options.nc.subscribe(deliverySubject(prefix, options.name, options.instance), {
    queue: queueGroup(options.name, options.instance),
    callback: (err, msg) => {
      if (err === null) void onBatch(msg);
    },
  });
  await options.nc.flush();

  const hello = async (): Promise<number> => {
    const reply = await options.nc.request(helloSubject(prefix), bus.Hello.encode({ name: options.name, instance: options.instance }).finish(), {
      timeout: 5000,
    });
    return bus.HelloReply.decode(reply.data).backlog;
  };
  // The core may not be up yet: a hello that finds nobody is retried by the core's own retries.
  await hello().catch(() => 0);

  return {
    get handled() {
      return handled;
    },
    get duplicates() {
      return duplicates;
    },
    hello,
    async stop() {
      await sub.drain();
    },
  };
}
