import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import { EventType, Priority, type SpaceCensus } from "@ioasid/ioasid";
import type { DeliveryEngine, DeliveryOutcome, DeliveryTarget, MissedDelivery, SettledAck } from "@ioasid/bus";
import type { IoasidCore } from "./ioasid-core.js";

/** Histogram buckets of a delivery's and a reclaim's duration, seconds: a local ack takes about a millisecond, a miss the deadline (2 s by default). */
export const DELIVERY_SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30] as const;
/** Histogram buckets of one operation-log write (a JetStream publish and its ack), seconds. */
export const WRITE_SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5] as const;

const TIER_NAMES = new Map<number, string>(Object.entries(Priority).map(([name, priority]) => [priority, name]));

/** A notifier priority's tier name (`CPU`, `DEVICE`, `IOMMU`, `LAST`; another number as itself): the `tier` label. */
export function tierName(priority: number): string {
  return TIER_NAMES.get(priority) ?? String(priority);
}

/**
 * A miss's reason as a closed set (the `reason` label): the engine's reasons carry a handler's
 * error text, which would make a series per message.
 */
export function missReason(reason: string): "not_live" | "no_ack" | "deadline_exceeded" | "no_responders" | "handler_failed" | "other" {
  if (reason === "not live") return "not_live";
  if (reason === "no ack") return "no_ack";
  if (reason === "deadline exceeded") return "deadline_exceeded";
  if (reason === "no responders") return "no_responders";
  if (reason.startsWith("handler failed")) return "handler_failed";
  return "other";
}

/** The core's metrics (DESIGN §13), fed by the delivery engine's and the operation log's hooks. */
export interface CoreMetrics {
  /** The delivery engine's `onDelivered`. */
  delivered(target: DeliveryTarget, outcome: DeliveryOutcome, seconds: number): void;
  /** With the engine's `onAcks`: counts acknowledgements of redelivered (missed) events. */
  acked(acks: readonly SettledAck[]): void;
  /** With the engine's `onMissed`. */
  missed(missed: readonly MissedDelivery[]): void;
  /** The operation log's `onWrite`: one message written and acknowledged. */
  opLogWritten(seconds: number): void;
  /**
   * Reads the model and the engine at every scrape (IOASIDs, references, backlogs), and follows
   * the committed events from now on (reclaim latency): call once the core has recovered, so that
   * a replay counts nothing. @returns stops following
   */
  follow(core: IoasidCore, engine: DeliveryEngine | undefined): () => void;
}

/**
 * Registers the core's metrics in `registry`:
 * - `ioasid_ioasids{set,state}`, `ioasid_references{role}`, `ioasid_sets`, `ioasid_registrations`,
 *   `ioasid_event_seq`: read from the model at scrape time ({@link IoasidSpace.census});
 * - `ioasid_events_total{type}` and `ioasid_reclaim_seconds` (from the FREE of an IOASID to its
 *   RECLAIM; one freed with no other reference is reclaimed at once and not observed);
 * - `ioasid_deliveries_total{tier,outcome}` and `ioasid_delivery_seconds{tier,outcome}` (from the
 *   delivery's turn in its chain to its ack or miss), `ioasid_delivery_misses_total{subscriber,reason}`,
 *   `ioasid_delivery_late_acks_total{subscriber}`, `ioasid_delivery_backlog{subscriber,subscriber_instance}`,
 *   `ioasid_delivery_subscriber_live{subscriber,subscriber_instance}` (not `instance`: Prometheus
 *   gives that label the scraped target), `ioasid_delivery_chains_running`;
 * - `ioasid_oplog_write_seconds`.
 */
