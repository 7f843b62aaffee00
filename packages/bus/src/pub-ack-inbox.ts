import {
  ClosedConnectionError,
  NoRespondersError,
  PermissionViolationError,
  TimeoutError,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type Subscription,
} from "@nats-io/transport-node";
import type { PubAck } from "@nats-io/jetstream";
import { connectionInbox, readPubAck } from "./pub-ack.js";

/** Options of {@link ReplyInbox.request}. */
export interface RequestOptions {
  /** Headers of the request. */
  readonly headers?: MsgHdrs;
  /** How long to wait for the reply, ms. */
  readonly timeoutMs: number;
}

/** Options of {@link PubAckInbox.publish}: the JetStream headers nats.js's `js.publish` sets for the same options. */
export interface AppendOptions {
  /** `Nats-Msg-Id`: a retry with the same id is acknowledged as a duplicate, not stored twice. */
  readonly msgID?: string;
  /** `Nats-Expected-Last-Sequence`: stored only right after this stream sequence. */
  readonly lastSequence?: number;
  /** How long to wait for the acknowledgement, ms. */
  readonly timeoutMs: number;
}

interface Waiting {
  readonly subject: string;
  readonly resolve: (msg: Msg) => void;
  readonly reject: (err: unknown) => void;
  readonly timer: ReturnType<typeof setTimeout>;
}

/**
 * Requests whose replies come to one inbox subscription of the connection (issue 15). A nats.js
 * `request` builds an Error even when it succeeds (`RequestOne.cancel` rejects its settled promise
 * with a new `RequestError("cancelled")`: a stack capture) beside its mux entry and timeout;
 * profiled, that was about 35 µs of the core's own CPU per durable Alloc, on its critical path, and
 * the core's largest single cost after its model in a crashed guest's teardown (one delivery batch
 * per tier). Here a request is one map entry, one timer and one publish with a reply subject.
 *
 * Failures are those of nats.js's `request`, with the same error classes, so callers tell them apart
 * as before:
 * - no subscriber takes the subject (the server's 503 status): a {@link NoRespondersError};
 * - no reply within the timeout: a {@link TimeoutError};
 * - the server refused the publish (the user may not publish on the subject): the server's
 *   {@link PermissionViolationError}, at once, for every request waiting on that subject;
 * - the connection closed with the request unanswered: at once (not at the timeout, which would
 *   hold a stopping process), a {@link ClosedConnectionError} ("closed connection"; nats.js says
 *   `RequestError` "connection closed": callers here treat both alike);
 * - the connection refused the publish (closed or draining, a bad subject): that error.
 * A subscription the server refused (the inbox outside the user's permissions) fails what waits,
 * and the next request subscribes again.
 */
export class ReplyInbox {
  readonly #nc: NatsConnection;
  readonly #inbox: string;
  readonly #waiting = new Map<string, Waiting>();
  #sub: Subscription | undefined;
  #watching = false;
  #next = 0;

  constructor(nc: NatsConnection) {
    this.#nc = nc;
    this.#inbox = connectionInbox(nc);
  }

  /** Listens (once per inbox) for the connection's close and for publishes the server refused. */
  #watch(): void {
    if (this.#watching) return;
    this.#watching = true;
    void this.#nc.closed().then(() => this.#failAll(new ClosedConnectionError()));
    void (async () => {
      for await (const s of this.#nc.status()) {
        if (s.type === "error" && s.error instanceof PermissionViolationError && s.error.operation === "publish") this.#failSubject(s.error.subject, s.error);
      }
    })().catch(() => undefined);
  }

