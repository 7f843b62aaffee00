import { createHistoryRecord, HistoryRecorder, type HistoryRecord } from "@ioasid/bus";
import { Code, isDomainError } from "@ioasid/errors";
import type { NatsConnection } from "@nats-io/transport-node";
import { CHAOS_ROLE, ChaosAction, createChaosRecord, type ChaosDetail, type ChaosOp, type FaultMarker, type HealMarker } from "@ioasid/checker";

/** What the driver knows about an operation before it completes. */
export type OpStart = Omit<ChaosOp, "opId" | "latencyMs" | "error">;

/** The outcome of {@link ChaosJournal.run}: the call's value, or how it failed. */
export type OpResult<T> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly outcome: "fail" | "info"; readonly error: string };

/** Counts of a run's operations and faults, for the summary and the progress bar. */
export interface JournalCounts {
  readonly ok: number;
  readonly fail: number;
  readonly info: number;
  /** Per op name: [ok, fail, info]. */
  readonly byOp: Readonly<Record<string, readonly [number, number, number]>>;
  readonly faults: number;
  readonly faultsByKind: Readonly<Record<string, number>>;
}

/** gRPC codes after which an operation may or may not have happened (Jepsen's `info`). */
const INDETERMINATE: ReadonlySet<number> = new Set([Code.CANCELLED, Code.UNKNOWN, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNAVAILABLE]);

/**
 * An operation that certainly did not happen, found by the driver rather than refused by a
 * service: an ENQCMD that raised #GP, a DMA that faulted or whose page request was answered
 * INVALID. Recorded `fail`.
 */
export class DefiniteFailure extends Error {
  override readonly name = "DefiniteFailure";
}

/**
 * Whether a failed call certainly did not happen (`fail`: the service refused it, or a
 * {@link DefiniteFailure}) or may have (`info`: it timed out, the connection broke, the service
 * failed inside).
 */
export function outcomeOf(err: unknown): "fail" | "info" {
  if (err instanceof DefiniteFailure) return "fail";
  return isDomainError(err) && !INDETERMINATE.has(err.code) ? "fail" : "info";
}

/** A short error for a chaos record: the DomainError reason, else the first line of the message. */
export function errorText(err: unknown): string {
  if (isDomainError(err)) return err.reason;
  const m = (err as { message?: unknown })?.message;
  return String(m ?? err)
    .split("\n")[0]!
    .slice(0, 160);
}

/**
 * The chaos driver's history column: each operation (invoke, then ok / fail / info with its
 * latency) and each fault and heal marker is published through the bus's {@link HistoryRecorder}
 * (role "chaos"; instances "driver" and "nemesis") and kept here too. History is fire-and-forget,
 * and the driver's own records must not be lost to the faults it injects (a nats-server restart),
 * so the runner checks with this copy of them ({@link ChaosJournal.merge}).
 */
export class ChaosJournal {
  readonly #records: HistoryRecord[] = [];
  readonly #recorders: Map<string, HistoryRecorder> = new Map();
  #nextOpId = 1;
  readonly #byOp = new Map<string, [number, number, number]>();
  readonly #faultsByKind = new Map<string, number>();

  readonly #prefix: string | undefined;
  readonly #onRecord: ((r: HistoryRecord) => void) | undefined;

  /**
   * @param nc where to publish (undefined: keep only the local copy, for tests)
   * @param options `prefix`: the bus subject prefix; `onRecord`: told of every record made (the runner's log)
   */
  constructor(
    private readonly nc: NatsConnection | undefined,
    options: { readonly prefix?: string; readonly onRecord?: (r: HistoryRecord) => void } = {},
  ) {
    this.#prefix = options.prefix;
    this.#onRecord = options.onRecord;
  }

  /** The records so far, in the order they were made. */
  get records(): readonly HistoryRecord[] {
    return this.#records;
  }

