import { ROOT_CONTEXT, trace, TraceFlags, type Context } from "@opentelemetry/api";
import { describe, expect, it } from "vitest";
import {
  extractFromMetadata,
  formatTraceparentList,
  fromTraceparent,
  hasSpan,
  injectIntoMetadata,
  isSampledTraceparent,
  parseTraceparentList,
  spanContextOf,
  toTraceparent,
  type MetadataLike,
} from "./propagation.js";

const TRACE_A = "0af7651916cd43dd8448eb211c80319c";
const TRACE_B = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN_A = "b7ad6b7169203331";
const SPAN_B = "00f067aa0ba902b7";

function contextOf(traceId: string, spanId: string, traceFlags = TraceFlags.SAMPLED): Context {
  return trace.setSpanContext(ROOT_CONTEXT, { traceId, spanId, traceFlags, isRemote: false });
}

/** gRPC metadata's shape (lower-case keys, one value list per key), in memory. */
class FakeMetadata implements MetadataLike {
  readonly map = new Map<string, string[]>();
  get(key: string): string[] {
    return this.map.get(key.toLowerCase()) ?? [];
  }
  set(key: string, value: string): void {
    this.map.set(key.toLowerCase(), [value]);
  }
  getMap(): Record<string, string> {
    return Object.fromEntries([...this.map].map(([k, v]) => [k, v[0]!]));
  }
}

describe("traceparent values (W3C Trace Context)", () => {
  it("writes the span a context carries as version 00 with its flags", () => {
    expect(toTraceparent(contextOf(TRACE_A, SPAN_A))).toBe(`00-${TRACE_A}-${SPAN_A}-01`);
    expect(toTraceparent(contextOf(TRACE_A, SPAN_A, TraceFlags.NONE))).toBe(`00-${TRACE_A}-${SPAN_A}-00`);
  });

  it("writes nothing for a context without a valid span", () => {
    expect(toTraceparent(ROOT_CONTEXT)).toBeUndefined();
    expect(toTraceparent(contextOf("0".repeat(32), SPAN_A))).toBeUndefined();
    expect(hasSpan(ROOT_CONTEXT)).toBe(false);
  });

  it("reads a value back as a remote parent with the same ids and flags", () => {
    const ctx = fromTraceparent(`00-${TRACE_B}-${SPAN_B}-01`)!;
    expect(spanContextOf(ctx)).toEqual({ traceId: TRACE_B, spanId: SPAN_B, traceFlags: TraceFlags.SAMPLED, isRemote: true });
    expect(toTraceparent(ctx)).toBe(`00-${TRACE_B}-${SPAN_B}-01`);
  });

  it("refuses absent and malformed values", () => {
    expect(fromTraceparent(undefined)).toBeUndefined();
    expect(fromTraceparent("")).toBeUndefined();
    expect(fromTraceparent("00-nothex-b7ad6b7169203331-01")).toBeUndefined();
    expect(fromTraceparent(`00-${"0".repeat(32)}-${SPAN_A}-01`)).toBeUndefined();
  });

  it("tells a sampled value from an unsampled one", () => {
    expect(isSampledTraceparent(`00-${TRACE_A}-${SPAN_A}-01`)).toBe(true);
    expect(isSampledTraceparent(`00-${TRACE_A}-${SPAN_A}-00`)).toBe(false);
    expect(isSampledTraceparent(undefined)).toBe(false);
  });
});

describe("traceparent lists (one context per delivery of a batch)", () => {
  it("keeps each entry at its position, with - for an entry without a context", () => {
    const list = formatTraceparentList([contextOf(TRACE_A, SPAN_A), undefined, contextOf(TRACE_B, SPAN_B, TraceFlags.NONE)]);
    expect(list).toBe(`00-${TRACE_A}-${SPAN_A}-01,-,00-${TRACE_B}-${SPAN_B}-00`);
    const back = parseTraceparentList(list, 3);
    expect(back.map((c) => (c === undefined ? undefined : toTraceparent(c)))).toEqual([`00-${TRACE_A}-${SPAN_A}-01`, undefined, `00-${TRACE_B}-${SPAN_B}-00`]);
  });

  it("answers the count asked: missing entries are undefined, extra ones are ignored, bad ones skipped", () => {
    const two = `00-${TRACE_A}-${SPAN_A}-01,garbage`;
    expect(parseTraceparentList(two, 4).map((c) => c !== undefined)).toEqual([true, false, false, false]);
    expect(parseTraceparentList(`${two},00-${TRACE_B}-${SPAN_B}-01`, 1)).toHaveLength(1);
    expect(parseTraceparentList(undefined, 2)).toEqual([undefined, undefined]);
  });
});

describe("gRPC metadata", () => {
  it("carries a context from a caller's metadata to the server's", () => {
    const md = new FakeMetadata();
    injectIntoMetadata(contextOf(TRACE_A, SPAN_A), md);
    expect(md.get("traceparent")).toEqual([`00-${TRACE_A}-${SPAN_A}-01`]);
    const sc = spanContextOf(extractFromMetadata(md));
    expect(sc).toMatchObject({ traceId: TRACE_A, spanId: SPAN_A, isRemote: true });
  });

  it("leaves metadata without a context alone, and extracts the base from it", () => {
    const md = new FakeMetadata();
    injectIntoMetadata(ROOT_CONTEXT, md);
    expect(md.map.size).toBe(0);
    expect(extractFromMetadata(md)).toBe(ROOT_CONTEXT);
  });
});
