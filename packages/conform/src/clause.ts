import type { Code } from "@ioasid/errors";
import { codeName, DomainError } from "@ioasid/errors";
import { isDeepStrictEqual } from "node:util";

/** The roles the kit verifies: the four notifier roles and VFIO, and the core itself. */
export const CONFORM_ROLES = ["kvm", "vdcm", "iommu", "vfio", "core"] as const;
export type ConformRole = (typeof CONFORM_ROLES)[number];

/** What a clause needs from the run beyond the target's address; without it, the clause is skipped and says why. */
export type Capability = "restart";

/**
 * One clause of a role's contract: a case with a stable id (`kvm.free.settled-at-ack`), a one-line
 * statement, and where the rule comes from. `run` passes by returning, fails by throwing
 * {@link ClauseFailure} (expected vs. got) and is skipped by throwing {@link ClauseSkipped}; any
 * other error fails the clause with its message.
 */
export interface Clause<Ctx> {
  readonly id: string;
  readonly statement: string;
  /** DESIGN § or proto comment the clause checks. */
  readonly source: string;
  readonly needs?: readonly Capability[];
  run(ctx: Ctx): Promise<void>;
}

/** A clause that did not hold: what the contract expects and what the target did. */
export class ClauseFailure extends Error {
  override readonly name = "ClauseFailure";
  constructor(
    readonly expected: string,
    readonly got: string,
    readonly what?: string,
  ) {
    super(`${what === undefined ? "" : `${what}: `}expected ${expected}, got ${got}`);
  }
}

/** A clause that cannot run in this run (no `--target-cmd` to restart the target…). */
export class ClauseSkipped extends Error {
  override readonly name = "ClauseSkipped";
}

/** A compact, stable rendering of a value for expected/got lines (bigints as `123n`, Buffers as hex). */
export function show(value: unknown): string {
  if (value instanceof DomainError) return `${codeName(value.code)} ${value.reason}`;
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  const text = JSON.stringify(value, (_k, v: unknown) => {
    if (typeof v === "bigint") return `${v}n`;
    if (v instanceof Uint8Array) return `0x${Buffer.from(v).toString("hex")}`;
    if (v instanceof Date) return v.toISOString();
    return v;
  });
  if (text === undefined) return String(value);
  return text.length > 300 ? `${text.slice(0, 297)}...` : text;
}

/** Fails unless `got` deep-equals `expected`. */
export function expectEqual<T>(got: T, expected: T, what?: string): void {
  if (!isDeepStrictEqual(got, expected)) throw new ClauseFailure(show(expected), show(got), what);
}

/** Fails unless `condition`; `expected` says what should have held, `got` what did. */
export function expectThat(condition: boolean, expected: string, got: unknown, what?: string): void {
  if (!condition) throw new ClauseFailure(expected, typeof got === "string" ? got : show(got), what);
}

/** Awaits a call that the contract says must be refused with `code` and `reason`; returns the error. */
export async function expectRefused(call: Promise<unknown>, code: Code, reason: string, what?: string): Promise<DomainError> {
  const expected = `${codeName(code)} ${reason}`;
  let result: unknown;
  try {
    result = await call;
  } catch (err) {
    if (err instanceof DomainError && err.code === code && err.reason === reason) return err;
    throw new ClauseFailure(expected, show(err), what);
  }
  throw new ClauseFailure(expected, `success ${show(result)}`, what);
}

/**
 * A refused call changes nothing: `query` (the role's own query RPC) answers the same before and
 * after the call that must be refused with `code`/`reason` (DESIGN §8).
 */
export async function expectRefusedUnchanged<S>(
  query: () => Promise<S>,
  call: () => Promise<unknown>,
  code: Code,
  reason: string,
  what?: string,
): Promise<DomainError> {
  const before = await query();
  const refusal = await expectRefused(call(), code, reason, what);
  const after = await query();
  if (!isDeepStrictEqual(after, before)) throw new ClauseFailure(`the state unchanged by the refused call: ${show(before)}`, show(after), what);
  return refusal;
}

/** The refusal's ErrorInfo metadata `key` is `value` (e.g. the lookup behind PASID_UNTRANSLATABLE). */
export function expectMetadata(refusal: DomainError, key: string, value: string, what?: string): void {
  if (refusal.metadata[key] !== value) throw new ClauseFailure(`ErrorInfo metadata ${key}=${value}`, `${key}=${String(refusal.metadata[key])}`, what);
}

let patienceMs = 15_000;

/**
 * How long {@link eventually} waits by default for what must happen (a bound that ends a wait, not
 * a figure any clause asserts). The mutation test shortens it: a broken variant's waits all time out.
 */
export function setPatience(ms: number): void {
  patienceMs = ms;
}

/** The current patience (see {@link setPatience}). */
export function patience(): number {
  return patienceMs;
}

/**
 * Polls `probe` until it returns a value `accept` takes, every 25 ms, for at most `timeoutMs`
 * (a bound, never a figure the clause asserts: it only ends a wait for what must happen); fails
 * with the last value seen.
 */
export async function eventually<T>(
  probe: () => Promise<T>,
  accept: (value: T) => boolean,
  expected: string,
  timeoutMs = patienceMs,
  what?: string,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  let lastErr: unknown;
  for (;;) {
    try {
      last = await probe();
      lastErr = undefined;
      if (accept(last)) return last;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() >= deadline) {
      throw new ClauseFailure(`${expected} (within ${timeoutMs} ms)`, lastErr === undefined ? show(last) : show(lastErr), what);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}
