import { context, propagation, trace, type Tracer } from "@opentelemetry/api";
import type { SpanExporter } from "@opentelemetry/sdk-trace-base";
import { w3cPropagator } from "./propagation.js";

/** Options of {@link startTracing}: where finished spans go. Nothing configured: no tracing. */
export interface TracingOptions {
  /** The process's service (`ioasid-core`, `kvm`…): the resource's `service.name`. */
  readonly service: string;
  /** Append finished spans to this file as JSON lines (`IOASID_TRACE_FILE`). @default none */
  readonly file?: string;
  /**
   * Base URL of an OTLP/HTTP collector (`OTEL_EXPORTER_OTLP_ENDPOINT`, e.g. `http://127.0.0.1:4318`);
   * spans are sent to `<endpoint>/v1/traces`. @default none
   */
  readonly otlpEndpoint?: string;
  /** Full URL of an OTLP/HTTP traces endpoint (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), used as is. @default none */
  readonly otlpTracesEndpoint?: string;
  /** Further exporters (a test's in-memory one). @default none */
  readonly exporters?: readonly SpanExporter[];
  /** Longest a finished span waits before it is exported, in ms. @default 500 */
  readonly exportDelayMs?: number;
}

/** Tracing as {@link startTracing} set it up. */
export interface Tracing {
  /** What the spans go to, for the start-up log line (`file:/tmp/t.jsonl`, `otlp:http://…/v1/traces`). */
  readonly exporters: readonly string[];
  /** Exports every finished span now. */
  forceFlush(): Promise<void>;
  /** Exports what is left and stops tracing (the API's no-ops again). Idempotent. */
  shutdown(): Promise<void>;
}

let started = false;

/** True once {@link startTracing} registered an SDK in this process (until its shutdown). */
export function tracingStarted(): boolean {
  return started;
}

const TRACER_NAME = "ioasid-fabric";
let current: Tracer = trace.getTracer(TRACER_NAME);

/**
 * The fabric's tracer: the API's no-op until {@link startTracing} registers an SDK, and again after
 * its shutdown (the API's own proxy would keep the first SDK tracer it found).
 */
export const tracer: Pick<Tracer, "startSpan"> = {
  startSpan: (name, options, ctx) => current.startSpan(name, options, ctx),
};

/**
 * Starts tracing in this process when an exporter is configured, and does nothing (returns
 * undefined) when none is: then no SDK is loaded or registered and every span the fabric starts is
 * the OpenTelemetry API's no-op, which still passes on a context received from a caller.
 *
 * With an exporter: an SDK tracer provider (parent-based sampling: a caller's "not sampled"
 * decision is kept), the AsyncLocalStorage context manager (the active span follows async calls),
 * the W3C propagator, and a batch processor per exporter. The SDK is imported here only.
 *
 * @throws Error when the trace file cannot be opened.
 * @example
 * const tracing = await startTracing({ service: "kvm", file: process.env.IOASID_TRACE_FILE });
 * // … at exit
 * await tracing?.shutdown();
 */
export async function startTracing(options: TracingOptions): Promise<Tracing | undefined> {
  const file = options.file?.trim() ?? "";
  const otlpUrl = otlpTracesUrl(options);
  if (file === "" && otlpUrl === undefined && (options.exporters ?? []).length === 0) return undefined;
  if (started) throw new Error("startTracing: tracing is already started in this process");
  const [{ BasicTracerProvider, BatchSpanProcessor, ParentBasedSampler, AlwaysOnSampler }, { resourceFromAttributes }, { AsyncLocalStorageContextManager }] =
    await Promise.all([import("@opentelemetry/sdk-trace-base"), import("@opentelemetry/resources"), import("@opentelemetry/context-async-hooks")]);
  const exporters: Array<[string, SpanExporter]> = [];
  if (file !== "") {
    const { FileSpanExporter } = await import("./file-span-exporter.js");
    const exporter = new FileSpanExporter(file);
    exporters.push([`file:${exporter.path}`, exporter]);
  }
  if (otlpUrl !== undefined) {
    const { OTLPTraceExporter } = await import("@opentelemetry/exporter-trace-otlp-http");
    exporters.push([`otlp:${otlpUrl}`, new OTLPTraceExporter({ url: otlpUrl })]);
  }
  for (const e of options.exporters ?? []) exporters.push(["custom", e]);
  const delay = options.exportDelayMs ?? 500;
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ "service.name": options.service, "process.pid": process.pid }),
    sampler: new ParentBasedSampler({ root: new AlwaysOnSampler() }),
    spanProcessors: exporters.map(([, e]) => new BatchSpanProcessor(e, { scheduledDelayMillis: delay })),
  });
  const contextManager = new AsyncLocalStorageContextManager().enable();
  context.setGlobalContextManager(contextManager);
  trace.setGlobalTracerProvider(provider);
  propagation.setGlobalPropagator(w3cPropagator);
  current = provider.getTracer(TRACER_NAME);
  started = true;
  let stopping: Promise<void> | undefined;
  return {
    exporters: exporters.map(([name]) => name),
    forceFlush: () => provider.forceFlush(),
    shutdown: () =>
      (stopping ??= (async () => {
        try {
          await provider.shutdown();
        } finally {
          trace.disable();
          context.disable();
          propagation.disable();
          current = trace.getTracer(TRACER_NAME);
          started = false;
        }
      })()),
  };
}

/** The OTLP/HTTP traces URL the options name, if any (the signal-specific one wins, as in the spec). */
function otlpTracesUrl(options: TracingOptions): string | undefined {
  const traces = options.otlpTracesEndpoint?.trim() ?? "";
  if (traces !== "") return traces;
  const base = options.otlpEndpoint?.trim() ?? "";
  return base === "" ? undefined : `${base.replace(/\/+$/, "")}/v1/traces`;
}
