#!/usr/bin/env node
import { configOrExit, createLogger, defineConfigSchema, holdSignals, runUntilSignal } from "@ioasid/grpc-kit";
import { DEFAULT_CAPACITY, MAX_CAPACITY } from "@ioasid/ioasid";
import { busConfig, connectNats } from "@ioasid/role-kit";
import { OpLogFormatError } from "./op-codec.js";
import { startCoreServer } from "./server.js";

/** Configuration of ioasid-core, from the environment (`ioasid-core --help` lists it). */
export const coreConfigSchema = defineConfigSchema({
  ...busConfig,
  address: {
    name: "IOASID_CORE_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50051",
    doc: "host:port the CoreService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  capacity: {
    name: "IOASID_CAPACITY",
    kind: "int",
    min: 2,
    max: MAX_CAPACITY,
    default: DEFAULT_CAPACITY,
    doc: "Size of the IOASID namespace; valid IOASIDs are 1..capacity-1 (PASID 0 is reserved).",
  },
  eventLogRetain: {
    name: "IOASID_CORE_EVENT_LOG_RETAIN",
    kind: "int",
    min: 1,
    max: 10_000_000,
    default: 100_000,
    doc: "Committed events kept in memory for WatchEvents readers.",
  },
  stream: {
    name: "IOASID_CORE_STREAM",
    kind: "string",
    default: "IOASID_CORE_OPS",
    doc: "JetStream stream holding the core's operation log (file storage).",
  },
  replicas: {
    name: "IOASID_JS_REPLICAS",
    kind: "int",
    min: 1,
    max: 5,
    default: 1,
    doc: "Replicas of the operation log stream: 1 on one server, 3 in a NATS cluster.",
  },
  deadlineMs: {
    name: "IOASID_DELIVERY_DEADLINE",
    kind: "duration-ms",
    default: 2000,
    doc: "Time a subscriber gets to acknowledge a delivery before it is recorded as missed.",
  },
  retryMs: {
    name: "IOASID_DELIVERY_RETRY",
    kind: "duration-ms",
    default: 1000,
    doc: "How often deliveries a subscriber missed are retried.",
  },
});

const config = configOrExit(coreConfigSchema, { service: "ioasid-core" });
const logger = createLogger("ioasid-core", { level: config.logLevel });
// A signal that arrives while the core starts is held until it can stop gracefully (else the signal
// kills it between its `listening` line and the handler: exit by signal, found under load).
const held = holdSignals();
const nc = await connectNats(config.natsUrl, { name: "ioasid-core", timeoutMs: config.natsConnectTimeout, logger }).catch((err: unknown) => {
  logger.fatal({ url: config.natsUrl, err: String(err) }, "cannot reach NATS: start nats-server with JetStream (-js) or set NATS_URL");
  process.exit(1);
});
const running = await startCoreServer({
  host: config.address.host,
  port: config.address.port,
  capacity: config.capacity,
  eventLogRetain: config.eventLogRetain,
  logger,
  nats: { nc, prefix: config.prefix, stream: config.stream, replicas: config.replicas, deadlineMs: config.deadlineMs, retryMs: config.retryMs },
  onFatal: (err) => {
    logger.fatal({ err: String(err) }, "operation log unwritable: exiting so a restart replays a consistent log");
    process.exit(1);
  },
}).catch((err: unknown) => {
  // A store this core must not read: the message is the operator's instruction, so it is the log
  // line itself (no stack trace), and the exit is the same non-zero as any failed start.
  if (err instanceof OpLogFormatError) logger.fatal({ stream: err.at.stream, seq: err.at.seq }, `cannot start: ${err.message}`);
  else logger.fatal({ err: String(err) }, "could not start");
  process.exit(1);
});
runUntilSignal(running.server, {
  logger,
  beforeExit: async () => {
    await running.engine?.stop();
    await running.opLog?.drain();
    running.core.close();
    await nc.drain();
  },
});
held.release();
