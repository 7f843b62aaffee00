import { Code, DomainError } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { ClauseFailure, ClauseSkipped, eventually, expectRefused, expectRefusedUnchanged, setPatience, type Clause } from "./clause.js";
import { toJUnitXml } from "./junit.js";
import { formatResult, runClauses, summarize } from "./runner.js";

const clause = (id: string, run: () => Promise<void>, needs?: Clause<null>["needs"]): Clause<null> => ({
  id,
  statement: `statement of ${id}`,
  source: "DESIGN §12",
  ...(needs === undefined ? {} : { needs }),
  run,
});

describe("runClauses", () => {
  it("passes, fails with expected vs. got, skips with why, and goes on after a failure", async () => {
    const lines: string[] = [];
    const results = await runClauses(
      [
        clause("r.pass", async () => undefined),
        clause("r.fail", async () => {
          throw new ClauseFailure("[]", '["13->8"]', "the table");
        }),
        clause("r.error", async () => {
          throw new Error("boom");
        }),
        clause("r.skip", async () => {
          throw new ClauseSkipped("not here");
        }),
        clause("r.restart", async () => undefined, ["restart"]),
      ],
      null,
      { capabilities: new Set(), missingWhy: { restart: "needs --target-cmd" }, onResult: (r) => lines.push(formatResult(r)) },
    );
    expect(results.map((r) => [r.id, r.outcome])).toEqual([
      ["r.pass", "pass"],
      ["r.fail", "fail"],
      ["r.error", "fail"],
      ["r.skip", "skip"],
      ["r.restart", "skip"],
    ]);
    expect(results[1]).toMatchObject({ expected: "[]", got: '["13->8"]' });
    expect(results[2]!.message).toBe("Error: boom");
    expect(results[4]!.message).toBe("needs --target-cmd");
    expect(lines[1]).toContain("FAIL  r.fail");
    expect(lines[1]).toContain('got:      ["13->8"]');
    expect(summarize(results)).toEqual({ total: 5, passed: 1, failed: 2, skipped: 2 });
  });

  it("runs only the clauses whose id starts with one of --only", async () => {
    const results = await runClauses([clause("kvm.free.a", async () => undefined), clause("kvm.rpc.b", async () => undefined)], null, {
      capabilities: new Set(),
      only: ["kvm.free"],
    });
    expect(results.map((r) => r.id)).toEqual(["kvm.free.a"]);
  });

  it("fails a case that does not finish in time (a hung target) and goes on", async () => {
    const results = await runClauses([clause("r.hang", () => new Promise(() => undefined)), clause("r.next", async () => undefined)], null, {
      capabilities: new Set(),
      caseTimeoutMs: 50,
    });
    expect(results.map((r) => r.outcome)).toEqual(["fail", "pass"]);
  });
});

describe("the clause checks can fail", () => {
  it("expectRefused fails on success and on the wrong reason", async () => {
    await expect(expectRefused(Promise.resolve(1), Code.NOT_FOUND, "VM_NOT_FOUND")).rejects.toThrow("expected NOT_FOUND VM_NOT_FOUND, got success 1");
    await expect(expectRefused(Promise.reject(new DomainError(Code.NOT_FOUND, "SET_NOT_FOUND", "x")), Code.NOT_FOUND, "VM_NOT_FOUND")).rejects.toThrow(
      "got NOT_FOUND SET_NOT_FOUND",
    );
    await expect(expectRefused(Promise.reject(new DomainError(Code.NOT_FOUND, "VM_NOT_FOUND", "x")), Code.NOT_FOUND, "VM_NOT_FOUND")).resolves.toBeInstanceOf(
      DomainError,
    );
  });

  it("expectRefusedUnchanged fails when the refused call changed the state", async () => {
    let state = 1;
    const call = async () => {
      state = 2;
      throw new DomainError(Code.ALREADY_EXISTS, "VM_EXISTS", "x");
    };
    await expect(expectRefusedUnchanged(async () => state, call, Code.ALREADY_EXISTS, "VM_EXISTS")).rejects.toThrow(ClauseFailure);
  });

  it("eventually fails with the last value seen once its patience is spent", async () => {
    setPatience(15_000);
    await expect(
      eventually(
        async () => 3,
        (n) => n === 4,
        "four",
        60,
      ),
    ).rejects.toThrow("expected four (within 60 ms), got 3");
  });
});

describe("toJUnitXml", () => {
  it("writes one testcase per clause, failures with expected vs. got, skips with why, all escaped", () => {
    const xml = toJUnitXml(
      "conform.kvm",
      "127.0.0.1:1",
      [
        { id: "kvm.a", statement: "a <b> & c", source: "§5", outcome: "pass", ms: 12 },
        { id: "kvm.b", statement: "b", source: "§4.3", outcome: "fail", expected: "[]", got: '["1->2"]', message: "m", ms: 3 },
        { id: "kvm.c", statement: "c", source: "§12", outcome: "skip", message: "needs --target-cmd", ms: 0 },
      ],
      1500,
    );
    expect(xml).toContain('<testsuite name="conform.kvm" hostname="127.0.0.1:1" tests="3" failures="1" errors="0" skipped="1" time="1.500">');
    expect(xml).toContain("<system-out>a &lt;b&gt; &amp; c</system-out>");
    expect(xml).toContain("expected: []\ngot: [&quot;1-&gt;2&quot;]");
    expect(xml).toContain('<skipped message="needs --target-cmd"/>');
    expect(xml.match(/<testcase /g)).toHaveLength(3);
  });
});
