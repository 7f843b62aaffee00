import { describe, expect, it } from "vitest";
import { conform, expectMutantCaught, failures, mutantCommand, ourService, type MutantExpectation } from "./conform-fixture.js";

/** Each broken VFIO (test/conform/mutants/vfio-mutant.ts) and the clauses it must fail. */
const VFIO_MUTANTS: Record<string, MutantExpectation> = {
  "frees-other-set": { breaks: ["vfio.isolation.free-other-vm"] },
  "answers-for-other-container": { breaks: ["vfio.isolation.fault-group-of-other-vm"] },
  "keeps-set-on-session-end": { breaks: ["vfio.session.end-frees-set"] },
  "holds-reference": { breaks: ["vfio.references.holds-none"] },
  // Both restart clauses see it: the kept containers never closed, and container ids handed out again.
  "forgets-containers": { breaks: ["vfio.restart.closes-kept-containers", "vfio.restart.serves-again"] },
  // Every clause that unbinds sees the IOMMU's entry (and the SPID) left behind, or an unbind that claims to have found something.
  "skips-iommu-unbind": {
    breaks: ["vfio.rpc.unbind-guest-pasid", "vfio.rpc.unassign-device", "vfio.misbehaving.free-before-unbind", "vfio.misbehaving.unbind-twice"],
  },
  "unassigns-before-reclaim": { breaks: ["vfio.order.devices-after-reclaim"] },
  "drops-history": { breaks: ["vfio.history.records-changes"] },
  // A call without a capability, with another VM's, a malformed or a closed container's is served.
  "skips-capability-check": { breaks: ["vfio.capability.missing", "vfio.capability.other-container", "vfio.capability.closed-container"] },
  // VM B's VMM maps VM A's memory, memory given to nobody, a range past the end of its own.
  "maps-any-host-memory": { breaks: ["vfio.host-memory.given-only"] },
};

describe("conformance kit: VFIO", () => {
  it("our VFIO passes every clause", async () => {
    const report = await conform("vfio", ourService("vfio"));
    expect(failures(report)).toEqual({});
    expect(report.summary).toMatchObject({ failed: 0, skipped: 0 });
    expect(report.summary.passed).toBeGreaterThanOrEqual(30);
  });

  it.each(Object.entries(VFIO_MUTANTS))("the broken VFIO %s fails the clause it breaks, and only that", async (mutant, expectation) => {
    const report = await conform("vfio", mutantCommand("vfio", mutant), { patienceMs: 6000 });
    expectMutantCaught(report, expectation);
  });
});
