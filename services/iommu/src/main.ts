#!/usr/bin/env node
import { configOrExit, createLogger, runUntilSignal } from "@ioasid/grpc-kit";
import { failStopOnWriteError, HistoryGate, HistoryRecorder, RoleState, startSubscriber, type Subscriber } from "@ioasid/bus";
import { connectNats, createCoreClient, ensureRegistration, type CoreClient } from "@ioasid/role-kit";
import { Code, isDomainError } from "@ioasid/errors";
import { events, type core } from "@ioasid/proto";
import { iommuConfigSchema } from "./config.js";
import { IommuDriver } from "./iommu-driver.js";
import { IommuHardware } from "./iommu-hardware.js";
import { iommuStateCodec } from "./iommu-state-codec.js";
import { startIommuServer } from "./server.js";

// config → logger → NATS → core client → driver → bus subscriber + registration → gRPC server.

const SUBSCRIBER_NAME = "iommu";
const INSTANCE = /^[A-Za-z0-9._:@-]{1,128}$/;

const config = configOrExit(iommuConfigSchema, { service: "iommu" });
if (!INSTANCE.test(config.instance)) {
  process.stderr.write(`iommu: IOMMU_INSTANCE must be 1..128 of letters, digits and ._:@- (got "${config.instance}")\n`);
  process.exit(2);
}
const logger = createLogger("iommu", { level: config.logLevel });
// Set on SIGTERM/SIGINT: a store write failing during the graceful stop does not fail-stop.
let stopping = false;
for (const signal of ["SIGTERM", "SIGINT"] as const) process.once(signal, () => (stopping = true));
const nc = await connectNats(config.natsUrl, { name: `iommu/${config.instance}`, timeoutMs: config.natsConnectTimeout, logger }).catch(
  (err: unknown) => {
    logger.fatal({ url: config.natsUrl, err: String(err) }, "cannot reach NATS: start nats-server or set NATS_URL");
    process.exit(1);
  },
);
const coreClient = createCoreClient(config.coreAddress.address);
// The hardware tables and outstanding fault groups live in JetStream: an IOMMU killed with -9 comes
// back with its PASID tables, attach handles and fault groups, then reconciles with the core.
const store = await RoleState.open(nc, { role: "iommu", instance: config.instance, prefix: config.prefix, codec: iommuStateCodec }).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot open the IOMMU's state in JetStream (is nats-server running with -js?)");
  process.exit(1);
});
// A store in another format (the JSON of earlier versions) is refused, with what to do.
const saved = await store.load().catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "cannot read the IOMMU's kept state");
  process.exit(1);
});
const hardware = IommuHardware.restore(saved);
// History records wait until the tables they describe are kept (a crash takes back both).
let prqQuiet = (): boolean => true;
const gate = new HistoryGate({ quiet: () => !hardware.hasChanges() && prqQuiet() });
const driver = new IommuDriver({
  store: gate.store(failStopOnWriteError(store, (err: unknown) => {
    logger.fatal({ err: String(err) }, "state store unwritable: exiting so a restart restores the kept tables and reconciles");
    process.exit(1);
  }, { stopping: () => stopping })),
  saved,
  hardware,
  core: coreClient,
  history: gate.wrap(new HistoryRecorder(nc, "iommu", config.instance, config.prefix)),
  log: logger,
  instance: config.instance,
  faultTimeoutMs: config.faultTimeoutMs,
});
prqQuiet = () => !driver.prq.hasChanges();

let subscriber: Subscriber;
try {
  // The restored tables against the core first, so a FREE delivered from the backlog finds them.
  if (saved.size > 0) {
    const snap = driver.snapshot([], 0);
    logger.info({ devices: snap.devices.length, handles: snap.handles.length, faultGroups: driver.prq.outstanding().length }, "restored the IOMMU's tables");
  }
  const r = await retryWhileUnreachable(() => driver.reconcile(), config.natsConnectTimeout);
  if (r.adopted > 0 || r.tornDown > 0) logger.info(r, "reconciled with the core after the restart");
  // Subscribe before registering, so no delivery finds nobody listening.
  subscriber = await startSubscriber({
    nc,
    name: SUBSCRIBER_NAME,
    instance: config.instance,
    prefix: config.prefix,
    handler: (event) => driver.handleEvent(event),
  });
  // The IOMMU tears PASIDs down on FREE, globally, after CPU and DEVICE (DESIGN §1, §5).
  const registration = await retryWhileUnreachable(() => register(coreClient), config.natsConnectTimeout);
  logger.info({ registrationId: registration.registrationId, instance: config.instance }, "registered with the core (global, IOMMU priority, FREE)");
} catch (err) {
  logger.fatal({ err: String(err), core: config.coreAddress.address }, "cannot take back references or register with ioasid-core");
  process.exit(1);
}

const server = await startIommuServer({ driver, host: config.address.host, port: config.address.port, logger }).catch((err: unknown) => {
  logger.fatal({ err: String(err) }, "could not start");
  process.exit(1);
});
// Open fault-handler streams would hold the graceful shutdown for its whole grace period: end them first.
for (const signal of ["SIGTERM", "SIGINT"] as const) process.once(signal, () => driver.stop());
runUntilSignal(server, {
  logger,
  beforeExit: async () => {
    await subscriber.stop();
    coreClient.close();
    await gate.settle();
    await nc.drain();
  },
});

/** Registers the IOMMU's notifier: global, IOMMU priority, FREE (idempotent across restarts). */
function register(client: CoreClient): Promise<core.Registration> {
  return ensureRegistration(client, {
    subscriber: { name: SUBSCRIBER_NAME, instance: config.instance },
    priority: events.Priority.PRIORITY_IOMMU,
    scope: { $case: "global", value: true },
    events: [events.EventType.EVENT_TYPE_FREE],
  });
}

/** Runs `call`, retried while the core is not reachable yet (it may start after the IOMMU). */
async function retryWhileUnreachable<T>(call: () => Promise<T>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      const unreachable = isDomainError(err) && (err.code === Code.UNAVAILABLE || err.code === Code.DEADLINE_EXCEEDED);
      if (!unreachable || Date.now() >= deadline) throw err;
      if (attempt === 0) logger.warn({ core: config.coreAddress.address }, "ioasid-core not reachable yet; retrying");
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}
