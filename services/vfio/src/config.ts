import { defineConfigSchema, metricsConfig, type ConfigProblem } from "@ioasid/grpc-kit";
import { commonRoleConfig } from "@ioasid/role-kit";
import { hostMemoryProblem } from "./domain/host-memory-pool.js";
import { DEFAULT_GUEST_MEMORY_SIZE, DEFAULT_HOST_MEMORY, MAX_SESSION_GRACE_MS } from "./domain/vfio-containers.js";

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
  hostMemoryBase: {
    name: "VFIO_HOST_MEMORY_BASE",
    kind: "bytes",
    default: DEFAULT_HOST_MEMORY.base,
    doc: "First host physical address of the memory VFIO gives VMs (4 KiB aligned): MapDma maps only memory given to the VM's container.",
  },
  hostMemorySize: {
    name: "VFIO_HOST_MEMORY_SIZE",
    kind: "bytes",
    default: DEFAULT_HOST_MEMORY.size,
    doc: "Bytes of host memory VFIO gives VMs from VFIO_HOST_MEMORY_BASE up; OpenContainer is RESOURCE_EXHAUSTED HOST_MEMORY_EXHAUSTED when too little is free.",
  },
  guestMemorySize: {
    name: "VFIO_GUEST_MEMORY_SIZE",
    kind: "bytes",
    default: DEFAULT_GUEST_MEMORY_SIZE,
    doc: "Host memory given to a container whose OpenContainer asks for none (guest_memory_size 0): a multiple of 4 KiB, at most VFIO_HOST_MEMORY_SIZE.",
  },
  ...commonRoleConfig,
  // Prometheus text on GET /metrics: the gRPC default port + METRICS_PORT_OFFSET.
  ...metricsConfig(50058),
});

/**
 * What the schema's kinds cannot say: bounds of the grace period, an instance usable in the owner
 * name of IOMMU attach handles (the core's holder/subscriber alphabet), and a host memory pool and
 * default guest memory that VFIO can give out (4 KiB pages, below 2^64, the default fitting the pool).
 */
export function vfioConfigProblems(config: {
  readonly sessionGraceMs: number;
  readonly instance: string;
  readonly hostMemoryBase: bigint;
  readonly hostMemorySize: bigint;
  readonly guestMemorySize: bigint;
}): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  if (config.sessionGraceMs < 1 || config.sessionGraceMs > MAX_SESSION_GRACE_MS) {
    problems.push({ name: "VFIO_SESSION_GRACE", value: `${config.sessionGraceMs}ms`, expected: "a duration from 1ms to 24h" });
  }
  if (!/^[A-Za-z0-9._:@-]{1,128}$/.test(config.instance)) {
    problems.push({ name: "VFIO_INSTANCE", value: config.instance, expected: "1..128 of letters, digits and ._:@-" });
  }
  const pool = hostMemoryProblem({ base: config.hostMemoryBase, size: config.hostMemorySize });
  if (pool !== undefined) {
    problems.push({
      name: "VFIO_HOST_MEMORY_BASE, VFIO_HOST_MEMORY_SIZE",
      value: `0x${config.hostMemoryBase.toString(16)} + ${config.hostMemorySize}`,
      expected: pool,
    });
  }
  const guest = config.guestMemorySize;
  if (guest <= 0n || guest % 4096n !== 0n || guest > config.hostMemorySize) {
    problems.push({ name: "VFIO_GUEST_MEMORY_SIZE", value: String(guest), expected: "a non-zero multiple of 4 KiB, at most VFIO_HOST_MEMORY_SIZE" });
  }
  return problems;
}
