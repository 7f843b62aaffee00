import type { CorePort } from "@ioasid/role-kit";
import type { Scheduler, VfioLog } from "./vfio-ports.js";

/** First wait between two looks at the core, ms; it doubles up to {@link MAX_WAIT_MS}. */
const FIRST_WAIT_MS = 10;
/** Longest wait between two looks at the core, ms. */
const MAX_WAIT_MS = 500;

interface Waiter {
  readonly setId: number;
  /** Rounds started before it waited: only a round started after may say its set is gone. */
  readonly after: number;
  readonly deadline: number;
  readonly resolve: (reclaimed: boolean) => void;
}

/**
 * Waits for freed sets to be destroyed at the core (every IOASID reclaimed), for every closing
 * container at once: one ListSets per round answers them all. The release phase of a closed
 * container unassigns its mdevs only once its set is reclaimed (S5).
 *
 * Each container used to ask for its own set (a GetSet per container per round, the rounds growing
 * from 10 to 500 ms). In a crowd of 1,000 crashed guests whose reclaim takes 20 s that was about
 * 30,000 calls, answered by the core while it was the bottleneck of that reclaim (issue 15: the
 * core's CPU per guest grew with the crowd). Now it is one call per round, whatever the number of
 * containers waiting.
 */
export class ReclaimWatch {
  readonly #core: Pick<CorePort, "listSets">;
  readonly #scheduler: Scheduler;
  readonly #log: VfioLog;
  readonly #waiters = new Set<Waiter>();
  #polling = false;
  #wait = FIRST_WAIT_MS;
  /** Rounds started so far. */
  #rounds = 0;

  constructor(core: Pick<CorePort, "listSets">, scheduler: Scheduler, log: VfioLog) {
    this.#core = core;
    this.#scheduler = scheduler;
    this.#log = log;
  }

  /** Containers waiting now (tests, diagnostics). */
  get waiting(): number {
    return this.#waiters.size;
  }

  /**
   * Resolves true once the core no longer has set `setId`, or false when `timeoutMs` passed
   * first. The first look is at once when nothing else waits; a set that starts waiting while
   * others do is looked at in the next round (at most {@link MAX_WAIT_MS} later), and makes the
   * rounds short again.
   */
  reclaimed(setId: number, timeoutMs: number): Promise<boolean> {
    return new Promise((resolve) => {
      this.#waiters.add({ setId, after: this.#rounds, deadline: this.#scheduler.now() + timeoutMs, resolve });
      this.#wait = FIRST_WAIT_MS;
      if (!this.#polling) void this.#poll();
    });
  }

  async #poll(): Promise<void> {
    this.#polling = true;
    try {
      while (this.#waiters.size > 0) {
        try {
          const round = ++this.#rounds;
          const live = new Set((await this.#core.listSets()).map((s) => s.id));
          for (const w of this.#waiters) {
            // A list asked for before the set waited may predate the set itself: not an answer.
            if (w.after >= round || live.has(w.setId)) continue;
            this.#waiters.delete(w);
            w.resolve(true);
          }
        } catch (err) {
          this.#log.warn({ err, sets: this.#waiters.size }, "cannot ask the core whether the closed containers' sets are reclaimed");
        }
        const now = this.#scheduler.now();
        let next = Infinity;
        for (const w of this.#waiters) {
          if (w.deadline <= now) {
            this.#waiters.delete(w);
            w.resolve(false);
          } else next = Math.min(next, w.deadline - now);
        }
        if (this.#waiters.size === 0) break;
        const wait = this.#wait;
        this.#wait = Math.min(wait * 2, MAX_WAIT_MS);
        await this.#scheduler.sleep(Math.min(wait, next));
      }
    } finally {
      this.#polling = false;
    }
  }
}
