import { describe, expect, it } from "vitest";
import { formatTable, summaryRows } from "./summary.mjs";

const targets = [
  { id: "a.one", section: "a", target: "a: one ≤ 1.2×" },
  { id: "a.two", section: "a", target: "a: two" },
  { id: "b.one", section: "b", target: "b: one" },
  { id: "c.one", section: "c", target: "c: one" },
];

describe("summaryRows", () => {
  it("gives one row per target: its figure, or why there is none", () => {
    const rows = summaryRows(
      targets,
      { "a.one": { figure: "12 ms", floor: "10 ms", ratio: "1.20× floor", met: true } },
      { a: { status: "ok" }, b: { status: "failed", reason: "kvm (pid 7) exited on its own\nlast lines" } },
    );
    expect(rows.map((r) => [r.figure, r.met, r.note])).toEqual([
      ["12 ms", "yes", undefined],
      ["—", "—", "not measured"],
      ["—", "FAILED", "section b failed: kvm (pid 7) exited on its own"],
      ["—", "not run", undefined],
    ]);
  });

  it("says NO for a target measured and missed", () => {
    const [row] = summaryRows(targets.slice(0, 1), { "a.one": { figure: "30 ms", ratio: "3× target", met: false } }, { a: { status: "ok" } });
    expect(row).toMatchObject({ met: "NO", floor: "—", ratio: "3× target" });
  });
});

describe("formatTable", () => {
  it("aligns the columns under a header and puts a note on the line below its row", () => {
    const lines = formatTable([
      { target: "t1", figure: "1 ms", floor: "—", ratio: "0.1× target", met: "yes" },
      { target: "a longer target", figure: "—", floor: "—", ratio: "—", met: "FAILED", note: "section x failed: why" },
    ]);
    expect(lines).toEqual([
      "target          | figure | floor | ratio       | met",
      "----------------+--------+-------+-------------+-------",
      "t1              | 1 ms   | —     | 0.1× target | yes",
      "a longer target | —      | —     | —           | FAILED",
      "    section x failed: why",
    ]);
  });

  it("cuts a cell longer than maxCell", () => {
    const [, , row] = formatTable([{ target: "x".repeat(10), figure: "", floor: "", ratio: "", met: "" }], { maxCell: 5 });
    expect(row.split(" | ")[0].trimEnd()).toBe("xxxx…");
  });
});
