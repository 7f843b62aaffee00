import { defineConfigSchema, metricsConfig } from "@ioasid/grpc-kit";
import { commonRoleConfig } from "@ioasid/role-kit";

/** Configuration of the IOMMU role, from the environment (`iommu --help` lists it). */
export const iommuConfigSchema = defineConfigSchema({
  ...commonRoleConfig,
  // Prometheus text on GET /metrics: the gRPC default port + METRICS_PORT_OFFSET.
  ...metricsConfig(50057),
  address: {
    name: "IOMMU_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50052",
    doc: "host:port the IommuService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  instance: {
    name: "IOMMU_INSTANCE",
    kind: "string",
    default: "dmar0",
    doc: "This IOMMU's instance: its notifier subscriber instance and the holder instance of its references (iommu/<instance>/bind).",
  },
  faultTimeoutMs: {
    name: "IOMMU_FAULT_TIMEOUT",
    kind: "duration-ms",
    default: 10_000,
    doc: "How long a page-request group may stay unanswered (from its first request) before the IOMMU answers it INVALID.",
  },
  faultInjection: {
    name: "IOASID_IOMMU_FAULT_INJECTION",
    kind: "boolean",
    default: false,
    doc: "Tests only: serve InjectFailure, which makes the next AttachDomain/ReplaceDomain/DetachDomain/BindGpasid/UnbindGpasid fail at its n-th failure point (the kernel's fail-nth). Off: InjectFailure is refused.",
  },
});
