import { isDomainError } from "@ioasid/errors";
import { invalidField, vfioError } from "./vfio-errors.js";
import type { DeviceRef } from "./device-ref.js";
import type { HistoryPort, VfioLog } from "./vfio-ports.js";

// VFIO's half of the IO page fault path (DESIGN §5 "Faults", "VFIO"): VFIO owns the attach handles
// of guest binds, so the IOMMU sends it their complete fault groups, their answers and their
// unrecoverable faults on one stream; VFIO finds the container in the handle's owner data and
// relays to that VMM's WatchFaults stream (the vIOMMU's page-request queue), and relays the VMM's
// answers back. A group with no watcher is answered FAILURE (no handler); a VMM that goes away has
// every unanswered group of its container answered INVALID before its set is freed.

/** The answer to a fault group. */
export type PageResponseCode = "SUCCESS" | "INVALID" | "FAILURE";

/** Access of a request. */
export interface Access {
  readonly read: boolean;
  readonly write: boolean;
  readonly execute: boolean;
  readonly privileged: boolean;
}

/** A fault group as the IOMMU sends it to its owner. */
export interface IommuFaultGroup {
  readonly faultGroupId: bigint;
  readonly deviceId: string;
  readonly pasid: number;
  readonly prgi: number;
  readonly requests: readonly { readonly address: bigint; readonly access: Access; readonly lastRequest: boolean }[];
  readonly ownerData: Uint8Array;
  readonly gpasid: number;
  readonly createdAt: Date;
  readonly deadline: Date;
  /** Set on an answer. */
  readonly responseCode?: PageResponseCode;
  readonly responseSource?: string;
}

/** An unrecoverable fault as the IOMMU reports it. */
export interface IommuFaultRecord {
  readonly faultId: bigint;
  readonly deviceId: string;
  readonly pasid: number;
  readonly address: bigint;
  readonly access: Access;
  readonly reason: string;
  readonly ownerData: Uint8Array;
  readonly gpasid: number;
  readonly at: Date;
}

/** One item of the IOMMU's stream to VFIO. */
export type IommuFaultItem =
  | { readonly kind: "group"; readonly group: IommuFaultGroup }
  | { readonly kind: "answered"; readonly group: IommuFaultGroup }
  | { readonly kind: "fault"; readonly record: IommuFaultRecord };

/** The IOMMU's fault interface, as VFIO uses it. */
export interface IommuFaultPort {
  /**
   * Opens VFIO's fault-handler stream; resolves when it ends (rejects on a stream error). The
   * IOMMU sends the still unanswered groups first.
   */
  subscribe(onItem: (item: IommuFaultItem) => void, signal: AbortSignal): Promise<void>;
  /** SendPageResponse as VFIO's owner (`noHandler`: VFIO had nobody to relay the group to). */
  respond(faultGroupId: bigint, code: PageResponseCode, noHandler?: boolean): Promise<void>;
}

/** A fault group relayed to a VMM. */
export interface RelayedGroup {
  readonly faultGroupId: bigint;
  readonly device: DeviceRef;
  readonly hpasid: number;
  readonly gpasid: number;
  readonly prgi: number;
  readonly requests: readonly { readonly address: bigint; readonly access: Access; readonly lastRequest: boolean }[];
  readonly createdAt: Date;
  readonly deadline: Date;
}

/** One item of a container's WatchFaults stream. */
export type WatchItem =
  | { readonly kind: "group"; readonly group: RelayedGroup }
  | { readonly kind: "answered"; readonly faultGroupId: bigint; readonly code: PageResponseCode; readonly source: string }
  | {
      readonly kind: "fault";
      readonly faultId: bigint;
      readonly device: DeviceRef;
      readonly hpasid: number;
      readonly gpasid: number;
      readonly address: bigint;
      readonly access: Access;
      readonly reason: string;
      readonly at: Date;
    };

interface Watcher {
  readonly send: (item: WatchItem) => void;
  readonly end: (err?: Error) => void;
}

/** Groups remembered after their answer, so a late answer is refused with the right reason. */
const ANSWERED_MEMORY = 8192;

/** Options of {@link FaultRelay}. */
export interface FaultRelayOptions {
  readonly iommu: IommuFaultPort;
  readonly history: HistoryPort;
  readonly log: VfioLog;
  /** Whether the container exists and is not closing (a closing one gets nothing relayed). */
  readonly isOpen: (containerId: number) => boolean;
  /** Delay between attempts to (re)open the IOMMU stream, ms. @default 250 */
  readonly reconnectDelayMs?: number;
}

