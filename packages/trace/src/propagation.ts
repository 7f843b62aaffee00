import { context, ROOT_CONTEXT, trace, TraceFlags, type Context, type SpanContext, type TextMapGetter, type TextMapSetter } from "@opentelemetry/api";
import { parseTraceParent, TRACE_PARENT_HEADER, W3CTraceContextPropagator } from "@opentelemetry/core";

/**
 * The W3C Trace Context propagator (`traceparent`, `tracestate`) every hop of the fabric uses: gRPC
 * metadata and NATS headers alike (DESIGN §13). Used directly rather than through the global
 * propagator, so a process that registered no SDK still passes on a context it was given.
 */
export const w3cPropagator = new W3CTraceContextPropagator();

/** The header (and gRPC metadata key) that carries a W3C trace context: `traceparent`. */
export const TRACEPARENT = TRACE_PARENT_HEADER;

/** The span context a context carries, when it carries a valid one. */
export function spanContextOf(ctx: Context): SpanContext | undefined {
  const sc = trace.getSpanContext(ctx);
  return sc !== undefined && trace.isSpanContextValid(sc) ? sc : undefined;
}

/** True when `ctx` carries a valid span context (a span of this process, or one received). */
export function hasSpan(ctx: Context = context.active()): boolean {
  return spanContextOf(ctx) !== undefined;
}

/**
 * The `traceparent` value of the span a context carries (W3C Trace Context, version 00), or
 * undefined when it carries none.
 */
export function toTraceparent(ctx: Context): string | undefined {
  const sc = spanContextOf(ctx);
  if (sc === undefined) return undefined;
  return `00-${sc.traceId}-${sc.spanId}-${(sc.traceFlags & 0xff).toString(16).padStart(2, "0")}`;
}

/**
 * A context whose parent is the remote span a `traceparent` value names (over `base`), or undefined
 * when the value is absent or malformed.
 */
export function fromTraceparent(value: string | undefined, base: Context = ROOT_CONTEXT): Context | undefined {
  if (value === undefined || value === "") return undefined;
  const sc = parseTraceParent(value);
  if (sc === null) return undefined;
  return trace.setSpanContext(base, { ...sc, isRemote: true });
}

/** True when a `traceparent` value is sampled (flag 01): the caller records its spans. */
export function isSampledTraceparent(value: string | undefined): boolean {
  // "00-<32>-<16>-<2>": the flags are the last two hex digits.
  return value !== undefined && value.length === 55 && (Number.parseInt(value.slice(53), 16) & TraceFlags.SAMPLED) !== 0;
}

/**
 * Several trace contexts in one header value, by position: `traceparent` values separated by
 * commas, `-` where an entry has none. A NATS message that batches deliveries (or their acks)
 * carries one per delivery, since deliveries of one batch come from different operations.
 */
export function formatTraceparentList(contexts: ReadonlyArray<Context | undefined>): string {
  return contexts.map((c) => (c === undefined ? undefined : toTraceparent(c)) ?? "-").join(",");
}

/**
 * The contexts of a {@link formatTraceparentList} value, by position (undefined for `-`, a
 * malformed entry, or past the end). `count` bounds the work: a longer list is cut.
 */
export function parseTraceparentList(value: string | undefined, count: number, base: Context = ROOT_CONTEXT): Array<Context | undefined> {
  const out = new Array<Context | undefined>(count).fill(undefined);
  if (value === undefined || value === "") return out;
  const parts = value.split(",", count);
  for (let i = 0; i < parts.length; i++) out[i] = fromTraceparent(parts[i]!.trim(), base);
  return out;
}

/** Reads and writes W3C headers on gRPC metadata (string values; keys are lower case). */
export interface MetadataLike {
  get(key: string): Array<string | Buffer>;
  set(key: string, value: string): void;
  getMap(): { [key: string]: string | Buffer };
}

const metadataGetter: TextMapGetter<MetadataLike> = {
  get: (carrier, key) => {
    const values = carrier.get(key);
    const first = values[0];
    return first === undefined ? undefined : String(first);
  },
  keys: (carrier) => Object.keys(carrier.getMap()),
};

const metadataSetter: TextMapSetter<MetadataLike> = {
  set: (carrier, key, value) => carrier.set(key, value),
};

/** Writes the trace context of `ctx` into gRPC metadata (`traceparent`, `tracestate`). */
export function injectIntoMetadata(ctx: Context, metadata: MetadataLike): void {
  w3cPropagator.inject(ctx, metadata, metadataSetter);
}

/** The context a call's metadata carries (over `base`); `base` itself when it carries none. */
export function extractFromMetadata(metadata: MetadataLike, base: Context = ROOT_CONTEXT): Context {
  return w3cPropagator.extract(base, metadata, metadataGetter);
}
