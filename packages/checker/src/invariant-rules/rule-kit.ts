import { describeAction, stepLabel, type HistoryRecord } from "@ioasid/bus";
import type { FinalState } from "../final-state.js";
import type { HistoryIndex, Lifecycle } from "../history-index.js";
import type { InvariantId } from "../invariants.js";

// What every rule of the checker shares: its options, what it sees and returns, and the small
// helpers over the indexed history (one file per invariant beside this one).

/** Bounds and tolerances of the checker. */
export interface CheckOptions {
  /**
   * How far apart two processes' clocks may be when records of different roles are ordered by
   * time: only records their sequences and causal links leave unordered are (a history recorded
   * before records carried them, or processes no recorded message connects). @default 1
   */
  readonly clockToleranceMs?: number;
  /** L1: longest a free may take (invoke → completion). @default 1000 */
  readonly freeLatencyBoundMs?: number;
  /** L2: longest after max(crash, last heal) until each IOASID of a crashed guest is reclaimed. @default 5000 */
  readonly reclaimBoundMs?: number;
  /** L3: longest after max(group, last heal) until a page-request group is answered; undefined: by the end of the history. */
  readonly faultAnswerBoundMs?: number;
  /** Records of context shown before and after each record of a violation's trace. @default 3 */
  readonly traceContext?: number;
  /** Roles whose tables do not survive a kill (their entries end at the kill marker). @default [] */
  readonly volatileRoles?: readonly string[];
  /**
   * How long before and after a kill, and around a NATS link fault, a role's records may have been
   * lost (history is published fire-and-forget), in ms. A violation that rests on a missing record
   * of that role in such a window becomes a note. @default 100
   */
  readonly recordLossMarginMs?: number;
  /** Chaos op names that are frees (L1). @default ["free"] */
  readonly freeOps?: readonly string[];
  /** Chaos op names that crash a guest's VMM (L2). @default ["crash"] */
  readonly crashOps?: readonly string[];
}

/** {@link CheckOptions} with every default applied. */
export type ResolvedCheckOptions = Required<Omit<CheckOptions, "faultAnswerBoundMs">> & Pick<CheckOptions, "faultAnswerBoundMs">;

/** Applies the defaults of {@link CheckOptions}. */
export function resolveCheckOptions(options: CheckOptions = {}): ResolvedCheckOptions {
  return {
    clockToleranceMs: options.clockToleranceMs ?? 1,
    freeLatencyBoundMs: options.freeLatencyBoundMs ?? 1000,
    reclaimBoundMs: options.reclaimBoundMs ?? 5000,
    faultAnswerBoundMs: options.faultAnswerBoundMs,
    traceContext: options.traceContext ?? 3,
    volatileRoles: options.volatileRoles ?? [],
    recordLossMarginMs: options.recordLossMarginMs ?? 100,
    freeOps: options.freeOps ?? ["free"],
    crashOps: options.crashOps ?? ["crash"],
  };
}

/** What a rule sees. */
export interface RuleContext {
  readonly index: HistoryIndex;
  readonly finalState: FinalState | undefined;
  readonly options: ResolvedCheckOptions;
  /** Says what the history could not show (shown with the verdict; not a violation). */
  note(text: string): void;
}

