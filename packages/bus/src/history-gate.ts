import type { HistoryFields } from "./history.js";
import type { RoleStatePort, StateChange } from "./role-state.js";

/** Where a role's history records go: a {@link HistoryRecorder}, or a test's list. */
export interface HistorySink {
  record(action: string, fields?: HistoryFields, ts?: number): void;
}

/** Options of {@link HistoryGate}. */
export interface HistoryGateOptions {
  /**
   * Whether the role has no table change its store has not been given yet. Records made while it
   * is quiet and no write is in flight describe nothing unkept, and go out at once.
   * @default () => true (every change is written in the same turn as its record)
   */
  readonly quiet?: () => boolean;
  /** Wait before looking again whether held records can go, ms. @default 20 */
  readonly checkMs?: number;
}

interface Held {
  readonly sink: HistorySink;
  readonly action: string;
  readonly fields: HistoryFields;
  readonly ts: number;
}

/**
 * Holds a role's history records until the table changes they describe are kept in the role's
 * store, as the core holds its records until its operation log has them: a history never shows a
 * PASID entry, a VMCS translation or a fault group that a crash then took back. (Found by the chaos
 * suite: an IOMMU recorded a bind's PASID entry, its state write failed with NATS and it
 * fail-stopped; restarted without the entry, it never recorded a teardown, and S9 was reported.)
 *
 * A record made before a store write goes out once that write and every earlier one succeeded; a
 * record made while the role is quiet (see {@link HistoryGateOptions.quiet}) and nothing is in
 * flight goes out at once. After a failed write nothing more goes out: the role is stopping, and
 * what it records now may describe what was not kept. Records keep the time they were made.
 */
export class HistoryGate {
  readonly #quiet: () => boolean;
  readonly #checkMs: number;
  #held: Held[] = [];
  /** Records released so far (the index of #held[0] among every record held). */
  #released = 0;
  #inFlight = 0;
  #chain: Promise<void> = Promise.resolve();
  #failed = false;
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(options: HistoryGateOptions = {}) {
    this.#quiet = options.quiet ?? (() => true);
    this.#checkMs = options.checkMs ?? 20;
  }

  /** A recorder whose records wait at this gate. */
  wrap(sink: HistorySink): HistorySink {
    return {
      record: (action, fields = {}, ts = performance.timeOrigin + performance.now()) => {
        this.#held.push({ sink, action, fields, ts });
        this.#schedule();
      },
    };
  }

  /** The role's store, through which every write must go: a write releases the records made before it. */
  store(inner: RoleStatePort): RoleStatePort {
    return {
      write: (changes: readonly StateChange[]) => {
        const mark = this.#released + this.#held.length;
        this.#inFlight++;
        const write = inner.write(changes);
        this.#chain = this.#chain.then(() =>
          write.then(
            () => {
              this.#inFlight--;
              this.#releaseUpTo(mark);
            },
            () => {
              this.#inFlight--;
              this.#failed = true;
            },
          ),
        );
        return write;
      },
    };
  }

  /** Records held now (tests, diagnostics). */
  get held(): number {
    return this.#held.length;
  }

  /** Waits for the writes in flight, then releases what the quiet rule allows (a graceful stop). */
  async settle(): Promise<void> {
    await this.#chain;
    this.#check();
    // A HistoryRecorder publishes on the next turn: let it, before the connection is drained.
    await new Promise((r) => setImmediate(r));
  }

  #schedule(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#check();
    }, this.#checkMs);
    this.#timer.unref?.();
  }

  #check(): void {
    if (this.#failed || this.#held.length === 0) return;
    if (this.#inFlight === 0 && this.#quiet()) this.#releaseUpTo(this.#released + this.#held.length);
    else this.#schedule();
  }

  #releaseUpTo(mark: number): void {
    if (this.#failed) return;
    const n = Math.min(mark - this.#released, this.#held.length);
    if (n > 0) {
      const out = this.#held.splice(0, n);
      this.#released += n;
      for (const h of out) h.sink.record(h.action, h.fields, h.ts);
    }
    if (this.#held.length > 0) this.#schedule();
  }
}
