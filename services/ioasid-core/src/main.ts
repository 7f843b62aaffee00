#!/usr/bin/env node
import {
  configOrExit,
  packageVersion,
  createLogger,
  createMetricsRegistry,
  credentialsOrExit,
  formatAddress,
  holdSignals,
  metricsListen,
  runUntilSignal,
  startMetricsServer,
  startServiceTracing,
} from "@ioasid/grpc-kit";
import { connectNats } from "@ioasid/role-kit";
import { coreConfigSchema } from "./config.js";
import { OpLogFormatError } from "./op-codec.js";
import { isTransientWriteError } from "./op-log.js";
import { startCoreServer } from "./server.js";
import { collectDefaultMetrics } from "prom-client";
import { awaitLeaseExpiry, serveLease } from "./core-lease.js";

const config = configOrExit(coreConfigSchema, { service: "ioasid-core", version: packageVersion(import.meta.url) });
// IOASID_CREDENTIALS_DIR: mTLS and authorization by role; without it the core is insecure and says so.
const tls = credentialsOrExit({ service: "ioasid-core", role: "core" });
const logger = createLogger("ioasid-core", { level: config.logLevel });
// A signal that arrives while the core starts is held until it can stop gracefully (else the signal
// kills it between its `listening` line and the handler: exit by signal, found under load).
const held = holdSignals();
// IOASID_TRACE_FILE / OTEL_EXPORTER_OTLP_ENDPOINT: spans exported (DESIGN §13); nothing set, no SDK.
const tracing = await startServiceTracing("ioasid-core", config, logger).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot start tracing");
  process.exit(1);
});
const nc = await connectNats(config.natsUrl, {
  name: "ioasid-core",
  timeoutMs: config.natsConnectTimeout,
  logger,
  credentialsDir: config.credentialsDir,
}).catch((err: unknown) => {
  logger.fatal({ url: config.natsUrl, err: String(err) }, "cannot reach NATS: start nats-server with JetStream (-js) or set NATS_URL");
  process.exit(1);
});
if (config.standby) {
  // A standby (issue 18): waits behind the serving core's lease, then takes over as a restarted
  // core does (replay, seal). A signal while it waits stops it at once.
  logger.info({ leaseMs: config.leaseMs }, "standby: waiting behind the serving core's lease");
  const r = await awaitLeaseExpiry(nc, config.prefix, {
    leaseMs: config.leaseMs,
    stopped: () => held.received !== undefined,
    onHolder: (h) => logger.info({ holderPid: h.pid, holderAddress: h.address }, "standby: the serving core answers its lease"),
  });
  if (r === "stopped") {
    await nc.drain().catch(() => undefined);
    logger.info({}, "standby stopped before it took over");
    process.exit(0);
  }
  logger.warn({ leaseMs: config.leaseMs }, "the serving core's lease expired: taking over (replaying the operation log, sealing it)");
}
// This core holds the lease from now on — from before its replay, not only once it listens: a
// standby that started meanwhile (a supervisor bringing the dead core back as the standby) waits
// behind it instead of taking over too. A replay longer than that standby's lease made both cores
// replay and seal, the later one fencing the first (the ioasidctl standby review). A start that
// fails ends the process, and with it the lease.
const lease = serveLease(nc, config.prefix, { pid: process.pid, address: formatAddress(config.address.host, config.address.port) });
// Prometheus text on its own port (IOASID_METRICS_PORT; off: none), up before the gRPC server.
const metricsAt = metricsListen(config);
const metrics = metricsAt === undefined ? undefined : createMetricsRegistry();
const metricsServer =
  metricsAt === undefined || metrics === undefined
    ? undefined
    : await startMetricsServer({ registry: metrics, ...metricsAt, logger }).catch((err: unknown) => {
        logger.fatal({ err: String(err) }, "cannot serve metrics: choose another IOASID_METRICS_PORT, or off");
        process.exit(1);
      });
// A start cut by JetStream failing over (a NATS cluster electing leaders: a timeout, a 503) is
// tried again within IOASID_OPLOG_WRITE_RETRY, as an op-log write is (issue 18: a standby taking
// over while a nats-server died); any other failure, or a store this core must not read, stops it.
const startDeadline = Date.now() + config.opLogWriteRetryMs;
let running: Awaited<ReturnType<typeof startCoreServer>> | undefined;
for (let attempt = 1; running === undefined; attempt++) {
  try {
    running = await startCoreServer({
      ...(metrics === undefined ? {} : { metrics }),
      host: config.address.host,
      port: config.address.port,
      capacity: config.capacity,
      eventLogRetain: config.eventLogRetain,
      watchBuffer: config.watchBuffer,
      logger,
      ...(tls === undefined ? {} : { tls }),
      nats: {
        nc,
        prefix: config.prefix,
        stream: config.stream,
        replicas: config.replicas,
        deadlineMs: config.deadlineMs,
        retryMs: config.retryMs,
        maxInFlightPerName: config.maxInFlightPerName,
        historyFlushMs: config.historyFlushMs,
        snapshotEveryOps: config.snapshotEveryOps,
        snapshotEveryBytes: Number(config.snapshotEveryBytes),
        writeRetryMs: config.opLogWriteRetryMs,
      },
      onFatal: (err) => {
        logger.fatal({ err: String(err) }, "operation log unwritable: exiting so a restart replays a consistent log");
        process.exit(1);
      },
    });
  } catch (err) {
    // A store this core must not read: the message is the operator's instruction, so it is the log
    // line itself (no stack trace), and the exit is the same non-zero as any failed start.
    if (err instanceof OpLogFormatError) {
      logger.fatal({ stream: err.at.stream, seq: err.at.seq }, `cannot start: ${err.message}`);
      process.exit(1);
    }
    // A signal held meanwhile waits for the start too (it then stops gracefully, exit 0).
    if (!isTransientWriteError(err) || Date.now() >= startDeadline) {
      logger.fatal({ err: String(err) }, "could not start");
      process.exit(1);
    }
    logger.warn({ err: String(err), attempt }, "JetStream not available yet (failing over?): starting again");
    // The next attempt registers the core's metrics anew.
    if (metrics !== undefined) {
      metrics.clear();
      collectDefaultMetrics({ register: metrics });
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}
runUntilSignal(running.server, {
  logger,
  beforeExit: async () => {
    lease.unsubscribe();
    await metricsServer?.close();
    await running.engine?.stop();
    await running.opLog?.drain();
    // The last operations' history (it waits up to 5 ms for company) goes out while publishing is
    // still allowed: nc.drain() refuses publishes, and the outbox would drop the records unsaid.
    running.flushHistory();
    running.core.close();
    await nc.drain();
    await tracing?.shutdown();
  },
});
held.release();
