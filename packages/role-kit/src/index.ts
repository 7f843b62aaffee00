/** What the four role services (iommu, vfio, kvm, vdcm) share: configuration, NATS, core client, registrations. */
export { busConfig, commonRoleConfig, connectNats, createCoreClient, type CoreClient } from "./role-kit.js";
export { KeyedMutex } from "./keyed-mutex.js";
export { ensureRegistration, heldReferences, type CorePort, type CorePortCall, type HeldReference } from "./core-port.js";
export { createGrpcCorePort } from "./grpc-core-port.js";
export { isCoreUnreachable, runRole, type RoleBaseConfig, type RoleParts, type RoleRuntime, type RoleSpec } from "./run-role.js";
export {
  eventTypeFromWire,
  eventTypeToWire,
  priorityFromWire,
  priorityToWire,
  scopeFromWire,
  scopeToWire,
  tokenTypeFromWire,
  tokenTypeToWire,
  type WireScope,
} from "./core-wire.js";
