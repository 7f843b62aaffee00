import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import { runConformance, type ConformReport, type ConformRole } from "@ioasid/conform";
import { expect } from "vitest";

/** Absolute path of a built file of this repository (`services/kvm/dist/main.js`). */
export function built(path: string): string {
  return fileURLToPath(new URL(`../../${path}`, import.meta.url));
}

/** The command that starts our own service of `role`. */
export function ourService(role: ConformRole): string {
  return `exec ${JSON.stringify(process.execPath)} ${JSON.stringify(built(`services/${role === "core" ? "ioasid-core" : role}/dist/main.js`))}`;
}

/** The command that starts a mutant (test/conform/mutants/<role>-mutant.ts, built) as `mutant`. */
export function mutantCommand(role: ConformRole, mutant: string): string {
  return `IOASID_MUTANT=${mutant} exec ${JSON.stringify(process.execPath)} ${JSON.stringify(built(`test/dist/conform/mutants/${role}-mutant.js`))}`;
}

/** A port nothing listens on now (the target's, given to the kit with --target). */
export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolvePort(port));
    });
  });
}

/** The kit run against `targetCmd`, started by the kit on a free port. */
export async function conform(role: ConformRole, targetCmd: string, options: { patienceMs?: number } = {}): Promise<ConformReport> {
  return runConformance({
    role,
    target: `127.0.0.1:${await freePort()}`,
    targetCmd,
    ...(options.patienceMs === undefined ? {} : { patienceMs: options.patienceMs }),
  });
}

/** The ids of the clauses that failed, each with its message (for a readable assertion failure). */
export function failures(report: ConformReport): Record<string, string> {
  return Object.fromEntries(report.results.filter((r) => r.outcome === "fail").map((r) => [r.id, r.message ?? ""]));
}

/** What a broken variant must do to the suite. */
export interface MutantExpectation {
  /** The clauses the variant breaks: each must fail. */
  readonly breaks: readonly string[];
  /**
   * Clauses a variant's broken behaviour can reach from a later case (a deferred clear landing
   * there…): they may fail too. Nothing else may.
   */
  readonly mayAlsoBreak?: readonly string[];
}

/** Checks a mutant's report: every clause it breaks failed, and nothing outside what it may break. */
export function expectMutantCaught(report: ConformReport, expectation: MutantExpectation): void {
  const failed = failures(report);
  for (const id of expectation.breaks) expect(failed, `clause ${id} must fail`).toHaveProperty([id]);
  const allowed = new Set([...expectation.breaks, ...(expectation.mayAlsoBreak ?? [])]);
  const unexpected = Object.fromEntries(Object.entries(failed).filter(([id]) => !allowed.has(id)));
  expect(unexpected, "clauses the variant does not break must pass").toEqual({});
  expect(report.summary.skipped).toBe(0);
}
