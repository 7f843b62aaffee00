#!/usr/bin/env node
import { configOrExit, createLogger, defineConfigSchema, runUntilSignal } from "@ioasid/grpc-kit";
import { DEFAULT_CAPACITY, MAX_CAPACITY } from "@ioasid/ioasid";
import { startCoreServer } from "./server.js";

/** Configuration of ioasid-core, from the environment (`ioasid-core --help` lists it). */
export const coreConfigSchema = defineConfigSchema({
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
  logLevel: {
    name: "LOG_LEVEL",
    kind: "enum",
    values: ["fatal", "error", "warn", "info", "debug", "trace", "silent"],
    default: "info",
    doc: "Log level of the JSON log on stdout.",
  },
});

const config = configOrExit(coreConfigSchema, { service: "ioasid-core" });
const logger = createLogger("ioasid-core", { level: config.logLevel });
const running = await startCoreServer({
  host: config.address.host,
  port: config.address.port,
  capacity: config.capacity,
  eventLogRetain: config.eventLogRetain,
  logger,
});
runUntilSignal(running.server, { logger, beforeExit: () => running.core.close() });
