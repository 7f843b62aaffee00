import { core, iommu, vdcm } from "@ioasid/proto";
import { enumName, INSPECT_SECTIONS, renderInspectText, type InspectSnapshot } from "./inspect.js";
import { wrapText } from "./text-wrap.js";

/** The columns of the state picture, left to right: who owns what, down to the hardware. */
export const GRAPH_COLUMNS = ["set", "ioasid", "holder", "entry"] as const;
export type GraphNodeKind = (typeof GRAPH_COLUMNS)[number];

/** How a node is drawn: healthy, on its way out, wrong (a violation to look at), or unknown. */
export type GraphTone = "ok" | "pending" | "bad" | "neutral" | "unknown";

/** One box of the picture. */
export interface GraphNode {
  readonly id: string;
  readonly kind: GraphNodeKind;
  /** Its text, a line each (the first is its name). */
  readonly lines: readonly string[];
  readonly tone: GraphTone;
  /** The node it hangs from, in the column to its left (none for a set, or an IOASID no set answers for). */
  readonly parent?: string;
}

/** Sets → IOASIDs → their holders → the hardware entries each holder's reference stands for. */
export interface StateGraph {
  readonly nodes: readonly GraphNode[];
  /** The services that did not answer, with why (their part of the picture is missing). */
  readonly unreachable: InspectSnapshot["unreachable"];
}

/**
 * The picture of one `inspect`: each set, its IOASIDs, each IOASID's holders, and under each
 * holder the hardware entries its reference stands for (DESIGN §5): KVM's VMCS PASID translations,
 * VDCM's device PASID entries (by work queue), the IOMMU's PASID-table entries. An entry no
 * reference accounts for, or for an IOASID the core does not have (S9: nothing live for a
 * reclaimed PASID), hangs from its IOASID, drawn as wrong.
 */