/** The fault relay between the IOMMU and the VMMs' WatchFaults streams. */
export class FaultRelay {
  readonly #iommu: IommuFaultPort;
  readonly #history: HistoryPort;
  readonly #log: VfioLog;
  readonly #isOpen: (containerId: number) => boolean;
  readonly #reconnectDelayMs: number;
  /** Unanswered groups relayed (or being relayed), by id. */
  readonly #pending = new Map<bigint, { readonly containerId: number; readonly group: RelayedGroup }>();
  /** Answered groups: id → container. */
  readonly #answered = new Map<bigint, number>();
  readonly #watchers = new Map<number, Watcher>();
  #stop: AbortController | undefined;

  constructor(options: FaultRelayOptions) {
    this.#iommu = options.iommu;
    this.#history = options.history;
    this.#log = options.log;
    this.#isOpen = options.isOpen;
    this.#reconnectDelayMs = options.reconnectDelayMs ?? 250;
  }

  /** Keeps VFIO's fault-handler stream at the IOMMU open (reopened after any end) until {@link stop}. */
  start(): void {
    if (this.#stop !== undefined) return;
    const stop = new AbortController();
    this.#stop = stop;
    void (async () => {
      while (!stop.signal.aborted) {
        try {
          await this.#iommu.subscribe((item) => this.#onItem(item), stop.signal);
        } catch (err) {
          if (!stop.signal.aborted) this.#log.warn({ err }, "the IOMMU's fault stream ended; reopening");
        }
        if (!stop.signal.aborted) await new Promise((r) => setTimeout(r, this.#reconnectDelayMs).unref());
      }
    })();
  }

  /** Stops the IOMMU stream and ends every watcher. */
  stop(): void {
    this.#stop?.abort();
    for (const w of [...this.#watchers.values()]) w.end();
  }

  /**
   * A VMM's WatchFaults: holds the stream until `signal` aborts, a newer watcher replaces it
   * (ABORTED `FAULT_WATCHER_REPLACED`) or the container closes (resolves). The container's
   * unanswered groups are sent first.
   */
  watch(containerId: number, signal: AbortSignal, send: (item: WatchItem) => unknown): Promise<void> {
    this.#watchers.get(containerId)?.end(vfioError("FAULT_WATCHER_REPLACED", `a newer WatchFaults of container ${containerId} replaced this one`));
    return new Promise<void>((resolve, reject) => {
      const w: Watcher = {
        send: (item) => {
          Promise.resolve(send(item)).catch(() => w.end());
        },
        end: (err?: Error) => {
          if (this.#watchers.get(containerId) === w) this.#watchers.delete(containerId);
          signal.removeEventListener("abort", onAbort);
          if (err === undefined) resolve();
          else reject(err);
        },
      };
      const onAbort = () => w.end();
      this.#watchers.set(containerId, w);
      for (const p of this.pendingFor(containerId)) w.send({ kind: "group", group: p });
      if (signal.aborted) w.end();
      else signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Whether the container has a watcher. */
  watching(containerId: number): boolean {
    return this.#watchers.has(containerId);
  }

  /** The container's unanswered relayed groups, ascending by id. */
  pendingFor(containerId: number): RelayedGroup[] {
    return [...this.#pending.values()]
      .filter((p) => p.containerId === containerId)
      .map((p) => p.group)
      .sort((a, b) => (a.faultGroupId < b.faultGroupId ? -1 : 1));
  }

  /**
   * The VMM's answer to a group relayed to its container, passed to the IOMMU (which refuses a
   * second answer with FAULT_GROUP_ALREADY_RESPONDED).
   * A VMM answers SUCCESS or INVALID only: FAILURE disables PRI for the whole function and its VFs,
   * so it is the host's answer alone (iommufd removed it from the user API; DESIGN §5). Checked
   * before the group is looked up, as the fault fd checks the code before the cookie.
   * @throws INVALID_FIELD (code FAILURE), FAULT_GROUP_NOT_GIVEN (never relayed to this container:
   *   unknown, another container's, or forgotten), FAULT_GROUP_ALREADY_RESPONDED
   */
  async respond(containerId: number, faultGroupId: bigint, code: PageResponseCode): Promise<void> {
    if (code === "FAILURE") {
      throw invalidField("code", "a VMM answers SUCCESS or INVALID: FAILURE would disable PRI for the whole function and its VFs, so only the host gives it");
    }
    const pending = this.#pending.get(faultGroupId);
    const owner = pending?.containerId ?? this.#answered.get(faultGroupId);
    if (owner !== containerId) throw vfioError("FAULT_GROUP_NOT_GIVEN", `fault group ${faultGroupId} was never given to container ${containerId}`);
    await this.#iommu.respond(faultGroupId, code);
    this.#history.record(
      { $case: "pageResponse", value: { container: containerId, group: faultGroupId, code } },
      pending === undefined ? {} : { ioasid: pending.group.hpasid, spid: pending.group.gpasid },
    );
  }

  /**
   * The VMM went away: every unanswered group of the container is answered INVALID (before its set
   * is freed) and its watcher ends. Never throws: an answer the IOMMU refuses was given already.
   */
  async containerClosing(containerId: number): Promise<number> {
    const groups = this.pendingFor(containerId);
    await Promise.all(
      groups.map((g) =>
        this.#iommu.respond(g.faultGroupId, "INVALID").catch((err: unknown) => {
          if (!isDomainError(err, "FAULT_GROUP_ALREADY_RESPONDED") && !isDomainError(err, "FAULT_GROUP_NOT_FOUND")) {
            this.#log.warn({ err, containerId, faultGroupId: String(g.faultGroupId) }, "answering a fault group of a closing container failed");
          }
        }),
      ),
    );
    for (const g of groups) {
      this.#history.record({ $case: "faultSessionLost", value: { container: containerId, group: g.faultGroupId } }, { ioasid: g.hpasid, spid: g.gpasid });
    }
    this.#watchers.get(containerId)?.end();
    return groups.length;
  }

  #onItem(item: IommuFaultItem): void {
    if (item.kind === "answered") {
      const p = this.#pending.get(item.group.faultGroupId);
      const containerId = p?.containerId ?? ownerOf(item.group.ownerData)?.containerId;
      this.#pending.delete(item.group.faultGroupId);
      if (containerId === undefined) return;
      this.#answered.set(item.group.faultGroupId, containerId);
      if (this.#answered.size > ANSWERED_MEMORY) this.#answered.delete(this.#answered.keys().next().value!);
      if (p !== undefined) {
        this.#watchers.get(containerId)?.send({
          kind: "answered",
          faultGroupId: item.group.faultGroupId,
          code: item.group.responseCode ?? "INVALID",
          source: item.group.responseSource ?? "",
        });
      }
      return;
    }
    const data = ownerOf(item.kind === "group" ? item.group.ownerData : item.record.ownerData);
    if (item.kind === "fault") {
      const r = item.record;
      if (data === undefined) return;
      const w = this.#watchers.get(data.containerId);
      this.#history.record(
        { $case: "dmaFault", value: { container: data.containerId, reason: String(r.reason), address: r.address, noHandler: w === undefined } },
        { ioasid: r.pasid, spid: r.gpasid },
      );
      w?.send({
        kind: "fault",
        faultId: r.faultId,
        device: data.device,
        hpasid: r.pasid,
        gpasid: r.gpasid,
        address: r.address,
        access: r.access,
        reason: r.reason,
        at: r.at,
      });
      return;
    }
    const g = item.group;
    if (this.#pending.has(g.faultGroupId)) return; // resent after a reconnect: already relayed
    const fields = { ioasid: g.pasid, spid: g.gpasid };
    if (data === undefined || !this.#isOpen(data.containerId) || !this.#watchers.has(data.containerId)) {
      const why = data === undefined ? "not a VFIO handle" : this.#isOpen(data.containerId) ? "no WatchFaults" : "container closed";
      this.#history.record({ $case: "iopfNoHandler", value: { group: g.faultGroupId, why } }, fields);
      // An INVALID for a container that is gone (its FREE drains the rest); FAILURE when nobody listens.
      const code: PageResponseCode = data !== undefined && !this.#isOpen(data.containerId) ? "INVALID" : "FAILURE";
      this.#iommu.respond(g.faultGroupId, code, code === "FAILURE").catch((err: unknown) => {
        if (!isDomainError(err, "FAULT_GROUP_ALREADY_RESPONDED"))
          this.#log.warn({ err, faultGroupId: String(g.faultGroupId) }, "answering an unrelayable fault group failed");
      });
      return;
    }
    const relayed: RelayedGroup = {
      faultGroupId: g.faultGroupId,
      device: data.device,
      hpasid: g.pasid,
      gpasid: g.gpasid,
      prgi: g.prgi,
      requests: g.requests,
      createdAt: g.createdAt,
      deadline: g.deadline,
    };
    this.#pending.set(g.faultGroupId, { containerId: data.containerId, group: relayed });
    this.#history.record({ $case: "iopfRelay", value: { container: data.containerId, group: g.faultGroupId, requests: g.requests.length } }, fields);
    this.#watchers.get(data.containerId)!.send({ kind: "group", group: relayed });
  }
}

/** VFIO's owner data of a handle: `{"containerId":N,"device":{"kind":..,"id":..}}`. */
function ownerOf(data: Uint8Array): { containerId: number; device: DeviceRef } | undefined {
  try {
    const v = JSON.parse(new TextDecoder().decode(data)) as { containerId?: unknown; device?: { kind?: unknown; id?: unknown } };
    if (typeof v.containerId !== "number" || (v.device?.kind !== "device" && v.device?.kind !== "mdev") || typeof v.device.id !== "string") return undefined;
    return { containerId: v.containerId, device: { kind: v.device.kind, id: v.device.id } };
  } catch {
    return undefined;
  }
}
