import type { HistoryActionInput, HistoryFields } from "./history-catalogue.js";
import type { RoleStatePort, StateChange } from "./role-state.js";

/** Where a role's history records go: a {@link HistoryRecorder}, or a test's list. */
export interface HistorySink {
  /** Records one step: an action of the catalogue, what it is about, and when (default now). */
  record(action: HistoryActionInput, fields?: HistoryFields, ts?: number): void;
  /**
   * Numbers a record when it is made, before it is handed on later (see HistoryRecorder.stamp):
   * its place in the publisher's order, and the causal links it carries.
   */
  stamp?(fields: HistoryFields): HistoryFields;
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
  readonly action: HistoryActionInput;
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
 * A write keeps the changes made before it starts, so the records made between the previous write
 * and it go out once it succeeded (a slow earlier write holds back only its own records); a record
 * made while the role is quiet (see {@link HistoryGateOptions.quiet}) and nothing is in flight
 * goes out at once. After a failed write nothing more goes out: the role is stopping, and what it
 * records now may describe what was not kept. Records keep the time they were made.
 */
export class HistoryGate {
  readonly #quiet: () => boolean;
  readonly #checkMs: number;
  /** Records not yet released, and some released ones behind an unreleased one. */
  #held: Array<Held & { out: boolean }> = [];
  /**
   * Records of #held not yet released. Counted, not filtered for: every record asks whether any is
   * held, and a crowd's teardown holds thousands while a write is in flight (issue 15).
   */
  #unreleased = 0;
  /** Index (among every record held) of #held[0]. */
  #base = 0;
  /** Where the last write's range ends (its records are those from the previous mark up to it). */
  #lastMark = 0;
  #inFlight = 0;
  #failed = false;
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(options: HistoryGateOptions = {}) {
    this.#quiet = options.quiet ?? (() => true);
    this.#checkMs = options.checkMs ?? 20;
  }

  /** A recorder whose records wait at this gate. */
  wrap(sink: HistorySink): HistorySink {
    return {
      ...(sink.stamp === undefined ? {} : { stamp: (fields: HistoryFields) => sink.stamp!(fields) }),
      record: (action, fields = {}, ts = performance.timeOrigin + performance.now()) => {
        // Numbered now, not when released: an acknowledgement sent meanwhile covers it.
        this.#held.push({ sink, action, fields: sink.stamp?.(fields) ?? fields, ts, out: false });
        this.#unreleased++;
        this.#schedule();
      },
    };
  }

  /**
   * The role's store, through which every write must go. A write takes the changes made before it
   * starts, so it keeps what the records made since the previous write describe: those go out
   * when it succeeds (a write still in flight before it holds back only its own records).
   */
  store(inner: RoleStatePort): RoleStatePort {
    return {
      write: (changes: readonly StateChange[]) => {
        const from = this.#lastMark;
        const to = this.#base + this.#held.length;
        this.#lastMark = to;
        this.#inFlight++;
        const write = inner.write(changes);
        write.then(
          () => {
            this.#inFlight--;
            this.#release(from, to);
            this.#schedule();
          },
          () => {
            this.#inFlight--;
            this.#failed = true;
          },
        );
        return write;
      },
    };
  }

  /** Records held now (tests, diagnostics). */
  get held(): number {
    return this.#unreleased;
  }

  /** Waits for the writes in flight (at most `timeoutMs`), then releases what the quiet rule allows (a graceful stop). */
  async settle(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.#inFlight > 0 && !this.#failed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    this.#check();
    // A HistoryRecorder publishes on the next turn: let it, before the connection is drained.
    await new Promise((r) => setImmediate(r));
  }

  #schedule(): void {
    if (this.#timer !== undefined || this.held === 0) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#check();
    }, this.#checkMs);
    this.#timer.unref?.();
  }

  #check(): void {
    if (this.#failed) return;
    if (this.#inFlight === 0 && this.#quiet()) this.#release(this.#base, this.#base + this.#held.length);
    else this.#schedule();
  }

  /** Publishes the unreleased records with index in [from, to). */
  #release(from: number, to: number): void {
    if (this.#failed) return;
    for (let i = Math.max(from, this.#base); i < to && i - this.#base < this.#held.length; i++) {
      const h = this.#held[i - this.#base]!;
      if (h.out) continue;
      h.out = true;
      this.#unreleased--;
      h.sink.record(h.action, h.fields, h.ts);
    }
    let n = 0;
    while (n < this.#held.length && this.#held[n]!.out) n++;
    if (n > 0) {
      this.#held.splice(0, n);
      this.#base += n;
    }
  }
}
