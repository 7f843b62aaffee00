import { describeAction, stepLabel, type HistoryRecord } from "@ioasid/bus";
import { CHAOS_ROLE, parseChaosRecord } from "./chaos-record.js";
import type { FinalState } from "./final-state.js";
import { CORE_ROLE, indexHistory, type HistoryIndex, type LossWindow } from "./history-index.js";
import { INVARIANT_IDS, INVARIANTS, type InvariantId } from "./invariants.js";
import { resolveCheckOptions, RULES, type CheckOptions, type Finding, type Rule } from "./rules.js";

/** One record of a violation's trace. */
export interface TraceLine {
  readonly record: HistoryRecord;
  /** True for the records that show the violation; false for the context around them. */
  readonly evidence: boolean;
}

/** One violated invariant, with the minimal trace that explains it. */
export interface Violation {
  readonly invariant: InvariantId;
  readonly message: string;
  readonly ioasid?: number;
  readonly generation?: number;
  readonly setId?: number;
  /** The records that show it and a few around them that concern the same IOASID, in the causal order (see history-order.ts). */
  readonly trace: readonly TraceLine[];
  /** Facts of the final state that show it. */
  readonly facts: readonly string[];
}

/** The checker's verdict on one run. */
export interface Verdict {
  /** True when no rule found a violation. */
  readonly ok: boolean;
  readonly violations: readonly Violation[];
  /** Violations per invariant (0 for every invariant checked and clean). */
  readonly counts: Readonly<Partial<Record<InvariantId, number>>>;
  /** Invariants whose rule ran. */
  readonly checked: readonly InvariantId[];
  /** Records read. */
  readonly records: number;
  /** Earliest record time (the trace's zero; records are in causal order, so not always the first's). */
  readonly startTs: number | undefined;
  /** What the history could not show. */
  readonly notes: readonly string[];
}

/** Options of {@link createChecker}. */
export interface CheckerOptions extends CheckOptions {
  /** The rules to run. @default RULES (every invariant) */
  readonly rules?: readonly Rule[];
}

/** Checks recorded histories against DESIGN §7. */
export interface Checker {
  /** The rules it runs. */
  readonly rules: readonly Rule[];
  /**
   * Checks a history (any order: it is ordered by its sequences and causal links, by time only
   * where they leave records unordered) and, when given, the final state read after healing. Pure: no I/O.
   */
  check(history: readonly HistoryRecord[], finalState?: FinalState): Verdict;
}

/**
 * Creates an invariant checker. The rule set is a table: pass `rules` to run some (a test removes
 * one to show that its detection comes from that rule).
 * @example
 * const checker = createChecker({ reclaimBoundMs: 5000 });
 * const verdict = checker.check(await readHistory(nc, { sinceMs }), finalState);
 * console.log(renderVerdict(verdict));
 */
