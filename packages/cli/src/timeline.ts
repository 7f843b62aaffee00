import type { HistoryRecord } from "@ioasid/bus";

/** The columns of the kernel document's life-cycle tables, in its order. */
export const COLUMNS = ["VFIO", "IOMMU", "KVM", "VDCM", "IOASID"] as const;
export type Column = (typeof COLUMNS)[number];

/** One row of a timeline: a step in one column, and the reference count after it when it changed. */
export interface TimelineRow {
  readonly step: number;
  readonly ts: number;
  readonly column: Column;
  readonly text: string;
  readonly ref?: number;
  /** The history record the row comes from. */
  readonly record: HistoryRecord;
}

const ROLE_COLUMN: Record<string, Column> = { vfio: "VFIO", iommu: "IOMMU", kvm: "KVM", vdcm: "VDCM", ioasid: "IOASID" };

/** The column a history record belongs in: the component that did it. */
export function columnOf(r: HistoryRecord): Column | undefined {
  if (r.role === "ioasid") {
    // A reference change or a registration is done by its holder / subscriber (detail "kvm/vm-1/…").
    const owner = r.detail?.split("/")[0];
    if ((r.action === "ioasid_get" || r.action === "ioasid_put" || r.action.startsWith("ioasid_register")) && owner !== undefined) {
      return ROLE_COLUMN[owner] ?? "IOASID";
    }
    return "IOASID";
  }
  return ROLE_COLUMN[r.role];
}

/**
 * The history actions of the IO page fault path (DESIGN §5 "Faults"): page-request groups and
 * their one response, unrecoverable DMA faults, credits, and VFIO's relay to the VMM.
 */
export const FAULT_ACTIONS: ReadonlySet<string> = new Set([
  "iopf_group",
  "iopf_relay",
  "iopf_no_handler",
  "iopf_credits_exhausted",
  "page_response",
  "dma_fault",
  "fault_session_lost",
]);

/**
 * The Mermaid arrow a fault step draws, if it crosses between columns: the IOMMU hands a group or
 * reports a fault to its handler (VFIO), VFIO passes the VMM's answer to the IOMMU.
 */
function faultArrow(r: TimelineRow): string | undefined {
  const a = r.record.action;
  const toVfio = r.column === "IOMMU" && (r.record.detail ?? "").includes("vfio/");
  if ((a === "iopf_group" || a === "dma_fault") && toVfio) return "IOMMU->>VFIO";
  if (a === "page_response" && r.column === "VFIO") return "VFIO->>IOMMU";
  return undefined;
}

/** The kernel document's words for a history record. */
export function describeStep(r: HistoryRecord): string {
  const id = r.ioasid === undefined ? "" : `${r.ioasid}`;
  switch (r.action) {
    case "event:ALLOC":
      return `ioasid_alloc() -> ${id}`;
    case "event:FREE":
      return "ioasid_notify(FREE), mark_free_pending";
    case "event:BIND":
      return `ioasid_notify(BIND) spid ${r.spid ?? "?"}`;
    case "event:UNBIND":
      return `ioasid_notify(UNBIND) spid ${r.spid ?? "?"}`;
    case "event:RECLAIM":
      return "Reclaimed";
    case "event:SET_ALLOC":
      return `ioasid_alloc_set() set ${r.setId ?? "?"}`;
    case "event:SET_FREE":
      return `ioasid_set destroyed, set ${r.setId ?? "?"}`;
    case "ioasid_get":
      return `-> ioasid_get(${id})`;
    case "ioasid_put":
      return `-> ioasid_put(${id})`;
    default:
      if (FAULT_ACTIONS.has(r.action)) return `${r.action}(${id}${r.spid === undefined ? "" : `, gpasid ${r.spid}`}) ${r.detail ?? ""}`.trimEnd();
      return r.detail === undefined || r.role === "ioasid" ? `${r.action}(${id})` : `${r.action}(${id}) ${r.detail}`;
  }
}

/** Options of {@link buildTimeline}. */
export interface TimelineOptions {
  /** Only steps about these IOASIDs (and steps about no IOASID in these sets). */
  readonly ioasids?: ReadonlySet<number>;
  readonly setIds?: ReadonlySet<number>;
  /** Leave out steps with these actions. @default the set events */
  readonly omit?: ReadonlySet<string>;
  /** Also keep steps the other filters would leave out (e.g. a registration by MM token). */
  readonly include?: (r: HistoryRecord) => boolean;
}

