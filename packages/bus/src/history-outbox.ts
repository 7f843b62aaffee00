import type { MsgHdrs, NatsConnection } from "@nats-io/transport-node";
import { connectionInbox, readPubAck } from "./pub-ack.js";

/** Options of a connection's {@link HistoryOutbox}. */
export interface HistoryOutboxOptions {
  /** A message not acknowledged this long after it was sent is sent again, ms (default 2,000). */
  readonly ackWaitMs?: number;
  /**
   * A message still not stored this long after it was first sent is given up, ms (default 60,000:
   * half the history stream's duplicate window, 2 minutes, so that a message sent again is still
   * recognised as the one sent first and stored once).
   */
  readonly maxAgeMs?: number;
  /** At most this many bytes wait for acknowledgement; beyond, the oldest are given up (default 32 MiB). */
  readonly maxBytes?: number;
}

/** Messages an outbox gave up on (never stored, as far as it knows), with why. */
export interface HistoryLoss {
  readonly messages: number;
  readonly reason: string;
}

interface Waiting {
  readonly subject: string;
  readonly body: Uint8Array;
  readonly headers: MsgHdrs;
  readonly firstAt: number;
  sentAt: number;
  /** Answered with an error (no responders, a leader being elected): sent again at the next tick. */
  lastError: string | undefined;
}

/**
 * History messages published with JetStream acknowledgements, and sent again until stored (issue
 * 15, the compose cluster's killed stream leader). History was published fire and forget; a
 * message sent to a server as it died, or to the history stream while it elected a leader, was lost
 * without a trace: the cluster test's checker then found a teardown's records missing (a KVM VMCS
 * clear, the core's put, VFIO's vcmd_free) though the teardown itself was right.
 *
 * History still never holds up the work it records: {@link send} only publishes (with a reply
 * subject under the connection's inbox) and returns. Acknowledgements come to one subscription of
 * the connection; one timer (while anything waits) sends again, in the order first sent, what got
 * no acknowledgement within `ackWaitMs` or was answered with an error. Every message carries a
 * `Nats-Msg-Id`, so a message sent again that had been stored after all is stored once. What is
 * not stored within `maxAgeMs`, or overflows `maxBytes`, is given up and reported (`onLost`). A
 * closed connection loses what waits, never the work.
 */
export class HistoryOutbox {
  readonly #nc: NatsConnection;
  readonly #inbox: string;
  readonly #ackWaitMs: number;
  readonly #maxAgeMs: number;
  readonly #maxBytes: number;
  /** By token, in the order first sent (a Map keeps insertion order). */
  readonly #waiting = new Map<number, Waiting>();
  readonly #lostListeners = new Set<(loss: HistoryLoss) => void>();
  #subscribed = false;
  #timer: ReturnType<typeof setInterval> | undefined;
  #bytes = 0;
  #next = 0;
  /** Messages given up so far. */
  lost = 0;
  /** Messages sent again so far (tests, metrics). */
  resent = 0;

  constructor(nc: NatsConnection, options: HistoryOutboxOptions = {}) {
    this.#nc = nc;
    this.#inbox = connectionInbox(nc);
    this.#ackWaitMs = options.ackWaitMs ?? 2_000;
    this.#maxAgeMs = options.maxAgeMs ?? 60_000;
    this.#maxBytes = options.maxBytes ?? 32 * 1024 * 1024;
  }

  /** Messages waiting for acknowledgement. */
  get waiting(): number {
    return this.#waiting.size;
  }

  /** Listeners told of losses ({@link onLost}; tests). */
  get lossListeners(): number {
    return this.#lostListeners.size;
  }

  /** Calls `listener` whenever messages are given up; returns a function that stops it. */
  onLost(listener: (loss: HistoryLoss) => void): () => void {
    this.#lostListeners.add(listener);
    return () => this.#lostListeners.delete(listener);
  }

