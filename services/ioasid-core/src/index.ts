/** The IOASID core service: its model wrapper, gRPC handlers and server. */
export { coreConfigSchema } from "./config.js";
export { EventLog, type CommittedEvent, type EventLogOptions } from "./event-log.js";
export { IoasidCore, type ExternalAllocator, type IoasidCoreOptions } from "./ioasid-core.js";
export {
  DEFAULT_SNAPSHOT_EVERY_BYTES,
  DEFAULT_SNAPSHOT_EVERY_OPS,
  isTransientWriteError,
  OpLog,
  type OpLogOptions,
  type SnapshotInfo,
  type SnapshotStep,
} from "./op-log.js";
export { PubAckInbox, type AppendOptions } from "@ioasid/bus";
export {
  decodeMessage,
  encodeBatch,
  encodeOperation,
  encodeSeal,
  OP_LOG_FORMAT_HEADER,
  OpLogFormat,
  OpLogFormatError,
  type StoredMessage,
} from "./op-codec.js";
export {
  applyOperation,
  chainKey,
  type AckRelease,
  type CommittedOperation,
  type DeliveryAck,
  type DeliveryRef,
  type Operation,
  type OperationKind,
} from "./operation.js";
export {
  createCoreHandlers,
  grpcExternalAllocator,
  startCoreServer,
  type ExternalAllocatorFactory,
  type RunningCore,
  type StartCoreServerOptions,
} from "./server.js";
