#!/usr/bin/env node
import { configOrExit, createLogger, defineConfigSchema, formatAddress, runUntilSignal } from "@ioasid/grpc-kit";
import { commonRoleConfig, connectNats, createCoreClient } from "@ioasid/role-kit";
import { startKvmServer } from "./server.js";

/** Configuration of the KVM service, from the environment (`kvm --help` lists it). */
export const kvmConfigSchema = defineConfigSchema({
  address: {
    name: "KVM_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50054",
    doc: "host:port the KvmService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  reapStale: {
    name: "KVM_REAP_STALE_VMS",
    kind: "boolean",
    default: true,
    doc: "At start, drop the IOASID references and notifier registrations of VMs an earlier KVM process left behind and its kept state does not bring back (VMs it kept in JetStream come back with their tables); then, and after a VM went without KVM knowing all it held, release every kvm/* reference of an instance that is not a live VM.",
  },
  ...commonRoleConfig,
});

const config = configOrExit(kvmConfigSchema, { service: "kvm" });
const logger = createLogger("kvm", { level: config.logLevel });
const nc = await connectNats(config.natsUrl, { name: "kvm", timeoutMs: config.natsConnectTimeout, logger }).catch((err: unknown) => {
  logger.fatal({ url: config.natsUrl, err: String(err) }, "cannot reach NATS: start nats-server or set NATS_URL");
  process.exit(1);
});
const coreClient = createCoreClient(formatAddress(config.coreAddress.host, config.coreAddress.port));
const running = await startKvmServer({
  nc,
  core: coreClient,
  host: config.address.host,
  port: config.address.port,
  prefix: config.prefix,
  logger,
  reapStale: config.reapStale,
}).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "could not start");
  process.exit(1);
});
runUntilSignal(running.server, {
  logger,
  beforeExit: async () => {
    // KVM going away takes its VMs with it: their references are dropped (ioasid.rst rule 4).
    await running.stop();
    coreClient.close();
    await nc.drain();
  },
});