/** One violation as a rule finds it: what is wrong and the records that show it. */
export interface Finding {
  readonly message: string;
  /** Indices (in the causally ordered history, HistoryIndex.records) of the records that show the violation. */
  readonly evidence: readonly number[];
  readonly ioasid?: number;
  readonly generation?: number;
  readonly setId?: number;
  /** Facts of the final state that show it. */
  readonly facts?: readonly string[];
  /**
   * Set when the finding rests on a record that is missing: the role that should have recorded it
   * and the times between which it would have (ms since the epoch). A loss window of that role
   * overlapping them turns the finding into a note. `kills: false` when a kill of the role cannot
   * explain the absence (it would lose the state too, which is the violation).
   */
  readonly absence?: { readonly role: string; readonly from: number; readonly to: number; readonly kills?: boolean };
  /**
   * Set when the finding is an order that a missed delivery explains: a subscriber that misses its
   * deadline, or is still catching up on an earlier one, is passed over and the chain moves on
   * (DESIGN §4.4), and the core records that (`delivery_missed` with the event's seq). Such a record
   * for `seq` and the late subscriber (`role`/`instance`), not after record `before` (an index; by
   * happens-before, see {@link notAfter}), turns the finding
   * into a note; so does a loss window of the core's records (or of NATS) between `from` and `to`,
   * which may have taken the record with it.
   */
  readonly missedDelivery?: {
    readonly role: string;
    readonly instance: string;
    readonly seq: number;
    readonly before: number;
    readonly from: number;
    readonly to: number;
  };
}

/** One rule of the checker: the check of one invariant over the history and the final state. */
export interface Rule {
  readonly invariant: InvariantId;
  /** The rule in one line (the README's mapping). */
  readonly description: string;
  /**
   * Which order between records the rule relies on (issue 18: order without clocks): a process's
   * own (publisher sequence), the core's (op-log sequence), happens-before (event → handling,
   * causal links; see history-order.ts), or time — only for bounds (liveness), never for order.
   */
  readonly order: string;
  check(ctx: RuleContext): Finding[];
}

export function rec(ctx: RuleContext, idx: number): HistoryRecord {
  return ctx.index.records[idx]!;
}

export function ts(ctx: RuleContext, idx: number): number {
  return rec(ctx, idx).ts;
}

/**
 * `a` happened no later than `b`. Decided by happens-before — publisher order, the core's op-log
 * order, event → handling, causal links (history-order.ts) — never by clocks when those decide it;
 * only records they leave unordered (a history recorded before records carried sequences, or
 * processes no recorded message connects) are compared by time, within the clock tolerance.
 */
export function notAfter(ctx: RuleContext, a: number, b: number): boolean {
  return ctx.index.notAfter(a, b, ctx.options.clockToleranceMs);
}

export function name(l: Lifecycle): string {
  return `IOASID ${l.ioasid} generation ${l.generation}`;
}

export function who(r: HistoryRecord): string {
  return `${r.role}/${r.instance} ${stepLabel(r)}`;
}

/** Who took or dropped a reference (`role/instance/purpose`), as the core recorded it. */
export function holderText(r: HistoryRecord): string {
  return r.action?.$case === "ioasidGet" || r.action?.$case === "ioasidPut" ? (describeAction(r) ?? "a holder") : "a holder";
}

export function subject(l: Lifecycle): Pick<Finding, "ioasid" | "generation" | "setId"> {
  return { ioasid: l.ioasid, generation: l.generation, ...(l.setId === undefined ? {} : { setId: l.setId }) };
}

export function lifecycles(ctx: RuleContext): Lifecycle[] {
  return [...ctx.index.lifecycles.values()];
}

/** The final state's IOASID entry for a generation, when the final state lists IOASIDs. */
export function liveAtEnd(ctx: RuleContext, ioasid: number, generation: number | undefined): boolean | undefined {
  const list = ctx.finalState?.ioasids;
  if (list === undefined) return undefined;
  return list.some((i) => i.ioasid === ioasid && (generation === undefined || i.generation === generation));
}

/**
 * How much earlier than its marker a service's own exit may have begun: the runner records a
 * self-exit (`cause: "exit"`, e.g. the core's fail-stop) when it sees the process gone, after the
 * calls the failure broke were already answered.
 */
export const SELF_EXIT_LEAD_MS = 1000;

/**
 * How long after a restarted service is back its clients may still fail fast: a gRPC channel that
 * saw its peer go reconnects within its bounded backoff (grpc-kit's RECONNECT_BACKOFF: at most 1 s).
 */
export const RECONNECT_GRACE_MS = 1500;
