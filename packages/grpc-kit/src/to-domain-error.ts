import { Metadata, type ServiceError } from "@grpc/grpc-js";
import { type Code, DomainError, codeName } from "@ioasid/errors";
import { STATUS_DETAILS_KEY, decodeRpcStatus, findErrorInfo } from "./rpc-status.js";

/** Guard: does `err` look like the `ServiceError` grpc-js rejects a call with? */
export function isServiceError(err: unknown): err is ServiceError {
  if (!(err instanceof Error)) return false;
  const candidate = err as Partial<ServiceError>;
  return typeof candidate.code === "number" && candidate.metadata instanceof Metadata;
}

/**
 * Rebuilds the {@link DomainError} a server threw from the status a call failed with (the client
 * half of DESIGN §8, Temporal's `rethrowKnownErrorTypes`): code, message, and the reason and
 * metadata of the google.rpc.ErrorInfo in `grpc-status-details-bin`. A status without details
 * (raised by the transport: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED…) gets its code name as
 * reason. A DomainError is returned as is; anything else goes through {@link DomainError.from}.
 * The original error is kept as `cause`.
 *
 * @example
 * try { await client.alloc(req); } catch (err) { throw toDomainError(err); }
 */
export function toDomainError(err: unknown): DomainError {
  if (err instanceof DomainError) return err;
  if (!isServiceError(err)) return DomainError.from(err);
  const code = err.code as number as Code;
  const message = err.details;
  const raw = err.metadata.get(STATUS_DETAILS_KEY)[0];
  if (raw instanceof Uint8Array) {
    try {
      const info = findErrorInfo(decodeRpcStatus(raw));
      if (info !== undefined) {
        return new DomainError(code, info.reason, message, { cause: err, metadata: { ...info.metadata } });
      }
    } catch {
      // Undecodable details: fall through to the plain status (the code and message still hold).
    }
  }
  return new DomainError(code, codeName(code), message, { cause: err });
}
