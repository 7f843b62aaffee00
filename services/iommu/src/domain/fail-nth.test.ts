import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { FailNth, FailNthOperation, noFailures } from "./fail-nth.js";

const reasonOf = (fn: () => void): string | undefined => {
  try {
    fn();
    return undefined;
  } catch (err) {
    expect(err).toBeInstanceOf(DomainError);
    expect((err as DomainError).code).toBe(Code.RESOURCE_EXHAUSTED);
    return (err as DomainError).reason;
  }
};

describe("FailNth (the kernel's fail-nth for the IOMMU's operations)", () => {
  it("fails the armed n-th point of the next call of that operation only, once", () => {
    const f = new FailNth();
    f.arm(FailNthOperation.REPLACE, 2);
    const other = f.begin(FailNthOperation.ATTACH);
    expect(reasonOf(() => other.point("a"))).toBeUndefined();
    expect(reasonOf(() => other.point("b"))).toBeUndefined();
    const call = f.begin(FailNthOperation.REPLACE);
    expect(reasonOf(() => call.point("core-describe"))).toBeUndefined();
    expect(reasonOf(() => call.point("alloc-handle"))).toBe("FAULT_INJECTED");
    expect(reasonOf(() => call.point("later"))).toBeUndefined();
    // Used up by that call: the next one runs clean.
    const next = f.begin(FailNthOperation.REPLACE);
    for (const p of ["a", "b", "c"]) expect(reasonOf(() => next.point(p))).toBeUndefined();
  });

  it("is used up by a call with fewer points than n, which then succeeds", () => {
    const f = new FailNth();
    f.arm(FailNthOperation.DETACH, 3);
    const call = f.begin(FailNthOperation.DETACH);
    expect(reasonOf(() => call.point("only"))).toBeUndefined();
    const next = f.begin(FailNthOperation.DETACH);
    for (const p of ["a", "b", "c"]) expect(reasonOf(() => next.point(p))).toBeUndefined();
  });

  it("refuses n below 1, and without injection no point ever fails", () => {
    const f = new FailNth();
    expect(() => f.arm(FailNthOperation.BIND, 0)).toThrow(RangeError);
    const call = noFailures.begin(FailNthOperation.BIND);
    for (let i = 0; i < 10; i++) expect(reasonOf(() => call.point(`p${i}`))).toBeUndefined();
  });
});
