import { iommuError } from "./iommu-errors.js";

// Failure injection (DESIGN §5 "iommufd model", issue 16 item 2): the kernel's fail-nth for the
// IOMMU's multi-step operations. A test arms "the next call of this operation fails at its n-th
// failure point"; the operation marks its failure points (each allocation or call to another
// service that could fail) and, when the armed one is reached, fails with RESOURCE_EXHAUSTED
// `FAULT_INJECTED` — the -ENOMEM of a failed allocation — through the same undo paths a real
// failure takes. Walking n = 1, 2, … until the call succeeds shows every failure point leaves a
// consistent state. Off unless the service is started with it: a production IOMMU never fails on
// purpose, and an unarmed run costs one map lookup per operation.

/** The operations with failure points (ReplaceDomain's and the other attach paths'). */
export const FailNthOperation = {
  ATTACH: "ATTACH",
  REPLACE: "REPLACE",
  DETACH: "DETACH",
  BIND: "BIND",
  UNBIND: "UNBIND",
} as const;
export type FailNthOperation = (typeof FailNthOperation)[keyof typeof FailNthOperation];

/** The failure points of one call: `point` throws at the armed one. */
export interface FailurePoints {
  /** A failure point named for the log (e.g. "core-get"); throws `FAULT_INJECTED` if it is the armed n-th. */
  point(name: string): void;
}

const NONE: FailurePoints = { point: () => undefined };

/** One armed failure: the n-th point of the next call of an operation. */
class ArmedCall implements FailurePoints {
  #seen = 0;
  constructor(
    readonly operation: FailNthOperation,
    readonly nth: number,
  ) {}

  point(name: string): void {
    this.#seen++;
    if (this.#seen === this.nth) {
      throw iommuError("FAULT_INJECTED", `injected failure: ${this.operation} failed at its failure point ${this.nth} (${name})`);
    }
  }
}

/**
 * The failure injection of one IOMMU instance. {@link begin} is called once at the start of every
 * call of an operation and uses up that operation's arming, whether or not the call reaches it.
 */
export class FailNth {
  readonly #armed = new Map<FailNthOperation, number>();

  /** Arms the next call of `operation` to fail at its `nth` failure point (from 1). */
  arm(operation: FailNthOperation, nth: number): void {
    if (!Number.isInteger(nth) || nth < 1) throw new RangeError(`nth must be a positive integer, not ${nth}`);
    this.#armed.set(operation, nth);
  }

  /** The failure points of a call of `operation` that starts now. */
  begin(operation: FailNthOperation): FailurePoints {
    const nth = this.#armed.get(operation);
    if (nth === undefined) return NONE;
    this.#armed.delete(operation);
    return new ArmedCall(operation, nth);
  }
}

/** No failure injection (the default): every call's points are no-ops. */
export const noFailures: Pick<FailNth, "begin"> = { begin: () => NONE };
