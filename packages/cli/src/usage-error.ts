// ioasidctl's exit codes and the parsing of its flags, shared by every command so that a script can
// tell a bad command line from a failure from a refusal the same way everywhere (clig.dev; issue 17).

/**
 * ioasidctl's exit codes, one convention for every command:
 * - `OK` 0: done (a DMA translated, an ENQCMD translated, a state printed).
 * - `FAILED` 1: an operational failure: the stack is not running or not reachable, an RPC was
 *   rejected (its reason is printed), a VM is not known, something did not happen in time, `status`
 *   found a process down, a filter matched nothing (`timeline --ioasid 99` with no IOASID 99).
 * - `USAGE` 2: a bad command line (unknown command, verb or flag, a missing or malformed value):
 *   the command's usage is printed to stderr and nothing is sent.
 * - `REFUSED` 3: the stack answered and the answer is the modelled hardware's refusal: an ENQCMD
 *   that raised #GP, a DMA (or a descriptor's DMA) that faulted, including a page request answered
 *   other than SUCCESS and a retry that does not translate.
 */
export const ExitCode = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  REFUSED: 3,
} as const;
/** One of {@link ExitCode}. */
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

/** The exit-code table as `--help` and the README show it. */
export const EXIT_CODES_HELP = [
  "exit codes (every command):",
  "  0: done",
  "  1: failed: the stack is not running or not reachable, an RPC was rejected (reason printed), no such VM, a timeout,",
  "     status found a process down, a filter matched nothing",
  "  2: usage error: unknown command, verb or flag, a missing or malformed value (the usage is printed; nothing is sent)",
  "  3: refused by the modelled hardware: ENQCMD #GP, a faulted DMA or descriptor (page response not SUCCESS included)",
].join("\n");

/** A bad flag, verb or flag combination: the command prints it with its usage and exits 2, sending nothing. */
export class UsageError extends Error {
  override readonly name = "UsageError";
}

type Value = string | boolean | undefined;

/**
 * A non-negative integer flag (decimal), within `max`. A missing value is a usage error naming the
 * flag as required.
 * @throws UsageError
 */
export function parseCount(v: Value, flag: string, max = Number.MAX_SAFE_INTEGER): number {
  if (v === undefined) throw new UsageError(`--${flag} is required`);
  const n = typeof v === "string" && /^\d+$/.test(v.trim()) ? Number(v.trim()) : NaN;
  if (!Number.isSafeInteger(n) || n > max)
    throw new UsageError(`--${flag} must be ${max === Number.MAX_SAFE_INTEGER ? "a non-negative integer" : `an integer 0..${max}`}, got ${String(v)}`);
  return n;
}

/**
 * An unsigned 64-bit flag (an mm token): decimal or 0x-hex. `BigInt("abc")` would throw a
 * SyntaxError ("Cannot convert abc to a BigInt") that reads like a crash.
 * @throws UsageError
 */
export function parseU64(v: Value, flag: string): bigint {
  if (v === undefined) throw new UsageError(`--${flag} is required`);
  if (typeof v !== "string" || !/^(0x[0-9a-f]+|\d+)$/i.test(v.trim()))
    throw new UsageError(`--${flag} must be an integer (decimal or 0x-hex), got ${String(v)}`);
  const n = BigInt(v.trim());
  if (n >= 1n << 64n) throw new UsageError(`--${flag} must fit in 64 bits, got ${v}`);
  return n;
}

/** A required string flag. @throws UsageError when it is missing or empty */
export function requireString(v: Value, flag: string, what = ""): string {
  if (typeof v !== "string" || v === "") throw new UsageError(`--${flag} is required${what === "" ? "" : ` (${what})`}`);
  return v;
}

/**
 * The verb of a command with verbs (`vm create|crash|destroy|list`): the first positional, one of
 * `verbs`, and nothing after it.
 * @throws UsageError
 */
export function parseVerb<V extends string>(positionals: readonly string[], verbs: readonly V[], command: string): V {
  const [verb, ...rest] = positionals;
  if (verb === undefined) throw new UsageError(`${command} needs a verb: ${verbs.join(", ")}`);
  if (!(verbs as readonly string[]).includes(verb)) throw new UsageError(`unknown verb "${verb}" for ${command}: ${verbs.join(", ")}`);
  if (rest.length > 0) throw new UsageError(`unexpected argument "${rest[0]}"`);
  return verb as V;
}

/** Refuses positional arguments for a command that takes none. @throws UsageError */
export function noPositionals(positionals: readonly string[], command: string): void {
  if (positionals.length > 0) throw new UsageError(`${command} takes no arguments besides its flags (got "${positionals.join(" ")}")`);
}
