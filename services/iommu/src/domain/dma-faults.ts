import type { HistoryFields } from "@ioasid/bus";
import { IoasidState } from "@ioasid/ioasid";
import type { CorePort } from "@ioasid/role-kit";
import { FaultHandlers, type FaultItem, type FaultRecord } from "./fault-handlers.js";
import { iommuError, invalidField, isGone } from "./iommu-errors.js";
import type { AttachHandle, IommuHardware, TranslateResult, TranslateSpec } from "./iommu-hardware.js";
import { PageResponseCode, ResponseSource, type FaultGroup, type PageRequestQueue } from "./page-requests.js";
import type { IommuHistoryAction, IommuLog } from "./iommu-driver.js";

// The IOMMU driver's fault path (DESIGN §5 "IOMMU"): a device's DMA translated, or raised as a page
// request whose complete group goes to its owner's fault handler, or reported as a fault record;
// page responses and the deadline that answers a forgotten group INVALID. IommuDriver owns one and
// hands it the hardware, the page-request queue and its history, log and store.

/** A page-request group hint of a DMA request. */
export interface PageRequestHint {
  readonly prgi: number;
  readonly lastRequest: boolean;
}

/** What a DMA translation request produced, as the device sees it. */
export type DmaOutcome =
  | { readonly outcome: "TRANSLATED"; readonly outputAddress: bigint; readonly handleId: bigint }
  | { readonly outcome: "PAGE_REQUEST"; readonly handleId: bigint; readonly faultGroupId: bigint; readonly groupComplete: boolean }
  | { readonly outcome: "FAULT"; readonly reason: TranslateFault; readonly handleId: bigint; readonly faultGroupId: bigint };

/** Why a translation faulted. */
export type TranslateFault = Extract<TranslateResult, { outcome: "FAULT" }>["reason"];

/** Counters of the fault path (QueryState and logs). */
export interface FaultCounters {
  pageRequests: number;
  groupsCompleted: number;
  groupsNoHandler: number;
  creditsExhausted: number;
  faultsReported: number;
  faultsSuppressed: number;
  faultsUnhandled: number;
}

/** What {@link DmaFaults} works with: the driver's hardware, queue, core port, history, log and store. */
export interface DmaFaultsOptions {
  readonly hw: IommuHardware;
  readonly prq: PageRequestQueue;
  /** Asked whether a faulting IOASID is still live (no fault reporting between free and unbind). */
  readonly core: Pick<CorePort, "describe">;
  readonly record: (action: IommuHistoryAction, fields?: HistoryFields) => void;
  readonly log: IommuLog | undefined;
  /** Keeps the fault groups after the deadline timer answered some. */
  readonly persist: () => Promise<unknown>;
  /** Told of every fault reported to an owner (not of suppressed ones), with the handle it happened under. */
  readonly onFaultReported?: (record: FaultRecord, handle: AttachHandle) => void;
}

/** The fault path of {@link IommuDriver}: translations, page-request groups, page responses, fault records. */
export class DmaFaults {
  /** The owners' fault-handler streams. */
  readonly faults = new FaultHandlers();
  readonly counters: FaultCounters = {
    pageRequests: 0,
    groupsCompleted: 0,
    groupsNoHandler: 0,
    creditsExhausted: 0,
    faultsReported: 0,
    faultsSuppressed: 0,
    faultsUnhandled: 0,
  };
  readonly #hw: IommuHardware;
  readonly #prq: PageRequestQueue;
  readonly #core: Pick<CorePort, "describe">;
  readonly #record: (action: IommuHistoryAction, fields?: HistoryFields) => void;
  readonly #log: IommuLog | undefined;
  readonly #persist: () => Promise<unknown>;
  readonly #onFaultReported: DmaFaultsOptions["onFaultReported"];
  readonly #waiters = new Map<bigint, Set<(g: FaultGroup) => void>>();
  #timer: NodeJS.Timeout | undefined;
  #timerAt = Infinity;
  #nextFaultId = 1n;
  #stopped = false;

  constructor(options: DmaFaultsOptions) {
    this.#hw = options.hw;
    this.#prq = options.prq;
    this.#core = options.core;
    this.#record = options.record;
    this.#log = options.log;
    this.#persist = options.persist;
    this.#onFaultReported = options.onFaultReported;
  }

