#!/usr/bin/env node
import { configOrExit, packageVersion, credentialsOrExit, formatAddress } from "@ioasid/grpc-kit";
import { createCoreClient, runRole } from "@ioasid/role-kit";
import { kvmConfigSchema } from "./config.js";
import { KVM_SUBSCRIBER } from "./domain/holder-reference.js";
import { buildKvmRole } from "./adapters/server.js";
import { kvmStateCodec } from "./adapters/kvm-state-codec.js";

const config = configOrExit(kvmConfigSchema, { service: "kvm", version: packageVersion(import.meta.url) });
// IOASID_CREDENTIALS_DIR: mTLS for KvmService and toward the core (DESIGN §11).
const tls = credentialsOrExit({ service: "kvm", role: "kvm" });
const core = createCoreClient(formatAddress(config.coreAddress.host, config.coreAddress.port), undefined, tls);
// One KVM per host: its VMs and their VMCS tables are kept under the instance "kvm0".
await runRole({
  role: KVM_SUBSCRIBER,
  instance: "kvm0",
  config,
  codec: kvmStateCodec,
  connectionName: "kvm",
  build: (rt) =>
    buildKvmRole(rt, { core, host: config.address.host, port: config.address.port, reapStale: config.reapStale, ...(tls === undefined ? {} : { tls }) }),
});
