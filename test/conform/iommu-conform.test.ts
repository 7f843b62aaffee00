import { describe, expect, it } from "vitest";
import { conform, expectMutantCaught, failures, mutantCommand, ourService, type MutantExpectation } from "./conform-fixture.js";

/** Each broken IOMMU (test/conform/mutants/iommu-mutant.ts) and the clauses it must fail. */
const IOMMU_MUTANTS: Record<string, MutantExpectation> = {
  "ack-before-teardown": {
    // Both observe the same break: the entries still there when the ack is seen, and when the FREE reaches the LAST tier.
    breaks: ["iommu.free.settled-at-ack", "iommu.order.torn-down-at-last-tier"],
    // Its deferred teardowns are seen by later cases that look soon after a FREE's ack (the same break, seen again).
    mayAlsoBreak: ["iommu.restart.resubscribes-no-leak", "iommu.redelivery.idempotent"],
  },
  // The reference it keeps also keeps the IOASIDs freed around a restart from being reclaimed.
  "forgets-release": {
    breaks: ["iommu.free.releases-with-ack", "iommu.restart.restores-and-catches-up", "iommu.restart.resubscribes-no-leak"],
  },
  "unbind-on-free": { breaks: ["iommu.free.detaches-spid-with-ack"] },
  "unbind-not-last": { breaks: ["iommu.rpc.unbind-gpasid"] },
  "binds-other-set": { breaks: ["iommu.rpc.bind-gpasid.refused-other-set"] },
  "binds-host-sva": { breaks: ["iommu.rpc.bind-gpasid.refused-not-a-vm"] },
  "touches-other-set": { breaks: ["iommu.isolation.other-set"] },
  "reapplies-redelivery": { breaks: ["iommu.redelivery.idempotent"] },
  // At CPU priority it is no longer at the IOMMU tier, and tears down before the DEVICE tier ran.
  "registers-early": { breaks: ["iommu.registration.global-iommu-free", "iommu.order.entry-present-at-device-tier"] },
  "drops-history": { breaks: ["iommu.history.records-changes"] },
  "forgets-state": { breaks: ["iommu.restart.restores-and-catches-up", "iommu.restart.resubscribes-no-leak"] },
  "answers-twice": { breaks: ["iommu.faults.exactly-one-response"] },
  "replace-by-detach": { breaks: ["iommu.rpc.replace-domain"] },
};

describe("conformance kit: IOMMU", () => {
  it("our IOMMU passes every clause", async () => {
    const report = await conform("iommu", ourService("iommu"));
    expect(failures(report)).toEqual({});
    expect(report.summary).toMatchObject({ failed: 0, skipped: 0 });
    expect(report.summary.passed).toBeGreaterThanOrEqual(30);
  });

  it.each(Object.entries(IOMMU_MUTANTS))("the broken IOMMU %s fails the clause it breaks, and only that", async (mutant, expectation) => {
    const report = await conform("iommu", mutantCommand("iommu", mutant), { patienceMs: 6000 });
    expectMutantCaught(report, expectation);
  });
});
