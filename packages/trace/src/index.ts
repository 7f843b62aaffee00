/**
 * Traces of the fabric (DESIGN §13): the OpenTelemetry API with W3C Trace Context on gRPC metadata
 * and NATS headers, and an SDK with a file or OTLP exporter only when one is configured
 * ({@link startTracing}); otherwise the API's no-ops.
 */
export { FileSpanExporter, parseSpanRecords, toSpanRecord, type SpanRecord } from "./file-span-exporter.js";
export {
  extractFromMetadata,
  formatTraceparentList,
  fromTraceparent,
  hasSpan,
  injectIntoMetadata,
  isSampledTraceparent,
  parseTraceparentList,
  spanContextOf,
  toTraceparent,
  TRACEPARENT,
  w3cPropagator,
  type MetadataLike,
} from "./propagation.js";
export {
  decodePositions,
  encodePositions,
  noteReceived,
  POSITION_HEADER,
  POSITION_METADATA,
  positionOf,
  processPositions,
  PROCESS_INCARNATION,
  publisherKey,
  registerPosition,
  touchPosition,
  MAX_CALL_POSITIONS,
  takeReceived,
  receivedCursor,
  RECEIVED_WINDOW,
  type ReceivedCursor,
  type HistoryLink,
  type PositionSource,
} from "./history-position.js";
export { startTracing, tracer, tracingStarted, type Tracing, type TracingOptions } from "./start-tracing.js";
