import { describe, expect, it } from "vitest";
import { conform, expectMutantCaught, failures, mutantCommand, ourService, type MutantExpectation } from "./conform-fixture.js";

/** Each broken core (test/conform/mutants/core-mutant.ts) and the clauses it must fail. */
const CORE_MUTANTS: Record<string, MutantExpectation> = {
  "tier-order-ignored": { breaks: ["core.delivery.tier-order"] },
  "ignores-releases": { breaks: ["core.delivery.releases-with-ack"] },
  "free-other-set": { breaks: ["core.ownership.other-set"] },
  "unbind-on-free-pending": { breaks: ["core.events.no-unbind-on-free-pending"] },
  "get-in-free-pending": { breaks: ["core.free.no-new-reference"] },
  // Both allocate a range whose only ID is FREE_PENDING: before the last Put, and after a restart.
  "reuse-while-referenced": { breaks: ["core.free.reclaim-at-zero", "core.restart.durable"] },
  // A delivery that timed out is still sent again at once (the engine drains after a miss); one
  // that found no responder waits for the hello that never comes.
  "no-backlog": { breaks: ["core.delivery.backlog-on-hello"] },
  "forgets-state": { breaks: ["core.restart.durable"] },
};

describe("conformance kit: IOASID core", () => {
  it("our core passes every clause", async () => {
    const report = await conform("core", ourService("core"));
    expect(failures(report)).toEqual({});
    expect(report.summary).toMatchObject({ failed: 0, skipped: 0 });
    expect(report.summary.passed).toBeGreaterThanOrEqual(30);
  });

  it.each(Object.entries(CORE_MUTANTS))("the broken core %s fails the clause it breaks, and only that", async (mutant, expectation) => {
    const report = await conform("core", mutantCommand("core", mutant), { patienceMs: 6000 });
    expectMutantCaught(report, expectation);
  });
});
