import { startTracing, type Tracing } from "@ioasid/trace";
import type { Logger } from "pino";
import { defineConfigSchema } from "./load-config.js";

/**
 * Environment variables of traces (DESIGN §13), the same in every service (spread into its schema).
 * Nothing set: no tracing SDK is loaded and the fabric's spans are the OpenTelemetry API's no-ops.
 */
export const traceConfig = defineConfigSchema({
  traceFile: {
    name: "IOASID_TRACE_FILE",
    kind: "string",
    default: "",
    doc: "Append the process's finished trace spans to this file as JSON lines (one span a line; the services of one stack may share the file). Empty: no file.",
  },
  otlpEndpoint: {
    name: "OTEL_EXPORTER_OTLP_ENDPOINT",
    kind: "url",
    protocols: ["http:", "https:"],
    optional: true,
    doc: "Base URL of an OpenTelemetry collector's OTLP/HTTP receiver (e.g. http://127.0.0.1:4318): spans are sent to <endpoint>/v1/traces. Unset: no OTLP export.",
  },
  otlpTracesEndpoint: {
    name: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    kind: "url",
    protocols: ["http:", "https:"],
    optional: true,
    doc: "Full URL of an OTLP/HTTP traces endpoint, used as is (wins over OTEL_EXPORTER_OTLP_ENDPOINT). Unset: see OTEL_EXPORTER_OTLP_ENDPOINT.",
  },
});

/** The values of {@link traceConfig} a service's configuration carries. */
export interface TraceConfigValues {
  readonly traceFile?: string;
  readonly otlpEndpoint?: string | undefined;
  readonly otlpTracesEndpoint?: string | undefined;
}

/**
 * Starts tracing for a service when its configuration names an exporter (see {@link traceConfig}),
 * and logs where its spans go; undefined (and nothing registered) when none is named.
 * @throws Error when the trace file cannot be opened.
 */
export async function startServiceTracing(service: string, config: TraceConfigValues, logger?: Logger): Promise<Tracing | undefined> {
  const tracing = await startTracing({
    service,
    ...(config.traceFile === undefined ? {} : { file: config.traceFile }),
    ...(config.otlpEndpoint === undefined ? {} : { otlpEndpoint: config.otlpEndpoint }),
    ...(config.otlpTracesEndpoint === undefined ? {} : { otlpTracesEndpoint: config.otlpTracesEndpoint }),
  });
  if (tracing !== undefined) logger?.info({ exporters: tracing.exporters }, "tracing: finished spans are exported");
  return tracing;
}