export function buildStateGraph(s: InspectSnapshot): StateGraph {
  const nodes: GraphNode[] = [];
  const coreDown = s.core === undefined;
  const ioasids = new Map((s.core?.ioasids ?? []).map((x) => [x.ioasid, x]));
  const containers = new Map((s.vfio?.containers ?? []).map((c) => [c.setId, c]));
  for (const set of s.core?.sets ?? []) {
    const c = containers.get(set.setId);
    nodes.push({
      id: `set${set.setId}`,
      kind: "set",
      lines: [
        `set ${set.setId}${set.freeing ? " · FREEING" : ""}`,
        `token ${set.token} · quota ${set.quota} · in use ${set.inUse}`,
        ...(c === undefined ? [] : [`VFIO container ${c.containerId}${c.vmName === "" ? "" : ` (${c.vmName})`}`]),
      ],
      tone: set.freeing ? "pending" : "neutral",
    });
  }
  const holderIds = new Map<string, string>();
  for (const x of s.core?.ioasids ?? []) {
    const state = enumName(core.ioasidStateToJSON(x.state), "IOASID_STATE_");
    nodes.push({
      id: `ioasid${x.ioasid}`,
      kind: "ioasid",
      lines: [`IOASID ${x.ioasid} · gen ${x.generation}`, `${state} · spid ${x.spid || "-"} · refs ${x.refcount}`],
      tone: x.state === core.IoasidState.IOASID_STATE_FREE_PENDING ? "pending" : "ok",
      ...(nodes.some((n) => n.id === `set${x.setId}`) ? { parent: `set${x.setId}` } : {}),
    });
    x.holders.forEach((h, i) => {
      const id = `ioasid${x.ioasid}h${i}`;
      const who = h.holder!;
      holderIds.set(`${x.ioasid}/${who.role}/${who.instance}/${who.purpose}`, id);
      nodes.push({
        id,
        kind: "holder",
        lines: [`${who.role}/${who.instance}`, `${who.purpose}${h.count > 1 ? ` ×${h.count}` : ""}`],
        tone: "neutral",
        parent: `ioasid${x.ioasid}`,
      });
    });
  }
  /** An IOASID an entry names that the core does not list: drawn once, as wrong (or unknown, the core being down). */
  const unlisted = (pasid: number): string => {
    const id = `ioasid${pasid}`;
    if (!nodes.some((n) => n.id === id))
      nodes.push({
        id,
        kind: "ioasid",
        lines: [`IOASID ${pasid}`, coreDown ? "core unreachable" : "not allocated: S9"],
        tone: coreDown ? "unknown" : "bad",
      });
    return id;
  };
  /** The node an entry of `pasid` hangs from: the holder its reference is, else the IOASID (and the entry is wrong). */
  const parentOf = (pasid: number, holder: (who: core.Holder) => boolean, generation: number): { parent: string; problem?: string } => {
    const x = ioasids.get(pasid);
    if (x === undefined) return { parent: unlisted(pasid), ...(coreDown ? {} : { problem: "no IOASID" }) };
    if (generation !== 0 && generation !== x.generation)
      return { parent: `ioasid${pasid}`, problem: `generation ${generation}, the IOASID's is ${x.generation}` };
    const i = x.holders.findIndex((h) => h.holder !== undefined && holder(h.holder));
    if (i < 0) return { parent: `ioasid${pasid}`, problem: "no reference held for it" };
    return { parent: `ioasid${pasid}h${i}` };
  };
  const entry = (id: string, lines: string[], where: { parent: string; problem?: string }) =>
    // Device ids are PCI addresses ("0000:6a:01.0"): a Mermaid id is letters, digits and "_".
    nodes.push({
      id: id.replace(/[^A-Za-z0-9_]/g, "_"),
      kind: "entry",
      lines: where.problem === undefined ? lines : [...lines, where.problem],
      tone: where.problem === undefined ? "ok" : "bad",
      parent: where.parent,
    });

  for (const vm of s.kvm?.vms ?? [])
    for (const t of vm.translations)
      entry(
        `kvm${vm.vmId}g${t.gpasid}`,
        [`KVM VMCS · vm ${vm.vmId}${vm.vmName === "" ? "" : ` (${vm.vmName})`}`, `gpasid ${t.gpasid} → hpasid ${t.hpasid}`],
        // KVM's reference for a translation: holder kvm/vm-<id>/vmcs (DESIGN §5 "KVM").
        parentOf(t.hpasid, (h) => h.role === "kvm" && h.instance === `vm-${vm.vmId}`, t.generation),
      );
  for (const dev of s.vdcm?.devices ?? [])
    for (const e of dev.pasidEntries)
      entry(
        `vdcm${dev.deviceId}w${e.wqId}p${e.hpasid}`,
        [
          `VDCM ${dev.deviceId} wq ${e.wqId}`,
          `hpasid ${e.hpasid}${e.gpasid === 0 ? "" : ` · gpasid ${e.gpasid}`} · ${enumName(vdcm.devicePasidEntryStateToJSON(e.state), "DEVICE_PASID_ENTRY_STATE_")}`,
        ],
        // VDCM's reference for a programmed work queue: purpose "<device>.wq<id>" (DESIGN §5 "VDCM").
        parentOf(e.hpasid, (h) => h.role === "vdcm" && h.purpose === `${dev.deviceId}.wq${e.wqId}`, e.generation),
      );
  for (const dev of s.iommu?.devices ?? [])
    for (const e of dev.pasidEntries) {
      // The RID_PASID entry (requests without PASID) is no IOASID's.
      if (e.withoutPasid) continue;
      entry(
        `iommu${dev.deviceId}p${e.pasid}`,
        [
          `IOMMU ${dev.deviceId} PASID ${e.pasid}`,
          `${enumName(iommu.domainTypeToJSON(e.domainType), "DOMAIN_TYPE_")} domain ${e.domainId} · handle ${e.handleId}${e.gpasid === 0 ? "" : ` · gpasid ${e.gpasid}`}`,
        ],
        parentOf(e.pasid, (h) => h.role === "iommu", e.generation),
      );
    }
  return { nodes, unreachable: s.unreachable };
}

const TONES: Record<GraphTone, { fill: string; stroke: string }> = {
  ok: { fill: "#e8f5e9", stroke: "#2e7d32" },
  pending: { fill: "#fff3e0", stroke: "#e08a00" },
  bad: { fill: "#fdecea", stroke: "#c62828" },
  neutral: { fill: "#eef2fb", stroke: "#3f51b5" },
  unknown: { fill: "#f0f0f0", stroke: "#888888" },
};