/** Turns history records (time order) into the rows of the document's column table. */
export function buildTimeline(records: readonly HistoryRecord[], options: TimelineOptions = {}): TimelineRow[] {
  const omit = options.omit ?? new Set(["event:SET_ALLOC", "event:SET_FREE"]);
  const rows: TimelineRow[] = [];
  for (const r of [...records].sort((a, b) => a.ts - b.ts)) {
    if (omit.has(r.action)) continue;
    const forced = options.include?.(r) === true;
    if (!forced && r.ioasid !== undefined && options.ioasids !== undefined && !options.ioasids.has(r.ioasid)) continue;
    if (!forced && r.ioasid === undefined && options.setIds !== undefined && (r.setId === undefined || !options.setIds.has(r.setId))) continue;
    const column = columnOf(r);
    if (column === undefined) continue;
    const changesRef = r.action === "ioasid_get" || r.action === "ioasid_put" || r.action === "event:ALLOC" || r.action === "event:FREE";
    rows.push({
      step: rows.length + 1,
      ts: r.ts,
      column,
      text: describeStep(r),
      ...(changesRef && r.refcount !== undefined ? { ref: r.refcount } : {}),
      record: r,
    });
  }
  return rows;
}

/**
 * The timeline as the document's column table, for a terminal: each step written from its
 * column's position (a long step runs on into the empty columns to its right, as in the
 * document), the reference count after it at the right.
 */
export function renderTable(rows: readonly TimelineRow[], options: { width?: number; title?: string } = {}): string {
  const width = options.width ?? 22;
  const refAt = COLUMNS.length * width;
  const header = `${"#".padStart(3)}  ${COLUMNS.map((c) => c.padEnd(width)).join("")}Ref`;
  const lines = [header, "".padEnd(header.length, ".")];
  for (const r of rows) {
    const body = `${" ".repeat(COLUMNS.indexOf(r.column) * width)}${r.text}`;
    const ref = r.ref === undefined ? "" : String(r.ref);
    lines.push(`${String(r.step).padStart(3)}  ${body.length < refAt ? body.padEnd(refAt) : `${body} `}${ref}`.trimEnd());
  }
  return (options.title === undefined ? "" : `${options.title}\n`) + lines.join("\n");
}

/** The timeline as a Mermaid sequence diagram (participants are the columns). */
export function renderMermaid(rows: readonly TimelineRow[]): string {
  const out = ["sequenceDiagram", ...COLUMNS.map((c) => `    participant ${c}`)];
  for (const r of rows) {
    const text = `${r.step}. ${r.text}${r.ref === undefined ? "" : ` [ref ${r.ref}]`}`.replace(/[;#]/g, " ");
    const target: Column = r.column === "IOASID" ? "IOASID" : "IOASID";
    const arrow = faultArrow(r);
    if (arrow !== undefined) out.push(`    ${arrow}: ${text}`);
    else if (r.column === "IOASID") out.push(`    Note over IOASID: ${text}`);
    else if (r.record.action === "ioasid_get" || r.record.action === "ioasid_put" || r.record.action.startsWith("ioasid_register")) {
      out.push(`    ${r.column}->>${target}: ${text}`);
    } else out.push(`    Note over ${r.column}: ${text}`);
  }
  return out.join("\n");
}

/**
 * A self-contained HTML page with the timeline's Mermaid diagram and its table: the Mermaid
 * library is inlined (`mermaidJs`), so the file renders offline.
 */
export function renderHtml(sections: ReadonlyArray<{ title: string; rows: readonly TimelineRow[]; verdict?: string }>, mermaidJs: string): string {
  const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const body = sections
    .map(
      (s) => `<section>
<h2>${esc(s.title)}</h2>
<pre class="mermaid">
${esc(renderMermaid(s.rows))}
</pre>
<details><summary>column table</summary><pre>${esc(renderTable(s.rows))}</pre></details>
${s.verdict === undefined ? "" : `<pre class="verdict">${esc(s.verdict)}</pre>`}
</section>`,
    )
    .join("\n");
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ioasid-fabric timeline</title>
<style>body{font-family:system-ui,sans-serif;margin:2em}pre{font-size:12px}.verdict{background:#f4f4f4;padding:1em}</style>
</head><body>
<h1>ioasid-fabric timeline</h1>
${body}
<script>${mermaidJs.replace(/<\/script/gi, "<\\/script")}</script>
<script>mermaid.initialize({ startOnLoad: true, sequence: { showSequenceNumbers: false } });</script>
</body></html>
`;
}
