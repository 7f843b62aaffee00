import { ServerInterceptingCall, status as GrpcStatus, type ServerInterceptor } from "@grpc/grpc-js";
import { Counter, Histogram, type Registry } from "prom-client";

/** Told of every call a {@link GrpcServer} ended: what a metrics registry counts (see {@link createGrpcMetrics}). */
export interface CallObserver {
  /**
   * @param path full method path, `/ioasid.core.v1.CoreService/Free`
   * @param code the gRPC status code it ended with
   * @param seconds from the call's arrival to its status
   */
  callEnded(path: string, code: number, seconds: number): void;
}

/** Histogram buckets of a call's duration, seconds: a local call takes well under a millisecond, a free with deliveries up to a deadline (2 s). */
export const CALL_SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10] as const;

/**
 * The gRPC server metrics of a process, registered in `registry` (the names and labels of
 * go-grpc-prometheus, with the project's prefix):
 * - `ioasid_grpc_server_handled_total{grpc_service,grpc_method,grpc_code}`: calls ended, by status
 *   code name (`OK`, `FAILED_PRECONDITION`…), refusals by an interceptor (authorization) included;
 * - `ioasid_grpc_server_handling_seconds{grpc_service,grpc_method}`: their duration (a stream's is
 *   its whole life).
 */
export function createGrpcMetrics(registry: Registry): CallObserver {
  const handled = new Counter({
    name: "ioasid_grpc_server_handled_total",
    help: "gRPC calls this process served, by method and status code.",
    labelNames: ["grpc_service", "grpc_method", "grpc_code"] as const,
    registers: [registry],
  });
  const seconds = new Histogram({
    name: "ioasid_grpc_server_handling_seconds",
    help: "Duration of the gRPC calls this process served, from arrival to status, by method.",
    labelNames: ["grpc_service", "grpc_method"] as const,
    buckets: [...CALL_SECONDS_BUCKETS],
    registers: [registry],
  });
  return {
    callEnded(path, code, s) {
      const { service, method } = splitMethodPath(path);
      handled.inc({ grpc_service: service, grpc_method: method, grpc_code: GrpcStatus[code] ?? String(code) });
      seconds.observe({ grpc_service: service, grpc_method: method }, s);
    },
  };
}

/** `/pkg.Service/Method` → its service and method (`unknown` parts when it is not that shape). */
export function splitMethodPath(path: string): { service: string; method: string } {
  const [, service, method] = path.split("/");
  return { service: service || "unknown", method: method || "unknown" };
}

/**
 * A server interceptor that tells `observer()` how each call ended. It must be the first of the
 * server's interceptors (grpc-js wraps them in array order, the first nearest the transport), so
 * that a status another interceptor sends — an authorization refusal — passes through it too.
 * While `observer()` gives nothing it hands the call on untouched: no cost for a server whose
 * process serves no metrics.
 */
export function observeCalls(observer: () => CallObserver | undefined): ServerInterceptor {
  return (descriptor, call) => {
    const o = observer();
    // The interface is all grpc-js uses of what an interceptor returns; the declared class type is wider.
    if (o === undefined) return call as ServerInterceptingCall;
    const started = performance.now();
    return new ServerInterceptingCall(call, {
      sendStatus: (status, next) => {
        o.callEnded(descriptor.path, status.code, (performance.now() - started) / 1000);
        next(status);
      },
    });
  };
}
