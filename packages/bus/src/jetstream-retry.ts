/**
 * Reads from a NATS cluster tried again while JetStream fails over (issue 18). After a
 * nats-server's death the cluster elects new stream leaders; for a few seconds a JetStream API
 * request times out, finds no responder, or answers 503 ("JetStream not enabled"). A reader — the
 * history a checker judges, for one — that gave up on the first of those would fail a run that
 * lost nothing. What is not such a failure (a message that is not a history batch, a stream that
 * does not exist) is never tried again.
 */

/** Whether `err` is what a JetStream request answers while the cluster elects leaders or reconnects. */
export function isTransientJetStreamError(err: unknown): boolean {
  // A DomainError (say HISTORY_FORMAT_UNSUPPORTED) is a verdict about the data, not the cluster.
  if ((err as { reason?: unknown } | null)?.reason !== undefined) return false;
  const text = String(err);
  if (/stream not found|consumer not found|wrong last sequence/i.test(text)) return false;
  return (
    (err as { code?: unknown } | null)?.code === 503 ||
    /JetStreamNotEnabled|jetstream is not enabled|no responders|\b503\b|\btimeout\b|temporarily unavailable|disconnect|reconnect|heartbeats? missed/i.test(text)
  );
}

/** Options of {@link retryTransient}. */
export interface RetryTransientOptions {
  /** How long after the first failure it keeps trying, in ms. @default 10000 */
  readonly retryMs?: number;
  /** The pause between two tries, in ms. @default 250 */
  readonly delayMs?: number;
  /** Which failures are tried again. @default {@link isTransientJetStreamError} */
  readonly isTransient?: (err: unknown) => boolean;
  /** Told of each failure that is tried again. */
  readonly onRetry?: (err: unknown, attempt: number) => void;
}

/**
 * Runs `read` again, from scratch, while it fails with {@link isTransientJetStreamError} and
 * `retryMs` has not passed since the first failure; then throws the last error, saying how long
 * it tried. Any other error is thrown at once.
 */
export async function retryTransient<T>(read: () => Promise<T>, options: RetryTransientOptions = {}): Promise<T> {
  const retryMs = options.retryMs ?? 10_000;
  const delayMs = options.delayMs ?? 250;
  let firstFailure: number | undefined;
  for (let attempt = 1; ; attempt++) {
    try {
      return await read();
    } catch (err) {
      const now = performance.now();
      firstFailure ??= now;
      if (!(options.isTransient ?? isTransientJetStreamError)(err)) throw err;
      if (now - firstFailure + delayMs > retryMs) {
        throw new Error(`${String((err as Error).message ?? err)} (JetStream still failing after ${attempt} tries over ${Math.round(now - firstFailure)} ms)`, {
          cause: err,
        });
      }
      options.onRetry?.(err, attempt);
      await new Promise((r) => setTimeout(r, delayMs));
    }
  }
}
