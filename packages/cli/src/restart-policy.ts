/**
 * When the embedded stack's supervisor starts a service again (DESIGN §13: "a fail-stopped service
 * is restarted with backoff, and the restart is reported", as compose's `restart: on-failure`).
 */
export interface RestartPolicyOptions {
  /** Wait before the first restart, ms. @default 500 */
  readonly initialDelayMs?: number;
  /** The wait doubles with each failure in a row, up to this, ms. @default 10000 */
  readonly maxDelayMs?: number;
  /**
   * A service that ran at least this long before it failed was started successfully: its next
   * restart waits `initialDelayMs` again (Docker's rule for `restart: on-failure`), ms. @default 10000
   */
  readonly stableMs?: number;
  /** Restarts allowed within `windowMs`; one more failure in that window and the supervisor gives up. @default 5 */
  readonly maxRestarts?: number;
  /** @default 60000 */
  readonly windowMs?: number;
}

/** How a service process ended (Node's `exit` event). */
export interface ServiceExit {
  /** Exit code, or null when a signal ended it. */
  readonly code: number | null;
  /** The signal that ended it, or null. */
  readonly signal: string | null;
}

/** Exit code of a service whose configuration is wrong (grpc-kit `configOrExit`, `credentialsOrExit`). */
export const CONFIGURATION_ERROR_EXIT = 2;

/** What the supervisor does about one exit of a service. */
export type RestartDecision =
  /** Start it again after `delayMs`; `restarts`: restarts within the window, this one included. */
  | { readonly kind: "restart"; readonly delayMs: number; readonly restarts: number }
  /**
   * Leave it stopped: `clean-exit` (exit 0 is not a failure: a SIGTERM by hand stops a service
   * gracefully, as `docker compose stop` does) or `configuration-error` (exit 2: it would fail the
   * same way at every start; the log says what to fix).
   */
  | { readonly kind: "leave"; readonly reason: "clean-exit" | "configuration-error" }
  /** It failed again after `restarts` restarts within `windowMs`: restarting is not helping. */
  | { readonly kind: "give-up"; readonly restarts: number; readonly windowMs: number };

/**
 * The restart rule for one service: pure logic, told each exit and the time; the supervisor acts on
 * its decisions.
 *
 * @example
 * const policy = new RestartPolicy();
 * const d = policy.decide({ code: null, signal: "SIGKILL" }, ranMs, Date.now());
 * if (d.kind === "restart") setTimeout(start, d.delayMs);
 */
export class RestartPolicy {
  readonly #initialDelayMs: number;
  readonly #maxDelayMs: number;
  readonly #stableMs: number;
  readonly #maxRestarts: number;
  readonly #windowMs: number;
  /** When each restart within the window was decided. */
  #restarts: number[] = [];
  /** Failures in a row, each after a run shorter than `stableMs`. */
  #failuresInARow = 0;

  constructor(options: RestartPolicyOptions = {}) {
    this.#initialDelayMs = options.initialDelayMs ?? 500;
    this.#maxDelayMs = options.maxDelayMs ?? 10_000;
    this.#stableMs = options.stableMs ?? 10_000;
    this.#maxRestarts = options.maxRestarts ?? 5;
    this.#windowMs = options.windowMs ?? 60_000;
  }

  /** Restarts allowed within {@link windowMs}. */
  get maxRestarts(): number {
    return this.#maxRestarts;
  }

  /** The window restarts are counted in, ms. */
  get windowMs(): number {
    return this.#windowMs;
  }

  /**
   * What to do about an exit.
   * @param ranMs how long the process ran before it ended, ms
   * @param now the time of the exit, ms (any clock, the same for every call)
   */
  decide(exit: ServiceExit, ranMs: number, now: number): RestartDecision {
    if (exit.signal === null && exit.code === 0) return { kind: "leave", reason: "clean-exit" };
    if (exit.signal === null && exit.code === CONFIGURATION_ERROR_EXIT) return { kind: "leave", reason: "configuration-error" };
    this.#restarts = this.#restarts.filter((t) => now - t < this.#windowMs);
    if (this.#restarts.length >= this.#maxRestarts) return { kind: "give-up", restarts: this.#restarts.length, windowMs: this.#windowMs };
    this.#failuresInARow = ranMs >= this.#stableMs ? 1 : this.#failuresInARow + 1;
    this.#restarts.push(now);
    const delayMs = Math.min(this.#initialDelayMs * 2 ** (this.#failuresInARow - 1), this.#maxDelayMs);
    return { kind: "restart", delayMs, restarts: this.#restarts.length };
  }
}

/** An exit in words: "exit code 1", "signal SIGKILL". */
export function describeExit(exit: ServiceExit): string {
  return exit.signal !== null ? `signal ${exit.signal}` : `exit code ${String(exit.code)}`;
}
