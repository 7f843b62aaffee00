/**
 * Chaos testing of crashed-guest cleanup (issue 6): the invariant checker of DESIGN §7 over the
 * recorded history, the chaos driver's own history records, a TCP fault proxy, and a seeded,
 * reproducible fault schedule.
 */
// The checker, its own package (pure, no I/O), re-exported so the runner's users need one import.
export * from "@ioasid/checker";
export { startFaultProxy, type FaultProxy, type FaultProxyOptions, type FaultProxyStats, type PartitionMode } from "./fault-proxy.js";
export { createPrng, type Prng } from "./prng.js";
export { schedule, toFaultMarker, withHostPartitions, type FaultInjection, type HostPartitionOptions, type ScheduleOptions } from "./schedule.js";
export { ChaosUsageError, FAULT_NAMES, MAX_SEED, parseDuration, parseFaultKinds, parseSeeds } from "./run-options.js";
export {
  deriveSeed,
  describeGuestStep,
  GuestDevice,
  gpasidOf,
  mmTokenOf,
  planGuest,
  planProbeGuest,
  PROBE_INDEX,
  PROBE_PASIDS,
  type GuestEnd,
  type GuestPlan,
  type GuestPlanOptions,
  type GuestStep,
  type PlannedStep,
} from "./guest-plan.js";
export { ChaosJournal, DefiniteFailure, errorText, outcomeOf, type JournalCounts, type OpResult, type OpStart } from "./chaos-journal.js";
export {
  CHAOS_SERVICE_ENV,
  LAB_CORE_HOSTS,
  STACK_SERVICES,
  startChaosStack,
  type ChaosStack,
  type ChaosStackCredentials,
  type ChaosStackOptions,
  type HealReport,
  type NetworkFault,
  type ProxyLink,
  type StackService,
} from "./chaos-stack.js";
export { createChaosClients, startVmm, type ChaosClientCredentials, type ChaosClients, type VmmCommand, type VmmProcess } from "./chaos-clients.js";
export { assertNatsRefusesAnonymous, assertServicesSecure, type SecurityProbeOptions, type SecurityProbeTarget } from "./stack-security.js";
export { runNemesis, PARTITION_RESET_AFTER_MS, type NemesisOptions } from "./nemesis.js";
export { readFinalState, type RoleInstances } from "./read-final-state.js";
export { computeRunStats, renderStats, type ChaosRunStats } from "./run-stats.js";
export { renderChaosReport, type ChaosReportInput } from "./chaos-report.js";
export {
  CHAOS_VOLATILE_ROLES,
  ChaosPhase,
  PROBE_ATTEMPTS,
  runChaos,
  type ChaosProgress,
  type ChaosRunOptions,
  type ChaosRunResult,
  type ProbeResult,
} from "./runner.js";
export {
  createNetnsLab,
  destroyStaleLabs,
  labReaches,
  netnsAvailable,
  type LabCut,
  type LabGateway,
  type NetnsAvailability,
  type NetnsLab,
  type NetnsLabOptions,
} from "./netns-lab.js";
