import type { RoleStatePort } from "@ioasid/bus";
import { TokenType } from "@ioasid/ioasid";
import type { CorePort } from "@ioasid/role-kit";
import { CloseReason, ContainerState, type Container, type DeviceEntry } from "./container.js";
import type { ContainerCalls } from "./container-calls.js";
import { snapshotContainer, type AssignedDeviceInfo, type ContainerSnapshot } from "./container-snapshot.js";
import { assertCapability, issueCapability } from "./container-capability.js";
import { ContainerTeardown, type CloseResult } from "./container-teardown.js";
import { ContainerViommus, type ViommuInfo } from "./container-viommus.js";
import type { VdeviceEntry, VeventqEntry } from "./container.js";
import { DeviceAssignments } from "./device-assignments.js";
import { assertDmaMapping, assertDmaRange } from "./dma-mapping.js";
import { describeDevice, deviceKey, MAX_DEVICE_NAME, type DeviceRef } from "./device-ref.js";
import { GuestPasids, type GuestPasidBind, type GuestPasidUnbind } from "./guest-pasids.js";
import { assertGuestMemorySize, assertHostRangeGiven, formatBytes, HostMemoryPool, type HostMemoryOptions, type HostRange } from "./host-memory-pool.js";
import { invalidField, vfioError } from "./vfio-errors.js";
import { keptContainer, restoredContainer, type VfioKeptEntry } from "./vfio-kept-entry.js";
import {
  realScheduler,
  type DmaMapping,
  type HistoryPort,
  type IommuPort,
  type Scheduler,
  type VdcmPort,
  type VeventqItem,
  type VfioLog,
} from "./vfio-ports.js";

/** Longest session grace period an OpenContainer may ask for: one day (setTimeout's range is ~24.8 days). */
export const MAX_SESSION_GRACE_MS = 86_400_000;

/** Longest VM name accepted, in characters. */
export const MAX_VM_NAME = 256;

/**
 * The host memory pool VFIO gives guest memory from when its options name none: 64 GiB from 4 GiB
 * up (below 4 GiB is the host's own, as the MMIO hole and firmware would be on a real host).
 */
export const DEFAULT_HOST_MEMORY: HostMemoryOptions = { base: 1n << 32n, size: 64n << 30n };

/** Guest memory given to a container whose OpenContainer asks for none (0), in bytes: 1 GiB. */
export const DEFAULT_GUEST_MEMORY_SIZE = 1n << 30n;

/** What OpenContainer asks for. */
export interface OpenContainerSpec {
  /** The VM's MM token (non-zero): the set's token, and what KVM registered by. */
  readonly mmToken: bigint;
  /** The set's quota; 0 = all that is available. */
  readonly quota: number;
  /** A name for people. */
  readonly vmName: string;
  /** How long to wait for the Session stream, in ms; 0 = the service default. */
  readonly sessionGraceMs: number;
  /**
   * Host memory to give the VM, in bytes (a multiple of 4 KiB); 0 = the service default
   * ({@link VfioContainersOptions.guestMemorySize}). @default 0n
   */
  readonly guestMemorySize?: bigint;
}

/** The new container. */
export interface OpenedContainer {
  readonly containerId: number;
  readonly setId: number;
  readonly quota: number;
  /** Wall-clock ms since the epoch. */
  readonly sessionDeadline: number;
  /**
   * The container's capability (32 random bytes), answered once: every later call naming the
   * container must present it ({@link VfioContainers.authorize}). VFIO keeps only its digest.
   */
  readonly capability: Uint8Array;
  /** The host memory given to the VM, ascending by address: MapDma maps only inside it. */
  readonly guestMemory: readonly HostRange[];
}

/**
 * The VMM's lease on its container, held by the Session stream. The container lives exactly as long
 * as the lease: {@link SessionLease.end} (the stream ended from the VMM's side) closes it.
 */
export interface SessionLease {
  readonly containerId: number;
  readonly setId: number;
  /** Resolves with the reason once the container was closed from the server side (its IOASIDs freed). */
  readonly closed: Promise<CloseReason>;
  /** The VMM's side of the stream ended: closes the container (SESSION_ENDED) unless it is closing already. */
  end(): void;
}

