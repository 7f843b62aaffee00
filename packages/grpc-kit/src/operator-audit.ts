import { Metadata } from "@grpc/grpc-js";

/**
 * Request metadata an operator's client sends with an audited core call (a force-release Put,
 * RegisterAllocator, UnregisterAllocator): the reason, which the core writes into the audit record
 * beside the identity it authenticated. Percent-encoded UTF-8 (metadata values are ASCII).
 */
export const AUDIT_REASON_METADATA = "ioasid-audit-reason";

/**
 * Request metadata naming whom the operator's client acts for (a person, a ticket, a tool): a label the
 * audit record keeps as given — the record's authenticated identity is the client certificate's.
 */
export const AUDIT_ON_BEHALF_OF_METADATA = "ioasid-audit-on-behalf-of";

/** At most this many characters of each audit field are kept (a client string, bounded). */
export const MAX_AUDIT_FIELD_CHARS = 256;

/** What an operator says about an audited call. */
export interface AuditNote {
  readonly reason?: string;
  readonly onBehalfOf?: string;
}

/** The call metadata that carries `note` to the core. */
export function auditMetadata(note: AuditNote): Metadata {
  const m = new Metadata();
  if (note.reason !== undefined && note.reason !== "") m.set(AUDIT_REASON_METADATA, encodeURIComponent(note.reason));
  if (note.onBehalfOf !== undefined && note.onBehalfOf !== "") m.set(AUDIT_ON_BEHALF_OF_METADATA, encodeURIComponent(note.onBehalfOf));
  return m;
}

/** The note a call's metadata carries: each field decoded, control characters removed, bounded. */
export function readAuditNote(metadata: Metadata): { readonly reason: string; readonly onBehalfOf: string } {
  return { reason: field(metadata, AUDIT_REASON_METADATA), onBehalfOf: field(metadata, AUDIT_ON_BEHALF_OF_METADATA) };
}

function field(metadata: Metadata, key: string): string {
  const raw = metadata.get(key)[0];
  if (typeof raw !== "string") return "";
  let text: string;
  try {
    text = decodeURIComponent(raw);
  } catch {
    text = raw; // not percent-encoded: kept as sent
  }
  // eslint-disable-next-line no-control-regex
  text = text.replace(/[\u0000-\u001f\u007f]/g, " ");
  return text.length <= MAX_AUDIT_FIELD_CHARS ? text : `${text.slice(0, MAX_AUDIT_FIELD_CHARS)}…`;
}
