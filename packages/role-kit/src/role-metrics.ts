import { Counter, Histogram, type Registry } from "prom-client";
import { eventTypeName, type EventHandler, type RoleStatePort, type Subscriber } from "@ioasid/bus";

/** Histogram buckets of a role's delivery handling and state writes, seconds. */
export const ROLE_SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30] as const;

/** A role's metrics: they wrap its delivery handler and its state store (see {@link createRoleMetrics}). */
export interface RoleMetrics {
  /** The handler, counting and timing each delivery it handles by event type and outcome (settled, failed). */
  handler(handler: EventHandler): EventHandler;
  /** The store, timing each write from its call to its being kept (retries included). */
  store<T>(store: RoleStatePort<T>): RoleStatePort<T>;
  /** A write retry (the store's `onRetry`). */
  writeRetried(): void;
  /** Counts the duplicates `subscriber` answered from its memory, at every scrape. */
  follow(subscriber: Subscriber): void;
}

/**
 * Registers a role's metrics in `registry`:
 * - `ioasid_role_deliveries_handled_total{type,outcome}` and `ioasid_role_delivery_handling_seconds{type,outcome}`:
 *   deliveries its handler settled (acknowledged: the context for the IOASID is cleared, DESIGN §4.3) or failed (the core records a miss);
 * - `ioasid_role_delivery_duplicates_total`: redeliveries answered from the subscriber's memory without the handler;
 * - `ioasid_role_state_write_seconds` and `ioasid_role_state_write_retries_total`: writes of its kept state to JetStream.
 */
export function createRoleMetrics(registry: Registry): RoleMetrics {
  const registers = [registry];
  const handled = new Counter({
    name: "ioasid_role_deliveries_handled_total",
    help: "Deliveries this role's handler handled, by event type and outcome (settled: acknowledged; failed: the core records a miss).",
    labelNames: ["type", "outcome"] as const,
    registers,
  });
  const handling = new Histogram({
    name: "ioasid_role_delivery_handling_seconds",
    help: "Time this role's handler took for one delivery, by event type and outcome.",
    labelNames: ["type", "outcome"] as const,
    buckets: [...ROLE_SECONDS_BUCKETS],
    registers,
  });
  const subscribers: Subscriber[] = [];
  new Counter({
    name: "ioasid_role_delivery_duplicates_total",
    help: "Redelivered events answered from the subscriber's memory of its acknowledgements, without calling the handler.",
    registers,
    collect() {
      this.reset();
      this.inc(subscribers.reduce((n, s) => n + s.duplicates, 0));
    },
  });
  const writes = new Histogram({
    name: "ioasid_role_state_write_seconds",
    help: "Time one write of this role's kept state took to be stored by JetStream, retries included.",
    labelNames: ["outcome"] as const,
    buckets: [...ROLE_SECONDS_BUCKETS],
    registers,
  });
  const retries = new Counter({ name: "ioasid_role_state_write_retries_total", help: "Retries of state writes JetStream did not acknowledge.", registers });

  const ended = (type: string, outcome: "settled" | "failed", started: number) => {
    const labels = { type, outcome };
    handled.inc(labels);
    handling.observe(labels, (performance.now() - started) / 1000);
  };
  return {
    handler: (handler) => (event, ctx) => {
      const started = performance.now();
      const type = eventTypeName(event.type);
      let result: ReturnType<EventHandler>;
      try {
        result = handler(event, ctx);
      } catch (err) {
        ended(type, "failed", started);
        throw err;
      }
      // A synchronous handler stays synchronous: the subscriber answers its batch without a turn.
      if (!(result instanceof Promise)) {
        ended(type, "settled", started);
        return result;
      }
      return result.then(
        (r) => {
          ended(type, "settled", started);
          return r;
        },
        (err: unknown) => {
          ended(type, "failed", started);
          throw err;
        },
      );
    },
    store: (store) => ({
      write: async (changes) => {
        const started = performance.now();
        try {
          await store.write(changes);
          writes.observe({ outcome: "ok" }, (performance.now() - started) / 1000);
        } catch (err) {
          writes.observe({ outcome: "error" }, (performance.now() - started) / 1000);
          throw err;
        }
      },
    }),
    writeRetried: () => retries.inc(),
    follow: (subscriber) => void subscribers.push(subscriber),
  };
}
