import { JetStreamApiError, type PubAck } from "@nats-io/jetstream";
import { createInbox, type Msg, type NatsConnection } from "@nats-io/transport-node";

/**
 * What JetStream answered to a publish made with a reply subject, as nats.js's `js.publish` reads
 * it, with the same error classes and messages (the op log tells a transient failure from the fence
 * by them):
 * - a PubAck: `{ ack }` (`duplicate` false when absent);
 * - a JetStream error (`wrong last sequence: 5`, "JetStream system temporarily unavailable", …):
 *   `{ error }`, a {@link JetStreamApiError};
 * - no responders (no stream takes the subject, or its leader is being elected): `{ error }`, an
 *   Error "jetstream is not enabled (no responders)", as `js.publish` reports it;
 * - anything else: `{ error }`, "invalid ack response".
 */
export function readPubAck(msg: Msg): { ack: PubAck; error?: undefined } | { ack?: undefined; error: Error } {
  if (msg.data.length === 0 && msg.headers?.code === 503) return { error: new Error("jetstream is not enabled (no responders)") };
  try {
    const v = JSON.parse(DECODER.decode(msg.data)) as PubAck & { error?: ConstructorParameters<typeof JetStreamApiError>[0] };
    if (v.error !== undefined) return { error: new JetStreamApiError(v.error) };
    if (typeof v.stream !== "string" || v.stream === "") return { error: new Error("invalid ack response") };
    return { ack: { ...v, duplicate: v.duplicate ?? false } };
  } catch (err) {
    return { error: err instanceof Error ? err : new Error(String(err)) };
  }
}

const DECODER = new TextDecoder();

/**
 * A new inbox under the connection's own prefix: with authorization on, a user may subscribe only
 * under its prefix (security/nats-permissions.ts `inboxPrefix`).
 */
export function connectionInbox(nc: NatsConnection): string {
  return createInbox((nc as { options?: { inboxPrefix?: string } }).options?.inboxPrefix);
}
