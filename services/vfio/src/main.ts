#!/usr/bin/env node
import { failStopOnWriteError, HistoryRecorder, RoleState } from "@ioasid/bus";
import { ConfigError, configOrExit, createClient, createLogger, defineConfigSchema, runUntilSignal, type ConfigProblem } from "@ioasid/grpc-kit";
import { iommu, vdcm } from "@ioasid/proto";
import { commonRoleConfig, connectNats, createCoreClient } from "@ioasid/role-kit";
import { createCorePort, createGuestPagesPort, createIommuFaultPort, createIommuPort, createVdcmPort } from "./grpc-ports.js";
import { FaultRelay } from "./fault-relay.js";
import { startVfioServer } from "./server.js";
import { CloseReason, MAX_SESSION_GRACE_MS, VfioContainers } from "./vfio-containers.js";
import { vfioStateCodec } from "./vfio-state-codec.js";

/** Configuration of the vfio service, from the environment (`vfio --help` lists it). */
export const vfioConfigSchema = defineConfigSchema({
  address: {
    name: "VFIO_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50053",
    doc: "host:port the VfioService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  instance: {
    name: "VFIO_INSTANCE",
    kind: "string",
    default: "vfio-1",
    doc: "This VFIO's instance name: its history records, and the owner 'vfio/<instance>' of the IOMMU attach handles it creates.",
  },
  iommuAddress: {
    name: "IOMMU_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50052",
    doc: "host:port of the iommu service (devices, stage-2 domains, guest PASID binds).",
  },
  vdcmAddress: {
    name: "VDCM_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50055",
    doc: "host:port of the vdcm service (mdev assignment).",
  },
  sessionGraceMs: {
    name: "VFIO_SESSION_GRACE",
    kind: "duration-ms",
    default: 10_000,
    doc: "How long an opened container waits for its VMM's Session stream when OpenContainer gives none; then it is closed as crashed.",
  },
  ...commonRoleConfig,
});

const config = configOrExit(vfioConfigSchema, { service: "vfio" });
// What the schema's kinds cannot say: bounds of the grace period, and an instance usable in the
// owner name of IOMMU attach handles (the core's holder/subscriber alphabet).
const problems: ConfigProblem[] = [];
if (config.sessionGraceMs < 1 || config.sessionGraceMs > MAX_SESSION_GRACE_MS) {
  problems.push({ name: "VFIO_SESSION_GRACE", value: `${config.sessionGraceMs}ms`, expected: "a duration from 1ms to 24h" });
}
if (!/^[A-Za-z0-9._:@-]{1,128}$/.test(config.instance)) {
  problems.push({ name: "VFIO_INSTANCE", value: config.instance, expected: "1..128 of letters, digits and ._:@-" });
}
if (problems.length > 0) {
  process.stderr.write(`vfio: ${new ConfigError(problems).message}\n`);
  process.exit(2);
}
const logger = createLogger("vfio", { level: config.logLevel });
const nc = await connectNats(config.natsUrl, { name: `vfio/${config.instance}`, timeoutMs: config.natsConnectTimeout, logger }).catch(
  (err: unknown) => {
    logger.fatal({ url: config.natsUrl, err: String(err) }, "cannot reach NATS: start nats-server with JetStream (-js) or set NATS_URL");
    process.exit(1);
  },
);
const coreClient = createCoreClient(config.coreAddress.address);
const iommuClient = createClient(iommu.IommuServiceService, config.iommuAddress.address);
const vdcmClient = createClient(vdcm.VdcmServiceService, config.vdcmAddress.address);
const history = new HistoryRecorder(nc, "vfio", config.instance, config.prefix);
// The containers live in JetStream too: a VFIO killed with -9 finds the ones it had when it returns
// and closes them as crashed guests (their VMMs' sessions died with it).
const store = await RoleState.open(nc, { role: "vfio", instance: config.instance, prefix: config.prefix, codec: vfioStateCodec }).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot open VFIO's state in JetStream (is nats-server running with -js?)");
  process.exit(1);
});
// A store in another format (the JSON of earlier versions) is refused, with what to do.
const saved = await store.load().catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot read VFIO's kept state");
  process.exit(1);
});
// Late-bound: the relay asks the containers whether one is open, the containers tell the relay when one closes.
const late: { faults?: FaultRelay } = {};
const containers = new VfioContainers({
  core: createCorePort(coreClient),
  iommu: createIommuPort(iommuClient, `vfio/${config.instance}`),
  vdcm: createVdcmPort(vdcmClient),
  history,
  sessionGraceMs: config.sessionGraceMs,
  log: logger,
  onClosing: (containerId) => late.faults?.containerClosing(containerId) ?? Promise.resolve(),
  store: failStopOnWriteError(store, (err: unknown) => {
    logger.fatal({ err: String(err) }, "state store unwritable: exiting so a restart restores the kept tables and reconciles");
    process.exit(1);
  }, { stopping: () => closingAll !== undefined }),
  saved,
});
const faultRelay = new FaultRelay({
  iommu: createIommuFaultPort(iommuClient, `vfio/${config.instance}`),
  history,
  log: logger,
  isOpen: (containerId) => containers.isOpen(containerId),
});
late.faults = faultRelay;
faultRelay.start();

// Containers do not outlive VFIO: on SIGTERM/SIGINT every container is closed (its IOASIDs freed,
// its Session stream ended with SERVICE_STOPPED) while the server drains. Registered before
// runUntilSignal's handler, so the sessions end and the server's graceful shutdown can complete.
let closingAll: Promise<void> | undefined;
const closeAll = (): Promise<void> => (closingAll ??= containers.closeAll(CloseReason.SERVICE_STOPPED));
for (const signal of ["SIGTERM", "SIGINT"] as const) process.once(signal, () => void closeAll());

const server = await startVfioServer({
  host: config.address.host,
  port: config.address.port,
  containers,
  faults: faultRelay,
  guestPages: createGuestPagesPort(iommuClient),
  logger,
}).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "could not start");
  process.exit(1);
});
logger.info(
  { instance: config.instance, core: config.coreAddress.address, iommu: config.iommuAddress.address, vdcm: config.vdcmAddress.address },
  "vfio serving",
);
// Containers of the life before a crash: closed as crashed guests (in the background: the core and
// the roles may still be starting; the close retries while they are unreachable).
void containers.closeRestored().then(
  (n) => {
    if (n > 0) logger.info({ containers: n }, "closed the containers of the life before a crash (their sessions died with it)");
  },
  (err: unknown) => logger.error({ err: String(err) }, "closing the containers left by a crash failed"),
);
runUntilSignal(server, {
  logger,
  beforeExit: async () => {
    await closeAll();
    faultRelay.stop();
    coreClient.close();
    iommuClient.close();
    vdcmClient.close();
    await nc.drain();
  },
});
