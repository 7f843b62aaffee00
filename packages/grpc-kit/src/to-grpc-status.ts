import { Metadata, type StatusObject, type status as GrpcStatus } from "@grpc/grpc-js";
import { Code, DomainError, ERROR_DOMAIN, INTERNAL_REASON, boundMessage, codeName } from "@ioasid/errors";
import type { Logger } from "pino";
import { ERROR_INFO_TYPE_URL, STATUS_DETAILS_KEY, encodeErrorInfo, encodeRpcStatus } from "./rpc-status.js";

/** Where an error was raised, for the log line that records it. */
export interface ToGrpcStatusOptions {
  /** Logger that records unknown causes (never sent to the caller). Without one nothing is logged. */
  readonly logger?: Logger | undefined;
  /** gRPC method path, e.g. `/ioasid.core.v1.CoreService/Alloc`, for the log line. */
  readonly method?: string | undefined;
}

/** Message sent in place of anything that is not a {@link DomainError} (DESIGN §8). */
export const INTERNAL_MESSAGE = "internal error";

/**
 * Turns anything a handler threw into the gRPC status sent to the caller (DESIGN §8): a
 * {@link DomainError} keeps its code and message, and its reason and metadata travel as a
 * google.rpc.ErrorInfo (domain `ioasid.dev`) inside `grpc-status-details-bin`; anything else
 * becomes INTERNAL / "internal error" with reason INTERNAL, and the real cause is logged, never sent.
 *
 * @example
 * callback(toGrpcStatus(err, { logger, method: call.getPath() }));
 */
export function toGrpcStatus(err: unknown, options: ToGrpcStatusOptions = {}): StatusObject {
  const { logger, method } = options;
  let domainError: DomainError;
  if (err instanceof DomainError && isErrorCode(err.code)) {
    domainError = err;
    if (err.code === Code.INTERNAL) {
      // An INTERNAL DomainError was chosen by the handler, but it still means "a bug or an outage":
      // keep the cause in the log.
      logger?.error({ err, cause: err.cause, method, reason: err.reason }, "internal error");
    } else {
      logger?.debug({ method, code: codeName(err.code), reason: err.reason }, err.message);
    }
  } else {
    // Unknown failures never leak their message or stack (they may name files, hosts or state).
    logger?.error({ err, method }, "internal error");
    domainError = new DomainError(Code.INTERNAL, INTERNAL_REASON, INTERNAL_MESSAGE, { cause: err });
  }
  // One cap on whatever a handler built (DESIGN §8): a message that echoed a client's 50 KB string
  // stalled the caller's HTTP/2 connection (issue 14); metadata values are capped the same way.
  const message = boundMessage(domainError.message);
  const facts = boundMetadata(domainError.metadata);
  const metadata = new Metadata();
  const details = encodeRpcStatus({
    code: domainError.code,
    message,
    details: [
      {
        typeUrl: ERROR_INFO_TYPE_URL,
        value: encodeErrorInfo({ reason: domainError.reason, domain: ERROR_DOMAIN, metadata: facts }),
      },
    ],
  });
  metadata.set(STATUS_DETAILS_KEY, Buffer.from(details));
  return { code: domainError.code as number as GrpcStatus, details: message, metadata };
}

/** Is `code` an error status (1..16)? OK or an unknown number in a DomainError is a bug: INTERNAL. */
function isErrorCode(code: number): boolean {
  return Number.isInteger(code) && code >= Code.CANCELLED && code <= Code.UNAUTHENTICATED;
}

/** Longest ErrorInfo metadata value sent, in characters. */
const MAX_METADATA_VALUE_CHARS = 256;

function boundMetadata(metadata: Readonly<Record<string, string>>): Readonly<Record<string, string>> {
  for (const value of Object.values(metadata)) {
    if (value.length > MAX_METADATA_VALUE_CHARS) {
      return Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, boundMessage(v, MAX_METADATA_VALUE_CHARS)]));
    }
  }
  return metadata;
}