/** The state picture as a Mermaid flowchart (`inspect --mermaid`), for a Markdown page or mermaid.live. */
export function renderStateMermaid(g: StateGraph): string {
  const text = (lines: readonly string[]) => lines.map((l) => l.replace(/"/g, "#quot;").replace(/</g, "#lt;").replace(/>/g, "#gt;")).join("<br/>");
  const out = ["flowchart LR"];
  for (const n of g.nodes) out.push(`    ${n.id}["${text(n.lines)}"]`);
  for (const n of g.nodes) if (n.parent !== undefined) out.push(`    ${n.parent} --> ${n.id}`);
  for (const [section, reason] of Object.entries(g.unreachable))
    out.push(`    down_${section}["${text([`${section}: UNREACHABLE`, ...wrapText(reason, 40)])}"]`);
  for (const [tone, c] of Object.entries(TONES)) out.push(`    classDef ${tone} fill:${c.fill},stroke:${c.stroke}`);
  for (const tone of Object.keys(TONES)) {
    const ids = [...g.nodes.filter((n) => n.tone === tone).map((n) => n.id), ...(tone === "bad" ? Object.keys(g.unreachable).map((s) => `down_${s}`) : [])];
    if (ids.length > 0) out.push(`    class ${ids.join(",")} ${tone}`);
  }
  return out.join("\n");
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

/** Sizes of the drawing, px. */
const BOX_WIDTH = 270;
const COLUMN_GAP = 70;
const LINE_HEIGHT = 15;
const PAD = 7;
const ROW_GAP = 10;
const MARGIN = 20;
/** Characters per line in a box (12 px monospace is about 7.2 px a character). */
const BOX_CHARS = 35;

/**
 * The state picture as an SVG drawn here (no script, nothing fetched): a column per kind, each
 * node a box under the column's title, a curve from each node to the ones that hang from it.
 */
export function renderStateSvg(g: StateGraph): string {
  const textOf = new Map(g.nodes.map((n) => [n.id, n.lines.flatMap((l) => wrapText(l, BOX_CHARS))]));
  const height = (id: string) => textOf.get(id)!.length * LINE_HEIGHT + 2 * PAD;
  const children = new Map<string, GraphNode[]>();
  for (const n of g.nodes) if (n.parent !== undefined) children.set(n.parent, [...(children.get(n.parent) ?? []), n]);
  const place = new Map<string, { x: number; y: number; h: number }>();
  const banner = Object.entries(g.unreachable).map(([section, reason]) => `${section}: UNREACHABLE (${reason})`);
  const top = MARGIN + banner.length * 18 + (banner.length > 0 ? 10 : 0) + 30;
  /** Lays out `n` and what hangs from it from `y` down; returns where the next sibling starts. */
  const layout = (n: GraphNode, y: number): number => {
    const h = height(n.id);
    const kids = children.get(n.id) ?? [];
    let next = y;
    for (const k of kids) next = layout(k, next);
    const span = kids.length === 0 ? h : next - ROW_GAP - y;
    const ny = y + Math.max(0, (span - h) / 2);
    place.set(n.id, { x: MARGIN + GRAPH_COLUMNS.indexOf(n.kind) * (BOX_WIDTH + COLUMN_GAP), y: ny, h });
    return Math.max(next, ny + h + ROW_GAP);
  };
  let y = top;
  for (const kind of GRAPH_COLUMNS) for (const n of g.nodes) if (n.kind === kind && n.parent === undefined) y = layout(n, y);
  const width = 2 * MARGIN + GRAPH_COLUMNS.length * BOX_WIDTH + (GRAPH_COLUMNS.length - 1) * COLUMN_GAP;
  const totalHeight = Math.max(y, top + 40) + MARGIN;
  const titles = ["sets", "IOASIDs", "holders (references)", "hardware entries"];
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${totalHeight}" viewBox="0 0 ${width} ${totalHeight}" font-family="ui-monospace, Menlo, Consolas, monospace" font-size="12" role="img" aria-label="IOASID state: sets, IOASIDs, holders, hardware entries">`,
    `<rect width="100%" height="100%" fill="#ffffff"/>`,
    ...banner.map(
      (b, i) => `<text class="unreachable" x="${MARGIN}" y="${MARGIN + 12 + i * 18}" fill="${TONES.bad.stroke}" font-weight="bold">${esc(b)}</text>`,
    ),
    ...titles.map(
      (t, i) =>
        `<text x="${MARGIN + i * (BOX_WIDTH + COLUMN_GAP)}" y="${top - 12}" font-family="system-ui, sans-serif" font-size="14" font-weight="bold" fill="#333">${esc(t)}</text>`,
    ),
  ];
  for (const n of g.nodes) {
    if (n.parent === undefined) continue;
    const a = place.get(n.parent);
    const b = place.get(n.id);
    if (a === undefined || b === undefined) continue;
    const x1 = a.x + BOX_WIDTH;
    const y1 = a.y + a.h / 2;
    const x2 = b.x;
    const y2 = b.y + b.h / 2;
    const mid = (x1 + x2) / 2;
    out.push(
      `<path class="edge" data-from="${n.parent}" data-to="${n.id}" d="M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}" fill="none" stroke="${n.tone === "bad" ? TONES.bad.stroke : "#9aa3b5"}" stroke-width="1.5"/>`,
    );
  }
  for (const n of g.nodes) {
    const p = place.get(n.id)!;
    const c = TONES[n.tone];
    const lines = textOf.get(n.id)!;
    out.push(
      `<g class="node" data-kind="${n.kind}" data-id="${n.id}" data-tone="${n.tone}">` +
        `<rect x="${p.x}" y="${p.y}" width="${BOX_WIDTH}" height="${p.h}" rx="6" fill="${c.fill}" stroke="${c.stroke}" stroke-width="1.5"/>` +
        lines
          .map((l, i) => `<text x="${p.x + PAD}" y="${p.y + PAD + 11 + i * LINE_HEIGHT}"${i === 0 ? ' font-weight="bold"' : ""} fill="#222">${esc(l)}</text>`)
          .join("") +
        "</g>",
    );
  }
  out.push("</svg>");
  return out.join("\n");
}

/**
 * `inspect --html`: one self-contained page — the drawing (inline SVG), the report as text, and
 * the Mermaid source of the same picture. No script and nothing fetched, so it opens offline.
 */
export function renderStateHtml(s: InspectSnapshot, options: { title?: string; takenAt?: Date } = {}): string {
  const g = buildStateGraph(s);
  const title = options.title ?? "ioasid-fabric state";
  const down = Object.keys(s.unreachable);
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>body{font-family:system-ui,sans-serif;margin:2em}pre{font-size:12px;background:#f7f7f7;padding:1em;overflow:auto}.unreachable{color:#c62828;font-weight:bold}.legend span{display:inline-block;padding:0 .6em;margin-right:.6em;border:1.5px solid}</style>
</head><body>
<h1>${esc(title)}</h1>
<p>${options.takenAt === undefined ? "" : `Taken at ${esc(options.takenAt.toISOString())}. `}Sets → IOASIDs → the holders of their references → the hardware entries each reference stands for (${INSPECT_SECTIONS.length - down.length} of ${INSPECT_SECTIONS.length} services answered).</p>
${down.map((d) => `<p class="unreachable">${esc(`${d}: UNREACHABLE (${s.unreachable[d as keyof typeof s.unreachable]})`)}</p>`).join("\n")}
<p class="legend">${(["ok", "pending", "bad", "neutral", "unknown"] as const)
    .map(
      (t) =>
        `<span style="background:${TONES[t].fill};border-color:${TONES[t].stroke}">${{ ok: "active / accounted for", pending: "FREE_PENDING / freeing", bad: "wrong: no reference, stale, not allocated", neutral: "set / holder", unknown: "not known (core unreachable)" }[t]}</span>`,
    )
    .join("")}</p>
${renderStateSvg(g)}
<h2>report</h2>
<pre>${esc(renderInspectText(s))}</pre>
<details><summary>Mermaid source of the picture</summary><pre>${esc(renderStateMermaid(g))}</pre></details>
</body></html>
`;
}
