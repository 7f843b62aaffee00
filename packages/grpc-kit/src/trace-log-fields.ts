import { context } from "@opentelemetry/api";
import { spanContextOf } from "@ioasid/trace";

/**
 * The log fields that tie a line to its trace: `trace_id` and `span_id` of the span active when the
 * line is written (a gRPC call's, a delivery's handling), none outside a span or while tracing is
 * not started. A pino `mixin`, called for every line (pino merges the line's fields into the object
 * returned, so it is a new one each time).
 */
export function traceLogFields(): Record<string, string> {
  const sc = spanContextOf(context.active());
  return sc === undefined ? {} : { trace_id: sc.traceId, span_id: sc.spanId };
}
