import { stepLabel, type HistoryActionCase } from "@ioasid/bus";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runScenario, ScenarioKind, renderTable, renderVerdict, type ScenarioResult } from "@ioasid/cli";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// The two life-cycle tables of the IOASID document, run through the real services (core, IOMMU,
// VFIO, KVM, VDCM as processes, a real nats-server): the recorded history must show the same
// events, the priority order, and the same reference counts.

let stack: StackFixture;
beforeAll(async () => {
  stack = await startStack();
}, 60_000);
afterAll(async () => {
  await stack?.stop();
});

function refs(r: ScenarioResult): number[] {
  return r.rows.filter((x) => x.ref !== undefined).map((x) => x.ref!);
}
function events(r: ScenarioResult): string[] {
  return r.rows.filter((x) => x.column === "IOASID").map((x) => stepLabel(x.record).replace("event:", ""));
}
function columnOf(r: ScenarioResult, action: HistoryActionCase): string[] {
  return r.rows.filter((x) => x.record.action?.$case === action).map((x) => x.column);
}

describe("guest IOASID life cycle through the services", () => {
  it("reproduces the normal table (steps 1–24): ALLOC, BIND, UNBIND, FREE, reclaim; references 1→4→0", async () => {
    const r = await runScenario(ScenarioKind.NORMAL, stack.clients);
    const why = `${renderTable(r.rows)}\n${renderVerdict(r.verdict)}`;
    expect(r.verdict.ok, why).toBe(true);
    expect(events(r), why).toEqual(["ALLOC", "BIND", "UNBIND", "FREE", "RECLAIM"]);
    expect(refs(r), why).toEqual([1, 2, 3, 4, 3, 2, 1, 0]);
    // Who took and dropped the references, as in the table: IOMMU (4), KVM (6), VDCM (10); VDCM
    // (16), KVM (21), the free (22), IOMMU (23).
    expect(columnOf(r, "ioasidGet"), why).toEqual(["IOMMU", "KVM", "VDCM"]);
    expect(columnOf(r, "ioasidPut"), why).toEqual(["VDCM", "KVM", "IOMMU"]);
    expect(
      r.notes.some((n) => n.startsWith("new life cycle")),
      why,
    ).toBe(true);
  }, 60_000);

  it("reproduces the misbehaving-guest table (steps 13–30): FREE before unbind, CPU → DEVICE → IOMMU, late unbind harmless", async () => {
    const r = await runScenario(ScenarioKind.CRASH, stack.clients);
    const why = `${renderTable(r.rows)}\n${renderVerdict(r.verdict)}`;
    expect(r.verdict.ok, why).toBe(true);
    expect(events(r), why).toEqual(["ALLOC", "BIND", "FREE", "RECLAIM"]);
    expect(refs(r), why).toEqual([1, 2, 3, 4, 3, 2, 1, 0]);
    // The FREE's releases in priority order: KVM (CPU), VDCM (DEVICE), IOMMU (IOMMU).
    expect(columnOf(r, "ioasidPut"), why).toEqual(["KVM", "VDCM", "IOMMU"]);
    expect(
      r.notes.find((n) => n.startsWith("late unbind")),
      why,
    ).toBeDefined();
    // The IOASID is reusable afterwards.
    expect(
      r.notes.find((n) => n.startsWith("new life cycle")),
      why,
    ).toMatch(new RegExp(`-> ${r.hpasid} generation ${r.generation + 1}`));
  }, 60_000);
});
