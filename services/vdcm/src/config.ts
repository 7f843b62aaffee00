import { ConfigError, defineConfigSchema, metricsConfig } from "@ioasid/grpc-kit";
import { commonRoleConfig } from "@ioasid/role-kit";

/** Configuration of the VDCM service, from the environment (`vdcm --help` lists it). */
export const vdcmConfigSchema = defineConfigSchema({
  ...commonRoleConfig,
  // Prometheus text on GET /metrics: the gRPC default port + METRICS_PORT_OFFSET.
  ...metricsConfig(50060),
  address: {
    name: "VDCM_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50055",
    doc: "host:port VdcmService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  instance: {
    name: "VDCM_INSTANCE",
    kind: "string",
    default: "vdcm0",
    doc: "This VDCM's instance: its notifier subscriber instance and the holder instance of its IOASID references (1..128 of letters, digits, ._:@-).",
  },
  iommuAddress: {
    name: "IOMMU_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50052",
    doc: "host:port of the IOMMU service that translates descriptors' DMA (IommuService.Translate).",
  },
});

const INSTANCE = /^[A-Za-z0-9._:@-]{1,128}$/;

/**
 * Exits with code 2 and the problem named when VDCM_INSTANCE is not 1..128 of letters, digits and
 * ._:@- (it is part of every reference VDCM holds and of its subscriber subject).
 */
export function checkInstanceOrExit(instance: string): void {
  if (INSTANCE.test(instance)) return;
  const problem = { name: "VDCM_INSTANCE", value: instance, expected: "1..128 of letters, digits and ._:@-" };
  process.stderr.write(`vdcm: ${new ConfigError([problem]).message}\n`);
  process.exit(2);
}
