import { describeAction, eventOf, type HistoryActionCase, type HistoryRecord } from "@ioasid/bus";
import { orderHistory } from "@ioasid/checker";
import type { StackClients } from "./clients.js";

/** One checked invariant. */
export interface Check {
  /** S1…S9 of DESIGN §7, or DOC for the match with the document's table. */
  readonly id: string;
  readonly name: string;
  readonly ok: boolean;
  readonly detail: string;
}

/** The verdict on a run: every check, and whether all hold. */
export interface Verdict {
  readonly ok: boolean;
  readonly checks: readonly Check[];
}

/** What the checks look at. */
export interface VerdictInput {
  readonly records: readonly HistoryRecord[];
  readonly hpasid: number;
  readonly generation: number;
  readonly setId: number;
  readonly vmId: number;
}

/** The document's event sequence and reference counts for each life cycle. */
export const EXPECTED = {
  normal: { events: ["ALLOC", "BIND", "UNBIND", "FREE", "RECLAIM"], refs: [1, 2, 3, 4, 3, 2, 1, 0] },
  crash: { events: ["ALLOC", "BIND", "FREE", "RECLAIM"], refs: [1, 2, 3, 4, 3, 2, 1, 0] },
} as const;

/** Objects anywhere in `value` whose `hpasid` (or `pasid`) field is `ioasid`. */
export function findPasid(value: unknown, ioasid: number, path = "$"): string[] {
  const hits: string[] = [];
  if (value === null || typeof value !== "object") return hits;
  if (Array.isArray(value)) {
    value.forEach((v, i) => hits.push(...findPasid(v, ioasid, `${path}[${i}]`)));
    return hits;
  }
  const o = value as Record<string, unknown>;
  if (o["hpasid"] === ioasid || o["pasid"] === ioasid) hits.push(path);
  for (const [k, v] of Object.entries(o)) if (typeof v === "object") hits.push(...findPasid(v, ioasid, `${path}.${k}`));
  return hits;
}

/**
 * Checks a life-cycle run against the document and the invariants of DESIGN §7 that one run can
 * show: the events and reference counts of the table (DOC), S1 (reclaimed only at zero), S2 (no
 * reference taken once FREE_PENDING), S5 (teardown order), S6 (quota conservation), S8 (one event
 * per transition), S9 (nothing live in a VMCS table, device or IOMMU PASID table after reclaim).
 */
