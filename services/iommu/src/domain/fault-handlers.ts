import { iommuError, invalidField } from "./iommu-errors.js";
import type { FaultGroup } from "./page-requests.js";
import type { DmaAccess, FaultReason } from "./iommu-hardware.js";

/** An unrecoverable DMA fault reported to the owner of the handle it happened under. */
export interface FaultRecord {
  readonly faultId: bigint;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly address: bigint;
  readonly access: DmaAccess;
  readonly reason: FaultReason;
  readonly handleId: bigint;
  readonly owner: string;
  readonly ownerData: Uint8Array;
  readonly setId: number;
  readonly gpasid: number;
  readonly at: Date;
}

/** One item of an owner's fault stream. */
export type FaultItem =
  | { readonly kind: "group"; readonly group: FaultGroup }
  | { readonly kind: "fault"; readonly record: FaultRecord }
  | { readonly kind: "answered"; readonly group: FaultGroup };

interface Stream {
  readonly send: (item: FaultItem) => void;
  readonly end: (err?: Error) => void;
}

/**
 * The fault-handler streams of the owners of attach handles (SubscribeFaultGroups): one stream per
 * owner, a new subscription replacing the previous one, which ends with ABORTED
 * `FAULT_HANDLER_REPLACED`. The driver pushes complete groups, answers and fault records to the
 * owner's stream; {@link push} says whether the owner had one (no stream: no handler).
 */
export class FaultHandlers {
  readonly #streams = new Map<string, Stream>();

  /**
   * Holds an owner's fault-handler stream open until `signal` aborts (the caller went away), a
   * new subscription of the same owner replaces it (rejects with FAULT_HANDLER_REPLACED), or
   * {@link closeAll} ends it (resolves). `initial` items are sent first.
   * @throws INVALID_FIELD (empty owner)
   */
  subscribe(owner: string, signal: AbortSignal, send: (item: FaultItem) => unknown, initial: readonly FaultItem[] = []): Promise<void> {
    if (owner === "") return Promise.reject(invalidField("owner", "owner is required"));
    this.#streams.get(owner)?.end(iommuError("FAULT_HANDLER_REPLACED", `a newer fault-handler stream of ${owner} replaced this one`));
    return new Promise<void>((resolve, reject) => {
      const entry: Stream = {
        send: (item) => {
          // The transport buffers what it cannot write at once; a broken stream ends through `signal`.
          Promise.resolve(send(item)).catch(() => entry.end());
        },
        end: (err?: Error) => {
          if (this.#streams.get(owner) === entry) this.#streams.delete(owner);
          signal.removeEventListener("abort", onAbort);
          if (err === undefined) resolve();
          else reject(err);
        },
      };
      const onAbort = () => entry.end();
      this.#streams.set(owner, entry);
      for (const item of initial) entry.send(item);
      if (signal.aborted) entry.end();
      else signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Sends an item to the owner's stream. @returns false when the owner has no stream */
  push(owner: string, item: FaultItem): boolean {
    const s = this.#streams.get(owner);
    if (s === undefined) return false;
    s.send(item);
    return true;
  }

  /** Whether the owner has a stream open. */
  has(owner: string): boolean {
    return this.#streams.has(owner);
  }

  /** Owners with a stream open. */
  owners(): string[] {
    return [...this.#streams.keys()];
  }

  /** Ends every stream (service shutdown). */
  closeAll(): void {
    for (const s of [...this.#streams.values()]) s.end();
  }
}