/** Options of {@link VfioContainers}. */
export interface VfioContainersOptions {
  readonly core: CorePort;
  readonly iommu: IommuPort;
  readonly vdcm: VdcmPort;
  readonly history: HistoryPort;
  /** Session grace period when OpenContainer does not give one, in ms. */
  readonly sessionGraceMs: number;
  /** The host memory VFIO gives guest memory from. @default {@link DEFAULT_HOST_MEMORY} (64 GiB from 4 GiB) */
  readonly hostMemory?: HostMemoryOptions;
  /**
   * Guest memory given when OpenContainer asks for none, in bytes (a non-zero multiple of 4 KiB, at
   * most the pool's size). @default {@link DEFAULT_GUEST_MEMORY_SIZE} (1 GiB)
   */
  readonly guestMemorySize?: bigint;
  /** @default real timers */
  readonly scheduler?: Scheduler;
  /** @default silent */
  readonly log?: VfioLog;
  /**
   * Waits between attempts of the core FreeSet of a closing container while the core is
   * unreachable (UNAVAILABLE, DEADLINE_EXCEEDED); one attempt more than there are delays.
   * @default [100, 250, 500, 1000, 2000, 4000]
   */
  readonly freeSetRetryDelaysMs?: readonly number[];
  /**
   * Longest time a closing container with mdevs waits for its set's IOASIDs to be reclaimed before it
   * unassigns the mdevs anyway, in ms. @default 10000
   */
  readonly reclaimWaitMs?: number;
  /**
   * Waits between attempts to free the stage-2 domain of a closed container while the IOMMU's FREE
   * teardown still uses it (DOMAIN_IN_USE) or the IOMMU is unreachable.
   * @default [50, 100, 250, 500, 1000, 2000, 4000, 8000]
   */
  readonly domainReleaseRetryDelaysMs?: readonly number[];
  /**
   * Called when a container starts closing, before its set is freed (the fault relay answers the
   * container's unanswered fault groups INVALID). Its failure is logged, never blocks the close.
   */
  readonly onClosing?: (containerId: number) => Promise<unknown>;
  /**
   * Where the containers are kept so a VFIO killed with -9 can close them when it returns (its
   * VMMs' sessions died with it): a RoleState in JetStream. @default not kept
   */
  readonly store?: RoleStatePort<VfioKeptEntry>;
  /** What the store held at start: those containers come back to be closed by {@link VfioContainers.closeRestored}. */
  readonly saved?: ReadonlyMap<string, VfioKeptEntry>;
}

const silentLog: VfioLog = { info: () => {}, warn: () => {}, error: () => {} };

/**
 * VFIO's containers: one per VM, each holding the VM's IOASID set (token type MM), its assigned
 * devices and mdevs, and the guest PASID binds made through it (DESIGN §5 "VFIO"). It is the only
 * API a VMM uses, and every call names its container and stays inside its set (S3): another VM's
 * PASIDs are refused by the core's ownership check and nothing changes. VFIO holds no IOASID
 * references and subscribes to no events.
 *
 * A container lives exactly as long as its VMM's session: when the Session stream ends (clean
 * close, cancel, the VMM killed, the connection lost), when no session attaches within the grace
 * period, or on CloseContainer, every IOASID of the set is freed with one core FreeSet — the
 * crashed-guest path (ioasid.rst "Exception cases": free must always succeed; the FREE events
 * drive KVM → VDCM → IOMMU teardown in priority order) — and then the devices are unassigned.
 *
 * Each container is given host memory at open, exclusively, from one pool ({@link HostMemoryPool}),
 * and MapDma maps only inside it (VFIO_IOMMU_MAP_DMA pins the VMM's own pages: a VMM never maps
 * another VM's memory); the memory goes back to the pool when the container is released.
 *
 * All I/O goes through the injected ports, so this class is unit-tested with in-memory fakes.
 */
