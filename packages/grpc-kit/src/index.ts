/**
 * gRPC plumbing shared by every ioasid-fabric service: the error model on the wire (DESIGN §8),
 * promise-based server handlers and clients with deadlines, health, reflection, graceful shutdown,
 * configuration from the environment and the JSON logger.
 */
export {
  adaptService,
  serviceNameOf,
  type AdaptServiceOptions,
  type AnyMethodDefinition,
  type AnyServiceDefinition,
  type BidiStreamHandler,
  type CallContext,
  type ClientStreamHandler,
  type MethodHandler,
  type RequestOf,
  type ResponseOf,
  type Send,
  type ServerStreamHandler,
  type ServiceHandlers,
  type UnaryHandler,
} from "./adapt-service.js";
export { checkHealth, watchHealth, HealthServiceDefinition, type CheckHealthOptions } from "./check-health.js";
export {
  createClient,
  waitForReady,
  type BidiStream,
  type CallOptions,
  type ClientConstructor,
  type ClientMethod,
  type ClientStream,
  type CreateClientOptions,
  type PromiseClient,
} from "./create-client.js";
export { createLogger, isLogLevel, LogLevel, type CreateLoggerOptions } from "./create-logger.js";
export { createEchoHandlers, createEchoServer } from "./echo-server.js";
export { createGrpcServer, formatAddress, GrpcServer, HEALTH_SERVICE_NAME, ServingStatus, type GrpcServerOptions } from "./grpc-server.js";
export {
  ConfigError,
  ConfigKind,
  configOrExit,
  defineConfigSchema,
  describeConfig,
  formatBytesValue,
  loadConfig,
  packageVersion,
  parseAddress,
  parseBytes,
  type AddressVar,
  type BooleanVar,
  type BytesVar,
  type Config,
  type ConfigOrExitOptions,
  type ConfigProblem,
  type ConfigSchema,
  type ConfigValue,
  type ConfigVar,
  type DurationVar,
  type EnumVar,
  type HostPort,
  type IntVar,
  type PortOrOffVar,
  type PortVar,
  type StringVar,
  type UrlVar,
} from "./load-config.js";
export {
  decodeErrorInfo,
  decodeRpcStatus,
  encodeErrorInfo,
  encodeRpcStatus,
  ERROR_INFO_TYPE_URL,
  findErrorInfo,
  STATUS_DETAILS_KEY,
  type AnyMessage,
  type ErrorInfo,
  type RpcStatus,
} from "./rpc-status.js";
export { assertDecoded, guardDecoding, UndecodableRequest } from "./guard-decoding.js";
export { listServices } from "./list-services.js";
export { holdSignals, runUntilSignal, type HeldSignals, type RunUntilSignalOptions } from "./run-until-signal.js";
export { isServiceError, toDomainError } from "./to-domain-error.js";
export {
  callerIdentity,
  clientCredentials,
  credentialsOrExit,
  CREDENTIALS_DIR_ENV,
  loadCredentials,
  serverCredentials,
  type AuthenticatedCall,
  type ClientCredentialsOptions,
} from "./tls.js";
export { refuseRoles } from "./refuse-roles.js";
export { startServiceTracing, traceConfig, type TraceConfigValues } from "./trace-config.js";
export { traceClientInterceptor, traceServerMethod } from "./trace-calls.js";
export { traceLogFields } from "./trace-log-fields.js";
export { INTERNAL_MESSAGE, toGrpcStatus, type ToGrpcStatusOptions } from "./to-grpc-status.js";
export {
  createVfioSession,
  decodeVfioCapability,
  encodeVfioCapability,
  VFIO_CAPABILITY_METADATA,
  vfioCapabilityMetadata,
  type VfioClient,
  type VfioSession,
} from "./vfio-session.js";
export { AUDIT_ON_BEHALF_OF_METADATA, AUDIT_REASON_METADATA, auditMetadata, MAX_AUDIT_FIELD_CHARS, readAuditNote, type AuditNote } from "./operator-audit.js";
export { CALL_SECONDS_BUCKETS, createGrpcMetrics, observeCalls, splitMethodPath, type CallObserver } from "./call-metrics.js";
export { metricsConfig, metricsListen, METRICS_PORT_OFFSET } from "./metrics-config.js";
export { createMetricsRegistry, METRICS_PATH, startMetricsServer, type MetricsServer, type MetricsServerOptions } from "./metrics-server.js";
