import { writeFileSync } from "node:fs";
import { setPatience, type Capability, type ConformRole } from "./clause.js";
import { Harness, type HarnessOptions } from "./harness.js";
import { toJUnitXml } from "./junit.js";
import { runClauses, summarize, type CaseResult, type Summary } from "./runner.js";
import { SUITES } from "./suites/index.js";
import type { AnyRoleSuite } from "./suite.js";

/** Options of {@link runConformance}. */
export interface ConformOptions extends HarnessOptions {
  /** Only clauses whose id starts with one of these. */
  readonly only?: readonly string[];
  /** Each case's result as it is known. */
  readonly onResult?: (result: CaseResult) => void;
  /** Write JUnit XML here. */
  readonly junitFile?: string;
  /** A case longer than this fails. @default 60000 */
  readonly caseTimeoutMs?: number;
  /** How long a clause waits for what must happen before it fails. @default 15000 */
  readonly patienceMs?: number;
}

/** What a conformance run found. */
export interface ConformReport {
  readonly role: ConformRole;
  readonly target: string;
  readonly results: readonly CaseResult[];
  readonly summary: Summary;
  readonly ms: number;
  /** Every case passed or was skipped, and at least one ran. */
  readonly ok: boolean;
}

/** The suite of `role`, or an error naming the roles that have one. */
export function suiteOf(role: ConformRole): AnyRoleSuite {
  const suite = SUITES[role];
  if (suite === undefined) throw new Error(`no conformance suite for role ${role} (suites: ${Object.keys(SUITES).join(", ")})`);
  return suite;
}

/**
 * The library entry point (vitest, scripts): brings up the stack around the target, runs the
 * role's clauses, tears the stack down, and reports — a line per case through `onResult`, JUnit XML
 * to `junitFile`.
 *
 * @example
 * const report = await runConformance({ role: "kvm", target: "127.0.0.1:50154", targetCmd: "node services/kvm/dist/main.js" });
 * expect(report.summary.failed).toBe(0);
 */
export async function runConformance(options: ConformOptions): Promise<ConformReport> {
  const suite = suiteOf(options.role);
  setPatience(options.patienceMs ?? 15_000);
  const started = performance.now();
  const h = await Harness.start(options);
  let results: CaseResult[] = [];
  try {
    const ctx: unknown = await suite.prepare(h);
    try {
      const capabilities = new Set<Capability>(h.canRestart ? ["restart"] : []);
      results = await runClauses(suite.clauses, ctx, {
        capabilities,
        missingWhy: { restart: "needs --target-cmd: the kit restarts only a target it started itself" },
        ...(options.only === undefined ? {} : { only: options.only }),
        ...(options.onResult === undefined ? {} : { onResult: options.onResult }),
        ...(options.caseTimeoutMs === undefined ? {} : { caseTimeoutMs: options.caseTimeoutMs }),
      });
    } finally {
      await suite.close?.(ctx);
    }
  } finally {
    await h.close();
  }
  const ms = performance.now() - started;
  const summary = summarize(results);
  if (options.junitFile !== undefined) writeFileSync(options.junitFile, toJUnitXml(`conform.${options.role}`, options.target, results, ms));
  return { role: options.role, target: options.target, results, summary, ms, ok: summary.failed === 0 && summary.total > 0 };
}
