import { InterceptingCall, status as grpcStatus, type Interceptor, type Metadata, type UntypedServiceImplementation } from "@grpc/grpc-js";
import { context, SpanKind, SpanStatusCode, trace, type Attributes, type Span } from "@opentelemetry/api";
import { extractFromMetadata, injectIntoMetadata, tracer, tracingStarted } from "@ioasid/trace";
import type { AnyMethodDefinition } from "./adapt-service.js";

/**
 * Codes a server reports as its own error (OpenTelemetry's gRPC conventions): the others —
 * NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED… — are the caller's to handle, as the fabric's
 * refusals are (DESIGN §8), and leave a server span's status unset.
 */
const SERVER_ERRORS: ReadonlySet<number> = new Set([
  grpcStatus.UNKNOWN,
  grpcStatus.DEADLINE_EXCEEDED,
  grpcStatus.UNIMPLEMENTED,
  grpcStatus.INTERNAL,
  grpcStatus.UNAVAILABLE,
  grpcStatus.DATA_LOSS,
]);

/** `/pkg.Service/Method` → the span name `pkg.Service/Method` and its `rpc.*` attributes. */
function describeMethod(path: string): { name: string; attributes: Attributes } {
  const name = path.startsWith("/") ? path.slice(1) : path;
  const slash = name.lastIndexOf("/");
  return {
    name,
    attributes: { "rpc.system": "grpc", "rpc.service": name.slice(0, Math.max(0, slash)), "rpc.method": name.slice(slash + 1) },
  };
}

function endRpcSpan(span: Span, code: number, details: string | undefined, kind: "client" | "server"): void {
  span.setAttribute("rpc.grpc.status_code", code);
  if (code !== grpcStatus.OK && (kind === "client" || SERVER_ERRORS.has(code))) {
    span.setStatus({ code: SpanStatusCode.ERROR, message: `${grpcStatus[code] ?? code}${details === undefined || details === "" ? "" : `: ${details}`}` });
  }
  span.end();
}

/**
 * The client side of W3C trace context on gRPC (DESIGN §13): every call carries the caller's
 * active context in its metadata (`traceparent`), and a call with one response (unary,
 * client-streaming) gets a CLIENT span named after its method, ended with its status code.
 * Calls with a response stream (event feeds, the VFIO session) carry the context but get no span
 * of their own: they live as long as what they follow. Does nothing until tracing is started
 * (`startTracing`): without a context manager there is no active context to carry.
 */
export const traceClientInterceptor: Interceptor = (options, nextCall) => {
  if (!tracingStarted()) return new InterceptingCall(nextCall(options));
  const parent = context.active();
  const path = options.method_definition.path;
  const withSpan = !options.method_definition.responseStream;
  const { name, attributes } = describeMethod(path);
  const span = withSpan ? tracer.startSpan(name, { kind: SpanKind.CLIENT, attributes }, parent) : undefined;
  const ctx = span === undefined ? parent : trace.setSpan(parent, span);
  return new InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      injectIntoMetadata(ctx, metadata);
      next(metadata, {
        onReceiveStatus(status, nextStatus) {
          if (span !== undefined) endRpcSpan(span, status.code, status.details, "client");
          nextStatus(status);
        },
      });
    },
  });
};

type Handler = UntypedServiceImplementation[string];

interface TracedCall {
  readonly metadata: Metadata;
  on(event: "error", listener: (err: { code?: number; details?: string }) => void): unknown;
  once(event: "finish" | "cancelled", listener: () => void): unknown;
}

/**
 * The server side: a SERVER span per call of `method`, child of the caller's context
 * (`traceparent` in the metadata), named after the method and ended with the status code the
 * call ends with; the handler runs with that span active, so its logs carry the trace and its
 * own calls (a core call from a role) continue it. Returns `handler` itself while tracing is not
 * started (`startTracing`), so an untraced process pays nothing per call.
 */
export function traceServerMethod(method: AnyMethodDefinition, handler: Handler): Handler {
  const { name, attributes } = describeMethod(method.path);
  const unaryResponse = !method.responseStream;
  const traced = ((call: TracedCall, callback?: (err: { code?: number; details?: string } | null, value?: unknown) => void) => {
    const parent = extractFromMetadata(call.metadata, context.active());
    const span = tracer.startSpan(name, { kind: SpanKind.SERVER, attributes }, parent);
    let ended = false;
    const end = (code: number, details?: string): void => {
      if (ended) return;
      ended = true;
      endRpcSpan(span, code, details, "server");
    };
    if (unaryResponse && callback !== undefined) {
      const done = callback;
      callback = (err, value) => {
        end(err === null ? grpcStatus.OK : (err.code ?? grpcStatus.UNKNOWN), err?.details);
        done(err, value);
      };
    } else {
      // A response stream ends with end() (OK) or an 'error' event carrying the status (adaptService).
      call.on("error", (err) => end(err.code ?? grpcStatus.UNKNOWN, err.details));
      call.once("finish", () => end(grpcStatus.OK));
    }
    call.once("cancelled", () => end(grpcStatus.CANCELLED, "cancelled by the caller"));
    return context.with(trace.setSpan(parent, span), () => (handler as (c: unknown, cb?: unknown) => void)(call, callback));
  }) as unknown as Handler;
  return ((call: TracedCall, callback?: unknown) =>
    tracingStarted()
      ? (traced as (c: unknown, cb?: unknown) => void)(call, callback)
      : (handler as (c: unknown, cb?: unknown) => void)(call, callback)) as unknown as Handler;
}
