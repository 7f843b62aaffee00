/**
 * Chaos testing of crashed-guest cleanup (issue 6): the invariant checker of DESIGN §7 over the
 * recorded history, the chaos driver's own history records, a TCP fault proxy, and a seeded,
 * reproducible fault schedule.
 */
export {
  CHAOS_ROLE,
  ChaosAction,
  ChaosOpName,
  ChaosTarget,
  createChaosRecord,
  FaultKind,
  parseChaosRecord,
  roleOfTarget,
  SERVICE_TARGETS,
  type ChaosDetail,
  type ChaosEntry,
  type ChaosLink,
  type ChaosNote,
  type ChaosOp,
  type ChaosRecordOptions,
  type FaultMarker,
  type HealMarker,
} from "@ioasid/checker";
export {
  check,
  createChecker,
  formatRecord,
  renderVerdict,
  type Checker,
  type CheckerOptions,
  type TraceLine,
  type Verdict,
  type Violation,
} from "@ioasid/checker";
export { startFaultProxy, type FaultProxy, type FaultProxyOptions, type FaultProxyStats, type PartitionMode } from "./fault-proxy.js";
export type { FinalIoasid, FinalRegistration, FinalSet, FinalState, LiveEntry, OutstandingFaultGroup } from "@ioasid/checker";
export {
  indexHistory,
  lifecycleKey,
  tableChange,
  type ContainerRecord,
  type EntrySpan,
  type FaultSpan,
  type GroupRecord,
  type HistoryIndex,
  type Holder,
  type IndexOptions,
  type Lifecycle,
  type LossWindow,
  type OpSpan,
  type PendingRegistration,
} from "@ioasid/checker";
export { INVARIANT_IDS, INVARIANTS, type InvariantId } from "@ioasid/checker";
export { createPrng, type Prng } from "./prng.js";
export { RULES, type CheckOptions, type Finding, type Rule, type RuleContext } from "@ioasid/checker";
export { schedule, toFaultMarker, type FaultInjection, type ScheduleOptions } from "./schedule.js";
export { ChaosUsageError, FAULT_NAMES, MAX_SEED, parseDuration, parseFaultKinds, parseSeeds } from "./run-options.js";
export {
  deriveSeed,
  describeGuestStep,
  GuestDevice,
  gpasidOf,
  mmTokenOf,
  planGuest,
  type GuestEnd,
  type GuestPlan,
  type GuestPlanOptions,
  type GuestStep,
  type PlannedStep,
} from "./guest-plan.js";
export { ChaosJournal, DefiniteFailure, errorText, outcomeOf, type JournalCounts, type OpResult, type OpStart } from "./chaos-journal.js";
export {
  CHAOS_SERVICE_ENV,
  STACK_SERVICES,
  startChaosStack,
  type ChaosStack,
  type ChaosStackOptions,
  type HealReport,
  type NetworkFault,
  type ProxyLink,
  type StackService,
} from "./chaos-stack.js";
export { createChaosClients, startVmm, type ChaosClients, type VmmCommand, type VmmProcess } from "./chaos-clients.js";
export { runNemesis, PARTITION_RESET_AFTER_MS, type NemesisOptions } from "./nemesis.js";
export { readFinalState, type RoleInstances } from "./read-final-state.js";
export { computeRunStats, renderStats, type ChaosRunStats } from "./run-stats.js";
export { renderChaosReport, type ChaosReportInput } from "./chaos-report.js";
export { CHAOS_VOLATILE_ROLES, ChaosPhase, runChaos, type ChaosProgress, type ChaosRunOptions, type ChaosRunResult } from "./runner.js";
