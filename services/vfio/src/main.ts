#!/usr/bin/env node
import { HistoryRecorder } from "@ioasid/bus";
import { ConfigError, configOrExit, createClient, defineConfigSchema, type ConfigProblem } from "@ioasid/grpc-kit";
import { iommu, vdcm } from "@ioasid/proto";
import { commonRoleConfig, createCoreClient, createGrpcCorePort, runRole } from "@ioasid/role-kit";
import { createGuestPagesPort, createIommuFaultPort, createIommuPort, createVdcmPort } from "./adapters/grpc-ports.js";
import { FaultRelay } from "./domain/fault-relay.js";
import { createVfioServer } from "./adapters/server.js";
import { CloseReason } from "./domain/container.js";
import { MAX_SESSION_GRACE_MS, VfioContainers } from "./domain/vfio-containers.js";
import { vfioStateCodec } from "./adapters/vfio-state-codec.js";

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
const coreClient = createCoreClient(config.coreAddress.address);
const iommuClient = createClient(iommu.IommuServiceService, config.iommuAddress.address);
const vdcmClient = createClient(vdcm.VdcmServiceService, config.vdcmAddress.address);

await runRole({
  role: "vfio",
  instance: config.instance,
  config,
  codec: vfioStateCodec,
  build: ({ logger, nc, saved, store, history: gated }) => {
    // Through the role's history gate, as every role's: records wait until the tables they describe are kept.
    const history = gated(new HistoryRecorder(nc, "vfio", config.instance, config.prefix));
    // Late-bound: the relay asks the containers whether one is open, the containers tell the relay when one closes.
    const late: { faults?: FaultRelay } = {};
    // The containers come back as kept: a VFIO killed with -9 finds the ones it had and closes them
    // as crashed guests (their VMMs' sessions died with it).
    const containers = new VfioContainers({
      core: createGrpcCorePort(coreClient),
      iommu: createIommuPort(iommuClient, `vfio/${config.instance}`),
      vdcm: createVdcmPort(vdcmClient),
      history,
      sessionGraceMs: config.sessionGraceMs,
      log: logger,
      onClosing: (containerId) => late.faults?.containerClosing(containerId) ?? Promise.resolve(),
      store,
      saved: saved,
    });
    const faultRelay = new FaultRelay({
      iommu: createIommuFaultPort(iommuClient, `vfio/${config.instance}`),
      history,
      log: logger,
      isOpen: (containerId) => containers.isOpen(containerId),
    });
    late.faults = faultRelay;
    faultRelay.start();
    // Containers do not outlive VFIO: at SIGTERM/SIGINT every container is closed (its IOASIDs
    // freed, its Session stream ended with SERVICE_STOPPED) while the server drains, so that the
    // sessions end and the graceful shutdown can complete.
    let closingAll: Promise<void> | undefined;
    const closeAll = (): Promise<void> => (closingAll ??= containers.closeAll(CloseReason.SERVICE_STOPPED));
    return {
      server: createVfioServer({ containers, faults: faultRelay, guestPages: createGuestPagesPort(iommuClient), logger }),
      listen: config.address,
      onSignal: () => void closeAll(),
      serving: () => {
        logger.info(
          { instance: config.instance, core: config.coreAddress.address, iommu: config.iommuAddress.address, vdcm: config.vdcmAddress.address },
          "vfio serving",
        );
        // Containers of the life before a crash: closed as crashed guests (in the background: the
        // core and the roles may still be starting; the close retries while they are unreachable).
        void containers.closeRestored().then(
          (n) => {
            if (n > 0) logger.info({ containers: n }, "closed the containers of the life before a crash (their sessions died with it)");
          },
          (err: unknown) => logger.error({ err: String(err) }, "closing the containers left by a crash failed"),
        );
      },
      stop: async () => {
        await closeAll();
        faultRelay.stop();
        coreClient.close();
        iommuClient.close();
        vdcmClient.close();
      },
    };
  },
});
