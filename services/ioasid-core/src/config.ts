import { defineConfigSchema, metricsConfig } from "@ioasid/grpc-kit";
import { DEFAULT_CAPACITY, MAX_CAPACITY } from "@ioasid/ioasid";
import { busConfig } from "@ioasid/role-kit";

/** Configuration of ioasid-core, from the environment (`ioasid-core --help` lists it). */
export const coreConfigSchema = defineConfigSchema({
  ...busConfig,
  // Prometheus text on GET /metrics: the gRPC default port + METRICS_PORT_OFFSET.
  ...metricsConfig(50056),
  address: {
    name: "IOASID_CORE_GRPC_ADDRESS",
    kind: "address",
    default: "127.0.0.1:50051",
    doc: "host:port the CoreService listens on (port 0: an ephemeral port, printed in the 'listening' log line).",
  },
  capacity: {
    name: "IOASID_CAPACITY",
    kind: "int",
    min: 2,
    max: MAX_CAPACITY,
    default: DEFAULT_CAPACITY,
    doc: "Size of the IOASID namespace; valid IOASIDs are 1..capacity-1 (PASID 0 is reserved).",
  },
  eventLogRetain: {
    name: "IOASID_CORE_EVENT_LOG_RETAIN",
    kind: "int",
    min: 1,
    max: 10_000_000,
    default: 100_000,
    doc: "Committed events kept in memory for WatchEvents readers.",
  },
  watchBuffer: {
    name: "IOASID_CORE_WATCH_BUFFER",
    kind: "int",
    min: 1,
    max: 1_000_000,
    default: 10_000,
    doc: "Most committed events held for one WatchEvents stream that is not reading; past it the stream ends with RESOURCE_EXHAUSTED READER_TOO_SLOW (resume from its resume_from_seq).",
  },
  stream: {
    name: "IOASID_CORE_STREAM",
    kind: "string",
    default: "IOASID_CORE_OPS",
    doc: "JetStream stream holding the core's operation log (file storage).",
  },
  snapshotEveryOps: {
    name: "IOASID_CORE_SNAPSHOT_OPS",
    kind: "int",
    min: 0,
    max: 100_000_000,
    default: 100_000,
    doc: "Write a snapshot of the core's state once this many IOASID operations were logged since the last one (a batch allocation counts its IOASIDs), and trim the op log behind it; a restart loads the snapshot and replays only what follows. 0: never by count.",
  },
  snapshotEveryBytes: {
    name: "IOASID_CORE_SNAPSHOT_BYTES",
    kind: "bytes",
    max: 1n << 40n,
    default: 16n * 1024n * 1024n,
    doc: "Write a snapshot once this many bytes of operations were logged since the last one (K, M, G suffixes). 0: never by size. With both 0 the op log is never trimmed.",
  },
  historyFlushMs: {
    name: "IOASID_CORE_HISTORY_FLUSH",
    kind: "duration-ms",
    default: 5,
    doc: "How long the history records of the core's operations wait for company before they are published: sequential calls then share one history message. What a crash takes before it is published, the next start publishes again from the op log; a graceful stop publishes what waits. 0ms: at the end of each turn.",
  },
  replicas: {
    name: "IOASID_JS_REPLICAS",
    kind: "int",
    min: 1,
    max: 5,
    default: 1,
    doc: "Replicas of the operation log stream (snapshots included): 1 on one server, 3 in a NATS cluster.",
  },
  standby: {
    name: "IOASID_CORE_STANDBY",
    kind: "boolean",
    default: false,
    doc: "Start as a standby: wait while another core answers its lease on <prefix>.core.lease, and take over (replay the operation log, seal it, serve) once it has not answered for IOASID_CORE_LEASE. Without it the core serves at once.",
  },
  leaseMs: {
    name: "IOASID_CORE_LEASE",
    kind: "duration-ms",
    default: 1000,
    doc: "How long a standby waits without an answer from the serving core before it takes over.",
  },
  opLogWriteRetryMs: {
    name: "IOASID_OPLOG_WRITE_RETRY",
    kind: "duration-ms",
    default: 10_000,
    doc: "How long an operation-log write JetStream cannot take for a moment (a cluster electing a leader after a nats-server died, a reconnect) is retried, in order and under the same message id, before the core stops (fail-stop).",
  },
  deadlineMs: {
    name: "IOASID_DELIVERY_DEADLINE",
    kind: "duration-ms",
    default: 2000,
    doc: "Time a subscriber gets to acknowledge a delivery before it is recorded as missed.",
  },
  maxInFlightPerName: {
    name: "IOASID_DELIVERY_MAX_IN_FLIGHT",
    kind: "int",
    min: 1,
    max: 1_000_000,
    default: 2048,
    doc: "Most deliveries sent to one subscriber name (a role, e.g. all of KVM's VMs) and not yet acknowledged; more wait in the core, so a process serving many instances is never handed more than it can answer within the deadline.",
  },
  retryMs: {
    name: "IOASID_DELIVERY_RETRY",
    kind: "duration-ms",
    default: 1000,
    doc: "How often deliveries a subscriber missed are retried.",
  },
});
