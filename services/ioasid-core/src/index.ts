/** The IOASID core service: its model wrapper, gRPC handlers and server. */
export { EventLog, type CommittedEvent, type EventLogOptions } from "./event-log.js";
export { IoasidCore, type ExternalAllocator, type IoasidCoreOptions } from "./ioasid-core.js";
export { OpLog, type OpLogOptions } from "./op-log.js";
export { applyOp, chainKey, type OpRecord } from "./ops.js";
export {
  createCoreHandlers,
  grpcExternalAllocator,
  startCoreServer,
  type ExternalAllocatorFactory,
  type RunningCore,
  type StartCoreServerOptions,
} from "./server.js";
