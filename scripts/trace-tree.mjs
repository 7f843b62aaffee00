#!/usr/bin/env node
// Prints the traces of a trace file (IOASID_TRACE_FILE: one span a JSON line) as trees, one line a
// span: offset from the trace's start, duration, service, name and the attributes that say what
// it was about. Usage: node scripts/trace-tree.mjs FILE [TRACE_ID_PREFIX | --grep TEXT]
import { readFileSync } from "node:fs";

const [file, ...rest] = process.argv.slice(2);
if (file === undefined || file === "--help" || file === "-h") {
  process.stderr.write("usage: node scripts/trace-tree.mjs FILE [TRACE_ID_PREFIX | --grep TEXT]\n");
  process.exit(file === undefined ? 2 : 0);
}
// Piped into head: stop quietly when the reader is gone.
process.stdout.on("error", (err) => process.exit(err.code === "EPIPE" ? 0 : 1));
const grep = rest[0] === "--grep" ? rest[1] : undefined;
const prefix = rest[0] !== "--grep" ? rest[0] : undefined;
const spans = [];
for (const line of readFileSync(file, "utf8").split("\n")) {
  if (line.trim() === "") continue;
  try {
    spans.push(JSON.parse(line));
  } catch {
    // a line cut by a crash
  }
}
const byTrace = new Map();
for (const s of spans) {
  if (!byTrace.has(s.traceId)) byTrace.set(s.traceId, []);
  byTrace.get(s.traceId).push(s);
}
const SHOWN = [
  "ioasid.op",
  "ioasid.event",
  "ioasid.ioasid",
  "ioasid.generation",
  "ioasid.seq",
  "ioasid.subscriber",
  "ioasid.tier",
  "ioasid.delivery.outcome",
  "ioasid.ack.releases",
  "rpc.grpc.status_code",
];
let printed = 0;
for (const [traceId, list] of byTrace) {
  if (prefix !== undefined && !traceId.startsWith(prefix)) continue;
  if (grep !== undefined && !list.some((s) => JSON.stringify(s).includes(grep))) continue;
  const ids = new Set(list.map((s) => s.spanId));
  const children = new Map();
  for (const s of list) {
    const parent = s.parentSpanId !== undefined && ids.has(s.parentSpanId) ? s.parentSpanId : "";
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(s);
  }
  for (const c of children.values()) c.sort((a, b) => a.startMs - b.startMs);
  const t0 = Math.min(...list.map((s) => s.startMs));
  process.stdout.write(`trace ${traceId} (${list.length} spans)\n`);
  const walk = (parent, depth) => {
    for (const s of children.get(parent) ?? []) {
      const attrs = SHOWN.filter((k) => s.attributes?.[k] !== undefined).map(
        (k) => `${k.replace(/^ioasid\.|^rpc\.grpc\./, "")}=${JSON.stringify(s.attributes[k])}`,
      );
      const status = s.status?.code === "ERROR" ? ` ERROR ${s.status.message ?? ""}` : "";
      process.stdout.write(
        `${`+${(s.startMs - t0).toFixed(1)}ms`.padStart(10)} ${`${s.durationMs.toFixed(1)}ms`.padStart(9)}  ${"  ".repeat(depth)}${s.service}: ${s.name}${attrs.length === 0 ? "" : `  ${attrs.join(" ")}`}${status}\n`,
      );
      walk(s.spanId, depth + 1);
    }
  };
  walk("", 0);
  printed++;
}
if (printed === 0) {
  process.stderr.write(`no trace in ${file}${prefix === undefined ? "" : ` starts with ${prefix}`}${grep === undefined ? "" : ` mentions ${grep}`}\n`);
  process.exit(1);
}