  /**
   * One DMA translation request of a device. A miss on a PRI-capable device raises a page request
   * (DESIGN §5 "Faults"): it joins its group (`hint`, or a group by itself), and the complete group
   * goes to the owner of the handle — or is answered FAILURE when the owner has no fault stream.
   * Over the device's credits nothing is queued (FAULT `PRI_CREDITS_EXHAUSTED`) and the partial
   * group the request belonged to is answered INVALID. Any other fault is reported to the handle's
   * owner as a fault record, unless the IOASID is being freed (ioasid.rst: no fault reporting
   * between free and unbind).
   * @throws DEVICE_NOT_FOUND, INVALID_FIELD, PRGI_IN_USE
   */
  translate(t: TranslateSpec, hint?: PageRequestHint): DmaOutcome {
    const r = this.#hw.translate(t);
    if (r.outcome === "TRANSLATED") return r;
    if (r.outcome === "FAULT") {
      if (r.handleId !== 0n) this.#reportFault(t, r.reason, r.handleId);
      return { ...r, faultGroupId: 0n };
    }
    const dev = this.#hw.assertDevice(t.deviceId);
    const raised = this.#prq.raise(
      {
        deviceId: t.deviceId,
        credits: dev.priCredits,
        pasid: t.pasid,
        withoutPasid: t.withoutPasid,
        address: t.address,
        access: t.access,
        prgi: hint?.prgi,
        lastRequest: hint?.lastRequest ?? true,
      },
      r.handle,
    );
    if (raised.kind === "credits_exhausted") {
      this.counters.creditsExhausted++;
      if (raised.answered !== undefined) this.answered([raised.answered]);
      this.#record(
        {
          $case: "iopfCreditsExhausted",
          value: { device: t.deviceId, address: t.address, ...(raised.answered === undefined ? {} : { answeredGroup: raised.answered.faultGroupId }) },
        },
        t.withoutPasid ? {} : { ioasid: t.pasid },
      );
      return { outcome: "FAULT", reason: "PRI_CREDITS_EXHAUSTED", handleId: r.handle.handleId, faultGroupId: raised.answered?.faultGroupId ?? 0n };
    }
    this.counters.pageRequests++;
    const g = raised.group;
    if (raised.complete) this.#dispatch(g);
    else this.armTimer();
    return { outcome: "PAGE_REQUEST", handleId: g.handleId, faultGroupId: g.faultGroupId, groupComplete: raised.complete };
  }

  /**
   * iommu_page_response from the group's owner (its handler; `noHandler`: the owner had none for
   * it, recorded as NO_HANDLER).
   * @throws INVALID_FIELD, FAULT_GROUP_NOT_FOUND, FAULT_GROUP_NOT_OWNED, FAULT_GROUP_ALREADY_RESPONDED, FAULT_GROUP_INCOMPLETE
   */
  sendPageResponse(owner: string, faultGroupId: bigint, code: PageResponseCode, noHandler = false): FaultGroup {
    if (owner === "") throw invalidField("owner", "owner is required");
    if (noHandler) this.counters.groupsNoHandler++;
    const g = this.#prq.respond(faultGroupId, code, noHandler ? ResponseSource.NO_HANDLER : ResponseSource.HANDLER, owner);
    this.answered([g]);
    return g;
  }

  /**
   * AwaitPageResponse: waits until the device's group is answered (at once if it is and is still
   * remembered), or `signal` aborts (the call's deadline).
   * @throws DEVICE_NOT_FOUND, FAULT_GROUP_NOT_FOUND
   */
  async awaitPageResponse(deviceId: string, faultGroupId: bigint, signal?: AbortSignal): Promise<FaultGroup> {
    this.#hw.assertDevice(deviceId);
    const g = this.#prq.get(faultGroupId);
    if (g === undefined || g.deviceId !== deviceId) throw iommuError("FAULT_GROUP_NOT_FOUND", `device ${deviceId} has no fault group ${faultGroupId}`);
    if (g.state === "RESPONDED") return g;
    return new Promise<FaultGroup>((resolve, reject) => {
      let set = this.#waiters.get(faultGroupId);
      if (set === undefined) this.#waiters.set(faultGroupId, (set = new Set()));
      const waiter = (answered: FaultGroup) => {
        signal?.removeEventListener("abort", onAbort);
        resolve(answered);
      };
      const onAbort = () => {
        set.delete(waiter);
        if (set.size === 0) this.#waiters.delete(faultGroupId);
        reject(signal?.reason instanceof Error ? signal.reason : new Error("aborted"));
      };
      set.add(waiter);
      if (signal?.aborted === true) onAbort();
      else signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  /**
   * Opens an owner's fault stream; the owner's unanswered complete groups are sent first.
   * @see FaultHandlers.subscribe
   */
  subscribeFaults(owner: string, signal: AbortSignal, send: (item: FaultItem) => unknown): Promise<void> {
    const initial = owner === "" ? [] : this.#prq.outstanding({ pendingOwner: owner }).map((group): FaultItem => ({ kind: "group", group }));
    return this.faults.subscribe(owner, signal, send, initial);
  }

  /** Stops the fault timer and ends the fault streams (shutdown). */
  stop(): void {
    this.#stopped = true;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.faults.closeAll();
  }

  /** A complete group goes to its owner's handler, or is answered FAILURE (no handler). */
  #dispatch(g: FaultGroup): void {
    this.counters.groupsCompleted++;
    this.#record(
      { $case: "iopfGroup", value: { group: g.faultGroupId, device: g.deviceId, prgi: g.prgi, requests: g.requests.length, owner: g.owner } },
      this.#groupFields(g),
    );
    if (this.faults.push(g.owner, { kind: "group", group: g })) {
      this.armTimer();
      return;
    }
    this.counters.groupsNoHandler++;
    this.#log?.warn({ faultGroupId: String(g.faultGroupId), owner: g.owner, deviceId: g.deviceId }, "fault group has no handler: answered FAILURE");
    this.answered([this.#prq.respond(g.faultGroupId, PageResponseCode.FAILURE, ResponseSource.NO_HANDLER)]);
  }

  /** Records answers, tells the owners and the devices waiting. @returns how many */
  answered(groups: readonly FaultGroup[], seq?: number): number {
    for (const g of groups) {
      this.#record(
        {
          $case: "pageResponse",
          value: { group: g.faultGroupId, device: g.deviceId, prgi: g.prgi, code: String(g.responseCode), source: String(g.responseSource) },
        },
        { ...this.#groupFields(g), ...(seq === undefined ? {} : { seq }) },
      );
      this.faults.push(g.owner, { kind: "answered", group: g });
      const set = this.#waiters.get(g.faultGroupId);
      if (set !== undefined) {
        this.#waiters.delete(g.faultGroupId);
        for (const w of set) w(g);
      }
    }
    if (groups.length > 0) this.armTimer();
    return groups.length;
  }

  /** Keeps one timer at the earliest deadline of an outstanding group. */
  armTimer(): void {
    if (this.#stopped) return;
    const next = this.#prq.nextDeadline();
    const at = next?.getTime() ?? Infinity;
    if (at === this.#timerAt) return;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#timerAt = at;
    if (at === Infinity) return;
    this.#timer = setTimeout(
      () => {
        this.#timer = undefined;
        this.#timerAt = Infinity;
        this.answered(this.#prq.expire());
        this.armTimer();
        this.#persist().catch((err: unknown) => this.#log?.warn({ err }, "keeping the fault groups failed"));
      },
      Math.max(0, at - Date.now()) + 1,
    );
    this.#timer.unref();
  }

  /** Reports an unrecoverable fault to the handle's owner, unless its IOASID is being freed. */
  #reportFault(t: TranslateSpec, reason: TranslateFault, handleId: bigint): void {
    const h = this.#hw.handle(handleId);
    if (h === undefined) return;
    const record: FaultRecord = {
      faultId: this.#nextFaultId++,
      deviceId: t.deviceId,
      pasid: t.pasid,
      withoutPasid: t.withoutPasid,
      address: t.address,
      access: t.access,
      reason,
      handleId,
      owner: h.owner,
      ownerData: h.ownerData,
      setId: h.setId,
      gpasid: h.gpasid,
      at: new Date(),
    };
    const fields = { ...(t.withoutPasid ? {} : { ioasid: t.pasid }), ...(h.generation === 0 ? {} : { generation: h.generation }) };
    const deliver = (suppressed: string | undefined) => {
      if (suppressed !== undefined || !this.#hw.faultReporting(handleId)) {
        this.counters.faultsSuppressed++;
        this.#record({ $case: "dmaFault", value: { device: t.deviceId, address: t.address, reason, suppressed: suppressed ?? "IOASID being freed" } }, fields);
        return;
      }
      this.#onFaultReported?.(record, h);
      const sent = this.faults.push(h.owner, { kind: "fault", record });
      if (sent) this.counters.faultsReported++;
      else this.counters.faultsUnhandled++;
      this.#record(
        { $case: "dmaFault", value: { device: t.deviceId, address: t.address, reason, ...(sent ? { reportedTo: h.owner } : { noHandler: true }) } },
        fields,
      );
    };
    if (h.generation === 0 || t.withoutPasid) {
      deliver(undefined);
      return;
    }
    // Between the IOASID's free and the teardown of its entries (which FREE does last, at IOMMU
    // priority) nothing is reported: ask the core whether the IOASID is still live.
    this.#core
      .describe(t.pasid)
      .then(
        (info) =>
          deliver(
            info === undefined || info.generation !== h.generation
              ? "IOASID reclaimed"
              : info.state === IoasidState.FREE_PENDING
                ? "IOASID freed, not yet unbound"
                : undefined,
          ),
        (err: unknown) => deliver(isGone(err) ? "IOASID reclaimed" : undefined),
      )
      .catch((err: unknown) => this.#log?.warn({ err }, "reporting a DMA fault failed"));
  }

  #groupFields(g: FaultGroup): HistoryFields {
    return {
      ...(g.withoutPasid ? {} : { ioasid: g.pasid }),
      ...(g.generation === 0 ? {} : { generation: g.generation }),
      ...(g.setId === 0 ? {} : { setId: g.setId }),
      ...(g.gpasid === 0 ? {} : { spid: g.gpasid }),
    };
  }
}
