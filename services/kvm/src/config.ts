import { defineConfigSchema, metricsConfig } from "@ioasid/grpc-kit";
import { commonRoleConfig } from "@ioasid/role-kit";

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
  // Prometheus text on GET /metrics: the gRPC default port + METRICS_PORT_OFFSET.
  ...metricsConfig(50059),
});
