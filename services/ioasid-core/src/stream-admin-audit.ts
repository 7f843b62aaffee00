import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import type { Logger } from "pino";

/** nats-server's JetStream API audit advisory: one message per JetStream API call it served. */
export const API_AUDIT_SUBJECT = "$JS.EVENT.ADVISORY.API";

/**
 * The JetStream API calls that change or remove what a stream keeps, by the subject's prefix: the
 * calls only an operator credential may make (packages/security STREAM_ADMIN_SUBJECTS), each of which
 * the core records as a `stream_admin` audit record (DESIGN §11: "streams deny delete and purge";
 * issue 14: "an operator credential can still manage them, audited").
 */
const AUDITED_CALLS = ["STREAM.DELETE", "STREAM.PURGE", "STREAM.UPDATE", "STREAM.MSG.DELETE", "STREAM.RESTORE", "STREAM.SNAPSHOT"] as const;

/** What one advisory says, when it is about an audited call; undefined for any other call. */
export interface StreamAdminCall {
  readonly api: (typeof AUDITED_CALLS)[number];
  readonly stream: string;
  /** The NATS user, when nats-server names it ("" otherwise: 2.9 does not). */
  readonly user: string;
  readonly ok: boolean;
  readonly error: string;
}

/** Reads an API audit advisory (JSON); undefined for a call that is not audited, or bytes that are not one. */
export function parseApiAudit(text: string): StreamAdminCall | undefined {
  let advisory: { subject?: unknown; response?: unknown; client?: { user?: unknown; nkey?: unknown } };
  try {
    advisory = JSON.parse(text) as typeof advisory;
  } catch {
    return undefined;
  }
  if (typeof advisory.subject !== "string" || !advisory.subject.startsWith("$JS.API.")) return undefined;
  const call = advisory.subject.slice("$JS.API.".length);
  // The longest name first: STREAM.MSG.DELETE before a shorter one could match.
  const api = [...AUDITED_CALLS].sort((a, b) => b.length - a.length).find((a) => call.startsWith(`${a}.`));
  if (api === undefined) return undefined;
  const stream = call.slice(api.length + 1);
  let error = "";
  if (typeof advisory.response === "string") {
    try {
      const r = JSON.parse(advisory.response) as { error?: { description?: unknown; code?: unknown } };
      if (r.error !== undefined) error = typeof r.error.description === "string" ? r.error.description : `error ${String(r.error.code)}`;
    } catch {
      error = "unreadable response";
    }
  }
  const u = advisory.client?.user ?? advisory.client?.nkey;
  return { api, stream, user: typeof u === "string" ? u : "", ok: error === "", error };
}

/**
 * Records every audited stream administration call nats-server reports, as a `stream_admin` history
 * record of the core and a warn log line. Advisories are plain NATS messages: a call made while the
 * core is not connected is not recorded (the README says so).
 */
export function auditStreamAdmin(nc: NatsConnection, record: (action: HistoryActionInput, fields: HistoryFields) => void, logger: Logger): Subscription {
  const sub = nc.subscribe(API_AUDIT_SUBJECT, {
    callback: (err, msg) => {
      if (err !== null) {
        logger.warn({ err: String(err) }, "stream administration audit: subscription ended");
        return;
      }
      const call = parseApiAudit(msg.string());
      if (call === undefined) return;
      logger.warn({ audit: "streamAdmin", ...call }, "audit: JetStream stream administration");
      record({ $case: "streamAdmin", value: call }, {});
    },
  });
  return sub;
}
