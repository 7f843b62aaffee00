#!/usr/bin/env node
import { configOrExit, defineConfigSchema, formatAddress } from "@ioasid/grpc-kit";
import { commonRoleConfig, createCoreClient, runRole } from "@ioasid/role-kit";
import { KVM_SUBSCRIBER } from "./domain/holder-reference.js";
import { buildKvmRole } from "./adapters/server.js";
import { kvmStateCodec } from "./adapters/kvm-state-codec.js";

/** Configuration of the KVM service, from the environment (`kvm --help` lists it). */
export const kvmConfigSchema = defineConfigSchema({
  address: {
    name: "KVM_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50054",
    doc: "host:port the KvmService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  reapStale: {
    name: "KVM_REAP_STALE_VMS",
    kind: "boolean",
    default: true,
    doc: "At start, drop the IOASID references and notifier registrations of VMs an earlier KVM process left behind and its kept state does not bring back (VMs it kept in JetStream come back with their tables); then, and after a VM went without KVM knowing all it held, release every kvm/* reference of an instance that is not a live VM.",
  },
  ...commonRoleConfig,
});

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
