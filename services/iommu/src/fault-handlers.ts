import { iommuError, invalidField } from "./iommu-errors.js";

/**
 * The fault-handler registrations of the owners of attach handles (SubscribeFaultGroups): one
 * stream per owner, a new subscription replacing the previous one, which ends with ABORTED
 * `FAULT_HANDLER_REPLACED`.
 *
 * Minimal on purpose: page requests are not modelled yet (a translation miss is a fault, never a
 * page request), so no fault group ever exists and a subscribed stream receives nothing. The
 * registration rules above hold already, so handlers written against the contract keep working
 * when fault groups arrive.
 */
export class FaultHandlers {
  readonly #streams = new Map<string, { readonly end: (err?: Error) => void }>();

  /**
   * Holds an owner's fault-handler stream open until `signal` aborts (the caller went away), a
   * new subscription of the same owner replaces it (rejects with FAULT_HANDLER_REPLACED), or
   * {@link closeAll} ends it (resolves).
   * @throws INVALID_FIELD (empty owner)
   */
  subscribe(owner: string, signal: AbortSignal): Promise<void> {
    if (owner === "") return Promise.reject(invalidField("owner", "owner is required"));
    this.#streams.get(owner)?.end(iommuError("FAULT_HANDLER_REPLACED", `a newer fault-handler stream of ${owner} replaced this one`));
    return new Promise<void>((resolve, reject) => {
      const entry = {
        end: (err?: Error) => {
          if (this.#streams.get(owner) === entry) this.#streams.delete(owner);
          signal.removeEventListener("abort", onAbort);
          if (err === undefined) resolve();
          else reject(err);
        },
      };
      const onAbort = () => entry.end();
      this.#streams.set(owner, entry);
      if (signal.aborted) entry.end();
      else signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /**
   * iommu_page_response from an owner. No fault group exists yet (page requests are not modelled),
   * so every answer names an unknown group.
   * @throws INVALID_FIELD (empty owner), FAULT_GROUP_NOT_FOUND
   */
  respond(owner: string, faultGroupId: bigint): never {
    if (owner === "") throw invalidField("owner", "owner is required");
    throw iommuError("FAULT_GROUP_NOT_FOUND", `fault group ${faultGroupId} does not exist (or was answered and forgotten)`);
  }

  /**
   * The device side of PRI waiting for a group's response. No fault group exists yet.
   * @throws FAULT_GROUP_NOT_FOUND
   */
  awaitResponse(deviceId: string, faultGroupId: bigint): never {
    throw iommuError("FAULT_GROUP_NOT_FOUND", `device ${deviceId} has no fault group ${faultGroupId}`);
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
