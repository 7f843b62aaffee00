/** Default prefix of every subject the bus uses. */
export const DEFAULT_PREFIX = "ioasid.v1";

/**
 * Encodes a name into one subject token: characters outside [A-Za-z0-9_-] become `~` and two hex
 * digits, so names with dots (or anything else) cannot add or split tokens.
 */
export function encodeToken(name: string): string {
  return name.replace(/[^A-Za-z0-9_-]/g, (c) => {
    const code = c.codePointAt(0)!;
    return code < 256 ? `~${code.toString(16).padStart(2, "0")}` : `~u${code.toString(16)}~`;
  });
}

/** The subject a subscriber receives its deliveries on: `<prefix>.deliver.<name>.<instance>`. */
export function deliverySubject(prefix: string, name: string, instance: string): string {
  return `${prefix}.deliver.${encodeToken(name)}.${encodeToken(instance)}`;
}

/** The queue group of a subscriber's replicas: `<name>.<instance>` (encoded). */
export function queueGroup(name: string, instance: string): string {
  return `${encodeToken(name)}.${encodeToken(instance)}`;
}

/** The subject subscribers announce themselves on: `<prefix>.core.hello`. */
export function helloSubject(prefix: string): string {
  return `${prefix}.core.hello`;
}

/** Header names on delivery messages. */
export const Headers = {
  /** Sequence number of the first event in the batch. */
  FIRST_SEQ: "Ioasid-First-Seq",
  /** Sequence number of the last event in the batch. */
  LAST_SEQ: "Ioasid-Last-Seq",
  /** Number of deliveries in the batch. */
  COUNT: "Ioasid-Count",
  /**
   * W3C trace context of the batch's first delivery (on an AckBatch reply: of its first ack); an
   * unsampled one of its own when the core does not trace.
   */
  TRACEPARENT: "traceparent",
  /**
   * A batch of several: the W3C trace context of each delivery (each ack on the reply), by position,
   * comma-separated, `-` for none — deliveries of one batch come from different operations.
   */
  TRACEPARENTS: "Ioasid-Traceparents",
} as const;
