import { actionName, eventOf, type HistoryRecord } from "@ioasid/bus";
import { wrapText } from "./text-wrap.js";
import { describeStep, renderTable, type Column, type TimelineRow } from "./timeline.js";

/**
 * The lanes of the sequence diagram, left to right: the guest (its VMM, on the fault path), VFIO,
 * the core, then the subscribers in tier order — the order the core delivers a FREE in (DESIGN §3
 * "Priority order": CPU → DEVICE → IOMMU), so that tier order reads left to right.
 */
export const DIAGRAM_LANES = [
  { id: "guest", label: "guest (VMM)" },
  { id: "vfio", label: "VFIO" },
  { id: "core", label: "ioasid core" },
  { id: "kvm", label: "KVM<br/>CPU tier" },
  { id: "vdcm", label: "VDCM<br/>device tier" },
  { id: "iommu", label: "IOMMU<br/>IOMMU tier" },
] as const;
type Lane = (typeof DIAGRAM_LANES)[number]["id"];

const COLUMN_LANE: Record<Column, Lane> = { VFIO: "vfio", IOMMU: "iommu", KVM: "kvm", VDCM: "vdcm", IOASID: "core" };
/** The roles that receive deliveries (DESIGN §4): a record of theirs with a `seq` handles event `seq`. */
const TIERS: ReadonlySet<string> = new Set(["kvm", "vdcm", "iommu"]);
/** Above this many IOASIDs in one diagram, their states share one lane (a lane each would not fit). */
const MAX_IOASID_LANES = 4;
/** The background of the steps while the IOASID is ACTIVE, and while it is FREE_PENDING. */
const ACTIVE_BAND = "rgba(60, 170, 90, 0.08)";
const FREE_PENDING_BAND = "rgba(240, 160, 40, 0.16)";
/** Characters per line of an arrow's label. */
const LABEL_WIDTH = 46;
/** Most steps one self-arrow gathers (consecutive steps of one component). */
const MAX_GATHERED = 4;