  /** Publishes `data` on `subject` with a reply subject under the inbox, and resolves with the reply. */
  request(subject: string, data: Uint8Array, options: RequestOptions): Promise<Msg> {
    this.#watch();
    if (this.#sub === undefined) {
      const sub = this.#nc.subscribe(`${this.#inbox}.*`, {
        callback: (err, msg) => {
          if (err === null) return this.#answer(msg);
          // Refused (or ended) by the server: subscribe again at the next request.
          if (this.#sub === sub) this.#sub = undefined;
          this.#failAll(err);
        },
      });
      this.#sub = sub;
    }
    const token = String(++this.#next);
    return new Promise<Msg>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiting.delete(token);
        reject(new TimeoutError());
      }, options.timeoutMs);
      this.#waiting.set(token, { subject, resolve, reject, timer });
      try {
        this.#nc.publish(subject, data, { ...(options.headers === undefined ? {} : { headers: options.headers }), reply: `${this.#inbox}.${token}` });
      } catch (err) {
        // Closed or draining connection, a bad subject: nothing was sent.
        clearTimeout(timer);
        this.#waiting.delete(token);
        reject(err);
      }
    });
  }

  /** Stops listening; requests still waiting are rejected. */
  close(): void {
    this.#sub?.unsubscribe();
    this.#sub = undefined;
    this.#failAll(new Error("the reply inbox was closed"));
  }

  /** Requests waiting for a reply (tests). */
  get waiting(): number {
    return this.#waiting.size;
  }

  #answer(msg: Msg): void {
    const token = msg.subject.slice(this.#inbox.length + 1);
    const w = this.#waiting.get(token);
    if (w === undefined) return; // answered after its timeout
    this.#waiting.delete(token);
    clearTimeout(w.timer);
    // The server's "no responders" status, as nats.js's request reports it.
    if (msg.data.length === 0 && msg.headers?.code === 503) w.reject(new NoRespondersError(w.subject));
    else w.resolve(msg);
  }

  #failSubject(subject: string, err: unknown): void {
    for (const [token, w] of this.#waiting) {
      if (w.subject !== subject) continue;
      clearTimeout(w.timer);
      this.#waiting.delete(token);
      w.reject(err);
    }
  }

  #failAll(err: unknown): void {
    for (const w of this.#waiting.values()) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this.#waiting.clear();
  }
}

/**
 * JetStream publishes whose acknowledgements come to one inbox subscription of the connection (a
 * {@link ReplyInbox}): the core's operation log (the sequential durable Alloc: 1.39× its floor),
 * then the roles' state writes, three of which are on the IO page fault's round trip.
 *
 * Answers mean what `js.publish` makes of them, with the same error classes and messages (the op
 * log tells a transient failure from the fence by them, op-log.ts `isTransientWriteError`, and a
 * role's state store a refusal from a write to retry, role-state.ts; read by {@link readPubAck},
 * which the history outbox shares): a PubAck resolves, a JetStream error (`wrong last sequence: 5`,
 * …) or no responders ("jetstream is not enabled") rejects;
 * - no answer within the timeout: a {@link TimeoutError};
 * - a publish the server refused, or the connection closed with the write unanswered: at once, as
 *   {@link ReplyInbox} says (not after the timeout, which would hold a stopping process).
 */
export class PubAckInbox {
  readonly #replies: ReplyInbox;

  constructor(nc: NatsConnection) {
    this.#replies = new ReplyInbox(nc);
  }

  /** Publishes `data` on `subject` and resolves with JetStream's acknowledgement. */
  async publish(subject: string, data: Uint8Array, headers: MsgHdrs, options: AppendOptions): Promise<PubAck> {
    if (options.msgID !== undefined) headers.set("Nats-Msg-Id", options.msgID);
    if (options.lastSequence !== undefined) headers.set("Nats-Expected-Last-Sequence", String(options.lastSequence));
    let reply: Msg;
    try {
      reply = await this.#replies.request(subject, data, { headers, timeoutMs: options.timeoutMs });
    } catch (err) {
      // No stream takes the subject (or its leader is being elected): as `js.publish` reports it.
      if (err instanceof NoRespondersError) throw new Error("jetstream is not enabled (no responders)");
      throw err;
    }
    const answer = readPubAck(reply);
    if (answer.error !== undefined) throw answer.error;
    return answer.ack;
  }

  /** Stops listening; appends still waiting are rejected. */
  close(): void {
    this.#replies.close();
  }

  /** Appends waiting for an answer (tests). */
  get waiting(): number {
    return this.#replies.waiting;
  }
}

const SHARED = new WeakMap<NatsConnection, PubAckInbox>();

/**
 * The connection's shared inbox (made at the first call): every writer of the process on that
 * connection (a role's state stores) gets its acknowledgements through one subscription.
 */
export function pubAckInbox(nc: NatsConnection): PubAckInbox {
  let inbox = SHARED.get(nc);
  if (inbox === undefined) SHARED.set(nc, (inbox = new PubAckInbox(nc)));
  return inbox;
}