export function createCoreMetrics(registry: Registry): CoreMetrics {
  const registers = [registry];
  const state: { core?: IoasidCore; engine?: DeliveryEngine } = {};
  // One count of the model serves both gauges of a scrape (it is a pass over every IOASID): a
  // scrape collects every metric within one turn of the event loop, and the count lasts that turn.
  let counted: SpaceCensus | undefined;
  const census = (): SpaceCensus | undefined => {
    if (state.core === undefined) return undefined;
    if (counted === undefined) {
      counted = state.core.space.census();
      setImmediate(() => (counted = undefined));
    }
    return counted;
  };
  new Gauge({
    name: "ioasid_ioasids",
    help: "IOASIDs not yet reclaimed, by set and state (ACTIVE, FREE_PENDING).",
    labelNames: ["set", "state"] as const,
    registers,
    collect() {
      this.reset();
      for (const s of census()?.sets ?? []) {
        this.set({ set: String(s.setId), state: "ACTIVE" }, s.active);
        this.set({ set: String(s.setId), state: "FREE_PENDING" }, s.freePending);
      }
    },
  });
  new Gauge({
    name: "ioasid_references",
    help: "IOASID references held, by holder role (set-owner: the allocation references).",
    labelNames: ["role"] as const,
    registers,
    collect() {
      this.reset();
      for (const [role, n] of census()?.referencesByRole ?? []) this.set({ role }, n);
    },
  });
  const stat = (name: string, help: string, read: (core: IoasidCore) => number) =>
    new Gauge({
      name,
      help,
      registers,
      collect() {
        if (state.core !== undefined) this.set(read(state.core));
      },
    });
  stat("ioasid_sets", "IOASID sets.", (c) => c.space.stats().sets);
  stat("ioasid_registrations", "Notifier registrations.", (c) => c.space.stats().registrations);
  stat("ioasid_event_seq", "Sequence number of the last committed event.", (c) => c.space.stats().lastSeq);
  const events = new Counter({
    name: "ioasid_events_total",
    help: "Events committed since this core started, by type.",
    labelNames: ["type"] as const,
    registers,
  });
  const reclaim = new Histogram({
    name: "ioasid_reclaim_seconds",
    help: "Time from an IOASID's FREE to its RECLAIM (its last reference released).",
    buckets: [...DELIVERY_SECONDS_BUCKETS],
    registers,
  });
  const deliveries = new Counter({
    name: "ioasid_deliveries_total",
    help: "Deliveries of committed events to subscribers, by tier and outcome (acked, missed).",
    labelNames: ["tier", "outcome"] as const,
    registers,
  });
  const deliverySeconds = new Histogram({
    name: "ioasid_delivery_seconds",
    help: "Time from a delivery's turn in its event's chain to its acknowledgement or miss, by tier and outcome.",
    labelNames: ["tier", "outcome"] as const,
    buckets: [...DELIVERY_SECONDS_BUCKETS],
    registers,
  });
  const misses = new Counter({
    name: "ioasid_delivery_misses_total",
    help: "Deliveries recorded as missed (deadline, no responder, handler failure, or the subscriber not live), by subscriber and reason.",
    labelNames: ["subscriber", "reason"] as const,
    registers,
  });
  const lateAcks = new Counter({
    name: "ioasid_delivery_late_acks_total",
    help: "Acknowledgements of missed deliveries, redelivered from a subscriber's backlog, by subscriber.",
    labelNames: ["subscriber"] as const,
    registers,
  });
  new Gauge({
    name: "ioasid_delivery_backlog",
    help: "Deliveries waiting in a subscriber's backlog (it missed them), by subscriber and instance.",
    labelNames: ["subscriber", "subscriber_instance"] as const,
    registers,
    collect() {
      this.reset();
      for (const s of state.engine?.status() ?? []) this.set({ subscriber: s.subscriber.name, subscriber_instance: s.subscriber.instance }, s.backlog);
    },
  });
  new Gauge({
    name: "ioasid_delivery_subscriber_live",
    help: "1 while a subscriber is live (receives new deliveries), 0 while it is passed over until it catches up.",
    labelNames: ["subscriber", "subscriber_instance"] as const,
    registers,
    collect() {
      this.reset();
      for (const s of state.engine?.status() ?? []) this.set({ subscriber: s.subscriber.name, subscriber_instance: s.subscriber.instance }, s.live ? 1 : 0);
    },
  });
  new Gauge({
    name: "ioasid_delivery_chains_running",
    help: "Events whose delivery chain has not finished.",
    registers,
    collect() {
      this.set(state.engine?.runningChains ?? 0);
    },
  });
  const opLogWrite = new Histogram({
    name: "ioasid_oplog_write_seconds",
    help: "Time one operation-log message (one or more operations) took to be written and acknowledged by JetStream.",
    buckets: [...WRITE_SECONDS_BUCKETS],
    registers,
  });

  return {
    delivered(target, outcome, seconds) {
      const labels = { tier: tierName(target.priority), outcome };
      deliveries.inc(labels);
      deliverySeconds.observe(labels, seconds);
    },
    acked(acks) {
      for (const a of acks) if (a.late) lateAcks.inc({ subscriber: a.subscriber.name });
    },
    missed(missed) {
      for (const m of missed) misses.inc({ subscriber: m.subscriber.name, reason: missReason(m.reason) });
    },
    opLogWritten(seconds) {
      opLogWrite.observe(seconds);
    },
    follow(core, engine) {
      state.core = core;
      state.engine = engine;
      // IOASIDs freed with references outstanding, by ioasid:generation: cleared by their RECLAIM.
      const freedAt = new Map<string, number>();
      return core.log.follow((e) => {
        events.inc({ type: e.type });
        if (e.type === EventType.FREE) freedAt.set(`${e.ioasid}:${e.generation}`, performance.now());
        else if (e.type === EventType.RECLAIM) {
          const key = `${e.ioasid}:${e.generation}`;
          const at = freedAt.get(key);
          if (at !== undefined) {
            freedAt.delete(key);
            reclaim.observe((performance.now() - at) / 1000);
          }
        }
      });
    },
  };
}
