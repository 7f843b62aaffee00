import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { collectDefaultMetrics, Registry } from "prom-client";
import type { Logger } from "pino";

/** The one path a {@link MetricsServer} answers (Prometheus' default `metrics_path`). */
export const METRICS_PATH = "/metrics";

/**
 * A process's own metrics registry (never prom-client's global one: tests run several services in
 * one process), with the standard `process_*` and `nodejs_*` metrics of this process in it.
 */
export function createMetricsRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  return registry;
}

/** Options of {@link startMetricsServer}. */
export interface MetricsServerOptions {
  /** What GET /metrics serves. */
  readonly registry: Registry;
  /** @default "127.0.0.1" */
  readonly host?: string;
  /** 0: an ephemeral port. @default 0 */
  readonly port?: number;
  /** Where the `metrics listening` line (and a failed scrape) goes. @default no logging */
  readonly logger?: Logger;
}

/** A running Prometheus endpoint. */
export interface MetricsServer {
  /** `host:port` it listens on (IPv6 in brackets). */
  readonly address: string;
  readonly port: number;
  /** `http://host:port/metrics`. */
  readonly url: string;
  /** Stops listening and closes open (keep-alive) connections. Idempotent. */
  close(): Promise<void>;
}

/**
 * Serves a registry as Prometheus text on `GET /metrics` (HEAD too), on a plain node:http server of
 * its own, apart from the gRPC port: Prometheus scrapes HTTP, and a scrape must not compete with
 * the service's calls for admission. Anything else answers 404 or 405. Logs
 * `{"msg":"metrics listening","address":…,"url":…}` once bound.
 *
 * @throws Error when the address cannot be bound (the port is taken).
 * @example
 * const metrics = await startMetricsServer({ registry, host: "127.0.0.1", port: 50056, logger });
 * // curl -s http://127.0.0.1:50056/metrics
 * await metrics.close();
 */
export async function startMetricsServer(options: MetricsServerOptions): Promise<MetricsServer> {
  const { registry, logger } = options;
  const host = options.host ?? "127.0.0.1";
  const server = createServer((req, res) => answer(registry, req, res, logger));
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err) => reject(new Error(`cannot listen for metrics on ${hostPort(host, options.port ?? 0)}: ${err.message}`, { cause: err })));
    server.listen(options.port ?? 0, host, () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  const address = hostPort(host, port);
  const url = `http://${address}${METRICS_PATH}`;
  logger?.info({ address, url }, "metrics listening");
  let closing: Promise<void> | undefined;
  return {
    address,
    port,
    url,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        // A scraper keeps its connection open between scrapes: do not wait for it to hang up.
        server.closeAllConnections();
      })),
  };
}

function answer(registry: Registry, req: IncomingMessage, res: ServerResponse, logger: Logger | undefined): void {
  const path = (req.url ?? "/").split("?")[0];
  if (path !== METRICS_PATH) {
    res.writeHead(404, { "content-type": "text/plain; charset=utf-8" }).end(`not found: metrics are at ${METRICS_PATH}\n`);
    return;
  }
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405, { allow: "GET, HEAD", "content-type": "text/plain; charset=utf-8" }).end(`${req.method ?? "?"} not allowed: GET ${METRICS_PATH}\n`);
    return;
  }
  registry.metrics().then(
    (text) => {
      res.writeHead(200, { "content-type": registry.contentType });
      res.end(req.method === "HEAD" ? undefined : text);
    },
    (err: unknown) => {
      logger?.error({ err: String(err) }, "collecting metrics failed");
      res.writeHead(500, { "content-type": "text/plain; charset=utf-8" }).end("collecting metrics failed; see the service's log\n");
    },
  );
}

function hostPort(host: string, port: number): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}
