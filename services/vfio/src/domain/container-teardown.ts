import { Code, DomainError, isDomainError } from "@ioasid/errors";
import type { RoleStatePort } from "@ioasid/bus";
import type { CorePort } from "@ioasid/role-kit";
import { ContainerState, type CloseReason, type Container } from "./container.js";
import { adoptViommusOver, destroyAllViommus } from "./container-viommus.js";
import { describeDevice } from "./device-ref.js";
import type { HostMemoryPool } from "./host-memory-pool.js";
import type { VfioKeptEntry } from "./vfio-kept-entry.js";
import { ReclaimWatch } from "./reclaim-watch.js";
import { type HistoryPort, type IommuPort, type Scheduler, type VdcmPort, type VfioLog } from "./vfio-ports.js";

// The teardown of a container (DESIGN §5 "VFIO"): the set freed first (the crashed-guest path,
// ioasid.rst "Exception cases"), then the release phase in the order the tiers need (S5). Cut out
// of vfio-containers.ts along its "Container life cycle" seam; VfioContainers decides when to close.

/** What closing a container did. */
export interface CloseResult {
  /** IOASIDs of the set the close moved out of ACTIVE. */
  readonly freed: number;
  /** Devices and mdevs the teardown unassigns. */
  readonly unassignedDevices: number;
}

const DEFAULT_FREE_SET_RETRY = [100, 250, 500, 1000, 2000, 4000] as const;
/** Between rounds of a background close (each round: one close with its FreeSet retries). */
const BACKGROUND_CLOSE_FIRST_WAIT_MS = 500;
const BACKGROUND_CLOSE_MAX_WAIT_MS = 5000;
const DEFAULT_DOMAIN_RELEASE_RETRY = [50, 100, 250, 500, 1000, 2000, 4000, 8000] as const;

function isUnreachable(err: unknown): boolean {
  return err instanceof DomainError && (err.code === Code.UNAVAILABLE || err.code === Code.DEADLINE_EXCEEDED);
}

/** What a {@link ContainerTeardown} needs: VfioContainers' ports and tables, and its retry settings. */
export interface ContainerTeardownOptions {
  readonly core: CorePort;
  readonly iommu: IommuPort;
  readonly vdcm: VdcmPort;
  readonly history: HistoryPort;
  readonly scheduler: Scheduler;
  readonly log: VfioLog;
  /** @default [100, 250, 500, 1000, 2000, 4000] (see VfioContainersOptions) */
  readonly freeSetRetryDelaysMs: readonly number[] | undefined;
  /** @default 10000 (see VfioContainersOptions) */
  readonly reclaimWaitMs: number | undefined;
  /** @default [50, 100, 250, 500, 1000, 2000, 4000, 8000] (see VfioContainersOptions) */
  readonly domainReleaseRetryDelaysMs: readonly number[] | undefined;
  readonly onClosing: (containerId: number) => Promise<unknown>;
  readonly store: RoleStatePort<VfioKeptEntry> | undefined;
  /** VfioContainers' table: the release phase forgets the container in it. */
  readonly containers: Map<number, Container>;
  /** VfioContainers' device owners: the release phase hands the devices back. */
  readonly owners: Map<string, number>;
  /** VfioContainers' host memory: the release phase puts the container's guest memory back. */
  readonly hostMemory: Pick<HostMemoryPool, "put">;
}

/** How VfioContainers closes a container and releases what it held. */
export class ContainerTeardown {
  readonly #core: CorePort;
  readonly #iommu: IommuPort;
  readonly #vdcm: VdcmPort;
  readonly #history: HistoryPort;
  readonly #scheduler: Scheduler;
  readonly #log: VfioLog;
  readonly #freeSetRetry: readonly number[];
  /** closeAll has begun: background closes stop retrying (closeAll closes every container). */
  #stopping = false;
  readonly #reclaimWaitMs: number;
  readonly #domainRetry: readonly number[];
  readonly #containers: Map<number, Container>;
  readonly #onClosing: (containerId: number) => Promise<unknown>;
  readonly #store: RoleStatePort<VfioKeptEntry> | undefined;
  readonly #owners: Map<string, number>;
  readonly #hostMemory: Pick<HostMemoryPool, "put">;
  readonly #reclaims: ReclaimWatch;