export async function checkInvariants(kind: "normal" | "crash", c: StackClients, input: VerdictInput): Promise<Verdict> {
  const mine = input.records.filter((r) => r.ioasid === input.hpasid && r.generation === input.generation);
  const events = mine.filter((r) => r.role === "ioasid").flatMap((r) => eventOf(r) ?? []);
  const isRef = (r: HistoryRecord) => r.action?.$case === "ioasidGet" || r.action?.$case === "ioasidPut";
  const refSteps = mine.filter((r) => r.role === "ioasid" && (isRef(r) || eventOf(r) === "ALLOC" || eventOf(r) === "FREE"));
  const refs = refSteps.map((r) => r.refcount);
  const checks: Check[] = [];
  const add = (id: string, name: string, ok: boolean, detail: string) => checks.push({ id, name, ok, detail });
  const expected = EXPECTED[kind];

  add("DOC", "events as in the document's table", JSON.stringify(events) === JSON.stringify(expected.events), events.join(", "));
  add("DOC", "reference counts as in the document's table", JSON.stringify(refs) === JSON.stringify(expected.refs), refs.join(" → "));

  const reclaim = mine.find((r) => eventOf(r) === "RECLAIM");
  const lastPut = [...mine].reverse().find((r) => r.action?.$case === "ioasidPut");
  add(
    "S1",
    "reclaimed only at zero references",
    reclaim !== undefined && reclaim.refcount === 0 && (lastPut === undefined || lastPut.refcount === 0 || lastPut.ts > reclaim.ts),
    reclaim === undefined ? "never reclaimed" : `reclaimed at refcount ${reclaim.refcount}`,
  );
  const free = mine.find((r) => eventOf(r) === "FREE");
  const lateGets = free === undefined ? [] : mine.filter((r) => r.action?.$case === "ioasidGet" && r.ts > free.ts);
  add("S2", "no reference taken once FREE_PENDING", lateGets.length === 0, lateGets.length === 0 ? "none" : lateGets.map((r) => describeAction(r)).join(", "));

  // S5: after FREE, KVM's entry is cleared before the device is drained and cleared, which is
  // before the IOMMU tears down its PASID entry; the references are released in that order too,
  // and the reclaim comes last. Ordered as the checker orders (issue 18, order without clocks):
  // by the records' sequences and causal links, not by the times different processes stamped —
  // a busy machine once made the core stamp KVM's release after VDCM stamped its clear, which the
  // release had caused, and the scenario failed S5 with nothing out of order.
  if (free !== undefined) {
    const order = orderHistory(input.records);
    const position = new Map<HistoryRecord, number>();
    order.order.forEach((index, at) => position.set(input.records[index]!, at));
    const at = (r: HistoryRecord) => position.get(r) ?? -1;
    const after = mine.filter((r) => at(r) >= at(free)).sort((a, b) => at(a) - at(b));
    const first = (role: string, action: HistoryActionCase) => after.find((r) => r.role === role && r.action?.$case === action);
    const putBy = (role: string) => after.find((r) => r.action?.$case === "ioasidPut" && r.action.value.holder?.role === role);
    const steps = [
      ["kvm clears", first("kvm", "vmcsUpdate")],
      ["kvm releases", putBy("kvm")],
      ["vdcm drains/clears", first("vdcm", "vdevClear")],
      ["vdcm releases", putBy("vdcm")],
      ["iommu tears down", first("iommu", "teardownPasid")],
      ["iommu releases", putBy("iommu")],
      ["reclaim", reclaim],
    ] as const;
    const present = steps.filter(([, r]) => r !== undefined) as Array<readonly [string, HistoryRecord]>;
    const sorted = present.every(([, r], i) => i === 0 || at(r) >= at(present[i - 1]![1]));
    add("S5", "teardown order after FREE: KVM → device → IOMMU → reclaim", sorted, present.map(([n]) => n).join(" → "));
  } else {
    add("S5", "teardown order after FREE", false, "no FREE recorded");
  }

  const stats = await c.core.getStats({});
  add(
    "S6",
    "quota conservation: available + Σ quotas = allocatable",
    stats.available + stats.quotaTotal === stats.allocatable,
    `${stats.available} + ${stats.quotaTotal} = ${stats.allocatable}`,
  );

  const count = (t: string) => events.filter((e) => e === t).length;
  add(
    "S8",
    "exactly one event per transition",
    count("ALLOC") === 1 && count("FREE") <= 1 && count("BIND") <= 1 && count("UNBIND") <= 1 && count("RECLAIM") === 1,
    events.join(", "),
  );

  const [k, d, i] = await Promise.all([
    c.kvm.queryState({ vmId: 0 }),
    c.vdcm.queryState({ deviceIds: [] }),
    c.iommu.queryState({ deviceIds: [], maxIotlbFlushes: 0, viommusOnly: false }),
  ]);
  const live = [
    ...findPasid(k, input.hpasid).map((p) => `kvm ${p}`),
    ...findPasid(d, input.hpasid).map((p) => `vdcm ${p}`),
    ...findPasid(i, input.hpasid).map((p) => `iommu ${p}`),
  ];
  add("S9", "nothing live for the PASID after its reclaim (VMCS tables, devices, IOMMU)", live.length === 0, live.length === 0 ? "none" : live.join("; "));

  return { ok: checks.every((x) => x.ok), checks };
}

/** The verdict as text. */
export function renderVerdict(v: Verdict, title = "verdict"): string {
  const lines = v.checks.map((c) => `  ${c.ok ? "ok  " : "FAIL"} ${c.id.padEnd(3)} ${c.name}: ${c.detail}`);
  return `${title}: ${v.ok ? "all clear" : "VIOLATIONS"}\n${lines.join("\n")}`;
}
