import type { Clause, ConformRole } from "./clause.js";
import type { Harness } from "./harness.js";

/**
 * One role's contract as cases: `prepare` makes the role's context (clients of the target…) from
 * the harness, `clauses` are checked in order against it, `close` ends what `prepare` opened.
 */
export interface RoleSuite<Ctx> {
  readonly role: ConformRole;
  /** One line: what an implementation of this role must be (for `--help` and the README). */
  readonly summary: string;
  /** What the target must expose (its service, health, the variables it reads). */
  readonly target: string;
  prepare(h: Harness): Promise<Ctx> | Ctx;
  readonly clauses: readonly Clause<Ctx>[];
  close?(ctx: Ctx): Promise<void> | void;
}

/** A suite whose context type is not known to the caller (the registry's element). */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyRoleSuite = RoleSuite<any>;
