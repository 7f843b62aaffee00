import type { Logger } from "pino";
import type { GrpcServer } from "./grpc-server.js";

/** Options of {@link runUntilSignal}. */
export interface RunUntilSignalOptions {
  /** @default the server's logger */
  readonly logger?: Logger;
  /** Time calls in flight get to finish. @default 5000 */
  readonly graceMs?: number;
  /** Signals that stop the process. @default ["SIGTERM", "SIGINT"] */
  readonly signals?: readonly NodeJS.Signals[];
  /** Runs after the gRPC server has stopped (close NATS, flush state). Its failure exits 1. */
  readonly beforeExit?: () => Promise<void> | void;
  /** Ends the process. @default process.exit */
  readonly exit?: (code: number) => void;
}

/**
 * Keeps a service running until SIGTERM or SIGINT, then shuts it down gracefully
 * ({@link GrpcServer.shutdown}, then `beforeExit`) and exits 0. A second signal during shutdown
 * exits 1 at once. Returns a function that removes the signal handlers.
 *
 * @example
 * await server.listen(host, port);
 * runUntilSignal(server, { logger, beforeExit: () => nats.close() });
 */
export function runUntilSignal(server: GrpcServer, options: RunUntilSignalOptions = {}): () => void {
  const logger = options.logger ?? server.logger;
  const signals = options.signals ?? ["SIGTERM", "SIGINT"];
  const exit = options.exit ?? ((code: number) => process.exit(code));
  let stopping = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      logger.warn({ signal }, "second signal during shutdown, exiting now");
      exit(1);
      return;
    }
    stopping = true;
    logger.info({ signal }, "signal received, shutting down");
    void (async () => {
      let code = 0;
      try {
        await server.shutdown(options.graceMs ?? 5000);
        await options.beforeExit?.();
      } catch (err) {
        logger.error({ err }, "shutdown failed");
        code = 1;
      }
      logger.info({ code }, "exiting");
      exit(code);
    })();
  };
  for (const signal of signals) process.on(signal, onSignal);
  return () => {
    for (const signal of signals) process.off(signal, onSignal);
  };
}

/** Signals held by {@link holdSignals} while a service starts. */
export interface HeldSignals {
  /** The first signal that arrived while held, if any. */
  readonly received: NodeJS.Signals | undefined;
  /** Stops holding; a signal that arrived meanwhile is delivered again to the handlers now installed. */
  release(): void;
}

/**
 * Holds SIGTERM/SIGINT while a service starts, until {@link runUntilSignal} is in place. Without
 * it a signal arriving in that window (after the `listening` line a supervisor or a test waits for,
 * before the handler) kills the process at once — exit by signal, no graceful stop — or, when some
 * other listener is installed, is lost and the process never stops. Found by the test that sends
 * SIGTERM right after `listening` on a busy machine.
 *
 * @example
 * const held = holdSignals();
 * // … connect, restore, listen …
 * runUntilSignal(server, options);
 * held.release();
 */
export function holdSignals(signals: readonly NodeJS.Signals[] = ["SIGTERM", "SIGINT"]): HeldSignals {
  let received: NodeJS.Signals | undefined;
  const hold = (signal: NodeJS.Signals): void => {
    received ??= signal;
  };
  for (const signal of signals) process.on(signal, hold);
  return {
    get received() {
      return received;
    },
    release() {
      for (const signal of signals) process.off(signal, hold);
      if (received !== undefined) process.emit(received, received);
    },
  };
}
