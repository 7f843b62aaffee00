import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { SpanKind, SpanStatusCode, type HrTime } from "@opentelemetry/api";
import { ExportResultCode, type ExportResult } from "@opentelemetry/core";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace-base";

/** One finished span as a line of a trace file ({@link FileSpanExporter}). */
export interface SpanRecord {
  readonly traceId: string;
  readonly spanId: string;
  /** Absent on a root span. */
  readonly parentSpanId?: string;
  readonly name: string;
  /** `INTERNAL`, `SERVER`, `CLIENT`, `PRODUCER` or `CONSUMER`. */
  readonly kind: string;
  /** The process's service (`ioasid-core`, `kvm`…): the resource's `service.name`. */
  readonly service: string;
  /** Start, in ms since the epoch (fractional). */
  readonly startMs: number;
  readonly durationMs: number;
  /** `UNSET`, `OK` or `ERROR`, with the message of an error. */
  readonly status: { readonly code: string; readonly message?: string };
  readonly attributes: Readonly<Record<string, unknown>>;
  readonly events?: ReadonlyArray<{ readonly name: string; readonly timeMs: number; readonly attributes?: Readonly<Record<string, unknown>> }>;
  readonly links?: ReadonlyArray<{ readonly traceId: string; readonly spanId: string }>;
}

const hrMs = (t: HrTime): number => t[0] * 1e3 + t[1] / 1e6;

/** The {@link SpanRecord} of a finished span. */
export function toSpanRecord(span: ReadableSpan): SpanRecord {
  const sc = span.spanContext();
  const parent = span.parentSpanContext?.spanId;
  return {
    traceId: sc.traceId,
    spanId: sc.spanId,
    ...(parent === undefined ? {} : { parentSpanId: parent }),
    name: span.name,
    kind: SpanKind[span.kind] ?? String(span.kind),
    service: String(span.resource.attributes["service.name"] ?? ""),
    startMs: Math.round(hrMs(span.startTime) * 1000) / 1000,
    durationMs: Math.round(hrMs(span.duration) * 1000) / 1000,
    status: {
      code: SpanStatusCode[span.status.code] ?? String(span.status.code),
      ...(span.status.message === undefined || span.status.message === "" ? {} : { message: span.status.message }),
    },
    attributes: { ...span.attributes },
    ...(span.events.length === 0
      ? {}
      : {
          events: span.events.map((e) => ({ name: e.name, timeMs: hrMs(e.time), ...(e.attributes === undefined ? {} : { attributes: { ...e.attributes } }) })),
        }),
    ...(span.links.length === 0 ? {} : { links: span.links.map((l) => ({ traceId: l.context.traceId, spanId: l.context.spanId })) }),
  };
}

/**
 * A span exporter that appends finished spans to a file as JSON lines (one {@link SpanRecord} a
 * line), for looking at a trace with `jq` or `ioasidctl`-free tooling when no collector runs.
 * Every export is one append (`O_APPEND`), so the processes of one stack may share a file: lines
 * of different processes interleave but never mix.
 */
export class FileSpanExporter implements SpanExporter {
  /** The file, as an absolute path (a relative one is resolved against the working directory). */
  readonly path: string;
  #fd: number | undefined;

  /** @throws Error when the file cannot be opened for appending (its directory is created). */
  constructor(path: string) {
    this.path = resolve(path);
    mkdirSync(dirname(this.path), { recursive: true });
    this.#fd = openSync(this.path, "a");
  }

  export(spans: ReadableSpan[], resultCallback: (result: ExportResult) => void): void {
    if (this.#fd === undefined) {
      resultCallback({ code: ExportResultCode.FAILED, error: new Error(`trace file ${this.path} is closed`) });
      return;
    }
    try {
      let text = "";
      for (const span of spans) text += `${JSON.stringify(toSpanRecord(span))}\n`;
      if (text !== "") writeSync(this.#fd, text);
      resultCallback({ code: ExportResultCode.SUCCESS });
    } catch (err) {
      resultCallback({ code: ExportResultCode.FAILED, error: err instanceof Error ? err : new Error(String(err)) });
    }
  }

  async forceFlush(): Promise<void> {}

  async shutdown(): Promise<void> {
    if (this.#fd !== undefined) closeSync(this.#fd);
    this.#fd = undefined;
  }
}

/**
 * The spans of a trace file's text, in file order. Lines that are not span records (a line cut by
 * a crash) are skipped.
 */
export function parseSpanRecords(text: string): SpanRecord[] {
  const out: SpanRecord[] = [];
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    try {
      const r = JSON.parse(line) as SpanRecord;
      if (typeof r.traceId === "string" && typeof r.spanId === "string" && typeof r.name === "string") out.push(r);
    } catch {
      // a partial line: skipped
    }
  }
  return out;
}
