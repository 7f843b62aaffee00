import { Code, DomainError, quote } from "@ioasid/errors";
import type { AnyMethodDefinition, AnyServiceDefinition } from "./adapt-service.js";

/**
 * What a guarded request deserializer hands grpc-js in place of a request whose bytes do not
 * decode: the handler wrapper ({@link assertDecoded}) turns it into INVALID_ARGUMENT before any
 * handler sees it.
 */
export class UndecodableRequest {
  /** Full method path, e.g. `/ioasid.core.v1.CoreService/Alloc`. */
  readonly method: string;
  /** What the generated decoder threw (kept for the log, quoted in the message). */
  readonly cause: unknown;

  constructor(method: string, cause: unknown) {
    this.method = method;
    this.cause = cause;
  }
}

/**
 * A copy of a generated service definition whose request deserializers never throw: bytes that do
 * not decode become an {@link UndecodableRequest}. grpc-js answers a throwing deserializer with
 * INTERNAL on every method, which DESIGN §8 forbids ("bytes that do not decode are
 * INVALID_ARGUMENT, not INTERNAL"); with this, the adapted handler answers INVALID_ARGUMENT
 * `REQUEST_UNDECODABLE` instead. A request that decodes costs one try block, nothing more.
 */
export function guardDecoding<D extends AnyServiceDefinition>(definition: D): D {
  const guarded: Record<string, AnyMethodDefinition> = {};
  for (const [name, method] of Object.entries(definition)) {
    const decode = method.requestDeserialize;
    const path = method.path;
    guarded[name] = {
      ...method,
      requestDeserialize: (bytes: Buffer): unknown => {
        try {
          return decode(bytes);
        } catch (err) {
          return new UndecodableRequest(path, err);
        }
      },
    };
  }
  return guarded as D;
}

/**
 * The request itself, or INVALID_ARGUMENT `REQUEST_UNDECODABLE` thrown when a guarded deserializer
 * could not decode it (see {@link guardDecoding}).
 * @throws DomainError INVALID_ARGUMENT `REQUEST_UNDECODABLE`
 */
export function assertDecoded<T>(request: T): T {
  if (request instanceof UndecodableRequest) {
    const what = request.cause instanceof Error ? request.cause.message : String(request.cause);
    throw new DomainError(Code.INVALID_ARGUMENT, "REQUEST_UNDECODABLE", `the request to ${request.method} does not decode: ${quote(what)}`, {
      cause: request.cause,
    });
  }
  return request;
}
