/**
 * The invariant checker of DESIGN §7, pure: S1–S9 and L1–L4 judged from the recorded history
 * (the typed catalogue of `@ioasid/bus`) and, when given, the state read after healing. No I/O, no
 * stack: the chaos runner (`@ioasid/chaos`), the tests and any other tool use it the same way.
 * One file per invariant in `invariant-rules/`.
 */
export {
  CHAOS_ROLE,
  ChaosAction,
  ChaosOpName,
  ChaosTarget,
  createChaosRecord,
  FaultKind,
  HostFaultKind,
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
} from "./chaos-record.js";
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
} from "./checker.js";
export type { FinalIoasid, FinalRegistration, FinalSet, FinalState, LiveEntry, OutstandingFaultGroup } from "./final-state.js";
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
} from "./history-index.js";
export { orderHistory, type HistoryOrder } from "./history-order.js";
export { INVARIANT_IDS, INVARIANTS, type InvariantId } from "./invariants.js";
export { RULES, type CheckOptions, type Finding, type Rule, type RuleContext } from "./rules.js";
