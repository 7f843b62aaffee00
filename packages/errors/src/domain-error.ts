/**
 * Status codes of the one error model (DESIGN §8). The numbers are gRPC's, so the transport maps
 * them one to one; the domain never imports the transport to name them.
 */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;
export type Code = (typeof Code)[keyof typeof Code];

const codeNames = new Map<number, string>(Object.entries(Code).map(([k, v]) => [v, k]));

/** Name of a status code ("NOT_FOUND"), or `CODE_<n>` for a number outside the set. */
export function codeName(code: number): string {
  return codeNames.get(code) ?? `CODE_${code}`;
}

/** Reason given to errors whose cause is not a {@link DomainError}: never shown to callers in detail. */
export const INTERNAL_REASON = "INTERNAL";

/** The ErrorInfo domain every reason is qualified by on the wire. */
export const ERROR_DOMAIN = "ioasid.dev";

/**
 * The one error of the project: a gRPC status code, a stable machine-readable `reason` (carried as
 * google.rpc.ErrorInfo on the wire, see proto/ioasid/errors/v1/errors.proto) and a message a person
 * can act on. Modelled on connect-es `ConnectError`.
 *
 * @example
 * throw new DomainError(Code.NOT_FOUND, "IOASID_FREE_PENDING", "IOASID 201 is being freed");
 */
export class DomainError extends Error {
  override readonly name = "DomainError";
  /** gRPC status code. */
  readonly code: Code;
  /** Stable machine-readable reason, one of the `ErrorReason` names in errors.proto. */
  readonly reason: string;
  /** Extra key/value facts (ErrorInfo.metadata): never secrets, never stack traces. */
  readonly metadata: Readonly<Record<string, string>>;

  constructor(code: Code, reason: string, message: string, options?: { cause?: unknown; metadata?: Record<string, string> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.reason = reason;
    this.metadata = Object.freeze({ ...(options?.metadata ?? {}) });
  }

  /**
   * Normalises anything caught at a boundary: a DomainError is returned as is; anything else
   * becomes INTERNAL with the original kept as `cause` (for the log, never for the wire).
   */
  static from(err: unknown): DomainError {
    if (err instanceof DomainError) return err;
    return new DomainError(Code.INTERNAL, INTERNAL_REASON, "internal error", { cause: err });
  }
}

/** Guard: is `err` a {@link DomainError} (optionally with this reason)? */
export function isDomainError(err: unknown, reason?: string): err is DomainError {
  return err instanceof DomainError && (reason === undefined || err.reason === reason);
}

/**
 * The error builder of a reason table (reason name → the status code it always comes with): each
 * service declares its reasons once and builds its refusals through this.
 *
 * @example
 * export const KvmReason = { VM_NOT_FOUND: Code.NOT_FOUND } as const satisfies Record<string, Code>;
 * export const kvmError = reasonError(KvmReason);
 * throw kvmError("VM_NOT_FOUND", "no VM 7");
 */
export function reasonError<const T extends Record<string, Code>>(
  table: T,
): (reason: keyof T & string, message: string, metadata?: Record<string, string>) => DomainError {
  return (reason, message, metadata) => new DomainError(table[reason]!, reason, message, metadata === undefined ? undefined : { metadata });
}

/**
 * INVALID_ARGUMENT `INVALID_FIELD` for a missing or malformed request field; the ErrorInfo metadata
 * `field` names it (the proto field name, dotted for nested ones).
 */
export function invalidField(field: string, message: string): DomainError {
  return new DomainError(Code.INVALID_ARGUMENT, "INVALID_FIELD", message, { metadata: { field } });
}
