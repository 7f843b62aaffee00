/**
 * Ordered, acknowledged, durable delivery of IOASID events over NATS (DESIGN §4): the core side
 * ({@link DeliveryEngine}) and the subscriber SDK ({@link startSubscriber}).
 */
export {
  DeliveryEngine,
  encodeDeliveryBatch,
  type Chain,
  type DeliveryEngineOptions,
  type DeliveryOutcome,
  type DeliveryTarget,
  type MissedDelivery,
  type SettledAck,
  type SubscriberId,
} from "./delivery-engine.js";
export { startSubscriber, type DeliveryContext, type EventHandler, type HandlerResult, type Subscriber, type SubscriberOptions } from "./subscriber.js";
export { isTransientJetStreamError, retryTransient, type RetryTransientOptions } from "./jetstream-retry.js";
export { publisherGaps, type HistoryGap } from "./history-gaps.js";
export { HistoryOutbox, historyOutbox, type HistoryLoss, type HistoryOutboxOptions } from "./history-outbox.js";
export { connectionInbox, readPubAck } from "./pub-ack.js";
export { PubAckInbox, pubAckInbox, ReplyInbox, type AppendOptions, type RequestOptions } from "./pub-ack-inbox.js";
export { ReusedWriter } from "./reused-writer.js";
export { decodeHistoryBatch, ensureHistoryStream, historyStreamName, historySubject, lastHistoryHeaders, HistoryRecorder, readHistory } from "./history.js";
export {
  actionName,
  chaosPhaseName,
  checkHistoryRecord,
  completeAction,
  createHistoryRecord,
  describeAction,
  eventOf,
  eventTypeName,
  eventTypeOf,
  HISTORY_ACTION_CASES,
  historyFormatError,
  historyRecordToJson,
  isAction,
  parseHistoryJsonl,
  stepLabel,
  VDEV_CLEAR_CAUSE,
  type HistoryAction,
  type HistoryActionCase,
  type HistoryActionInput,
  type HistoryActionValue,
  type HistoryFields,
  type HistoryRecord,
  type TypedHistoryRecord,
} from "./history-catalogue.js";
export { HistoryGate, type HistoryGateOptions, type HistorySink } from "./history-gate.js";
export {
  decodePositions,
  encodePositions,
  noteReceived,
  POSITION_HEADER,
  positionOf,
  PROCESS_INCARNATION,
  publisherKey,
  type HistoryLink,
} from "@ioasid/trace";
export {
  ensureRoleStateStream,
  failStopOnWriteError,
  MemoryRoleState,
  protoStateCodec,
  requireField,
  ROLE_STATE_JOURNAL_FORMAT,
  ROLE_STATE_UNREADABLE,
  RoleState,
  RoleStateHeaders,
  roleStateJournalSubject,
  roleStateStreamName,
  roleStateSubject,
  StateWriteError,
  type ProtoMessageFns,
  type RoleStateJournalOptions,
  type RoleStateOptions,
  type RoleStatePort,
  type StateChange,
  type StateCodec,
  type StateWriteRetry,
  type StateWriteRetryOptions,
} from "./role-state.js";
export { DEFAULT_PREFIX, deliverySubject, encodeToken, Headers, helloSubject, queueGroup } from "./subjects.js";
export {
  checkExample,
  exampleMessage,
  formatFailures,
  MATCHER_TYPES,
  MESSAGE_CONTRACT_FORMAT,
  messageCodec,
  parseMessageContract,
  readMessageContract,
  verifyInteraction,
  verifyMessage,
  type CapturedMessage,
  type ContractFailure,
  type Matcher,
  type MatcherType,
  type MessageContract,
  type MessageExample,
  type MessageInteraction,
  type VerifyOptions,
} from "./message-contract.js";
