import { defineConfigSchema } from "./load-config.js";

/**
 * How far a service's default metrics port is from its default gRPC port: the core's gRPC port
 * 50051 goes with metrics on 50056, the IOMMU's 50052 with 50057 … VDCM's 50055 with 50060 — the
 * five ports after the gRPC ones, as `ioasidctl up --base-port` assigns them.
 */
export const METRICS_PORT_OFFSET = 5;

/**
 * Environment variables of a service's Prometheus endpoint (spread them into its schema):
 * `IOASID_METRICS_HOST` (loopback by default: the numbers describe the host's guests, so they are
 * not offered to the network unless asked) and `IOASID_METRICS_PORT` (`off` starts no listener).
 * @param defaultPort the service's own default port (its gRPC default + {@link METRICS_PORT_OFFSET})
 */
export function metricsConfig(defaultPort: number) {
  return defineConfigSchema({
    metricsHost: {
      name: "IOASID_METRICS_HOST",
      kind: "string",
      default: "127.0.0.1",
      doc: "Address the Prometheus endpoint (GET /metrics, plain HTTP) listens on; 0.0.0.0 or :: to offer it beyond this host.",
    },
    metricsPort: {
      name: "IOASID_METRICS_PORT",
      kind: "port-or-off",
      default: defaultPort,
      doc: "Port of the Prometheus endpoint (0: an ephemeral port, printed in the 'metrics listening' log line; off: no endpoint).",
    },
  });
}

/** Where a service's metrics endpoint listens, from its configuration; undefined when it is off. */
export function metricsListen(config: { readonly metricsHost?: string; readonly metricsPort?: number | "off" }): { host: string; port: number } | undefined {
  if (config.metricsPort === undefined || config.metricsPort === "off") return undefined;
  return { host: config.metricsHost ?? "127.0.0.1", port: config.metricsPort };
}
