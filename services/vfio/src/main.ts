#!/usr/bin/env node
import { HistoryRecorder } from "@ioasid/bus";
import { ConfigError, configOrExit, packageVersion, createClient, credentialsOrExit } from "@ioasid/grpc-kit";
import { iommu, vdcm } from "@ioasid/proto";
import { createCoreClient, createGrpcCorePort, runRole } from "@ioasid/role-kit";
import { vfioConfigProblems, vfioConfigSchema } from "./config.js";
import { createGuestPagesPort, createIommuFaultPort, createIommuPort, createVdcmPort } from "./adapters/grpc-ports.js";
import { FaultRelay } from "./domain/fault-relay.js";
import { createVfioServer } from "./adapters/server.js";
import { CloseReason } from "./domain/container.js";
import { VfioContainers } from "./domain/vfio-containers.js";
import { vfioStateCodec } from "./adapters/vfio-state-codec.js";

const config = configOrExit(vfioConfigSchema, { service: "vfio", version: packageVersion(import.meta.url) });
const problems = vfioConfigProblems(config);
if (problems.length > 0) {
  process.stderr.write(`vfio: ${new ConfigError(problems).message}\n`);
  process.exit(2);
}
// IOASID_CREDENTIALS_DIR: mTLS for VfioService (VMMs then need a vmm credential) and toward the
// core, the IOMMU and VDCM, each of which must prove its role (DESIGN §11).
const tls = credentialsOrExit({ service: "vfio", role: "vfio" });
const coreClient = createCoreClient(config.coreAddress.address, undefined, tls);
const iommuClient = createClient(iommu.IommuServiceService, config.iommuAddress.address, tls === undefined ? {} : { tls, serverRole: "iommu" });
const vdcmClient = createClient(vdcm.VdcmServiceService, config.vdcmAddress.address, tls === undefined ? {} : { tls, serverRole: "vdcm" });

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
      hostMemory: { base: config.hostMemoryBase, size: config.hostMemorySize },
      guestMemorySize: config.guestMemorySize,
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
      server: createVfioServer({
        containers,
        faults: faultRelay,
        guestPages: createGuestPagesPort(iommuClient),
        logger,
        ...(tls === undefined ? {} : { tls }),
      }),
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
