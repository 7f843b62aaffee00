// The targets of DESIGN §9, one row each in the summary table the benchmark prints at the end, and
// the table's formatting (pure; tested in summary.test.mjs).

/**
 * DESIGN §9's targets, in its order: `id` is what a section records its figure under
 * (`target(id, …)`), `section` the `--only` name that measures it.
 */
export const TARGETS = [
  { id: "allocator.rate", section: "allocator", target: "allocator: alloc+free pairs/s at 50% of 2^20 ≥ 2,000,000" },
  { id: "allocator.memory", section: "allocator", target: "allocator: bytes per live IOASID ≤ 200" },
  { id: "grpc.sequential", section: "grpc", target: "durable Alloc p50 ≤ 1.3× (echo + JetStream ack)" },
  { id: "grpc.inflight", section: "grpc", target: "durable Alloc, 64 in flight ≥ 0.8× echo at 64 in flight" },
  { id: "grpc.batch", section: "grpc", target: "BatchAlloc ≥ 100,000 IOASIDs/s" },
  { id: "delivery.chain", section: "delivery", target: "one FREE through 4 tiers p50 ≤ 1.25× raw 4-tier floor" },
  { id: "delivery.inflight", section: "delivery", target: "1,000 IOASIDs in flight ≥ 50,000 events/s" },
  { id: "delivery.inflightFloor", section: "delivery", target: "1,000 IOASIDs in flight ≥ 0.25× batched floor" },
  { id: "crash.single", section: "crash", target: "crashed guest, 64 PASIDs: all reclaimed p50 ≤ 10 ms" },
  { id: "crash.crowd", section: "crash", target: "1,000 guests × 64 PASIDs crashing: all reclaimed ≤ 3 s" },
  { id: "scale.flat", section: "scale", target: "Alloc+Bind+Program p50 at 64k live ≤ 1.2× at 1k live" },
  { id: "restart.live", section: "restart", target: "core restart with 100k live: serving again ≤ 1 s" },
  { id: "restart.snapshot", section: "restart-snapshot", target: "core restart after 1M ops, 100k live: serving ≤ 1 s" },
  { id: "faults.roundTrip", section: "faults", target: "IO page fault round trip ≤ 1.5× its critical path" },
  { id: "failover.takeover", section: "failover", target: "standby core serving ≤ 2 s after kill -9 of the primary (one server and a 3-server cluster)" },
];

/**
 * One row per target: what its section recorded, or why there is nothing (`section failed: …`,
 * `not run`, `not measured`).
 * @param recorded id → { figure, floor, ratio, met, note? } (strings, and `met` a boolean)
 * @param sections section name → { status: "ok" | "failed" | …, reason? }
 */
export function summaryRows(targets, recorded, sections) {
  return targets.map((t) => {
    const r = recorded[t.id];
    if (r !== undefined) {
      return { target: t.target, figure: r.figure, floor: r.floor ?? "—", ratio: r.ratio ?? "—", met: r.met ? "yes" : "NO", note: r.note };
    }
    const s = sections[t.section];
    const blank = { target: t.target, figure: "—", floor: "—", ratio: "—" };
    if (s === undefined) return { ...blank, met: "not run" };
    if (s.status === "failed") return { ...blank, met: "FAILED", note: `section ${t.section} failed: ${firstLine(s.reason)}` };
    return { ...blank, met: "—", note: "not measured" };
  });
}

const firstLine = (s) => String(s ?? "").split("\n")[0];

/**
 * The rows as a fixed-width text table (a header, a rule, one line per row; a row's note goes on
 * the next line, indented), long cells cut to `maxCell` characters with "…".
 */
export function formatTable(rows, { maxCell = 72 } = {}) {
  const cols = ["target", "figure", "floor", "ratio", "met"];
  const cut = (s) => (s.length > maxCell ? `${s.slice(0, maxCell - 1)}…` : s);
  const cells = rows.map((r) => cols.map((c) => cut(String(r[c] ?? ""))));
  const widths = cols.map((c, i) => Math.max(c.length, ...cells.map((row) => row[i].length)));
  const line = (row) =>
    row
      .map((cell, i) => cell.padEnd(widths[i]))
      .join(" | ")
      .trimEnd();
  const out = [line(cols), widths.map((w) => "-".repeat(w)).join("-+-")];
  rows.forEach((r, k) => {
    out.push(line(cells[k]));
    if (r.note) out.push(`    ${r.note}`);
  });
  return out;
}