  /**
   * Publishes `body` on `subject`; `headers` must carry a `Nats-Msg-Id` unique to this message (a
   * message sent again is recognised by it). Never throws: a closed connection drops it.
   */
  send(subject: string, body: Uint8Array, headers: MsgHdrs): void {
    if (this.#nc.isClosed()) return;
    if (!this.#subscribed) {
      this.#nc.subscribe(`${this.#inbox}.*`, { callback: (err, msg) => (err === null ? this.#answer(msg.subject, readPubAck(msg)) : undefined) });
      this.#subscribed = true;
    }
    const token = ++this.#next;
    const now = performance.now();
    this.#waiting.set(token, { subject, body, headers, firstAt: now, sentAt: now, lastError: undefined });
    this.#bytes += body.length;
    this.#publish(token, subject, body, headers);
    if (this.#bytes > this.#maxBytes) this.#giveUpOldest();
    this.#timer ??= setInterval(() => this.#tick(), Math.max(10, Math.floor(this.#ackWaitMs / 2))).unref();
  }

  /** Resolves once nothing waits for acknowledgement, or after `timeoutMs`; true when nothing waits. */
  async settled(timeoutMs: number): Promise<boolean> {
    const end = performance.now() + timeoutMs;
    while (this.#waiting.size > 0 && performance.now() < end) await new Promise((r) => setTimeout(r, 20));
    return this.#waiting.size === 0;
  }

  #publish(token: number, subject: string, body: Uint8Array, headers: MsgHdrs): void {
    try {
      this.#nc.publish(subject, body, { headers, reply: `${this.#inbox}.${token}` });
    } catch {
      // Closed or draining: the tick drops what waits.
    }
  }

  #answer(subject: string, answer: ReturnType<typeof readPubAck>): void {
    const token = Number(subject.slice(this.#inbox.length + 1));
    const w = this.#waiting.get(token);
    if (w === undefined) return; // an answer to a message sent twice, or given up
    if (answer.error === undefined) {
      this.#waiting.delete(token);
      this.#bytes -= w.body.length;
      if (this.#waiting.size === 0) this.#stopTimer();
    } else {
      w.lastError = answer.error.message;
    }
  }

  #tick(): void {
    if (this.#nc.isClosed()) {
      this.#waiting.clear();
      this.#bytes = 0;
      this.#stopTimer();
      return;
    }
    const now = performance.now();
    let expired = 0;
    let why: string | undefined;
    for (const [token, w] of this.#waiting) {
      if (now - w.firstAt >= this.#maxAgeMs) {
        this.#waiting.delete(token);
        this.#bytes -= w.body.length;
        expired++;
        why ??= w.lastError ?? "no acknowledgement";
        continue;
      }
      if (w.lastError !== undefined || now - w.sentAt >= this.#ackWaitMs) {
        w.sentAt = now;
        this.resent++;
        this.#publish(token, w.subject, w.body, w.headers);
      }
    }
    if (expired > 0) this.#report(expired, `not stored within ${this.#maxAgeMs} ms (${why})`);
    if (this.#waiting.size === 0) this.#stopTimer();
  }

  #giveUpOldest(): void {
    let dropped = 0;
    for (const [token, w] of this.#waiting) {
      if (this.#bytes <= this.#maxBytes) break;
      this.#waiting.delete(token);
      this.#bytes -= w.body.length;
      dropped++;
    }
    if (dropped > 0) this.#report(dropped, `more than ${this.#maxBytes} bytes waited for acknowledgement`);
  }

  #report(messages: number, reason: string): void {
    this.lost += messages;
    for (const l of this.#lostListeners) l({ messages, reason });
  }

  #stopTimer(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }
}

/** One outbox per connection: one acknowledgement subscription, however many recorders use it. */
const OUTBOXES = new WeakMap<NatsConnection, HistoryOutbox>();

/**
 * The connection's history outbox, made at first use with `options` (later calls get the same
 * outbox; their options are not applied).
 */
export function historyOutbox(nc: NatsConnection, options: HistoryOutboxOptions = {}): HistoryOutbox {
  let o = OUTBOXES.get(nc);
  if (o === undefined) OUTBOXES.set(nc, (o = new HistoryOutbox(nc, options)));
  return o;
}