  /** Records an `invoke`; the returned function records the completion. */
  begin(start: OpStart): { readonly opId: number; done(outcome: "ok" | "fail" | "info", extra?: Partial<ChaosOp>): void } {
    const opId = this.#nextOpId++;
    const t0 = performance.now();
    this.#record(ChaosAction.INVOKE, { ...start, opId });
    let finished = false;
    return {
      opId,
      done: (outcome, extra = {}) => {
        if (finished) return;
        finished = true;
        const latencyMs = Math.round((performance.now() - t0) * 1000) / 1000;
        this.#record(outcome, { ...start, ...extra, opId, latencyMs });
        const counts = this.#byOp.get(start.op) ?? [0, 0, 0];
        counts[outcome === "ok" ? 0 : outcome === "fail" ? 1 : 2]++;
        this.#byOp.set(start.op, counts);
      },
    };
  }

  /**
   * Runs one operation: records its invoke, awaits `call`, and records ok (with what `onOk` adds:
   * the IOASID an allocation returned…) or fail / info with the error.
   */
  async run<T>(start: OpStart, call: () => Promise<T>, onOk?: (value: T) => Partial<ChaosOp>): Promise<OpResult<T>> {
    const op = this.begin(start);
    try {
      const value = await call();
      op.done("ok", onOk?.(value) ?? {});
      return { ok: true, value };
    } catch (err) {
      const outcome = outcomeOf(err);
      const error = errorText(err);
      op.done(outcome, { error });
      return { ok: false, outcome, error };
    }
  }

  /** Records a fault: injected, or seen (`cause`: a service that exited on its own); only injected ones are counted. */
  fault(marker: FaultMarker): void {
    this.#record(ChaosAction.INFO, marker);
    if (marker.cause === undefined) this.#faultsByKind.set(marker.fault, (this.#faultsByKind.get(marker.fault) ?? 0) + 1);
  }

  /** Records a heal (of one fault, or of everything). */
  heal(marker: HealMarker): void {
    this.#record(ChaosAction.INFO, marker);
  }

  /** Records a note ("seed 7, 4 guests", "vdcm exited on its own"). */
  note(text: string): void {
    this.#record(ChaosAction.INFO, { note: text });
  }

  counts(): JournalCounts {
    let ok = 0;
    let fail = 0;
    let info = 0;
    for (const [a, b, c] of this.#byOp.values()) {
      ok += a;
      fail += b;
      info += c;
    }
    const faultsByKind = Object.fromEntries(this.#faultsByKind);
    return { ok, fail, info, byOp: Object.fromEntries(this.#byOp), faults: Object.values(faultsByKind).reduce((s, n) => s + n, 0), faultsByKind };
  }

  /** Publishes what is pending now. */
  flush(): void {
    for (const r of this.#recorders.values()) r.flush();
  }

  /**
   * The stored history with the driver's records taken from this copy: stored chaos records are
   * dropped (they may be incomplete) and every local one put in.
   */
  merge(stored: readonly HistoryRecord[]): HistoryRecord[] {
    return [...stored.filter((r) => r.role !== CHAOS_ROLE), ...this.#records].sort((a, b) => a.ts - b.ts);
  }

  #record(action: ChaosAction, detail: ChaosDetail): void {
    let r = createChaosRecord(action, detail);
    let recorder: HistoryRecorder | undefined;
    if (this.nc !== undefined) {
      recorder = this.#recorders.get(r.instance);
      if (recorder === undefined) this.#recorders.set(r.instance, (recorder = new HistoryRecorder(this.nc, CHAOS_ROLE, r.instance, this.#prefix)));
      // Numbered by its recorder (order without clocks): the local copy the checker reads has it too.
      const { ts: _ts, role: _role, instance: _instance, action: _action, ...fields } = r;
      r = createHistoryRecord(r, r.action, recorder.stamp(fields), r.ts);
    }
    this.#records.push(r);
    this.#onRecord?.(r);
    if (recorder === undefined) return;
    const { ts: _ts, role: _role, instance: _instance, action: _action, ...fields } = r;
    recorder.record(r.action, fields);
  }
}
