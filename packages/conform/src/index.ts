/**
 * The conformance kit (DESIGN §12): verifies a role implementation at its address, clause by
 * clause, through the rest of the stack — `ioasidctl conform` and {@link runConformance}.
 */
export {
  CONFORM_ROLES,
  ClauseFailure,
  ClauseSkipped,
  eventually,
  expectEqual,
  expectRefused,
  expectRefusedUnchanged,
  expectThat,
  setPatience,
  show,
  type Capability,
  type Clause,
  type ConformRole,
} from "./clause.js";
export { runConformance, suiteOf, type ConformOptions, type ConformReport } from "./conform.js";
export {
  Harness,
  NEEDS,
  targetEnvironment,
  type CoreClient,
  type HarnessOptions,
  type KitDelivery,
  type KitTier,
  type Tap,
  type TappedDelivery,
} from "./harness.js";
export { toJUnitXml } from "./junit.js";
export { formatResult, runClauses, summarize, type CaseOutcome, type CaseResult, type RunClausesOptions, type Summary } from "./runner.js";
export type { AnyRoleSuite, RoleSuite } from "./suite.js";
export { SUITES } from "./suites/index.js";
