import { actionName, describeAction, eventOf, type HistoryActionCase, type HistoryRecord } from "@ioasid/bus";
import { wrapText } from "./text-wrap.js";

/** The columns of the kernel document's life-cycle tables, in its order. */
export const COLUMNS = ["VFIO", "IOMMU", "KVM", "VDCM", "IOASID"] as const;
export type Column = (typeof COLUMNS)[number];

/** One row of a timeline: a step in one column, and the reference count after it when it changed. */
export interface TimelineRow {
  /** The step's number in the document's table; 0 for a row the table leaves out (an acknowledgement). */
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
    // A reference change or a registration is done by its holder / subscriber.
    const owner = ownerRole(r);
    return owner === undefined ? "IOASID" : (ROLE_COLUMN[owner] ?? "IOASID");
  }
  return ROLE_COLUMN[r.role];
}

/** The role that asked the core for a step: the holder of a reference, a notifier's subscriber. */
function ownerRole(r: HistoryRecord): string | undefined {
  const a = r.action;
  switch (a?.$case) {
    case "ioasidGet":
    case "ioasidPut":
      return a.value.holder?.role;
    case "ioasidRegisterNotifier":
    case "ioasidRegisterNotifierMm":
    case "deliveryAcked":
      return a.value.subscriber;
    default:
      return undefined;
  }
}

/**
 * The history actions of the IO page fault path (DESIGN §5 "Faults"): page-request groups and
 * their one response, unrecoverable DMA faults, credits, and VFIO's relay to the VMM.
 */
export const FAULT_ACTIONS: ReadonlySet<HistoryActionCase> = new Set<HistoryActionCase>([
  "iopfGroup",
  "iopfRelay",
  "iopfNoHandler",
  "iopfCreditsExhausted",
  "pageResponse",
  "dmaFault",
  "faultSessionLost",
]);

/** The kernel document's words for a history record. */
export function describeStep(r: HistoryRecord): string {
  const id = r.ioasid === undefined ? "" : `${r.ioasid}`;
  switch (eventOf(r)) {
    case "ALLOC":
      return `ioasid_alloc() -> ${id}`;
    case "FREE":
      return "ioasid_notify(FREE), mark_free_pending";
    case "BIND":
      return `ioasid_notify(BIND) spid ${r.spid ?? "?"}`;
    case "UNBIND":
      return `ioasid_notify(UNBIND) spid ${r.spid ?? "?"}`;
    case "RECLAIM":
      return "Reclaimed";
    case "SET_ALLOC":
      return `ioasid_alloc_set() set ${r.setId ?? "?"}`;
    case "SET_FREE":
      return `ioasid_set destroyed, set ${r.setId ?? "?"}`;
    case undefined:
      // Not an event: the step's own words, below.
      break;
  }
  const c = r.action?.$case;
  if (c === "ioasidGet" || c === "ioasidPut") return `-> ${actionName(c)}(${id})`;
  const name = actionName(r);
  const detail = describeAction(r);
  if (c !== undefined && FAULT_ACTIONS.has(c)) return `${name}(${id}${r.spid === undefined ? "" : `, gpasid ${r.spid}`}) ${detail ?? ""}`.trimEnd();
  return detail === undefined || r.role === "ioasid" ? `${name}(${id})` : `${name}(${id}) ${detail}`;
}

/** Options of {@link buildTimeline}. */
export interface TimelineOptions {
  /** Only steps about these IOASIDs (and steps about no IOASID in these sets). */
  readonly ioasids?: ReadonlySet<number>;
  readonly setIds?: ReadonlySet<number>;
  /** Leave out the core's records of these events ("SET_ALLOC"). @default the set events */
  readonly omitEvents?: ReadonlySet<string>;
  /** Also keep steps the other filters would leave out (e.g. a registration by MM token). */
  readonly include?: (r: HistoryRecord) => boolean;
}

/** Turns history records (time order) into the rows of the document's column table. */
export function buildTimeline(records: readonly HistoryRecord[], options: TimelineOptions = {}): TimelineRow[] {
  const omit = options.omitEvents ?? new Set(["SET_ALLOC", "SET_FREE"]);
  const rows: TimelineRow[] = [];
  let steps = 0;
  for (const r of [...records].sort((a, b) => a.ts - b.ts)) {
    const event = eventOf(r);
    if (event !== undefined && omit.has(event)) continue;
    const forced = options.include?.(r) === true;
    if (!forced && r.ioasid !== undefined && options.ioasids !== undefined && !options.ioasids.has(r.ioasid)) continue;
    if (!forced && r.ioasid === undefined && options.setIds !== undefined && (r.setId === undefined || !options.setIds.has(r.setId))) continue;
    const column = columnOf(r);
    if (column === undefined) continue;
    // The core's record of an acknowledgement is a delivery's end in the diagram; the document's
    // table has no row for it (its steps are what the components did).
    const step = r.action?.$case === "deliveryAcked" ? 0 : ++steps;
    const changesRef = r.action?.$case === "ioasidGet" || r.action?.$case === "ioasidPut" || event === "ALLOC" || event === "FREE";
    rows.push({
      step,
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
 * The timeline as the document's column table, for a terminal: each step in its column, wrapped
 * within it (a long step takes more lines, never the neighbouring columns: issue 17), the
 * reference count after it at the right of its first line.
 * @param options.width characters per column, the last one a gap. @default 22
 */
export function renderTable(rows: readonly TimelineRow[], options: { width?: number; title?: string } = {}): string {
  const width = options.width ?? 22;
  const header = `${"#".padStart(3)}  ${COLUMNS.map((c) => c.padEnd(width)).join("")}Ref`;
  const lines = [header, "".padEnd(header.length, ".")];
  for (const r of rows) {
    if (r.step === 0) continue;
    const indent = " ".repeat(COLUMNS.indexOf(r.column) * width);
    wrapText(r.text, width - 1).forEach((part, i) => {
      const ref = i === 0 && r.ref !== undefined ? String(r.ref) : "";
      const step = i === 0 ? String(r.step) : "";
      lines.push(`${step.padStart(3)}  ${`${indent}${part}`.padEnd(COLUMNS.length * width)}${ref}`.trimEnd());
    });
  }
  return (options.title === undefined ? "" : `${options.title}\n`) + lines.join("\n");
}
