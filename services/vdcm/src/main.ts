#!/usr/bin/env node
import { HistoryRecorder } from "@ioasid/bus";
import { ConfigError, configOrExit, defineConfigSchema } from "@ioasid/grpc-kit";
import { events } from "@ioasid/proto";
import { commonRoleConfig, createCoreClient, createGrpcCorePort, runRole } from "@ioasid/role-kit";
import { createIommuClient, iommuDmaTranslator } from "./adapters/iommu-adapter.js";
import { createVdcmServer } from "./adapters/server.js";
import { Vdcm, VDCM_ROLE } from "./domain/vdcm.js";
import { VdcmState } from "./domain/vdcm-state.js";
import { vdcmStateCodec } from "./adapters/vdcm-state-codec.js";
import { toHistorySink } from "./adapters/convert.js";

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
const coreClient = createCoreClient(config.coreAddress.address);
const iommuClient = createIommuClient(config.iommuAddress.address);

await runRole({
  role: VDCM_ROLE,
  instance: config.instance,
  config,
  codec: vdcmStateCodec,
  connectionName: `vdcm-${config.instance}`,
  build: ({ logger, nc, saved, store, history }) => {
    // The device tables come back as kept: devices, mdevs and programmed PASIDs (the hardware did
    // not forget them); reconcile then squares them with the core.
    const state = VdcmState.restore(saved);
    const vdcm = new Vdcm({
      state,
      store,
      instance: config.instance,
      core: createGrpcCorePort(coreClient),
      dma: iommuDmaTranslator(iommuClient),
      history: toHistorySink(history(new HistoryRecorder(nc, VDCM_ROLE, config.instance, config.prefix))),
      log: (level, msg, fields) => logger[level](fields ?? {}, msg),
    });
    return {
      server: createVdcmServer(vdcm, { logger }),
      listen: config.address,
      quiet: () => !state.hasChanges(),
      restored: {
        message: "restored the device tables",
        fields: () => {
          const snap = vdcm.snapshot();
          return { devices: snap.devices.length, mdevs: snap.mdevs.length, entries: snap.devices.reduce((n, d) => n + d.pasidEntries.length, 0) };
        },
      },
      // References and registrations the restored tables do not back are stale; entries whose
      // reference is gone are cleared. Any failure is retried while NATS's connect timeout lasts
      // (the core may start after VDCM).
      reconcile: { run: () => vdcm.reconcile(), when: "before-serving", retryOn: () => true },
      // One subscriber per process: deliveries of every set registration (DEVICE priority) arrive here.
      subscriber: {
        instance: config.instance,
        handler: (e) =>
          vdcm.onIoasidEvent({
            type: e.type === events.EventType.EVENT_TYPE_FREE ? "FREE" : events.eventTypeToJSON(e.type),
            seq: Number(e.seq),
            ioasid: e.ioasid,
            generation: e.generation,
            setId: e.setId,
            spid: e.spid,
          }),
      },
      // Releases deferred while the core was unreachable are retried until made.
      retry: { due: () => vdcm.pendingPutCount > 0, run: () => vdcm.retryPendingPuts(), everyMs: 1000 },
      stop: () => {
        coreClient.close();
        iommuClient.close();
      },
    };
  },
});
