import { ClauseFailure, ClauseSkipped, type Capability, type Clause } from "./clause.js";

/** How one case ended. */
export type CaseOutcome = "pass" | "fail" | "skip";

/** One case's result: the clause, its outcome, and for a failure expected vs. got. */
export interface CaseResult {
  readonly id: string;
  readonly statement: string;
  readonly source: string;
  readonly outcome: CaseOutcome;
  /** Failure: what the contract expects. */
  readonly expected?: string;
  /** Failure: what the target did. */
  readonly got?: string;
  /** Failure or skip: the message (skip: why it could not run). */
  readonly message?: string;
  readonly ms: number;
}

/** Options of {@link runClauses}. */
export interface RunClausesOptions {
  /** What this run can do (a restartable target…); clauses needing more are skipped. */
  readonly capabilities: ReadonlySet<Capability>;
  /** Why each missing capability is missing, for the skip line. */
  readonly missingWhy?: Partial<Record<Capability, string>>;
  /** Only clauses whose id starts with one of these. @default all */
  readonly only?: readonly string[];
  /** Called with each result as it is known (the CLI prints a line per case). */
  readonly onResult?: (result: CaseResult) => void;
  /** A case longer than this fails (the target hung). @default 60000 */
  readonly caseTimeoutMs?: number;
}

/** Runs `clauses` one after another against `ctx`; a failure never stops the run. */
export async function runClauses<Ctx>(clauses: readonly Clause<Ctx>[], ctx: Ctx, options: RunClausesOptions): Promise<CaseResult[]> {
  const results: CaseResult[] = [];
  for (const clause of clauses) {
    if (options.only !== undefined && !options.only.some((p) => clause.id.startsWith(p))) continue;
    const result = await runOne(clause, ctx, options);
    results.push(result);
    options.onResult?.(result);
  }
  return results;
}

async function runOne<Ctx>(clause: Clause<Ctx>, ctx: Ctx, options: RunClausesOptions): Promise<CaseResult> {
  const base = { id: clause.id, statement: clause.statement, source: clause.source };
  const missing = (clause.needs ?? []).find((c) => !options.capabilities.has(c));
  if (missing !== undefined) return { ...base, outcome: "skip", message: options.missingWhy?.[missing] ?? `needs ${missing}`, ms: 0 };
  const started = performance.now();
  const timeoutMs = options.caseTimeoutMs ?? 60_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      clause.run(ctx),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new ClauseFailure(`the case to finish within ${timeoutMs} ms`, "it did not (the target hung?)")), timeoutMs);
      }),
    ]);
    return { ...base, outcome: "pass", ms: performance.now() - started };
  } catch (err) {
    const ms = performance.now() - started;
    if (err instanceof ClauseSkipped) return { ...base, outcome: "skip", message: err.message, ms };
    if (err instanceof ClauseFailure) return { ...base, outcome: "fail", expected: err.expected, got: err.got, message: err.message, ms };
    return { ...base, outcome: "fail", message: err instanceof Error ? `${err.name}: ${err.message}` : String(err), ms };
  } finally {
    clearTimeout(timer);
  }
}

/** The line the CLI prints for a case. */
export function formatResult(r: CaseResult): string {
  const head = `${r.outcome === "pass" ? "PASS" : r.outcome === "fail" ? "FAIL" : "SKIP"}  ${r.id}  ${r.statement}`;
  if (r.outcome === "pass") return `${head}  (${Math.round(r.ms)} ms)`;
  if (r.outcome === "skip") return `${head}\n      skipped: ${r.message ?? ""}`;
  const lines = [head];
  if (r.expected !== undefined) lines.push(`      expected: ${r.expected}`, `      got:      ${r.got ?? ""}`);
  else lines.push(`      error: ${r.message ?? ""}`);
  lines.push(`      clause source: ${r.source}`);
  return lines.join("\n");
}

/** Counts of a run. */
export interface Summary {
  readonly total: number;
  readonly passed: number;
  readonly failed: number;
  readonly skipped: number;
}

export function summarize(results: readonly CaseResult[]): Summary {
  return {
    total: results.length,
    passed: results.filter((r) => r.outcome === "pass").length,
    failed: results.filter((r) => r.outcome === "fail").length,
    skipped: results.filter((r) => r.outcome === "skip").length,
  };
}