export function createChecker(options: CheckerOptions = {}): Checker {
  const rules = options.rules ?? RULES;
  const resolved = resolveCheckOptions(options);
  return {
    rules,
    check(history, finalState) {
      const index = indexHistory(history, { volatileRoles: resolved.volatileRoles, recordLossMarginMs: resolved.recordLossMarginMs });
      const notes: string[] = [];
      const violations: Violation[] = [];
      for (const rule of rules) {
        const findings = rule.check({ index, finalState, options: resolved, note: (text) => notes.push(text) });
        for (const f of findings) {
          const lost = f.absence === undefined ? undefined : lossExplaining(index, f.absence);
          const missed = f.missedDelivery === undefined ? undefined : missExplaining(index, f.missedDelivery, resolved.clockToleranceMs);
          if (lost !== undefined) notes.push(`${rule.invariant} not counted, a record may have been lost (${lost.why}): ${f.message}`);
          else if (missed !== undefined)
            notes.push(
              `${rule.invariant} not counted, ${f.missedDelivery!.role}/${f.missedDelivery!.instance} was passed over (${missed}) and the chain moved on (DESIGN §4.4): ${f.message}`,
            );
          else violations.push(toViolation(rule.invariant, f, index, resolved.traceContext));
        }
      }
      const checked = INVARIANT_IDS.filter((id) => rules.some((r) => r.invariant === id));
      const counts: Partial<Record<InvariantId, number>> = {};
      for (const id of checked) counts[id] = violations.filter((v) => v.invariant === id).length;
      if (finalState === undefined) notes.push("no final state: S6 and the final-state halves of S4, S9, L3 and L4 were not checked");
      // Order without clocks (issue 18): say when the history could not give it (a history with no
      // sequences at all was recorded before them, and is checked by time as it always was).
      const unsequenced = index.records.length - index.sequenced;
      if (unsequenced > 0 && index.sequenced > 0)
        notes.push(`${unsequenced} of ${index.records.length} records carry no publisher sequence (recorded before issue 18): those are ordered by time`);
      if (index.cycles > 0)
        notes.push(
          `the records' sequences and causal links contradict each other (${index.cycles} cycle(s)): the history is ordered by time where they do, and happens-before is not used`,
        );
      return {
        ok: violations.length === 0,
        violations,
        counts,
        checked,
        records: index.records.length,
        startTs: index.startTs,
        notes: [...new Set(notes)],
      };
    },
  };
}

/** Checks a history (and final state) with every rule and default bounds; see {@link createChecker}. */
export function check(history: readonly HistoryRecord[], finalState?: FinalState, options: CheckOptions = {}): Verdict {
  return createChecker(options).check(history, finalState);
}

/** A loss window that could explain a missing record (see {@link Finding.absence}). */
function lossExplaining(index: HistoryIndex, absence: NonNullable<Finding["absence"]>): LossWindow | undefined {
  return index.lossWindows.find(
    (w) => (w.role === undefined || w.role === absence.role) && (absence.kills !== false || w.kind !== "kill") && w.from <= absence.to && w.to >= absence.from,
  );
}

/**
 * What explains a tier passed over (see {@link Finding.missedDelivery}): the core's record that it
 * missed that delivery, or a window in which the core's records (or NATS) may have been lost.
 */
function missExplaining(index: HistoryIndex, d: NonNullable<Finding["missedDelivery"]>, toleranceMs: number): string | undefined {
  const t0 = index.startTs ?? 0;
  for (const idx of index.withSeq(d.seq)) {
    const r = index.records[idx]!;
    const a = r.action;
    if (r.role !== CORE_ROLE || a?.$case !== "deliveryMissed" || a.value.subscriber !== d.role || a.value.instance !== d.instance) continue;
    // Before the early tier's step by happens-before (the core's record precedes the delivery
    // that let the chain move on), by time only where the history does not say.
    if (index.notAfter(idx, d.before, toleranceMs)) return `the core recorded its delivery of seq ${d.seq} missed at +${(r.ts - t0).toFixed(0)} ms`;
  }
  const lost = lossExplaining(index, { role: CORE_ROLE, from: d.from, to: d.to });
  return lost === undefined ? undefined : `the core's record of a missed delivery may have been lost: ${lost.why}`;
}

const MAX_TRACE = 24;
/** Records looked at on each side of an evidence record for its context (bounds the cost of many violations). */
const MAX_SCAN = 2000;

/**
 * A finding with its trace: the evidence records, and up to `context` records before and after
 * each that concern the same IOASID (the same generation where records carry one).
 */