  constructor(options: ContainerTeardownOptions) {
    this.#core = options.core;
    this.#iommu = options.iommu;
    this.#vdcm = options.vdcm;
    this.#history = options.history;
    this.#scheduler = options.scheduler;
    this.#log = options.log;
    this.#onClosing = options.onClosing;
    this.#store = options.store;
    this.#containers = options.containers;
    this.#owners = options.owners;
    this.#hostMemory = options.hostMemory;
    this.#freeSetRetry = options.freeSetRetryDelaysMs ?? DEFAULT_FREE_SET_RETRY;
    this.#reclaimWaitMs = options.reclaimWaitMs ?? 10_000;
    this.#domainRetry = options.domainReleaseRetryDelaysMs ?? DEFAULT_DOMAIN_RELEASE_RETRY;
    this.#reclaims = new ReclaimWatch(options.core, options.scheduler, options.log);
  }

  /** closeAll has begun: background closes stop retrying from now on. */
  beginStopping(): void {
    this.#stopping = true;
  }

  /**
   * A close nobody waits for and nobody would retry (the VMM is gone: session lost, or a VFIO
   * restart): retried, the wait between rounds growing to {@link BACKGROUND_CLOSE_MAX_WAIT_MS},
   * until the set is freed, the container is gone, or VFIO stops (closeAll then closes it).
   * Found by the chaos suite: a crashed guest's close gave up while the core was down, and its
   * IOASIDs were never reclaimed (L2).
   */
  backgroundClose(c: Container, reason: CloseReason): Promise<void> {
    const attempt = async (round: number): Promise<void> => {
      try {
        await this.close(c, reason);
      } catch (err) {
        if (this.#stopping || this.#containers.get(c.id) !== c) return;
        const wait = Math.min(BACKGROUND_CLOSE_FIRST_WAIT_MS * 2 ** round, BACKGROUND_CLOSE_MAX_WAIT_MS);
        this.#log.error(
          { err, containerId: c.id, setId: c.setId, reason, round, retryInMs: wait },
          "container could not be closed yet: its set is still allocated; retrying",
        );
        await this.#scheduler.sleep(wait);
        if (this.#stopping || this.#containers.get(c.id) !== c) return;
        await attempt(round + 1);
      }
    };
    return attempt(0);
  }

  /**
   * Closes the container: CLOSING at once, its fault groups answered, its set freed (one core
   * FreeSet), then the release phase in the background. A close in progress is joined; a failed
   * one leaves the container CLOSING and the next close retries.
   */
  close(c: Container, reason: CloseReason): Promise<CloseResult> {
    if (c.closing !== undefined) return c.closing;
    c.state = ContainerState.CLOSING;
    c.cancelGrace?.();
    c.cancelGrace = undefined;
    c.sessionDeadline = undefined;
    // The VMM is gone (or going): its unanswered fault groups are answered INVALID first.
    const faultsAnswered = this.#onClosing(c.id).catch((err: unknown) =>
      this.#log.warn({ err, containerId: c.id }, "answering the container's fault groups failed"),
    );
    const closing = faultsAnswered
      .then(() => this.#freeSet(c))
      .then(
        (freed) => {
          const unassignedDevices = c.devices.size;
          this.#history.record({ $case: "containerClose", value: { container: c.id, reason, freed, unassigning: unassignedDevices } }, { setId: c.setId });
          this.#log.info({ containerId: c.id, setId: c.setId, reason, freed, unassignedDevices }, "container closed: its IOASIDs are freed");
          c.notifySession?.(reason);
          c.released = this.#release(c);
          return { freed, unassignedDevices };
        },
        (err: unknown) => {
          // Stays CLOSING (nothing new may start) with no close in progress: the next close retries.
          c.closing = undefined;
          throw err;
        },
      );
    c.closing = closing;
    return closing;
  }

  /** core.FreeSet, retried while the core is unreachable; a set already gone counts as freed. */
  async #freeSet(c: Container): Promise<number> {
    for (let attempt = 0; ; attempt++) {
      try {
        return (await this.#core.freeSet(c.setId)).freed;
      } catch (err) {
        if (isDomainError(err, "SET_UNKNOWN")) return 0;
        const delay = this.#freeSetRetry[attempt];
        if (!isUnreachable(err) || delay === undefined) throw err;
        this.#log.warn({ err, containerId: c.id, setId: c.setId, attempt }, "core unreachable while freeing the set; retrying");
        await this.#scheduler.sleep(delay);
      }
    }
  }

  /**
   * The release phase after the IOASIDs are freed: calls still in flight settle, mdevs are
   * unassigned only once the set is reclaimed (its FREE events went through every tier, so no
   * device is drained before KVM cleared its translation entries, S5), physical devices are
   * detached, the stage-2 domain freed, the container forgotten, and its guest memory put back in
   * the pool — only once no stage-2 domain maps it any more.
   */
  async #release(c: Container): Promise<void> {
    await Promise.allSettled([...c.inflight]);
    if ([...c.devices.values()].some((d) => d.ref.kind === "mdev")) await this.#awaitReclaim(c);
    const stage2 = c.stage2 === undefined ? undefined : await c.stage2.catch(() => undefined);
    for (const entry of c.devices.values()) {
      try {
        if (entry.ref.kind === "mdev") await this.#vdcm.unassignMdev(entry.ref.id);
        else if (entry.nested !== undefined) {
          // Replaced to a nested domain (ReplaceDeviceDomain): detach that one, and free it so
          // the stage 2 (its parent) can be freed below.
          await this.#iommu.detachDevice(entry.nested.domainId, entry.ref.id);
          await this.#iommu.freeDomain(entry.nested.domainId);
        } else if (stage2 !== undefined) await this.#iommu.detachDevice(stage2, entry.ref.id);
        this.#history.record(
          { $case: "deviceUnassign", value: { container: c.id, deviceKind: entry.ref.kind, device: entry.ref.id, teardown: true } },
          { setId: c.setId },
        );
      } catch (err) {
        if (!isDomainError(err, "MDEV_NOT_ASSIGNED") && !isDomainError(err, "ATTACH_HANDLE_NOT_FOUND")) {
          this.#log.error({ err, containerId: c.id, device: describeDevice(entry.ref) }, "teardown could not unassign a device");
        }
      }
      if (this.#owners.get(entry.key) === c.id) this.#owners.delete(entry.key);
    }
    c.devices.clear();
    c.binds.clear();
    // Then the vIOMMUs, event queues → vdevices → vIOMMU (issue 16): the nested domains on them went
    // with the devices above, and a vIOMMU left behind holds the stage 2 freed below (DOMAIN_IN_USE).
    if (stage2 !== undefined) await adoptViommusOver(this.#iommu, c, stage2, this.#log);
    await destroyAllViommus(this.#iommu, this.#history, c, this.#log);
    this.#containers.delete(c.id);
    this.#history.record({ $case: "containerRelease", value: { container: c.id } }, { setId: c.setId });
    // The guest memory may be given to another VM only once no device can reach it through this
    // container's stage 2: after the domain is freed. A domain that could not be freed (still in
    // use after every retry, logged) keeps the memory out of the pool — given to nobody until VFIO
    // restarts — rather than let the next VM's memory be DMA'd by this VM's devices.
    const unmapped = stage2 === undefined || (await this.#releaseDomain(c, stage2));
    if (unmapped) this.#hostMemory.put(c.guestMemory);
    else
      this.#log.error(
        { containerId: c.id, domainId: stage2 },
        "guest memory of a closed container withheld from the pool: its stage-2 domain could not be freed",
      );
    await this.#store
      ?.write([{ key: `ctr/${c.id}`, value: undefined }])
      .catch((err: unknown) => this.#log.warn({ err, containerId: c.id }, "could not forget the released container in the store"));
  }

  /**
   * Waits (bounded by `reclaimWaitMs`) until the core destroyed the set: every IOASID reclaimed.
   * Every closing container waits through one {@link ReclaimWatch}: one core call per round for all.
   */
  async #awaitReclaim(c: Container): Promise<void> {
    if (await this.#reclaims.reclaimed(c.setId, this.#reclaimWaitMs)) return;
    this.#log.warn(
      { containerId: c.id, setId: c.setId, waitedMs: this.#reclaimWaitMs },
      "set not reclaimed in time (a subscriber is down?): unassigning its mdevs anyway",
    );
  }

  /**
   * Frees the stage-2 domain once the IOMMU's FREE teardown stopped using it (bounded retries).
   * @returns whether the domain is gone (freed now, or not found)
   */
  async #releaseDomain(c: Container, domainId: number): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.#iommu.freeDomain(domainId);
        return true;
      } catch (err) {
        if (isDomainError(err, "DOMAIN_NOT_FOUND")) return true;
        const delay = this.#domainRetry[attempt];
        if ((!isDomainError(err, "DOMAIN_IN_USE") && !isUnreachable(err)) || delay === undefined) {
          this.#log.error({ err, containerId: c.id, domainId }, "stage-2 domain of a closed container could not be freed");
          return false;
        }
        await this.#scheduler.sleep(delay);
      }
    }
  }
}
