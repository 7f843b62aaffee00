import { Code, DomainError } from "@ioasid/errors";
import type { CallContext, Send } from "@ioasid/grpc-kit";
import type { core } from "@ioasid/proto";
import { fromCommittedEvent } from "./convert.js";
import type { CommittedEvent, EventLog } from "./event-log.js";

/** Most committed events held for one WatchEvents stream by default (IOASID_CORE_WATCH_BUFFER). */
export const DEFAULT_WATCH_BUFFER = 10_000;

/**
 * The core's WatchEvents streams, each with a bounded queue (DESIGN §8: "every queue toward a
 * client is bounded; a slow WatchEvents reader is cut off with RESOURCE_EXHAUSTED and resumes from
 * its last sequence"). 20 paused readers over ~360k events grew the core by 145 MB (issue 14):
 * the events a reader had not taken were queued for it without limit.
 */
export class EventWatchers {
  readonly #log: EventLog;
  readonly #limit: number;
  readonly #queues = new Set<WatchQueue>();

  /** @param limit most events held for one stream @default DEFAULT_WATCH_BUFFER */
  constructor(log: EventLog, limit = DEFAULT_WATCH_BUFFER) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`watch buffer must be ≥ 1, got ${limit}`);
    this.#log = log;
    this.#limit = limit;
  }

  /** Open streams, and the most events held for any one of them now (GetStats). */
  stats(): { watchers: number; watchBufferedMax: number } {
    let max = 0;
    for (const q of this.#queues) max = Math.max(max, q.size);
    return { watchers: this.#queues.size, watchBufferedMax: max };
  }

  /**
   * Serves one WatchEvents stream: the retained events from `fromSeq` (0: from now), then every
   * new commit, until the caller cancels. Sends respect the stream's backpressure; events committed
   * meanwhile wait in the stream's queue, and when it holds its limit the stream ends.
   * @param lastSeq the sequence of the last committed event (for `fromSeq` 0)
   * @param types the event types wanted (undefined: all): others are neither sent nor queued, so a
   *   reader of one type (the benchmark's SET_FREE) costs the core nothing for the rest
   * @throws DomainError RESOURCE_EXHAUSTED `READER_TOO_SLOW`, metadata `resume_from_seq`
   */
  async serve(
    fromSeq: bigint,
    lastSeq: number,
    ctx: CallContext,
    send: Send<core.WatchEventsResponse>,
    types?: ReadonlySet<CommittedEvent["type"]>,
  ): Promise<void> {
    // Follow first, then read the backlog, so nothing committed in between is missed; the
    // follower's copies of backlog events are skipped by sequence number.
    const queue = new WatchQueue();
    let next = fromSeq === 0n ? lastSeq + 1 : Number(fromSeq);
    let wake: (() => void) | undefined;
    let cutOff: ((err: DomainError) => void) | undefined;
    const tooSlow = new Promise<never>((_, reject) => {
      cutOff = reject;
    });
    tooSlow.catch(() => {});
    let overflowed = false;
    const unfollow = this.#log.follow((e) => {
      if (overflowed || (types !== undefined && !types.has(e.type))) return;
      if (queue.size >= this.#limit) {
        // Cut off now, even while a send waits for the reader: what it has not been sent it can
        // read again from the log (resume_from_seq), the core keeps none of it for the stream.
        overflowed = true;
        const resumeFrom = Math.min(next, queue.peek()?.seq ?? next);
        queue.clear();
        cutOff?.(
          new DomainError(
            Code.RESOURCE_EXHAUSTED,
            "READER_TOO_SLOW",
            `the reader fell ${this.#limit} events behind and was cut off: WatchEvents again with from_seq ${resumeFrom} to carry on`,
            { metadata: { resume_from_seq: String(resumeFrom) } },
          ),
        );
        wake?.();
        return;
      }
      queue.push(e);
      wake?.();
    });
    this.#queues.add(queue);
    const onAbort = (): void => wake?.();
    ctx.signal.addEventListener("abort", onAbort);
    const deliver = async (e: CommittedEvent): Promise<void> => {
      const sent = send({ event: fromCommittedEvent(e) });
      if (sent !== undefined) await Promise.race([sent, tooSlow]);
      next = e.seq + 1;
    };
    try {
      for (const e of this.#log.since(next)) {
        if (ctx.signal.aborted) return;
        if (types === undefined || types.has(e.type)) await deliver(e);
      }
      while (!ctx.signal.aborted) {
        if (overflowed) await tooSlow;
        const e = queue.shift();
        if (e === undefined) {
          await Promise.race([new Promise<void>((resolve) => (wake = resolve)), tooSlow]);
          wake = undefined;
          continue;
        }
        if (e.seq < next) continue;
        await deliver(e);
      }
    } finally {
      unfollow();
      this.#queues.delete(queue);
      ctx.signal.removeEventListener("abort", onAbort);
    }
  }
}

/** A FIFO of committed events whose take is O(1) (an array with a moving head, compacted now and then). */
class WatchQueue {
  #items: Array<CommittedEvent | undefined> = [];
  #head = 0;

  get size(): number {
    return this.#items.length - this.#head;
  }

  push(e: CommittedEvent): void {
    this.#items.push(e);
  }

  peek(): CommittedEvent | undefined {
    return this.#items[this.#head];
  }

  shift(): CommittedEvent | undefined {
    const e = this.#items[this.#head];
    if (e === undefined) return undefined;
    this.#items[this.#head++] = undefined;
    if (this.#head >= 1024 && this.#head * 2 >= this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return e;
  }

  clear(): void {
    this.#items = [];
    this.#head = 0;
  }
}
