import { describeAction, stepLabel, type HistoryRecord } from "@ioasid/bus";
import { parseChaosRecord } from "@ioasid/checker";
import type { Verdict } from "@ioasid/checker";

/** What {@link renderChaosReport} shows. */
export interface ChaosReportInput {
  readonly title: string;
  /** The run's history (any order). */
  readonly history: readonly HistoryRecord[];
  readonly verdict: Verdict;
  /** The verdict as text (renderVerdict). */
  readonly verdictText: string;
  /** The summary as text (renderStats). */
  readonly summaryText: string;
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

const COLORS = { ok: "#2e8b57", fail: "#9a9a9a", info: "#e08a00", crash: "#c0392b", fault: "#c0392b55", violation: "#d00000" } as const;

interface Lane {
  readonly label: string;
  readonly marks: string[];
}

/**
 * The HTML report of a chaos run: one self-contained page (inline SVG and CSS, no script, nothing
 * fetched) with the summary, a timeline — one lane per fault target with each fault as a bar from
 * its injection to its heal, one lane per guest with each operation as a tick at its completion
 * (green ok, grey fail, orange info, red crash), a lane of violations at the times of their
 * evidence — and the verdict with its traces. Hover a mark for its record. Pure.
 */
export function renderChaosReport(input: ChaosReportInput): string {
  const records = [...input.history].sort((a, b) => a.ts - b.ts);
  const t0 = records[0]?.ts ?? 0;
  const t1 = Math.max(t0 + 1, records.at(-1)?.ts ?? t0 + 1);
  const W = 1100;
  const LEFT = 130;
  const LANE = 16;
  const x = (ts: number) => (LEFT + ((ts - t0) / (t1 - t0)) * (W - LEFT - 10)).toFixed(1);
  const rel = (ts: number) => `+${((ts - t0) / 1000).toFixed(3)} s`;

  const faultLanes = new Map<string, Lane>();
  const guestLanes = new Map<string, Lane>();
  const open = new Map<number, { start: number; lane: Lane; text: string }>();
  const faultLane = (target: string) => {
    let lane = faultLanes.get(target);
    if (lane === undefined) faultLanes.set(target, (lane = { label: `fault: ${target}`, marks: [] }));
    return lane;
  };
  const bar = (lane: Lane, from: number, to: number, text: string) =>
    lane.marks.push(
      `<rect x="${x(from)}" y="2" width="${Math.max(2, Number(x(to)) - Number(x(from))).toFixed(1)}" height="${LANE - 4}" fill="${COLORS.fault}"><title>${esc(text)}</title></rect>`,
    );

  for (const r of records) {
    const e = parseChaosRecord(r);
    if (e === undefined) continue;
    if (e.kind === "fault") {
      const m = e.marker;
      const text = `${rel(r.ts)} ${m.fault} of ${m.target}${m.link === undefined ? "" : ` (${m.link} link)`}${m.latencyMs === undefined ? "" : ` ${m.latencyMs}±${m.jitterMs ?? 0} ms`}${m.probability === undefined ? "" : ` p=${m.probability}`}`;
      open.set(m.faultId ?? -open.size - 1, { start: r.ts, lane: faultLane(m.target), text });
    } else if (e.kind === "heal") {
      const ids = e.marker.faultId === undefined ? [...open.keys()] : [e.marker.faultId];
      for (const id of ids) {
        const f = open.get(id);
        if (f === undefined) continue;
        open.delete(id);
        bar(f.lane, f.start, r.ts, `${f.text}, healed at ${rel(r.ts)}`);
      }
      if (e.marker.faultId === undefined)
        faultLane("all").marks.push(
          `<line x1="${x(r.ts)}" x2="${x(r.ts)}" y1="0" y2="${LANE}" stroke="#000"><title>${esc(`${rel(r.ts)} everything healed`)}</title></line>`,
        );
    } else if (e.kind === "op" && e.action !== "invoke") {
      const vm = e.op.vm ?? "driver";
      let lane = guestLanes.get(vm);
      if (lane === undefined) guestLanes.set(vm, (lane = { label: vm, marks: [] }));
      const crash = e.op.op === "crash";
      const color = crash ? COLORS.crash : COLORS[e.action];
      const text = `${rel(r.ts)} ${e.op.op} ${e.action}${e.op.ioasid === undefined ? "" : ` ioasid ${e.op.ioasid}`}${e.op.latencyMs === undefined ? "" : ` (${e.op.latencyMs} ms)`}${e.op.error === undefined ? "" : ` ${e.op.error}`}`;
      lane.marks.push(
        crash
          ? `<path d="M${Number(x(r.ts)) - 4} 2 l8 ${LANE - 4} M${Number(x(r.ts)) + 4} 2 l-8 ${LANE - 4}" stroke="${color}" stroke-width="2"><title>${esc(text)}</title></path>`
          : `<rect x="${x(r.ts)}" y="3" width="2" height="${LANE - 6}" fill="${color}"><title>${esc(text)}</title></rect>`,
      );
    }
  }
  for (const f of open.values()) bar(f.lane, f.start, t1, `${f.text}, never healed`);

  const violations: Lane = { label: "violations", marks: [] };
  input.verdict.violations.forEach((v, i) => {
    for (const line of v.trace.filter((l) => l.evidence)) {
      violations.marks.push(
        `<line x1="${x(line.record.ts)}" x2="${x(line.record.ts)}" y1="0" y2="${LANE}" stroke="${COLORS.violation}" stroke-width="2"><title>${esc(`#${i + 1} ${v.invariant}: ${v.message}\n${rel(line.record.ts)} ${line.record.role}/${line.record.instance} ${stepLabel(line.record)} ${describeAction(line.record) ?? ""}`.trimEnd())}</title></line>`,
      );
    }
  });

  const lanes = [
    ...[...faultLanes.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([, l]) => l),
    ...[...guestLanes.entries()].sort(([a], [b]) => Number(a.slice(1)) - Number(b.slice(1)) || a.localeCompare(b)).map(([, l]) => l),
    violations,
  ];
  const H = 20 + lanes.length * LANE;
  const ticks: string[] = [];
  const step = Math.max(1000, Math.ceil((t1 - t0) / 12 / 1000) * 1000);
  for (let t = 0; t <= t1 - t0; t += step)
    ticks.push(
      `<line x1="${x(t0 + t)}" x2="${x(t0 + t)}" y1="0" y2="${H - 18}" stroke="#eee"/><text x="${x(t0 + t)}" y="${H - 4}" font-size="10" text-anchor="middle">${t / 1000}s</text>`,
    );
  const body = lanes
    .map((l, i) => `<g transform="translate(0 ${i * LANE})"><text x="4" y="${LANE - 4}" font-size="11">${esc(l.label)}</text>${l.marks.join("")}</g>`)
    .join("\n");
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="monospace">${ticks.join("")}\n${body}</svg>`;

  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(input.title)}</title>
<style>body{font-family:sans-serif;margin:1.5em;color:#222}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px;white-space:pre-wrap}
.ok{color:${COLORS.ok}}.bad{color:${COLORS.violation}}.legend span{display:inline-block;margin-right:1.2em}</style></head>
<body>
<h1>${esc(input.title)}</h1>
<p class="${input.verdict.ok ? "ok" : "bad"}"><b>${input.verdict.ok ? "No violation" : `${input.verdict.violations.length} violation(s)`}</b> of DESIGN §7 in ${input.verdict.records} records.</p>
<pre>${esc(input.summaryText)}</pre>
<h2>Timeline</h2>
<p class="legend"><span style="color:${COLORS.ok}">▮ ok</span><span style="color:${COLORS.fail}">▮ fail</span><span style="color:${COLORS.info}">▮ info (indeterminate)</span><span style="color:${COLORS.crash}">✕ VMM crash</span><span style="color:#c0392b99">▬ fault, injection → heal</span><span style="color:${COLORS.violation}">| violation evidence</span> (hover for details)</p>
${svg}
<h2>Verdict</h2>
<pre>${esc(input.verdictText)}</pre>
</body></html>
`;
}
