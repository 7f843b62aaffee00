#!/usr/bin/env node
import { configOrExit, packageVersion, credentialsOrExit } from "@ioasid/grpc-kit";
import { createCoreClient, runRole } from "@ioasid/role-kit";
import { createIommuClient } from "./adapters/iommu-adapter.js";
import { buildVdcmRole } from "./adapters/role.js";
import { vdcmStateCodec } from "./adapters/vdcm-state-codec.js";
import { checkInstanceOrExit, vdcmConfigSchema } from "./config.js";
import { VDCM_ROLE } from "./domain/vdcm.js";

const config = configOrExit(vdcmConfigSchema, { service: "vdcm", version: packageVersion(import.meta.url) });
checkInstanceOrExit(config.instance);
// IOASID_CREDENTIALS_DIR: mTLS for VdcmService and toward the core and the IOMMU (DESIGN §11).
const tls = credentialsOrExit({ service: "vdcm", role: "vdcm" });

await runRole({
  role: VDCM_ROLE,
  instance: config.instance,
  config,
  codec: vdcmStateCodec,
  connectionName: `vdcm-${config.instance}`,
  build: (rt) =>
    buildVdcmRole(rt, {
      instance: config.instance,
      listen: config.address,
      coreClient: createCoreClient(config.coreAddress.address, undefined, tls),
      iommuClient: createIommuClient(config.iommuAddress.address, tls),
      ...(tls === undefined ? {} : { tls }),
    }),
});
