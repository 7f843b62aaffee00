import { describe, expect, it } from "vitest";
import { conform, expectMutantCaught, failures, mutantCommand, ourService, type MutantExpectation } from "./conform-fixture.js";

/** Each broken KVM (test/conform/mutants/kvm-mutant.ts) and the clauses it must fail. */
const KVM_MUTANTS: Record<string, MutantExpectation> = {
  "ack-before-clear": {
    // Both observe the same break: the entry still there when the ack is seen, and when the FREE reaches the next tier.
    breaks: ["kvm.free.settled-at-ack", "kvm.order.cleared-before-device-tier"],
    // Its deferred clears land in later cases (the IOASID was reclaimed at once and may be reused there).
    mayAlsoBreak: ["kvm.unbind-after-free.harmless", "kvm.history.records-changes", "kvm.isolation.other-set"],
  },
  // The reference it keeps also keeps the IOASID freed while KVM was down from being reclaimed.
  "forgets-release": { breaks: ["kvm.free.releases-with-ack", "kvm.restart.restores-and-catches-up"] },
  "reapplies-redelivery": { breaks: ["kvm.redelivery.idempotent"] },
  "touches-other-vm": { breaks: ["kvm.isolation.other-set"] },
  "unbind-after-free-fails": { breaks: ["kvm.unbind-after-free.harmless"] },
  "drops-history": { breaks: ["kvm.history.records-changes"] },
  "forgets-state": { breaks: ["kvm.restart.restores-and-catches-up", "kvm.restart.resubscribes-no-leak"] },
};

describe("conformance kit: KVM", () => {
  it("our KVM passes every clause", async () => {
    const report = await conform("kvm", ourService("kvm"));
    expect(failures(report)).toEqual({});
    expect(report.summary).toMatchObject({ failed: 0, skipped: 0 });
    expect(report.summary.passed).toBeGreaterThanOrEqual(20);
  });

  it.each(Object.entries(KVM_MUTANTS))("the broken KVM %s fails the clause it breaks, and only that", async (mutant, expectation) => {
    const report = await conform("kvm", mutantCommand("kvm", mutant), { patienceMs: 6000 });
    expectMutantCaught(report, expectation);
  });
});
