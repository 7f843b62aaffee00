#!/usr/bin/env node
import { failStopOnWriteError, HistoryGate, HistoryRecorder, RoleState, startSubscriber } from "@ioasid/bus";
import { ConfigError, configOrExit, createLogger, defineConfigSchema, runUntilSignal } from "@ioasid/grpc-kit";
import { events } from "@ioasid/proto";
import { commonRoleConfig, connectNats, createCoreClient } from "@ioasid/role-kit";
import { coreIoasidPort, coreNotifierPort } from "./core-adapter.js";
import { createIommuClient, iommuDmaTranslator } from "./iommu-adapter.js";
import { createVdcmServer } from "./server.js";
import { Vdcm, VDCM_ROLE } from "./vdcm.js";
import { VdcmState } from "./vdcm-state.js";
import { vdcmStateCodec } from "./vdcm-state-codec.js";

/** Configuration of the VDCM service, from the environment (`vdcm --help` lists it). */
export const vdcmConfigSchema = defineConfigSchema({
  ...commonRoleConfig,
  address: {
    name: "VDCM_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50055",
    doc: "host:port VdcmService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  instance: {
    name: "VDCM_INSTANCE",
    kind: "string",
    default: "vdcm0",
    doc: "This VDCM's instance: its notifier subscriber instance and the holder instance of its IOASID references (1..128 of letters, digits, ._:@-).",
  },
  iommuAddress: {
    name: "IOMMU_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50052",
    doc: "host:port of the IOMMU service that translates descriptors' DMA (IommuService.Translate).",
  },
});

const INSTANCE = /^[A-Za-z0-9._:@-]{1,128}$/;

const config = configOrExit(vdcmConfigSchema, { service: "vdcm" });
if (!INSTANCE.test(config.instance)) {
  const problem = { name: "VDCM_INSTANCE", value: config.instance, expected: "1..128 of letters, digits and ._:@-" };
  process.stderr.write(`vdcm: ${new ConfigError([problem]).message}\n`);
  process.exit(2);
}
const logger = createLogger("vdcm", { level: config.logLevel });
// Set on SIGTERM/SIGINT: a store write failing during the graceful stop does not fail-stop.
let stopping = false;
for (const signal of ["SIGTERM", "SIGINT"] as const) process.once(signal, () => (stopping = true));
const nc = await connectNats(config.natsUrl, { name: `vdcm-${config.instance}`, timeoutMs: config.natsConnectTimeout, logger }).catch((err: unknown) => {
  logger.fatal({ url: config.natsUrl, err: String(err) }, "cannot reach NATS: start nats-server or set NATS_URL");
  process.exit(1);
});
const coreClient = createCoreClient(config.coreAddress.address);
const iommuClient = createIommuClient(config.iommuAddress.address);
const history = new HistoryRecorder(nc, VDCM_ROLE, config.instance, config.prefix);
// The device tables live in JetStream: a VDCM killed with -9 comes back with its devices, mdevs and
// programmed PASIDs (the hardware did not forget them), then reconciles with the core.
const store = await RoleState.open(nc, { role: VDCM_ROLE, instance: config.instance, prefix: config.prefix, codec: vdcmStateCodec }).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot open VDCM's state in JetStream (is nats-server running with -js?)");
  process.exit(1);
});
// A store in another format (the JSON of earlier versions) is refused, with what to do.
const saved = await store.load().catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot read VDCM's kept state");
  process.exit(1);
});
const state = VdcmState.restore(saved);
// History records wait until the tables they describe are kept (a crash takes back both).
const gate = new HistoryGate({ quiet: () => !state.hasChanges() });
const vdcm = new Vdcm({
  state,
  store: gate.store(failStopOnWriteError(store, (err: unknown) => {
    logger.fatal({ err: String(err) }, "state store unwritable: exiting so a restart restores the kept tables and reconciles");
    process.exit(1);
  }, { stopping: () => stopping })),
  instance: config.instance,
  ioasids: coreIoasidPort(coreClient),
  notifier: coreNotifierPort(coreClient, { name: VDCM_ROLE, instance: config.instance }),
  dma: iommuDmaTranslator(iommuClient),
  history: gate.wrap(history),
  log: (level, msg, fields) => logger[level](fields ?? {}, msg),
});

if (saved.size > 0) {
  const snap = vdcm.snapshot();
  logger.info({ devices: snap.devices.length, mdevs: snap.mdevs.length, entries: snap.devices.reduce((n, d) => n + d.pasidEntries.length, 0) }, "restored the device tables");
}
// References and registrations the restored tables do not back are stale; entries whose reference
// is gone are cleared. The core may start after VDCM: keep trying for as long as NATS is given.
const reconcileDeadline = Date.now() + config.natsConnectTimeout;
for (let attempt = 0; ; attempt++) {
  try {
    const r = await vdcm.reconcile();
    if (r.released > 0 || r.unregistered > 0 || r.cleared > 0) logger.info(r, "reconciled with the core after restart");
    break;
  } catch (err) {
    if (Date.now() >= reconcileDeadline) {
      logger.fatal({ core: config.coreAddress.address, err: String(err) }, "cannot reach ioasid-core: start it or set IOASID_CORE_ADDRESS");
      process.exit(1);
    }
    if (attempt === 0) logger.warn({ core: config.coreAddress.address, err: String(err) }, "ioasid-core not reachable yet; retrying");
    await new Promise((r) => setTimeout(r, 250));
  }
}

// One subscriber per process: deliveries of every set registration (DEVICE priority) arrive here.
const subscriber = await startSubscriber({
  nc,
  name: VDCM_ROLE,
  instance: config.instance,
  prefix: config.prefix,
  handler: (e) =>
    vdcm.onIoasidEvent({
      type: e.type === events.EventType.EVENT_TYPE_FREE ? "FREE" : events.eventTypeToJSON(e.type),
      seq: Number(e.seq),
      ioasid: e.ioasid,
      generation: e.generation,
      setId: e.setId,
      spid: e.spid,
    }),
});

// Releases deferred while the core was unreachable are retried until made.
let retryingPuts = false;
const putTimer = setInterval(() => {
  if (retryingPuts || vdcm.pendingPutCount === 0) return;
  retryingPuts = true;
  void vdcm.retryPendingPuts().finally(() => (retryingPuts = false));
}, 1000);
putTimer.unref();

const server = createVdcmServer(vdcm, { logger });
await server.listen(config.address.host, config.address.port).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "could not start");
  process.exit(1);
});
runUntilSignal(server, {
  logger,
  beforeExit: async () => {
    await subscriber.stop();
    coreClient.close();
    iommuClient.close();
    await gate.settle();
    await nc.drain();
  },
});
