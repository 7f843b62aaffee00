import { defineConfigSchema, type ConfigProblem } from "@ioasid/grpc-kit";
import { commonRoleConfig } from "@ioasid/role-kit";
import { MAX_SESSION_GRACE_MS } from "./domain/vfio-containers.js";

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

/**
 * What the schema's kinds cannot say: bounds of the grace period, and an instance usable in the
 * owner name of IOMMU attach handles (the core's holder/subscriber alphabet).
 */
export function vfioConfigProblems(config: { readonly sessionGraceMs: number; readonly instance: string }): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  if (config.sessionGraceMs < 1 || config.sessionGraceMs > MAX_SESSION_GRACE_MS) {
    problems.push({ name: "VFIO_SESSION_GRACE", value: `${config.sessionGraceMs}ms`, expected: "a duration from 1ms to 24h" });
  }
  if (!/^[A-Za-z0-9._:@-]{1,128}$/.test(config.instance)) {
    problems.push({ name: "VFIO_INSTANCE", value: config.instance, expected: "1..128 of letters, digits and ._:@-" });
  }
  return problems;
}