export class VfioContainers {
  readonly #core: CorePort;
  readonly #iommu: IommuPort;
  readonly #vdcm: VdcmPort;
  readonly #history: HistoryPort;
  readonly #scheduler: Scheduler;
  readonly #log: VfioLog;
  readonly #defaultGraceMs: number;
  /** The host memory every container's guest memory is given from. */
  readonly #hostMemory: HostMemoryPool;
  readonly #defaultGuestMemory: bigint;
  readonly #containers = new Map<number, Container>();
  /** Closing and releasing containers (it shares the table and the owners). */
  readonly #teardown: ContainerTeardown;
  /** AssignDevice and UnassignDevice. */
  readonly #devices: DeviceAssignments;
  /** The guest PASID calls: alloc, free, bind, unbind. */
  readonly #pasids: GuestPasids;
  /** The vIOMMU calls: vIOMMUs, vdevices, event queues. */
  readonly #viommus: ContainerViommus;
  readonly #store: RoleStatePort<VfioKeptEntry> | undefined;
  readonly #restored: Container[] = [];
  /** Which container each assigned device (by key) belongs to: a device serves one VM at a time. */
  readonly #owners = new Map<string, number>();
  #nextId = 1;

  constructor(options: VfioContainersOptions) {
    this.#core = options.core;
    this.#iommu = options.iommu;
    this.#vdcm = options.vdcm;
    this.#history = options.history;
    this.#scheduler = options.scheduler ?? realScheduler;
    this.#log = options.log ?? silentLog;
    this.#defaultGraceMs = options.sessionGraceMs;
    this.#hostMemory = new HostMemoryPool(options.hostMemory ?? DEFAULT_HOST_MEMORY);
    this.#defaultGuestMemory = options.guestMemorySize ?? DEFAULT_GUEST_MEMORY_SIZE;
    if (this.#defaultGuestMemory <= 0n || this.#defaultGuestMemory % 4096n !== 0n || this.#defaultGuestMemory > this.#hostMemory.size) {
      throw new RangeError(`guestMemorySize ${this.#defaultGuestMemory}: expected a non-zero multiple of 4 KiB, at most the host memory pool's size`);
    }
    this.#store = options.store;
    this.#teardown = new ContainerTeardown({
      core: this.#core,
      iommu: this.#iommu,
      vdcm: this.#vdcm,
      history: this.#history,
      scheduler: this.#scheduler,
      log: this.#log,
      freeSetRetryDelaysMs: options.freeSetRetryDelaysMs,
      reclaimWaitMs: options.reclaimWaitMs,
      domainReleaseRetryDelaysMs: options.domainReleaseRetryDelaysMs,
      onClosing: options.onClosing ?? (() => Promise.resolve()),
      store: this.#store,
      containers: this.#containers,
      owners: this.#owners,
      hostMemory: this.#hostMemory,
    });
    const calls: ContainerCalls = {
      core: this.#core,
      iommu: this.#iommu,
      vdcm: this.#vdcm,
      history: this.#history,
      scheduler: this.#scheduler,
      log: this.#log,
      containers: this.#containers,
      owners: this.#owners,
      op: (containerId, fn) => this.#op(containerId, fn),
      requireDevice: (device) => this.#requireDevice(device),
      assigned: (c, ref) => this.#assigned(c, ref),
      stage2: (c) => this.#stage2(c),
      save: (c) => this.#save(c),
    };
    this.#devices = new DeviceAssignments(calls);
    this.#pasids = new GuestPasids(calls);
    this.#viommus = new ContainerViommus(calls);
    if (options.saved !== undefined) this.#restore(options.saved);
  }

  /**
   * Closes the containers restored from the store (VFIO crashed: their sessions ended with it) as
   * the crashed-guest path does — every IOASID of their sets freed, devices and mdevs unassigned,
   * the stage-2 domains freed. Failures are logged; the next start tries again.
   * @returns how many were closed
   */
  async closeRestored(): Promise<number> {
    const restored = this.#restored.splice(0);
    await Promise.allSettled(restored.map((c) => this.#teardown.backgroundClose(c, CloseReason.SERVICE_RESTARTED)));
    await Promise.allSettled(restored.map((c) => c.released ?? Promise.resolve()));
    return restored.length;
  }

  #restore(saved: ReadonlyMap<string, VfioKeptEntry>): void {
    for (const v of saved.values()) {
      if (v.kind === "containerCounter") {
        this.#nextId = Math.max(this.#nextId, v.nextContainerId);
        continue;
      }
      // Its memory stays its own until it is released: nobody opened meanwhile is given it.
      const c = restoredContainer(v, this.#hostMemory.reserve(v.guestMemory));
      for (const k of c.devices.keys()) this.#owners.set(k, c.id);
      this.#containers.set(c.id, c);
      this.#restored.push(c);
      this.#nextId = Math.max(this.#nextId, c.id + 1);
    }
  }

  /** Keeps the container (set, devices, stage-2 domain) before a call that changed it returns. */
  async #save(c: Container): Promise<void> {
    if (this.#store === undefined) return;
    const stage2 = c.stage2 === undefined ? undefined : await c.stage2.catch(() => undefined);
    await this.#store.write([
      { key: `ctr/${c.id}`, value: keptContainer(c, stage2) },
      { key: "next", value: { kind: "containerCounter", nextContainerId: this.#nextId } },
    ]);
  }

  /**
   * Checks that a call naming the container carries the container's capability — before anything
   * else of the call happens, so a refused call changes nothing (DESIGN §3 "Authority is a
   * capability, not a name"). Every call naming a container but OpenContainer and QueryState goes
   * through here first. A closing container still checks it (CloseContainer joins its teardown only
   * for its VMM), and a container restored after a VFIO restart checks its kept digest.
   * @param presented the capability the call carried; undefined when it carried none
   * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (container_id 0); NOT_FOUND
   *   `CONTAINER_NOT_FOUND` (container ids are not secret: QueryState lists them);
   *   PERMISSION_DENIED `CAPABILITY_MISSING`, `CAPABILITY_NOT_FOR_CONTAINER`
   */
  authorize(containerId: number, presented: Uint8Array | undefined): void {
    assertCapability(containerId, this.#get(containerId).capabilityDigest, presented);
  }

  /**
   * Checks that host memory `[paddr, paddr + size)` lies inside one of the ranges the container was
   * given at open: MapDma calls it before anything is created for the mapping. Issue 14 item 3:
   * VM B's VMM mapped VM A's host memory into B's stage 2 and DMAed into it; VFIO — the host
   * kernel's side of VFIO_IOMMU_MAP_DMA, which pins only the caller's own pages — now maps only
   * memory the VM owns.
   * @throws DomainError PERMISSION_DENIED `HOST_MEMORY_NOT_GIVEN`; NOT_FOUND `CONTAINER_NOT_FOUND`
   */
  assertHostMemoryGiven(containerId: number, paddr: bigint, size: bigint): void {
    assertHostRangeGiven(containerId, this.#get(containerId).guestMemory, paddr, size);
  }

  /** Whether the container exists and is not closing. */
  isOpen(containerId: number): boolean {
    const c = this.#containers.get(containerId);
    return c !== undefined && c.state !== ContainerState.CLOSING;
  }

  /**
   * The set of a container that may be used (exists, not closing).
   * @throws CONTAINER_NOT_FOUND, CONTAINER_CLOSING
   */
  usableSetId(containerId: number): number {
    return this.#usable(containerId).setId;
  }

  /** Containers in the table (any state). */
  get size(): number {
    return this.#containers.size;
  }

  /** The host memory pool: its bounds and what is free now (inspection and tests). */
  get hostMemory(): Pick<HostMemoryPool, "base" | "size" | "freeBytes" | "freeRanges"> {
    return this.#hostMemory;
  }

  // ---------------------------------------------------------------------------------------------
  // Container life cycle

  /**
   * Opens the VM's container: gives it its guest memory from the host memory pool, creates its
   * IOASID set (token type MM, the VM's MM token, the quota) and starts the session grace period.
   * A refused open takes nothing: the memory goes back when the set cannot be created.
   * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (mm_token 0, grace above a day, name too
   *   long, guest_memory_size not a multiple of 4 KiB or larger than the pool); RESOURCE_EXHAUSTED
   *   `HOST_MEMORY_EXHAUSTED`; the core's ALREADY_EXISTS `TOKEN_IN_USE`, RESOURCE_EXHAUSTED
   *   `CAPACITY_EXHAUSTED`, INVALID_ARGUMENT `QUOTA_INVALID`.
   */
  async openContainer(spec: OpenContainerSpec): Promise<OpenedContainer> {
    if (spec.mmToken === 0n) throw invalidField("mm_token", "mm_token is required: the VM's MM token, non-zero");
    if (spec.sessionGraceMs > MAX_SESSION_GRACE_MS) {
      throw invalidField("session_grace_ms", `session_grace_ms ${spec.sessionGraceMs} is above ${MAX_SESSION_GRACE_MS} (one day)`);
    }
    if (spec.vmName.length > MAX_VM_NAME) throw invalidField("vm_name", `vm_name is longer than ${MAX_VM_NAME} characters`);
    const memorySize = spec.guestMemorySize === undefined || spec.guestMemorySize === 0n ? this.#defaultGuestMemory : spec.guestMemorySize;
    assertGuestMemorySize(memorySize, this.#hostMemory.size);
    // Taken before the set is created (synchronously, so two opens never get the same memory) and
    // put back if the core refuses the set: a refused open takes nothing (DESIGN §8).
    const guestMemory = this.#hostMemory.take(memorySize);
    let set: Awaited<ReturnType<CorePort["createSet"]>>;
    try {
      // One container per VM: the core refuses a second set for the same MM token (TOKEN_IN_USE).
      set = await this.#core.createSet({ type: TokenType.MM, value: spec.mmToken }, spec.quota);
    } catch (err) {
      this.#hostMemory.put(guestMemory);
      throw err;
    }
    const graceMs = spec.sessionGraceMs === 0 ? this.#defaultGraceMs : spec.sessionGraceMs;
    const now = this.#scheduler.now();
    const issued = issueCapability();
    const c: Container = {
      id: this.#nextId++,
      setId: set.id,
      mmToken: spec.mmToken,
      vmName: spec.vmName,
      quota: set.quota,
      openedAt: now,
      capabilityDigest: issued.digest,
      guestMemory,
      state: ContainerState.AWAITING_SESSION,
      sessionDeadline: now + graceMs,
      cancelGrace: undefined,
      sessionAttached: false,
      notifySession: undefined,
      devices: new Map(),
      binds: new Map(),
      viommus: new Map(),
      stage2: undefined,
      inflight: new Set(),
      closing: undefined,
      released: undefined,
    };
    this.#containers.set(c.id, c);
    // No Session within the grace period: the VMM is taken for crashed before it started.
    c.cancelGrace = this.#scheduler.after(graceMs, () => {
      c.cancelGrace = undefined;
      if (c.sessionAttached || c.state === ContainerState.CLOSING) return;
      // Nobody waits for it: the background close retries until the set is freed, never rejects.
      void this.#teardown.backgroundClose(c, CloseReason.SESSION_NEVER_ATTACHED);
    });
    await this.#save(c);
    this.#history.record(
      { $case: "containerOpen", value: { container: c.id, mmToken: c.mmToken, quota: c.quota, vmName: c.vmName, graceMs, guestMemory: [...guestMemory] } },
      { setId: c.setId },
    );
    this.#log.info(
      {
        containerId: c.id,
        setId: c.setId,
        mmToken: String(c.mmToken),
        quota: c.quota,
        graceMs,
        guestMemory: guestMemory.map((r) => `0x${r.paddr.toString(16)}+${formatBytes(r.size)}`),
      },
      "container opened",
    );
    return { containerId: c.id, setId: c.setId, quota: c.quota, sessionDeadline: now + graceMs, capability: issued.capability, guestMemory };
  }

  /**
   * Attaches the VMM's Session stream to its container (once: a session that ended cannot be
   * re-attached). The container turns ACTIVE and its grace timer stops.
   * @throws DomainError NOT_FOUND `CONTAINER_NOT_FOUND`; FAILED_PRECONDITION `CONTAINER_CLOSING`;
   *   ALREADY_EXISTS `SESSION_ALREADY_ATTACHED`; INVALID_ARGUMENT `INVALID_FIELD` (container_id 0).
   */
  attachSession(containerId: number): SessionLease {
    const c = this.#usable(containerId);
    if (c.sessionAttached) {
      throw vfioError("SESSION_ALREADY_ATTACHED", `container ${containerId} already has its session: a container has exactly one`);
    }
    c.sessionAttached = true;
    c.state = ContainerState.ACTIVE;
    c.cancelGrace?.();
    c.cancelGrace = undefined;
    c.sessionDeadline = undefined;
    const closed = new Promise<CloseReason>((resolve) => {
      c.notifySession = resolve;
    });
    this.#history.record({ $case: "sessionAttach", value: { container: c.id } }, { setId: c.setId });
    return {
      containerId: c.id,
      setId: c.setId,
      closed,
      end: () => {
        // The VMM went away (exit, kill -9, lost connection): the crashed-guest path. A close in
        // progress (the VMM's own CloseContainer) is joined, and retried if it fails: the VMM that
        // would have retried it is gone (chaos seed 4: its close failed with the core down, and
        // the set was never freed).
        if (this.#containers.get(c.id) === c) void this.#teardown.backgroundClose(c, CloseReason.SESSION_ENDED);
      },
    };
  }

  /**
   * The VMM's clean exit (CloseContainer): every IOASID of the set freed (one core FreeSet), then,
   * in the background, devices unassigned and the container forgotten. Resolves once the IOASIDs are
   * freed. A close while the container is already closing joins that teardown.
   * @throws DomainError NOT_FOUND `CONTAINER_NOT_FOUND`; the core's UNAVAILABLE when it stayed
   *   unreachable (the container then stays CLOSING; call again to retry).
   */
  async closeContainer(containerId: number, reason: CloseReason = CloseReason.CLOSED): Promise<CloseResult> {
    const c = this.#get(containerId);
    return this.#teardown.close(c, reason);
  }

  /**
   * Closes every container (VFIO is stopping: its containers do not outlive it) and waits for each
   * teardown, release phase included. Never throws; failures are logged.
   */
  async closeAll(reason: CloseReason = CloseReason.SERVICE_STOPPED): Promise<void> {
    this.#teardown.beginStopping();
    const all = [...this.#containers.values()];
    await Promise.allSettled(all.map((c) => this.#teardown.close(c, reason)));
    await Promise.allSettled(all.map((c) => c.released ?? Promise.resolve()));
  }

  /** Resolves when the container's release phase is over (it is then gone), or at once if it is gone. */
  async whenReleased(containerId: number): Promise<void> {
    const c = this.#containers.get(containerId);
    await c?.closing?.catch(() => {});
    await c?.released;
  }

  // ---------------------------------------------------------------------------------------------
  // Devices (device-assignments.ts)

  /** Assigns a physical device or an mdev to the container: see {@link DeviceAssignments.assignDevice}. */
  assignDevice(containerId: number, device: DeviceRef | undefined): Promise<AssignedDeviceInfo> {
    return this.#devices.assignDevice(containerId, device);
  }

  /** Replaces what a device's requests without PASID translate through: see {@link DeviceAssignments.replaceDeviceDomain}. */
  replaceDeviceDomain(
    containerId: number,
    device: DeviceRef | undefined,
    guestPgtable: bigint,
    viommuId = 0,
  ): Promise<{ domainId: number; guestPgtable: bigint; answeredFaultGroups: number }> {
    return this.#devices.replaceDeviceDomain(containerId, device, guestPgtable, viommuId);
  }

  /** Unassigns a device or mdev, its guest binds unbound first: see {@link DeviceAssignments.unassignDevice}. */
  unassignDevice(containerId: number, device: DeviceRef | undefined): Promise<{ unbound: number }> {
    return this.#devices.unassignDevice(containerId, device);
  }

  // ---------------------------------------------------------------------------------------------
  // vIOMMUs, vdevices and event queues (container-viommus.ts)

  /** AllocViommu over the container's stage 2: see {@link ContainerViommus.allocViommu}. */
  allocViommu(containerId: number, device: DeviceRef | undefined): Promise<ViommuInfo> {
    return this.#viommus.allocViommu(containerId, device);
  }

  /** DestroyViommu of one of the container's vIOMMUs: see {@link ContainerViommus.destroyViommu}. */
  destroyViommu(containerId: number, viommuId: number): Promise<void> {
    return this.#viommus.destroyViommu(containerId, viommuId);
  }

  /** AllocVdevice in one of the container's vIOMMUs: see {@link ContainerViommus.allocVdevice}. */
  allocVdevice(containerId: number, viommuId: number, device: DeviceRef | undefined, virtId: bigint): Promise<VdeviceEntry> {
    return this.#viommus.allocVdevice(containerId, viommuId, device, virtId);
  }

  /** DestroyVdevice of one of the container's vdevices: see {@link ContainerViommus.destroyVdevice}. */
  destroyVdevice(containerId: number, vdeviceId: number): Promise<void> {
    return this.#viommus.destroyVdevice(containerId, vdeviceId);
  }

  /** AllocVeventq on one of the container's vIOMMUs: see {@link ContainerViommus.allocVeventq}. */
  allocVeventq(containerId: number, viommuId: number, depth: number): Promise<VeventqEntry> {
    return this.#viommus.allocVeventq(containerId, viommuId, depth);
  }

  /** DestroyVeventq of one of the container's event queues: see {@link ContainerViommus.destroyVeventq}. */
  destroyVeventq(containerId: number, veventqId: number): Promise<void> {
    return this.#viommus.destroyVeventq(containerId, veventqId);
  }

  /** ReadVeventq of one of the container's event queues: see {@link ContainerViommus.readVeventq}. */
  readVeventq(containerId: number, veventqId: number, maxItems: number): Promise<VeventqItem[]> {
    return this.#viommus.readVeventq(containerId, veventqId, maxItems);
  }

  // ---------------------------------------------------------------------------------------------
  // Guest PASIDs (virtual command) and binds (guest-pasids.ts)

  /** The guest's virtual-command PASID allocation: see {@link GuestPasids.allocPasid}. */
  allocPasid(containerId: number): Promise<{ hpasid: number; generation: number }> {
    return this.#pasids.allocPasid(containerId);
  }

  /** The guest's virtual-command PASID free, which always succeeds in its set: see {@link GuestPasids.freePasid}. */
  freePasid(containerId: number, hpasid: number, generation: number): Promise<{ reclaimed: boolean; alreadyFreePending: boolean }> {
    return this.#pasids.freePasid(containerId, hpasid, generation);
  }

  /** bind_gpasid on an assigned device: see {@link GuestPasids.bindGuestPasid}. */
  bindGuestPasid(containerId: number, bind: GuestPasidBind): Promise<{ handleId: bigint; firstBind: boolean }> {
    return this.#pasids.bindGuestPasid(containerId, bind);
  }

  /** unbind_gpasid on an assigned device: see {@link GuestPasids.unbindGuestPasid}. */
  unbindGuestPasid(containerId: number, unbind: GuestPasidUnbind): Promise<{ unbound: boolean; lastUnbind: boolean }> {
    return this.#pasids.unbindGuestPasid(containerId, unbind);
  }

  // ---------------------------------------------------------------------------------------------
  // Stage-2 DMA mappings and inspection

  /**
   * VFIO_IOMMU_MAP_DMA: maps guest physical memory in the VM's stage-2 domain (created with the
   * first need, once the mapping's shape is known to be good and its host memory the container's:
   * a refused MapDma creates nothing). The host range must lie inside one of the ranges the
   * container was given at open (the kernel pins the VMM's own pages: a VMM maps only memory it
   * owns, never another VM's).
   * @throws DomainError INVALID_ARGUMENT `ADDRESS_NOT_ALIGNED`, `INVALID_RANGE`, `INVALID_FIELD`;
   *   PERMISSION_DENIED `HOST_MEMORY_NOT_GIVEN`; the IOMMU's refusals (IOVA_ALREADY_MAPPED)
   */
  async mapDma(containerId: number, m: DmaMapping): Promise<void> {
    await this.#op(containerId, async (c) => {
      assertDmaMapping(m);
      this.assertHostMemoryGiven(c.id, m.paddr, m.size);
      const domainId = await this.#stage2(c);
      await this.#iommu.map(domainId, m);
      this.#history.record({ $case: "vfioMapDma", value: { container: c.id, gpa: m.iova, hpa: m.paddr, size: m.size } }, { setId: c.setId });
    });
  }

  /**
   * VFIO_IOMMU_UNMAP_DMA. Without a stage-2 domain nothing is mapped: 0, and no domain is created.
   * @returns bytes unmapped
   * @throws DomainError INVALID_ARGUMENT `ADDRESS_NOT_ALIGNED`, `INVALID_RANGE`
   */
  async unmapDma(containerId: number, iova: bigint, size: bigint): Promise<bigint> {
    return this.#op(containerId, async (c) => {
      assertDmaRange(iova, size);
      if (c.stage2 === undefined) return 0n;
      const domainId = await this.#stage2(c);
      const unmapped = await this.#iommu.unmap(domainId, iova, size);
      if (unmapped > 0n) this.#history.record({ $case: "vfioUnmapDma", value: { container: c.id, gpa: iova, size } }, { setId: c.setId });
      return unmapped;
    });
  }

  /**
   * VFIO's view of one container (or of all, for 0), ascending by id: set, devices, and the set's
   * IOASIDs as the core has them, with the binds made through this VFIO. Changes nothing.
   * @throws DomainError NOT_FOUND `CONTAINER_NOT_FOUND` (a non-zero id that does not exist).
   */
  async queryState(containerId: number): Promise<ContainerSnapshot[]> {
    const selected = containerId === 0 ? [...this.#containers.values()].sort((a, b) => a.id - b.id) : [this.#get(containerId)];
    return Promise.all(selected.map((c) => snapshotContainer(this.#core, c)));
  }

  // ---------------------------------------------------------------------------------------------
  // Helpers

  #get(containerId: number): Container {
    if (containerId === 0) throw invalidField("container_id", "container_id is required (container ids are never 0)");
    const c = this.#containers.get(containerId);
    if (c === undefined) throw vfioError("CONTAINER_NOT_FOUND", `no container ${containerId} (never opened, or closed)`);
    return c;
  }

  /** The container, if it may serve a call: not closing. */
  #usable(containerId: number): Container {
    const c = this.#get(containerId);
    if (c.state === ContainerState.CLOSING) throw vfioError("CONTAINER_CLOSING", `container ${containerId} is being closed`);
    return c;
  }

  /** Runs a call on a usable container, tracked so that the teardown waits for it. */
  #op<T>(containerId: number, fn: (c: Container) => Promise<T>): Promise<T> {
    let c: Container;
    try {
      c = this.#usable(containerId);
    } catch (err) {
      return Promise.reject(err);
    }
    const p = fn(c);
    const done = (): void => void c.inflight.delete(tracked);
    const tracked: Promise<unknown> = p.then(done, done);
    c.inflight.add(tracked);
    return p;
  }

  #requireDevice(device: DeviceRef | undefined): DeviceRef {
    if (device === undefined || device.id === "") throw invalidField("device", "device is required: a device_id or an mdev_uuid");
    if (device.id.length > MAX_DEVICE_NAME) throw invalidField("device", `device name is longer than ${MAX_DEVICE_NAME} characters`);
    return device;
  }

  /** The device's entry if it is assigned to this container (and not being (un)assigned). */
  #assigned(c: Container, ref: DeviceRef): DeviceEntry {
    const entry = c.devices.get(deviceKey(ref));
    if (entry === undefined || entry.state !== "assigned") {
      throw vfioError("DEVICE_NOT_ASSIGNED", `${describeDevice(ref)} is not assigned to container ${c.id}`);
    }
    return entry;
  }

  /** The VM's stage-2 paging domain, created at the IOMMU on first need (once, even when raced). */
  #stage2(c: Container): Promise<number> {
    c.stage2 ??= this.#iommu
      .createStage2Domain()
      .then(async (domainId) => {
        // Kept with the container, so a VFIO back from a crash frees it.
        await this.#save({ ...c, stage2: Promise.resolve(domainId) });
        return domainId;
      })
      .catch((err: unknown) => {
        c.stage2 = undefined;
        throw err;
      });
    return c.stage2;
  }
}
