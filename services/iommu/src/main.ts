#!/usr/bin/env node
import { configOrExit, packageVersion, credentialsOrExit } from "@ioasid/grpc-kit";
import { HistoryRecorder } from "@ioasid/bus";
import { EventType, Priority } from "@ioasid/ioasid";
import { createCoreClient, createGrpcCorePort, ensureRegistration, runRole } from "@ioasid/role-kit";
import { iommuConfigSchema } from "./config.js";
import { IommuDriver } from "./domain/iommu-driver.js";
import { FailNth } from "./domain/fail-nth.js";
import { IommuHardware } from "./domain/iommu-hardware.js";
import { createIommuServer } from "./adapters/server.js";
import { createIommuEventHandler } from "./adapters/iommu-event-handler.js";
import { iommuHistoryPort } from "./adapters/iommu-history.js";
import { iommuStateCodec } from "./adapters/iommu-state-codec.js";

// config → core client → runRole: NATS, kept tables, driver, reconcile, subscriber, registration, gRPC server.

const SUBSCRIBER_NAME = "iommu";
const INSTANCE = /^[A-Za-z0-9._:@-]{1,128}$/;

const config = configOrExit(iommuConfigSchema, { service: "iommu", version: packageVersion(import.meta.url) });
if (!INSTANCE.test(config.instance)) {
  process.stderr.write(`iommu: IOMMU_INSTANCE must be 1..128 of letters, digits and ._:@- (got "${config.instance}")\n`);
  process.exit(2);
}
// IOASID_CREDENTIALS_DIR: mTLS for IommuService and toward the core (DESIGN §11).
const tls = credentialsOrExit({ service: "iommu", role: "iommu" });
const coreClient = createCoreClient(config.coreAddress.address, undefined, tls);
const core = createGrpcCorePort(coreClient);

await runRole({
  role: SUBSCRIBER_NAME,
  instance: config.instance,
  config,
  codec: iommuStateCodec,
  build: ({ logger, nc, saved, store, history }) => {
    // The hardware tables and outstanding fault groups come back as kept: PASID tables, attach
    // handles and fault groups; reconcile then squares them with the core.
    const hardware = IommuHardware.restore(saved);
    const driver = new IommuDriver({
      store,
      saved: saved,
      hardware,
      core,
      history: iommuHistoryPort(history(new HistoryRecorder(nc, SUBSCRIBER_NAME, config.instance, config.prefix))),
      log: logger,
      instance: config.instance,
      faultTimeoutMs: config.faultTimeoutMs,
      ...(config.faultInjection ? { failNth: new FailNth() } : {}),
    });
    return {
      server: createIommuServer(driver, { logger, ...(tls === undefined ? {} : { tls }) }),
      listen: config.address,
      quiet: () => !hardware.hasChanges() && !driver.prq.hasChanges() && !driver.viommus.hasChanges(),
      restored: {
        message: "restored the IOMMU's tables",
        fields: () => {
          const snap = driver.snapshot([], 0);
          return { devices: snap.devices.length, handles: snap.handles.length, faultGroups: driver.prq.outstanding().length };
        },
      },
      // The restored tables against the core first, so that a FREE delivered from the backlog finds them.
      reconcile: { run: () => driver.reconcile(), when: "before-serving" },
      subscriber: { instance: config.instance, handler: createIommuEventHandler(driver) },
      // The IOMMU tears PASIDs down on FREE, globally, after CPU and DEVICE (DESIGN §1, §5).
      register: async () => {
        const registration = await ensureRegistration(core, {
          subscriber: { name: SUBSCRIBER_NAME, instance: config.instance },
          priority: Priority.IOMMU,
          scope: { kind: "global" },
          events: [EventType.FREE],
        });
        logger.info({ registrationId: registration.id, instance: config.instance }, "registered with the core (global, IOMMU priority, FREE)");
      },
      // Open fault-handler streams would hold the graceful shutdown for its whole grace period: end them first.
      onSignal: () => driver.stop(),
      stop: () => coreClient.close(),
    };
  },
});
