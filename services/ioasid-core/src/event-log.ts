import type { IoasidEvent } from "@ioasid/ioasid";

/** A committed event with the time the core committed it. */
export interface CommittedEvent extends IoasidEvent {
  /** Commit time, ms since the epoch. */
  readonly commitTimeMs: number;
}

/** Options of {@link EventLog}. */
export interface EventLogOptions {
  /** Events kept for late readers; older ones are dropped. @default 100_000 */
  readonly retain?: number;
  /** Clock. @default Date.now */
  readonly now?: () => number;
}

/**
 * The core's log of committed events, in sequence order, with followers (WatchEvents streams).
 * A bounded ring: readers that ask for events older than what is retained get the oldest kept.
 * (Durable storage of the log is the delivery issue's JetStream stream; this is the in-process
 * view tools read.)
 */
export class EventLog {
  private readonly retain: number;
  private readonly now: () => number;
  private readonly ring: (CommittedEvent | undefined)[];
  private start = 0;
  private count = 0;
  private readonly followers = new Set<(event: CommittedEvent) => void>();

  constructor(options: EventLogOptions = {}) {
    this.retain = options.retain ?? 100_000;
    if (!Number.isInteger(this.retain) || this.retain < 1) throw new RangeError(`retain must be ≥ 1, got ${this.retain}`);
    this.now = options.now ?? Date.now;
    this.ring = new Array<CommittedEvent | undefined>(this.retain);
  }

  /**
   * Appends an event (sequence numbers must increase) and tells every follower.
   * @param commitTimeMs when its operation was committed @default now
   */
  append(event: IoasidEvent, commitTimeMs?: number): CommittedEvent {
    // An explicit literal: object spread is several times slower on this path (every event).
    const committed: CommittedEvent = {
      seq: event.seq,
      type: event.type,
      ioasid: event.ioasid,
      generation: event.generation,
      spid: event.spid,
      setId: event.setId,
      token: event.token,
      privateData: event.privateData,
      refcount: event.refcount,
      commitTimeMs: commitTimeMs ?? this.now(),
    };
    const last = this.last();
    if (last !== undefined && committed.seq <= last.seq) {
      throw new Error(`event seq ${committed.seq} does not follow ${last.seq}`);
    }
    if (this.count < this.retain) {
      this.ring[(this.start + this.count) % this.retain] = committed;
      this.count++;
    } else {
      this.ring[this.start] = committed;
      this.start = (this.start + 1) % this.retain;
    }
    for (const follower of this.followers) follower(committed);
    return committed;
  }

  /** The newest event, if any. */
  last(): CommittedEvent | undefined {
    return this.count === 0 ? undefined : this.ring[(this.start + this.count - 1) % this.retain];
  }

  /** Sequence number of the oldest event kept (undefined when empty). */
  firstSeq(): number | undefined {
    return this.count === 0 ? undefined : this.ring[this.start]!.seq;
  }

  /** Retained events with `seq ≥ fromSeq`, in order. */
  since(fromSeq: number): CommittedEvent[] {
    const out: CommittedEvent[] = [];
    if (this.count === 0) return out;
    // Sequence numbers are contiguous within the ring, so the first wanted index is arithmetic.
    const first = this.ring[this.start]!.seq;
    const skip = Math.max(0, Math.min(this.count, fromSeq - first));
    for (let i = skip; i < this.count; i++) out.push(this.ring[(this.start + i) % this.retain]!);
    return out;
  }

  /** Calls `listener` with every event appended from now on; returns the unsubscribe function. */
  follow(listener: (event: CommittedEvent) => void): () => void {
    this.followers.add(listener);
    return () => this.followers.delete(listener);
  }

  /** Number of followers (for tests and stats). */
  get followerCount(): number {
    return this.followers.size;
  }
}
