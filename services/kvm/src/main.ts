#!/usr/bin/env node
import { configOrExit, packageVersion, credentialsOrExit } from "@ioasid/grpc-kit";
import { createCoreClient, runRole } from "@ioasid/role-kit";
import { kvmConfigSchema } from "./config.js";
import { KVM_SUBSCRIBER } from "./domain/holder-reference.js";
import { buildKvmRole } from "./adapters/server.js";
import { kvmStateCodec } from "./adapters/kvm-state-codec.js";

const config = configOrExit(kvmConfigSchema, { service: "kvm", version: packageVersion(import.meta.url) });
// IOASID_CREDENTIALS_DIR: mTLS for KvmService and toward the core (DESIGN §11).
const tls = credentialsOrExit({ service: "kvm", role: "kvm" });
// Every core address given (`ipv4:a,b` with a standby): KVM follows a takeover, as the other roles
// do (issue 18). It took only the first until the ioasidctl standby test found KVM's CreateVm
// registrations failing UNAVAILABLE for good once that core had died.
const core = createCoreClient(config.coreAddress.address, undefined, tls);
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
