import type { NatsConnection, Subscription } from "@nats-io/transport-node";

// The serving core's lease (issue 18 item 2, DESIGN §13 "a standby core"). The core that serves
// answers pings on `<prefix>.core.lease`; a standby core (IOASID_CORE_STANDBY=1) pings it and
// waits while it answers. Once no answer came for a whole lease — the primary died (its
// subscription went with its connection: no responders at once) or stopped answering (SIGSTOP,
// a partition) — the standby takes over as a restarted core does: it replays the operation log and
// seals it. The seal is what keeps two cores from both committing, not the lease: a primary that
// comes back after its lease expired finds its next op-log write refused (the expected sequence
// the seal took) and stops. The lease only decides when a standby tries; measured with the
// standby's own monotonic clock, so no two hosts' clocks are compared.

/** The subject of the lease. */
export function leaseSubject(prefix: string): string {
  return `${prefix}.core.lease`;
}

/** Who holds the lease, as its answer says. */
export interface LeaseHolder {
  readonly pid: number;
  readonly address: string;
}

/** Answers the lease's pings while this core serves (until the subscription is closed). */
export function serveLease(nc: NatsConnection, prefix: string, holder: LeaseHolder): Subscription {
  const answer = JSON.stringify(holder);
  return nc.subscribe(leaseSubject(prefix), {
    callback: (_err, msg) => {
      msg.respond(answer);
    },
  });
}

/** Options of {@link awaitLeaseExpiry}. */
export interface AwaitLeaseOptions {
  /** How long without an answer means the holder is gone, ms. */
  readonly leaseMs: number;
  /** How often to ping (and how long one ping waits), ms. @default leaseMs / 4 */
  readonly pingMs?: number;
  /** Checked between pings: true stops the wait (a signal to stop). */
  readonly stopped: () => boolean;
  /** Called when a holder answers for the first time (and after a change of holder). */
  readonly onHolder?: (holder: LeaseHolder) => void;
}

/**
 * Waits until no core has answered the lease for `leaseMs` (from the start, or from the last answer).
 * @returns "expired" to take over, "stopped" when `stopped()` said so
 */
export async function awaitLeaseExpiry(nc: NatsConnection, prefix: string, options: AwaitLeaseOptions): Promise<"expired" | "stopped"> {
  const pingMs = options.pingMs ?? Math.max(10, Math.floor(options.leaseMs / 4));
  // A whole lease of silence, from the start too: in a NATS cluster the holder's subscription may
  // not have reached the standby's server yet (no responders for a moment), and taking over then
  // would fence a live primary.
  let lastAnswer = performance.now();
  let holder: string | undefined;
  // The standby's own connection moving to another server (a NATS cluster losing one) is no sign of
  // the holder's death: no silence counts while it is away, and a fresh lease starts when it is back.
  let away = false;
  const watching = (async () => {
    for await (const s of nc.status()) {
      if (s.type === "disconnect") away = true;
      else if (s.type === "reconnect") {
        away = false;
        lastAnswer = Math.max(lastAnswer, performance.now());
      }
    }
  })().catch(() => undefined);
  void watching;
  for (;;) {
    if (options.stopped()) return "stopped";
    const started = performance.now();
    try {
      const m = await nc.request(leaseSubject(prefix), undefined, { timeout: pingMs });
      lastAnswer = performance.now();
      const text = m.string();
      if (text !== holder) {
        holder = text;
        options.onHolder?.(JSON.parse(text) as LeaseHolder);
      }
    } catch {
      // No responders (nobody holds it) or no answer in time (the holder stopped, or is slow).
    }
    if (away) lastAnswer = Math.max(lastAnswer, performance.now() - options.leaseMs / 2);
    else if (performance.now() - lastAnswer >= options.leaseMs) return "expired";
    const left = pingMs - (performance.now() - started);
    if (left > 0) await new Promise((r) => setTimeout(r, left));
  }
}
