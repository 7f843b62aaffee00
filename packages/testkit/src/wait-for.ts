import { setTimeout as delay } from "node:timers/promises";

/** Options of {@link waitFor}. */
export interface WaitForOptions {
  /** Give up after this long, in ms. @default 5000 */
  readonly timeoutMs?: number;
  /** Time between two checks, in ms. @default 10 */
  readonly intervalMs?: number;
  /** What is awaited, for the timeout error ("nats-server to accept connections"). */
  readonly message?: string;
  /** Stops waiting at once: waitFor then rejects with the signal's reason. */
  readonly signal?: AbortSignal;
}

/**
 * Awaits a condition with a bounded deadline — the replacement for sleeping in tests (STYLE.md:
 * "no sleeps to wait for ordering"). A condition that throws counts as not yet true; its last error
 * is quoted if the deadline passes.
 *
 * @throws Error `timed out after <ms> ms waiting for <message>` when the condition never holds;
 * the signal's reason when `signal` aborts.
 * @example
 * await waitFor(() => events.length === 3, { timeoutMs: 2000, message: "three FREE events" });
 */
export async function waitFor(condition: () => boolean | Promise<boolean>, options: WaitForOptions = {}): Promise<void> {
  const { timeoutMs = 5000, intervalMs = 10, message = "the condition", signal } = options;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    signal?.throwIfAborted();
    try {
      if (await condition()) return;
      lastError = undefined;
    } catch (err) {
      lastError = err;
    }
    const remaining = deadline - Date.now();
    if (remaining <= 0) {
      const why = lastError === undefined ? "" : ` (last error: ${lastError instanceof Error ? lastError.message : String(lastError)})`;
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${message}${why}`, { cause: lastError });
    }
    await delay(Math.min(intervalMs, remaining), undefined, signal === undefined ? undefined : { signal }).catch(() => {
      signal?.throwIfAborted();
    });
  }
}
