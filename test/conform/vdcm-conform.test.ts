import { describe, expect, it } from "vitest";
import { conform, expectMutantCaught, failures, mutantCommand, ourService, type MutantExpectation } from "./conform-fixture.js";

/** Each broken VDCM (test/conform/mutants/vdcm-mutant.ts) and the clauses it must fail. */
const VDCM_MUTANTS: Record<string, MutantExpectation> = {
  "ack-before-clear": {
    // Both observe the same break: the entries still there when the ack is seen, and when the FREE reaches the next tier.
    breaks: ["vdcm.free.settled-at-ack", "vdcm.order.cleared-before-iommu-tier"],
    // Every later FREE is acknowledged 3 s before its entries go: a case that looks right after the ack sees them
    // (resubscribes-no-leak does); the others wait for the entries to go and pass unless the deferred clear is late.
    mayAlsoBreak: [
      "vdcm.restart.resubscribes-no-leak",
      "vdcm.redelivery.idempotent",
      "vdcm.isolation.other-set",
      "vdcm.clear-after-free.harmless",
      "vdcm.history.records-changes",
      "vdcm.restart.restores-and-catches-up",
    ],
  },
  // The references it keeps also keep the IOASID freed while VDCM was down from being reclaimed, and leak after a restart.
  "forgets-release": { breaks: ["vdcm.free.releases-with-ack", "vdcm.restart.restores-and-catches-up", "vdcm.restart.resubscribes-no-leak"] },
  "reapplies-redelivery": { breaks: ["vdcm.redelivery.idempotent"] },
  "touches-other-set": { breaks: ["vdcm.isolation.other-set"] },
  // No reference keeps a freed IOASID while VDCM is down, and a restart clears the entries no reference backs.
  "no-reference": { breaks: ["vdcm.rpc.write-wq-pasid", "vdcm.restart.restores-and-catches-up", "vdcm.restart.resubscribes-no-leak"] },
  "crosses-sets": { breaks: ["vdcm.isolation.foreign-pasids"] },
  "wrong-priority": { breaks: ["vdcm.rpc.assign-mdev", "vdcm.order.cleared-before-iommu-tier"] },
  "cpu-priority": {
    breaks: ["vdcm.rpc.assign-mdev"],
    // At the kit's own CPU priority VDCM gets the FREE in parallel with the kit's tier: the kit's check at that tier
    // sees VDCM's delivery or its cleared entry when VDCM's delivery lands before the check's query, which the kit
    // cannot force (equal priorities run in parallel, DESIGN §3).
    mayAlsoBreak: ["vdcm.order.programmed-at-cpu-tier"],
  },
  "drops-history": { breaks: ["vdcm.history.records-changes"] },
  "forgets-state": { breaks: ["vdcm.restart.restores-and-catches-up", "vdcm.restart.resubscribes-no-leak"] },
};

describe("conformance kit: VDCM", () => {
  it("our VDCM passes every clause", async () => {
    const report = await conform("vdcm", ourService("vdcm"));
    expect(failures(report)).toEqual({});
    expect(report.summary).toMatchObject({ failed: 0, skipped: 0 });
    expect(report.summary.passed).toBeGreaterThanOrEqual(30);
  });

  it.each(Object.entries(VDCM_MUTANTS))("the broken VDCM %s fails the clause it breaks, and only that", async (mutant, expectation) => {
    const report = await conform("vdcm", mutantCommand("vdcm", mutant), { patienceMs: 6000 });
    expectMutantCaught(report, expectation);
  });
});
