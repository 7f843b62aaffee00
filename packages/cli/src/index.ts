/** ioasidctl as a library: the stack, the scenarios, the timeline and the verdict. */
export { addressesOf, connectStack, type NatsAuth, type StackAddresses, type StackClients } from "./clients.js";
export { runScenario, ScenarioKind, type ScenarioOptions, type ScenarioResult } from "./scenario.js";
export {
  readState,
  repoRoot,
  serviceMain,
  SERVICES,
  stackDown,
  stackUp,
  Supervision,
  supervisorMain,
  type ServiceName,
  type ServiceRecord,
  type StackState,
  type StackUpOptions,
} from "./stack.js";
export { describeExit, RestartPolicy, type RestartDecision, type RestartPolicyOptions, type ServiceExit } from "./restart-policy.js";
export { superviseStack, type SupervisedService, type SupervisorPlan } from "./supervisor.js";
export { buildTimeline, columnOf, COLUMNS, describeStep, FAULT_ACTIONS, renderTable, type Column, type TimelineRow } from "./timeline.js";
export { DIAGRAM_LANES, renderHtml, renderMermaid } from "./timeline-diagram.js";
export { wrapText } from "./text-wrap.js";
export { checkInvariants, EXPECTED, findPasid, renderVerdict, type Check, type Verdict, type VerdictInput } from "./verdict.js";
export {
  answerFaultGroup,
  formatTranslate,
  formatWatchItem,
  guestPagesOf,
  parseDmaOptions,
  parseRespondOptions,
  parseWatchOptions,
  RESPONSE_CODES,
  watchItemJson,
  type DmaOptions,
  type GroupAnswer,
  type ResponseCodeName,
  type WatchOptions,
} from "./faults.js";
export { EXIT_CODES_HELP, ExitCode, noPositionals, parseCount, parseU64, parseVerb, requireString, UsageError } from "./usage-error.js";
export { faultCommands, type FaultCommand, type FaultCommandContext, type VmRef } from "./fault-commands.js";
export { forceRelease, heldBy, holderCommands, type HeldReference, type HolderSelector, type ReleaseResult } from "./holder.js";