function toViolation(invariant: InvariantId, f: Finding, index: HistoryIndex, context: number): Violation {
  const records = index.records;
  const evidence = new Set(f.evidence);
  const picked = new Set(f.evidence);
  const ioasid = f.ioasid ?? f.evidence.map((i) => records[i]?.ioasid).find((x) => x !== undefined);
  // Context is the roles' steps; the driver's operations show only as evidence (they are many and
  // say little the roles' records do not), its fault and heal markers whenever they fall inside.
  const related = (r: HistoryRecord): boolean =>
    r.role !== CHAOS_ROLE &&
    (ioasid !== undefined
      ? r.ioasid === ioasid && (f.generation === undefined || r.generation === undefined || r.generation === f.generation)
      : f.setId !== undefined && r.setId === f.setId);
  if (ioasid !== undefined || f.setId !== undefined) {
    for (const e of f.evidence) {
      for (const step of [-1, 1]) {
        let found = 0;
        for (let i = e + step, seen = 0; i >= 0 && i < records.length && found < context && seen < MAX_SCAN; i += step, seen++) {
          if (!related(records[i]!)) continue;
          picked.add(i);
          found++;
        }
      }
    }
  }
  let lines = [...picked].sort((a, b) => a - b);
  if (lines.length > 0) {
    for (let i = lines[0]!; i <= lines.at(-1)!; i++) {
      const e = parseChaosRecord(records[i]!);
      if (e?.kind === "fault" || e?.kind === "heal") picked.add(i);
    }
    lines = [...picked].sort((a, b) => a - b);
  }
  if (lines.length > MAX_TRACE) {
    // Keep every evidence record, and the context nearest to them.
    const distance = (i: number) => Math.min(...f.evidence.map((e) => Math.abs(e - i)));
    const keep = new Set([...lines].sort((a, b) => distance(a) - distance(b)).slice(0, Math.max(MAX_TRACE, evidence.size)));
    lines = lines.filter((i) => keep.has(i));
  }
  return {
    invariant,
    message: f.message,
    ...(f.ioasid === undefined ? {} : { ioasid: f.ioasid }),
    ...(f.generation === undefined ? {} : { generation: f.generation }),
    ...(f.setId === undefined ? {} : { setId: f.setId }),
    trace: lines.map((i) => ({ record: records[i]!, evidence: evidence.has(i) })),
    facts: f.facts ?? [],
  };
}

/** One history record as a trace line: time from `startTs`, column, action, IOASID fields, detail. */
export function formatRecord(r: HistoryRecord, startTs = r.ts): string {
  const parts = [`+${(r.ts - startTs).toFixed(3)}ms`.padStart(14), `${r.role}/${r.instance}`, stepLabel(r)];
  if (r.ioasid !== undefined) parts.push(`ioasid ${r.ioasid}${r.generation === undefined ? "" : `#${r.generation}`}`);
  if (r.setId !== undefined) parts.push(`set ${r.setId}`);
  if (r.spid !== undefined) parts.push(`spid ${r.spid}`);
  if (r.refcount !== undefined) parts.push(`ref ${r.refcount}`);
  if (r.seq !== undefined) parts.push(`seq ${r.seq}`);
  const detail = describeAction(r);
  if (detail !== undefined) parts.push(JSON.stringify(detail));
  if (r.recovered === true) parts.push("(recovered at a restart)");
  return parts.join(" ");
}

/**
 * The verdict as text: one line per invariant checked (ok or its count), then each violation with
 * its trace (`>` marks the records that show it), then the notes.
 */
export function renderVerdict(v: Verdict, title = "chaos verdict"): string {
  const out = [`${title}: ${v.ok ? "all clear" : `${v.violations.length} violation(s)`} (${v.records} records)`];
  for (const id of v.checked) {
    const n = v.counts[id] ?? 0;
    out.push(`  ${n === 0 ? "ok  " : "FAIL"} ${id} ${INVARIANTS[id]}${n === 0 ? "" : `: ${n}`}`);
  }
  v.violations.forEach((x, i) => {
    out.push("", `#${i + 1} ${x.invariant}: ${x.message}`);
    for (const fact of x.facts) out.push(`    final state: ${fact}`);
    for (const line of x.trace) out.push(`  ${line.evidence ? ">" : " "} ${formatRecord(line.record, v.startTs)}`);
  });
  if (v.notes.length > 0) out.push("", "notes:", ...v.notes.map((n) => `  - ${n}`));
  return out.join("\n");
}
