#!/usr/bin/env node
import { configOrExit, formatAddress } from "@ioasid/grpc-kit";
import { createCoreClient, runRole } from "@ioasid/role-kit";
import { kvmConfigSchema } from "./config.js";
import { KVM_SUBSCRIBER } from "./domain/holder-reference.js";
import { buildKvmRole } from "./adapters/server.js";
import { kvmStateCodec } from "./adapters/kvm-state-codec.js";

const config = configOrExit(kvmConfigSchema, { service: "kvm" });
const core = createCoreClient(formatAddress(config.coreAddress.host, config.coreAddress.port));
// One KVM per host: its VMs and their VMCS tables are kept under the instance "kvm0".
await runRole({
  role: KVM_SUBSCRIBER,
  instance: "kvm0",
  config,
  codec: kvmStateCodec,
  connectionName: "kvm",
  build: (rt) => buildKvmRole(rt, { core, host: config.address.host, port: config.address.port, reapStale: config.reapStale }),
});