/** Mermaid text of a label: its own `#`, `;`, `<`, `>` as entity codes, wrapped with `<br/>`. */
function label(text: string, width = LABEL_WIDTH): string {
  return wrapText(text, width)
    .map((l) => l.replace(/#/g, "#35;").replace(/;/g, "#59;").replace(/</g, "#lt;").replace(/>/g, "#gt;"))
    .join("<br/>");
}

/** The role that did a step: the holder of a reference, a notifier's subscriber, else the recorder. */
function actorRole(r: HistoryRecord): string {
  const a = r.action;
  if (a?.$case === "ioasidGet" || a?.$case === "ioasidPut") return a.value.holder?.role ?? r.role;
  if (a?.$case === "ioasidRegisterNotifier" || a?.$case === "ioasidRegisterNotifierMm") return a.value.subscriber;
  if (a?.$case === "deliveryMissed" || a?.$case === "deliveryAcked") return a.value.subscriber;
  return r.role;
}

/** One delivery: an event (by sequence number) to one subscriber instance, and what shows it. */
interface Delivery {
  readonly seq: number;
  readonly tier: Lane;
  readonly instance: string;
  /** Indexes (into the ordered rows) of the subscriber's steps for it, first and last. */
  first: number;
  last: number;
  /** The core's record of the reference the acknowledgement released, if it released one. */
  put?: TimelineRow;
  /** The core's record of the acknowledgement (`delivery_acked`), when the history has one. */
  ack?: TimelineRow;
}

/**
 * The rows in the order the diagram tells them: as recorded, except a request VFIO records once the
 * core answered it (the virtual command's alloc and free, a guest's page response passed on), which
 * is drawn before the step it caused.
 */
function causalOrder(rows: readonly TimelineRow[]): TimelineRow[] {
  // `before` puts a request just ahead of the step it caused (same time key).
  const keyed = rows.map((row, i) => ({ row, i, key: row.ts, before: 0 }));
  const coreEvent = (event: string, r: HistoryRecord) =>
    rows.find(
      (x) => x.record.role === "ioasid" && eventOf(x.record) === event && x.record.ioasid === r.ioasid && x.record.generation === r.generation && x.ts <= r.ts,
    );
  for (const k of keyed) {
    const a = k.row.record.action;
    let caused: TimelineRow | undefined;
    if (a?.$case === "vcmdAlloc") caused = coreEvent("ALLOC", k.row.record);
    else if (a?.$case === "vcmdFree") caused = coreEvent(a.value.outcome === "RECLAIMED" ? "RECLAIM" : "FREE", k.row.record);
    else if (a?.$case === "pageResponse" && a.value.container !== undefined) {
      const group = a.value.group;
      caused = rows.find(
        (x) => x.record.role === "iommu" && x.record.action?.$case === "pageResponse" && x.record.action.value.group === group && x.ts <= k.row.ts,
      );
    }
    if (caused !== undefined) {
      k.key = caused.ts;
      k.before = -1;
    }
  }
  return keyed.sort((a, b) => a.key - b.key || a.before - b.before || a.i - b.i).map((k) => k.row);
}

/** The deliveries the rows show: a subscriber's steps that carry an event's sequence number. */
function findDeliveries(rows: readonly TimelineRow[]): Delivery[] {
  const bySubscriber = new Map<string, Delivery>();
  rows.forEach((row, i) => {
    const r = row.record;
    if (r.seq === undefined || r.action?.$case === "deliveryMissed" || r.action?.$case === "ioasidNotify") return;
    const tier = actorRole(r);
    if (!TIERS.has(tier)) return;
    const a = r.action;
    const instance =
      a?.$case === "ioasidPut" || a?.$case === "ioasidGet" ? (a.value.holder?.instance ?? "") : a?.$case === "deliveryAcked" ? a.value.instance : r.instance;
    const key = `${r.seq}/${tier}/${instance}`;
    const d = bySubscriber.get(key) ?? { seq: r.seq, tier: tier as Lane, instance, first: i, last: i };
    d.last = i;
    // DESIGN §4.3: "an ack may also release the subscriber's reference in the same message".
    if (a?.$case === "ioasidPut") d.put = row;
    if (a?.$case === "deliveryAcked") d.ack = row;
    bySubscriber.set(key, d);
  });
  const deliveries = [...bySubscriber.values()];
  // A reference the subscriber took while handling the event (KVM's on a BIND: DESIGN §5) is a
  // Get of its own, without the event's sequence number: it belongs to the delivery when it lies
  // between the event and the subscriber's first step for it, on the same IOASID.
  for (const d of deliveries) {
    const at = rows[d.first]!.record;
    for (let i = d.first - 1; i >= 0; i--) {
      const r = rows[i]!.record;
      if (r.seq === d.seq && r.action?.$case === "ioasidNotify") break;
      const a = r.action;
      if (
        a?.$case === "ioasidGet" &&
        r.seq === undefined &&
        r.ioasid === at.ioasid &&
        a.value.holder?.role === d.tier &&
        a.value.holder.instance === d.instance
      )
        d.first = i;
    }
  }
  return deliveries;
}

/** Builds the diagram's lines, gathering consecutive steps of one component into one self-arrow. */
class DiagramWriter {
  readonly lines: string[] = [];
  private gathered: { lane: Lane; labels: string[]; at: number } | undefined;

  line(text: string): void {
    this.gathered = undefined;
    this.lines.push(`    ${text}`);
  }

  /** A step a component did on its own (its hardware, its tables): an arrow to itself. */
  self(lane: Lane, text: string): void {
    const g = this.gathered;
    if (g !== undefined && g.lane === lane && g.labels.length < MAX_GATHERED) {
      g.labels.push(label(text));
      this.lines[g.at] = `    ${lane}->>${lane}: ${g.labels.join("<br/>")}`;
      return;
    }
    this.line(`${lane}->>${lane}: ${label(text)}`);
    this.gathered = { lane, labels: [label(text)], at: this.lines.length - 1 };
  }
}

/**
 * The timeline as a Mermaid sequence diagram (issue 17, "pictures that show delivery"):
 * - each delivery of an event as an arrow from the core to the subscriber (`core->>kvm: FREE seq 13`),
 *   what the subscriber did for it as an arrow to itself, and its acknowledgement back
 *   (`kvm-->>core: ack seq 13 · ioasid_put(vmcs)`), the subscribers in tier order; a subscriber
 *   passed over at its deadline as a crossed arrow. A delivery is found by the event's sequence
 *   number on the subscriber's own steps, the core's record of its acknowledgement
 *   (`delivery_acked`, made for every settled ack, so a subscriber with nothing to do for an event
 *   is drawn too) and the reference the acknowledgement released;
 * - a lane per IOASID (up to {@link MAX_IOASID_LANES}; past that one shared lane) with its state
 *   band: activated while ACTIVE, a second bar while FREE_PENDING, ended at the reclaim, and a
 *   note at each state or reference-count change;
 * - the IO page fault hand-offs: IOMMU → VFIO (a page-request group, a DMA fault), VFIO → guest,
 *   the guest's answer back through VFIO to the IOMMU;
 * - references taken and dropped as arrows from their holder to the core.
 */
export function renderMermaid(rows: readonly TimelineRow[]): string {
  const ordered = causalOrder(rows);
  const deliveries = findDeliveries(ordered);
  const startsAt = new Map<number, Delivery[]>();
  const endsAt = new Map<number, Delivery[]>();
  const acks = new Set<TimelineRow>();
  for (const d of deliveries) {
    startsAt.set(d.first, [...(startsAt.get(d.first) ?? []), d]);
    endsAt.set(d.last, [...(endsAt.get(d.last) ?? []), d]);
    if (d.put !== undefined) acks.add(d.put);
    if (d.ack !== undefined) acks.add(d.ack);
  }
  const events = new Map<number, string>();
  for (const row of ordered) if (eventOf(row.record) !== undefined && row.record.seq !== undefined) events.set(row.record.seq, eventOf(row.record)!);
  const instancesOf = (seq: number, tier: Lane) => deliveries.filter((d) => d.seq === seq && d.tier === tier).length;
  const eventName = (seq: number) => `${events.get(seq) ?? "event"} seq ${seq}`;
  const to = (d: Delivery) => (instancesOf(d.seq, d.tier) > 1 ? ` to ${d.instance}` : "");

  const ioasids = [...new Set(ordered.flatMap((r) => (r.record.ioasid === undefined ? [] : [r.record.ioasid])))];
  const shared = ioasids.length > MAX_IOASID_LANES;
  const laneOf = (ioasid: number) => (shared ? "ioasids" : `ioasid${ioasid}`);
  const levels = new Map<string, number>();
  const w = new DiagramWriter();
  /** A note on an IOASID's lane: its band. */
  const band = (r: HistoryRecord, text: string) => w.line(`Note over ${laneOf(r.ioasid!)}: ${label(shared ? `IOASID ${r.ioasid}: ${text}` : text, 30)}`);
  // With one IOASID in the diagram, its state is also a background band across every lane (green
  // while ACTIVE, amber while FREE_PENDING): Mermaid's rect blocks must nest, which states of
  // several IOASIDs would not.
  const banded = ioasids.length === 1;
  let rectOpen = false;
  const stateBand = (colour: string | undefined) => {
    if (!banded) return;
    if (rectOpen) w.line("end");
    rectOpen = colour !== undefined;
    if (colour !== undefined) w.line(`rect ${colour}`);
  };
  const activate = (r: HistoryRecord) => {
    if (shared) return;
    const lane = laneOf(r.ioasid!);
    levels.set(lane, (levels.get(lane) ?? 0) + 1);
    w.line(`activate ${lane}`);
  };
  let usesGuest = false;

  ordered.forEach((row, i) => {
    for (const d of startsAt.get(i) ?? []) w.line(`core->>${d.tier}: ${label(`${eventName(d.seq)}${to(d)}`)}`);
    const r = row.record;
    const a = r.action;
    const lane = COLUMN_LANE[row.column];
    const event = eventOf(r);
    if (acks.has(row)) {
      // Drawn as the acknowledgement below.
    } else if (event !== undefined && r.ioasid !== undefined) {
      const ref = r.refcount === undefined ? "" : ` · ref ${r.refcount}`;
      const seq = r.seq === undefined ? "" : ` seq ${r.seq}`;
      if (event === "ALLOC") {
        stateBand(ACTIVE_BAND);
        band(r, `ALLOC${seq} · gen ${r.generation ?? "?"} · ACTIVE${ref}`);
        activate(r);
      } else if (event === "FREE") {
        stateBand(FREE_PENDING_BAND);
        band(r, `FREE${seq} · FREE_PENDING${ref}`);
        activate(r);
      } else if (event === "RECLAIM") {
        const l = laneOf(r.ioasid);
        for (let n = levels.get(l) ?? 0; n > 0; n--) w.line(`deactivate ${l}`);
        levels.set(l, 0);
        stateBand(undefined);
        band(r, `RECLAIM${seq} · reclaimed, free again`);
      } else band(r, `${event}${seq}${r.spid === undefined ? "" : ` spid ${r.spid}`}`);
    } else if (event !== undefined) {
      w.line(`Note over core: ${label(describeStep(r))}`);
    } else if (a?.$case === "ioasidGet" || a?.$case === "ioasidPut") {
      const holder = actorRole(r);
      const from: Lane = TIERS.has(holder) ? (holder as Lane) : "core";
      w.line(`${from}->>core: ${label(`${actionName(a.$case)}(${r.ioasid ?? ""}) ${a.value.holder?.purpose ?? ""}`.trimEnd())}`);
      if (r.refcount !== undefined && r.ioasid !== undefined) band(r, `ref ${r.refcount}`);
    } else if (a?.$case === "ioasidRegisterNotifier" || a?.$case === "ioasidRegisterNotifierMm") {
      const s = a.value.scope;
      const scope = s === undefined || s.$case === "global" ? "global" : s.$case === "scopeSetId" ? `set ${s.value}` : `mm ${s.value}`;
      w.line(`${lane}->>core: ${label(`${actionName(a.$case)} ${scope} priority ${a.value.priority}${a.value.pending ? " (pending)" : ""}`)}`);
    } else if (a?.$case === "deliveryMissed") {
      const tier = TIERS.has(a.value.subscriber) ? a.value.subscriber : "core";
      w.line(`core-x${tier}: ${label(`${r.seq === undefined ? "delivery" : eventName(r.seq)} to ${a.value.instance}: missed, no ack by the deadline`)}`);
    } else if (a?.$case === "vcmdAlloc") {
      w.line(`vfio->>core: ${label(`ioasid_alloc() for container ${a.value.container} (virtual command)`)}`);
    } else if (a?.$case === "vcmdFree") {
      w.line(`vfio->>core: ${label(`ioasid_free(${r.ioasid ?? ""}) for container ${a.value.container}: ${a.value.outcome}`)}`);
    } else if (a?.$case === "iopfGroup" && a.value.owner.startsWith("vfio/")) {
      w.line(
        `iommu->>vfio: ${label(`page requests (${r.ioasid ?? ""}${r.spid === undefined ? "" : `, gpasid ${r.spid}`}): group ${a.value.group}, ${a.value.requests} request(s), device ${a.value.device} prgi ${a.value.prgi}`)}`,
      );
    } else if (a?.$case === "iopfRelay") {
      usesGuest = true;
      w.line(
        `vfio->>guest: ${label(`IO page fault group ${a.value.group}: ${a.value.requests} request(s)${r.spid === undefined ? "" : ` on gpasid ${r.spid}`}`)}`,
      );
    } else if (a?.$case === "pageResponse" && a.value.container !== undefined) {
      usesGuest = true;
      w.line(`guest->>vfio: ${label(`page response group ${a.value.group}: ${a.value.code}`)}`);
      w.line(`vfio->>iommu: ${label(`page_response() container ${a.value.container} group ${a.value.group}: ${a.value.code}`)}`);
    } else if (a?.$case === "dmaFault" && r.role === "iommu" && a.value.reportedTo.startsWith("vfio/")) {
      w.line(`iommu->>vfio: ${label(`DMA fault (${r.ioasid ?? ""}) device ${a.value.device} 0x${a.value.address.toString(16)} ${a.value.reason}`)}`);
    } else if (a?.$case === "dmaFault" && r.role === "vfio" && !a.value.noHandler) {
      usesGuest = true;
      w.line(`vfio->>guest: ${label(`DMA fault ${a.value.reason} 0x${a.value.address.toString(16)}`)}`);
    } else if (a?.$case === "iopfNoHandler" || a?.$case === "faultSessionLost") {
      w.line(`vfio->>iommu: ${label(describeStep(r))}`);
    } else if (lane === "core") {
      w.line(`Note over core: ${label(describeStep(r))}`);
    } else w.self(lane, describeStep(r));

    for (const d of endsAt.get(i) ?? []) {
      const put = d.put?.record.action;
      const ack = d.ack?.record.action;
      const released =
        put?.$case === "ioasidPut"
          ? ` · ioasid_put(${put.value.holder?.purpose ?? ""})`
          : ack?.$case === "deliveryAcked" && ack.value.releases.length > 0
            ? ` · releases ${ack.value.releases.join(", ")}`
            : "";
      w.line(`${d.tier}-->>core: ${label(`ack seq ${d.seq}${to(d)}${released}`)}`);
      if (d.put?.record.refcount !== undefined && d.put.record.ioasid !== undefined) band(d.put.record, `ref ${d.put.record.refcount}`);
    }
  });

  stateBand(undefined);
  const lanes = [
    ...DIAGRAM_LANES.filter((l) => l.id !== "guest" || usesGuest).map((l) => `    participant ${l.id} as ${l.label}`),
    ...(shared ? ["    participant ioasids as IOASIDs"] : ioasids.map((x) => `    participant ioasid${x} as IOASID ${x}`)),
  ];
  return ["sequenceDiagram", ...lanes, ...w.lines].join("\n");
}

/**
 * A self-contained HTML page with each timeline's Mermaid diagram and its table: the Mermaid
 * library is inlined (`mermaidJs`), so the file renders offline (nothing is fetched at view time).
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
<style>body{font-family:system-ui,sans-serif;margin:2em}pre{font-size:12px}.verdict{background:#f4f4f4;padding:1em}.legend{color:#444;max-width:60em}</style>
</head><body>
<h1>ioasid-fabric timeline</h1>
<p class="legend">Solid arrows from the core are deliveries of an event (tiers left to right: CPU, device, IOMMU, the order a FREE
is delivered in); dashed arrows back are acknowledgements, with the reference they released. Each IOASID has its own lane on the
right: a bar while ACTIVE, a second bar while FREE_PENDING, notes at each state and reference-count change. Arrows to the guest
are the IO page fault hand-offs.</p>
${body}
<script>${mermaidJs.replace(/<\/script/gi, "<\\/script")}</script>
<script>mermaid.initialize({ startOnLoad: true, sequence: { showSequenceNumbers: false, mirrorActors: true } });</script>
</body></html>
`;
}
