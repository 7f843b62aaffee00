import { Code, DomainError, isDomainError } from "@ioasid/errors";
import type { RoleStatePort } from "@ioasid/bus";
import { IoasidState, TokenType, type IoasidInfo } from "@ioasid/ioasid";
import type { CorePort } from "@ioasid/role-kit";
import { invalidField, vfioError, VfioReason } from "./vfio-errors.js";
import {
  realScheduler,
  type DmaMapping,
  type HistoryPort,
  setExists,
  type IommuPort,
  type Scheduler,
  type VdcmPort,
  type VfioLog,
} from "./vfio-ports.js";

/** A device a VM can be given: a physical PCI function (by its IOMMU device id) or an mdev (by UUID). */
export type DeviceRef = { readonly kind: "device"; readonly id: string } | { readonly kind: "mdev"; readonly id: string };

/** Where a container is in its life (vfio.proto `ContainerState`). */
export const ContainerState = {
  /** Opened; waiting for the VMM's Session stream until the grace period runs out. */
  AWAITING_SESSION: "AWAITING_SESSION",
  /** The Session stream is attached. */
  ACTIVE: "ACTIVE",
  /** Being torn down: every call naming it is refused with CONTAINER_CLOSING. */
  CLOSING: "CLOSING",
} as const;
export type ContainerState = (typeof ContainerState)[keyof typeof ContainerState];

/** Why a container was closed (vfio.proto `CloseReason`). */
export const CloseReason = {
  /** The VMM called CloseContainer (clean exit). */
  CLOSED: "CLOSED",
  /** The Session stream ended from the VMM's side: exit, crash (kill -9) or lost connection. */
  SESSION_ENDED: "SESSION_ENDED",
  /** No Session stream attached within the grace period. */
  SESSION_NEVER_ATTACHED: "SESSION_NEVER_ATTACHED",
  /** VFIO itself is stopping: its containers do not outlive it. */
  SERVICE_STOPPED: "SERVICE_STOPPED",
  /** VFIO came back after a crash: the sessions of its containers ended with it (the crashed-guest path). */
  SERVICE_RESTARTED: "SERVICE_RESTARTED",
} as const;
export type CloseReason = (typeof CloseReason)[keyof typeof CloseReason];

/** Guest PASIDs (SPIDs) are 20-bit: 1..2^20−1 (README "SPIDs are 20-bit guest PASIDs"). */
export const MAX_GPASID = (1 << 20) - 1;

/** Longest session grace period an OpenContainer may ask for: one day (setTimeout's range is ~24.8 days). */
export const MAX_SESSION_GRACE_MS = 86_400_000;

/** Longest device id or mdev UUID accepted, in characters. */
export const MAX_DEVICE_NAME = 256;

/** Longest VM name accepted, in characters. */
export const MAX_VM_NAME = 256;

/** A device as assigned to a container. */
export interface AssignedDeviceInfo {
  readonly device: DeviceRef;
  /** For an mdev: its parent physical device; "" for a physical device. */
  readonly parentDeviceId: string;
  /** Wall-clock ms since the epoch. */
  readonly assignedAt: number;
}

/** A host PASID of the container's set, with VFIO's view of its guest binds. */
export interface GuestPasidInfo {
  readonly hpasid: number;
  readonly generation: number;
  /** The guest PASID (SPID) bound to it; 0 when none. */
  readonly gpasid: number;
  /** Devices (as the VMM named them) it is bound on through this VFIO. */
  readonly boundDevices: readonly DeviceRef[];
  readonly freePending: boolean;
}

/** One container as QueryState shows it. */
export interface ContainerSnapshot {
  readonly containerId: number;
  readonly setId: number;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly quota: number;
  readonly state: ContainerState;
  readonly devices: readonly AssignedDeviceInfo[];
  readonly pasids: readonly GuestPasidInfo[];
  /** Wall-clock ms since the epoch. */
  readonly openedAt: number;
  /** AWAITING_SESSION: when the container is closed if no Session attaches. */
  readonly sessionDeadline: number | undefined;
}

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
}

/** The new container. */
export interface OpenedContainer {
  readonly containerId: number;
  readonly setId: number;
  readonly quota: number;
  /** Wall-clock ms since the epoch. */
  readonly sessionDeadline: number;
}

/** What closing a container did. */
export interface CloseResult {
  /** IOASIDs of the set the close moved out of ACTIVE. */
  readonly freed: number;
  /** Devices and mdevs the teardown unassigns. */
  readonly unassignedDevices: number;
}

/** A BindGuestPasid request. */
export interface GuestPasidBind {
  readonly device: DeviceRef | undefined;
  readonly hpasid: number;
  /** 0: unchecked. */
  readonly generation: number;
  readonly gpasid: number;
  readonly guestPgtable: bigint;
}

/** An UnbindGuestPasid request. */
export interface GuestPasidUnbind {
  readonly device: DeviceRef | undefined;
  readonly hpasid: number;
  /** 0: unchecked. */
  readonly generation: number;
  /** 0: do not check it. */
  readonly gpasid: number;
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

/** A container as VFIO keeps it in its store (what closing it after a restart needs): `ctr/<id>`. */
export interface KeptContainer {
  readonly kind: "container";
  readonly id: number;
  readonly setId: number;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly quota: number;
  /** Unix ms. */
  readonly openedAt: number;
  /** Assigned devices (assignments in progress are not kept); `assignedAt` in unix ms. */
  readonly devices: readonly { readonly ref: DeviceRef; readonly parentDeviceId: string; readonly assignedAt: number }[];
  /** The stage-2 domain; undefined while there is none. */
  readonly stage2: number | undefined;
}

/** The next container id, as kept: `next`. */
export interface KeptContainerCounter {
  readonly kind: "containerCounter";
  readonly nextContainerId: number;
}

/** One entry of VFIO's kept state (ioasid.vfio.v1.VfioStateEntry; adapters/vfio-state-codec.ts converts). */
export type VfioKeptEntry = KeptContainer | KeptContainerCounter;

type DeviceEntryState = "assigning" | "assigned" | "unassigning";

interface DeviceEntry {
  readonly ref: DeviceRef;
  readonly key: string;
  state: DeviceEntryState;
  /** For an mdev: its parent (known once VDCM assigned it); "" for a physical device. */
  parentDeviceId: string;
  assignedAt: number;
}

interface BindRecord {
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly deviceKey: string;
  readonly handleId: bigint;
}

interface Container {
  readonly id: number;
  readonly setId: number;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly quota: number;
  readonly openedAt: number;
  state: ContainerState;
  sessionDeadline: number | undefined;
  cancelGrace: (() => void) | undefined;
  sessionAttached: boolean;
  /** Resolves the Session lease's `closed`. */
  notifySession: ((reason: CloseReason) => void) | undefined;
  readonly devices: Map<string, DeviceEntry>;
  /** Guest binds made through this container, by `${hpasid}/${deviceKey}`. */
  readonly binds: Map<string, BindRecord>;
  /** The VM's stage-2 paging domain at the IOMMU, created with the first need. */
  stage2: Promise<number> | undefined;
  /** Calls in progress on the container: the teardown waits for them before it unassigns devices. */
  readonly inflight: Set<Promise<unknown>>;
  /** The close in progress (until the IOASIDs are freed); undefined before, or after a failed attempt. */
  closing: Promise<CloseResult> | undefined;
  /** The release phase (devices unassigned, domain freed, container forgotten). */
  released: Promise<void> | undefined;
}

const DEFAULT_FREE_SET_RETRY = [100, 250, 500, 1000, 2000, 4000] as const;
/** Between rounds of a background close (each round: one close with its FreeSet retries). */
const BACKGROUND_CLOSE_FIRST_WAIT_MS = 500;
const BACKGROUND_CLOSE_MAX_WAIT_MS = 5000;
const DEFAULT_DOMAIN_RELEASE_RETRY = [50, 100, 250, 500, 1000, 2000, 4000, 8000] as const;
const silentLog: VfioLog = { info: () => {}, warn: () => {}, error: () => {} };

/** Key of a device in VFIO's tables: kinds never collide. */
function deviceKey(ref: DeviceRef): string {
  return `${ref.kind}:${ref.id}`;
}

/** `device 0000:6a:01.0` / `mdev 6f0c…`, for messages and history. */
export function describeDevice(ref: DeviceRef): string {
  return `${ref.kind} ${ref.id}`;
}

function isUnreachable(err: unknown): boolean {
  return err instanceof DomainError && (err.code === Code.UNAVAILABLE || err.code === Code.DEADLINE_EXCEEDED);
}

/** Renames another service's refusal into the VFIO contract's reason, keeping the original as cause. */
function renamed(err: unknown, reasons: Readonly<Record<string, "DEVICE_BUSY" | "DEVICE_ALREADY_ASSIGNED">>, message: string): unknown {
  if (!(err instanceof DomainError)) return err;
  const reason = reasons[err.reason];
  return reason === undefined ? err : new DomainError(VfioReason[reason], reason, `${message}: ${err.message}`, { cause: err });
}

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
  readonly #freeSetRetry: readonly number[];
  /** closeAll has begun: background closes stop retrying (closeAll closes every container). */
  #stopping = false;
  readonly #reclaimWaitMs: number;
  readonly #domainRetry: readonly number[];
  readonly #containers = new Map<number, Container>();
  readonly #onClosing: (containerId: number) => Promise<unknown>;
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
    this.#onClosing = options.onClosing ?? (() => Promise.resolve());
    this.#store = options.store;
    if (options.saved !== undefined) this.#restore(options.saved);
    this.#freeSetRetry = options.freeSetRetryDelaysMs ?? DEFAULT_FREE_SET_RETRY;
    this.#reclaimWaitMs = options.reclaimWaitMs ?? 10_000;
    this.#domainRetry = options.domainReleaseRetryDelaysMs ?? DEFAULT_DOMAIN_RELEASE_RETRY;
  }

  /** Containers in the table (any state). */
  /**
   * Closes the containers restored from the store (VFIO crashed: their sessions ended with it) as
   * the crashed-guest path does — every IOASID of their sets freed, devices and mdevs unassigned,
   * the stage-2 domains freed. Failures are logged; the next start tries again.
   * @returns how many were closed
   */
  async closeRestored(): Promise<number> {
    const restored = this.#restored.splice(0);
    await Promise.allSettled(restored.map((c) => this.#backgroundClose(c, CloseReason.SERVICE_RESTARTED)));
    await Promise.allSettled(restored.map((c) => c.released ?? Promise.resolve()));
    return restored.length;
  }

  #restore(saved: ReadonlyMap<string, VfioKeptEntry>): void {
    for (const v of saved.values()) {
      if (v.kind === "containerCounter") {
        this.#nextId = Math.max(this.#nextId, v.nextContainerId);
        continue;
      }
      const c: Container = {
        id: v.id,
        setId: v.setId,
        mmToken: v.mmToken,
        vmName: v.vmName,
        quota: v.quota,
        openedAt: v.openedAt,
        state: ContainerState.AWAITING_SESSION,
        sessionDeadline: undefined,
        cancelGrace: undefined,
        sessionAttached: false,
        notifySession: undefined,
        devices: new Map(),
        binds: new Map(),
        stage2: v.stage2 === undefined ? undefined : Promise.resolve(v.stage2),
        inflight: new Set(),
        closing: undefined,
        released: undefined,
      };
      for (const d of v.devices) {
        const ref: DeviceRef = { kind: d.ref.kind, id: d.ref.id };
        const k = deviceKey(ref);
        c.devices.set(k, { ref, key: k, state: "assigned", parentDeviceId: d.parentDeviceId, assignedAt: d.assignedAt });
        this.#owners.set(k, c.id);
      }
      this.#containers.set(c.id, c);
      this.#restored.push(c);
      this.#nextId = Math.max(this.#nextId, c.id + 1);
    }
  }

  /** Keeps the container (set, devices, stage-2 domain) before a call that changed it returns. */
  async #save(c: Container): Promise<void> {
    if (this.#store === undefined) return;
    const stage2 = c.stage2 === undefined ? undefined : await c.stage2.catch(() => undefined);
    const kept: KeptContainer = {
      kind: "container",
      id: c.id,
      setId: c.setId,
      mmToken: c.mmToken,
      vmName: c.vmName,
      quota: c.quota,
      openedAt: c.openedAt,
      devices: [...c.devices.values()]
        .filter((d) => d.state !== "assigning")
        .map((d) => ({ ref: d.ref, parentDeviceId: d.parentDeviceId, assignedAt: d.assignedAt })),
      stage2,
    };
    await this.#store.write([
      { key: `ctr/${c.id}`, value: kept },
      { key: "next", value: { kind: "containerCounter", nextContainerId: this.#nextId } },
    ]);
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

  get size(): number {
    return this.#containers.size;
  }

  // ---------------------------------------------------------------------------------------------
  // Container life cycle

  /**
   * Opens the VM's container: creates its IOASID set (token type MM, the VM's MM token, the quota)
   * and starts the session grace period.
   * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (mm_token 0, grace above a day, name too
   *   long); the core's ALREADY_EXISTS `TOKEN_IN_USE`, RESOURCE_EXHAUSTED `CAPACITY_EXHAUSTED`,
   *   INVALID_ARGUMENT `QUOTA_INVALID`.
   */
  async openContainer(spec: OpenContainerSpec): Promise<OpenedContainer> {
    if (spec.mmToken === 0n) throw invalidField("mm_token", "mm_token is required: the VM's MM token, non-zero");
    if (spec.sessionGraceMs > MAX_SESSION_GRACE_MS) {
      throw invalidField("session_grace_ms", `session_grace_ms ${spec.sessionGraceMs} is above ${MAX_SESSION_GRACE_MS} (one day)`);
    }
    if (spec.vmName.length > MAX_VM_NAME) throw invalidField("vm_name", `vm_name is longer than ${MAX_VM_NAME} characters`);
    // One container per VM: the core refuses a second set for the same MM token (TOKEN_IN_USE).
    const set = await this.#core.createSet({ type: TokenType.MM, value: spec.mmToken }, spec.quota);
    const graceMs = spec.sessionGraceMs === 0 ? this.#defaultGraceMs : spec.sessionGraceMs;
    const now = this.#scheduler.now();
    const c: Container = {
      id: this.#nextId++,
      setId: set.id,
      mmToken: spec.mmToken,
      vmName: spec.vmName,
      quota: set.quota,
      openedAt: now,
      state: ContainerState.AWAITING_SESSION,
      sessionDeadline: now + graceMs,
      cancelGrace: undefined,
      sessionAttached: false,
      notifySession: undefined,
      devices: new Map(),
      binds: new Map(),
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
      void this.#backgroundClose(c, CloseReason.SESSION_NEVER_ATTACHED);
    });
    await this.#save(c);
    this.#history.record({ $case: "containerOpen", value: { container: c.id, mmToken: c.mmToken, quota: c.quota, vmName: c.vmName, graceMs } }, { setId: c.setId });
    this.#log.info({ containerId: c.id, setId: c.setId, mmToken: String(c.mmToken), quota: c.quota, graceMs }, "container opened");
    return { containerId: c.id, setId: c.setId, quota: c.quota, sessionDeadline: now + graceMs };
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
        if (this.#containers.get(c.id) === c) void this.#backgroundClose(c, CloseReason.SESSION_ENDED);
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
    return this.#close(c, reason);
  }

  /**
   * Closes every container (VFIO is stopping: its containers do not outlive it) and waits for each
   * teardown, release phase included. Never throws; failures are logged.
   */
  async closeAll(reason: CloseReason = CloseReason.SERVICE_STOPPED): Promise<void> {
    this.#stopping = true;
    const all = [...this.#containers.values()];
    await Promise.allSettled(all.map((c) => this.#close(c, reason)));
    await Promise.allSettled(all.map((c) => c.released ?? Promise.resolve()));
  }

  /** Resolves when the container's release phase is over (it is then gone), or at once if it is gone. */
  async whenReleased(containerId: number): Promise<void> {
    const c = this.#containers.get(containerId);
    await c?.closing?.catch(() => {});
    await c?.released;
  }

  /**
   * A close nobody waits for and nobody would retry (the VMM is gone: session lost, or a VFIO
   * restart): retried, the wait between rounds growing to {@link BACKGROUND_CLOSE_MAX_WAIT_MS},
   * until the set is freed, the container is gone, or VFIO stops (closeAll then closes it).
   * Found by the chaos suite: a crashed guest's close gave up while the core was down, and its
   * IOASIDs were never reclaimed (L2).
   */
  #backgroundClose(c: Container, reason: CloseReason): Promise<void> {
    const attempt = async (round: number): Promise<void> => {
      try {
        await this.#close(c, reason);
      } catch (err) {
        if (this.#stopping || this.#containers.get(c.id) !== c) return;
        const wait = Math.min(BACKGROUND_CLOSE_FIRST_WAIT_MS * 2 ** round, BACKGROUND_CLOSE_MAX_WAIT_MS);
        this.#log.error({ err, containerId: c.id, setId: c.setId, reason, round, retryInMs: wait }, "container could not be closed yet: its set is still allocated; retrying");
        await this.#scheduler.sleep(wait);
        if (this.#stopping || this.#containers.get(c.id) !== c) return;
        await attempt(round + 1);
      }
    };
    return attempt(0);
  }

  #close(c: Container, reason: CloseReason): Promise<CloseResult> {
    if (c.closing !== undefined) return c.closing;
    c.state = ContainerState.CLOSING;
    c.cancelGrace?.();
    c.cancelGrace = undefined;
    c.sessionDeadline = undefined;
    // The VMM is gone (or going): its unanswered fault groups are answered INVALID first.
    const faultsAnswered = this.#onClosing(c.id).catch((err: unknown) => this.#log.warn({ err, containerId: c.id }, "answering the container's fault groups failed"));
    const closing = faultsAnswered.then(() => this.#freeSet(c)).then(
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
   * detached, the stage-2 domain freed, and the container forgotten.
   */
  async #release(c: Container): Promise<void> {
    await Promise.allSettled([...c.inflight]);
    if ([...c.devices.values()].some((d) => d.ref.kind === "mdev")) await this.#awaitReclaim(c);
    const stage2 = c.stage2 === undefined ? undefined : await c.stage2.catch(() => undefined);
    for (const entry of c.devices.values()) {
      try {
        if (entry.ref.kind === "mdev") await this.#vdcm.unassignMdev(entry.ref.id);
        else if (stage2 !== undefined) await this.#iommu.detachDevice(stage2, entry.ref.id);
        this.#history.record({ $case: "deviceUnassign", value: { container: c.id, deviceKind: entry.ref.kind, device: entry.ref.id, teardown: true } }, { setId: c.setId });
      } catch (err) {
        if (!isDomainError(err, "MDEV_NOT_ASSIGNED") && !isDomainError(err, "ATTACH_HANDLE_NOT_FOUND")) {
          this.#log.error({ err, containerId: c.id, device: describeDevice(entry.ref) }, "teardown could not unassign a device");
        }
      }
      if (this.#owners.get(entry.key) === c.id) this.#owners.delete(entry.key);
    }
    c.devices.clear();
    c.binds.clear();
    this.#containers.delete(c.id);
    this.#history.record({ $case: "containerRelease", value: { container: c.id } }, { setId: c.setId });
    if (stage2 !== undefined) await this.#releaseDomain(c, stage2);
    await this.#store?.write([{ key: `ctr/${c.id}`, value: undefined }]).catch((err: unknown) => this.#log.warn({ err, containerId: c.id }, "could not forget the released container in the store"));
  }

  /** Waits (bounded by `reclaimWaitMs`) until the core destroyed the set: every IOASID reclaimed. */
  async #awaitReclaim(c: Container): Promise<void> {
    const deadline = this.#scheduler.now() + this.#reclaimWaitMs;
    // Backoff keeps a thousand crashing guests from flooding the core with polls.
    let wait = 10;
    for (let attempt = 0; attempt < 1000; attempt++) {
      try {
        if (!(await setExists(this.#core, c.setId))) return;
      } catch (err) {
        this.#log.warn({ err, containerId: c.id, setId: c.setId }, "cannot ask the core whether the set is reclaimed");
      }
      const left = deadline - this.#scheduler.now();
      if (left <= 0) break;
      await this.#scheduler.sleep(Math.min(wait, left));
      wait = Math.min(wait * 2, 500);
    }
    this.#log.warn(
      { containerId: c.id, setId: c.setId, waitedMs: this.#reclaimWaitMs },
      "set not reclaimed in time (a subscriber is down?): unassigning its mdevs anyway",
    );
  }

  /** Frees the stage-2 domain once the IOMMU's FREE teardown stopped using it (bounded retries). */
  async #releaseDomain(c: Container, domainId: number): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.#iommu.freeDomain(domainId);
        return;
      } catch (err) {
        if (isDomainError(err, "DOMAIN_NOT_FOUND")) return;
        const delay = this.#domainRetry[attempt];
        if ((!isDomainError(err, "DOMAIN_IN_USE") && !isUnreachable(err)) || delay === undefined) {
          this.#log.error({ err, containerId: c.id, domainId }, "stage-2 domain of a closed container could not be freed");
          return;
        }
        await this.#scheduler.sleep(delay);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Devices

  /**
   * Assigns a physical device (its RID attached to the VM's stage-2 paging domain at the IOMMU) or
   * an mdev (VDCM AssignMdev with the container's set: VDCM registers on the set with the first
   * mdev, so mdevs must be assigned before PASIDs are allocated).
   * @throws DomainError ALREADY_EXISTS `DEVICE_ALREADY_ASSIGNED`; FAILED_PRECONDITION `DEVICE_BUSY`
   *   (another container has it, its parent, or one of its mdevs), `SET_NOT_EMPTY`; NOT_FOUND
   *   `DEVICE_NOT_FOUND`, `MDEV_NOT_FOUND`; and the container errors.
   */
  async assignDevice(containerId: number, device: DeviceRef | undefined): Promise<AssignedDeviceInfo> {
    const ref = this.#requireDevice(device);
    return this.#op(containerId, async (c) => {
      const key = deviceKey(ref);
      if (c.devices.has(key)) throw vfioError("DEVICE_ALREADY_ASSIGNED", `${describeDevice(ref)} is already assigned to container ${c.id}`);
      const owner = this.#owners.get(key);
      if (owner !== undefined) throw vfioError("DEVICE_BUSY", `${describeDevice(ref)} is assigned to another container`);
      if (ref.kind === "device") {
        const other = this.#mdevChildOf(ref.id, c.id);
        if (other !== undefined) throw vfioError("DEVICE_BUSY", `device ${ref.id} is the parent of an mdev another container has`);
      }
      // Reserved before the first await: a concurrent assignment of the same device sees it.
      const entry: DeviceEntry = { ref, key, state: "assigning", parentDeviceId: "", assignedAt: 0 };
      c.devices.set(key, entry);
      this.#owners.set(key, c.id);
      try {
        if (ref.kind === "device") {
          const domainId = await this.#stage2(c);
          await this.#iommu.attachDevice(domainId, ref.id).catch((err: unknown) => {
            throw renamed(err, { PASID_IN_USE: "DEVICE_BUSY" }, `device ${ref.id} already has a domain attached to its requests without PASID`);
          });
        } else {
          const r = await this.#vdcm.assignMdev(ref.id, c.setId).catch((err: unknown) => {
            throw renamed(err, { MDEV_BUSY: "DEVICE_BUSY", MDEV_ALREADY_ASSIGNED: "DEVICE_ALREADY_ASSIGNED" }, `mdev ${ref.id}`);
          });
          const parentOwner = this.#owners.get(deviceKey({ kind: "device", id: r.parentDeviceId }));
          if (parentOwner !== undefined && parentOwner !== c.id) {
            await this.#vdcm.unassignMdev(ref.id).catch((err: unknown) => {
              this.#log.error({ err, mdev: ref.id }, "could not undo an mdev assignment");
            });
            throw vfioError("DEVICE_BUSY", `mdev ${ref.id} is on device ${r.parentDeviceId}, which another container has whole`);
          }
          entry.parentDeviceId = r.parentDeviceId;
        }
      } catch (err) {
        c.devices.delete(key);
        if (this.#owners.get(key) === c.id) this.#owners.delete(key);
        throw err;
      }
      entry.state = "assigned";
      entry.assignedAt = this.#scheduler.now();
      await this.#save(c);
      this.#history.record({ $case: "deviceAssign", value: { container: c.id, deviceKind: ref.kind, device: ref.id, parent: entry.parentDeviceId } }, { setId: c.setId });
      return { device: ref, parentDeviceId: entry.parentDeviceId, assignedAt: entry.assignedAt };
    });
  }

  /**
   * Unassigns a device or mdev: its guest binds are unbound first (as UnbindGuestPasid), then the
   * device is detached from the stage-2 domain, or the mdev handed back to VDCM (which drains and
   * clears its programmed PASIDs).
   * @returns how many binds were unbound
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`; and the container errors.
   */
  async unassignDevice(containerId: number, device: DeviceRef | undefined): Promise<{ unbound: number }> {
    const ref = this.#requireDevice(device);
    return this.#op(containerId, async (c) => {
      const entry = this.#assigned(c, ref);
      entry.state = "unassigning";
      let unbound = 0;
      try {
        for (const [key, bind] of [...c.binds].filter(([, b]) => b.deviceKey === entry.key)) {
          try {
            const r = await this.#iommu.unbindGpasid({
              setId: c.setId,
              hpasid: bind.hpasid,
              generation: bind.generation,
              gpasid: bind.gpasid,
              deviceId: this.#bindTarget(entry),
            });
            if (r.unbound) {
              unbound++;
              this.#history.record(
                { $case: "unbindGpasid", value: { container: c.id, deviceKind: ref.kind, device: ref.id, unassign: true, last: r.lastUnbind } },
                { ioasid: bind.hpasid, generation: bind.generation, setId: c.setId, spid: bind.gpasid },
              );
            }
          } catch (err) {
            // The IOASID was freed and allocated again elsewhere: its bind is long gone.
            if (!isDomainError(err, "STALE_GENERATION") && !isDomainError(err, "IOASID_NOT_IN_SET")) throw err;
          }
          c.binds.delete(key);
        }
        if (ref.kind === "mdev") {
          await this.#vdcm.unassignMdev(ref.id).catch((err: unknown) => {
            if (!isDomainError(err, "MDEV_NOT_ASSIGNED")) throw err;
          });
        } else {
          const domainId = await this.#stage2(c);
          await this.#iommu.detachDevice(domainId, ref.id).catch((err: unknown) => {
            if (!isDomainError(err, "ATTACH_HANDLE_NOT_FOUND")) throw err;
          });
        }
      } catch (err) {
        entry.state = "assigned";
        throw err;
      }
      c.devices.delete(entry.key);
      if (this.#owners.get(entry.key) === c.id) this.#owners.delete(entry.key);
      await this.#save(c);
      this.#history.record({ $case: "deviceUnassign", value: { container: c.id, deviceKind: ref.kind, device: ref.id, unbound } }, { setId: c.setId });
      return { unbound };
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Guest PASIDs (virtual command) and binds

  /**
   * The guest's virtual-command PASID allocation: core.Alloc in the container's set.
   * @throws DomainError the core's RESOURCE_EXHAUSTED `SET_QUOTA_EXCEEDED`, `IOASID_RANGE_EXHAUSTED`;
   *   and the container errors.
   */
  async allocPasid(containerId: number): Promise<{ hpasid: number; generation: number }> {
    return this.#op(containerId, async (c) => {
      const a = await this.#core.alloc(c.setId);
      this.#history.record({ $case: "vcmdAlloc", value: { container: c.id } }, { ioasid: a.ioasid, generation: a.generation, setId: c.setId });
      return { hpasid: a.ioasid, generation: a.generation };
    });
  }

  /**
   * The guest's virtual-command PASID free: core.Free in the container's set. Always succeeds for
   * an IOASID of the set, even before unbind (ioasid.rst "Exception cases": the misbehaving guest
   * only hurts itself; the FREE event makes the IOMMU tear its binds down). Another VM's IOASID is
   * refused by the core (IOASID_NOT_IN_SET) and nothing changes.
   * @throws DomainError PERMISSION_DENIED `IOASID_NOT_IN_SET`; NOT_FOUND `IOASID_NOT_FOUND`;
   *   FAILED_PRECONDITION `STALE_GENERATION`; INVALID_ARGUMENT `INVALID_FIELD` (hpasid 0).
   */
  async freePasid(containerId: number, hpasid: number, generation: number): Promise<{ reclaimed: boolean; alreadyFreePending: boolean }> {
    if (hpasid === 0) throw invalidField("hpasid", "hpasid is required (PASID 0 is RID_PASID, never allocated)");
    return this.#op(containerId, async (c) => {
      const { outcome } = await this.#core.free(c.setId, hpasid, generation);
      // The FREE teardown removes every bind of the IOASID at the IOMMU: forget ours.
      for (const [key, bind] of c.binds) if (bind.hpasid === hpasid) c.binds.delete(key);
      this.#history.record({ $case: "vcmdFree", value: { container: c.id, outcome } }, { ioasid: hpasid, ...(generation === 0 ? {} : { generation }), setId: c.setId });
      return { reclaimed: outcome === "RECLAIMED", alreadyFreePending: outcome === "ALREADY_FREE_PENDING" };
    });
  }

  /**
   * bind_gpasid on an assigned device: the hpasid must be an ACTIVE IOASID of the container's set
   * (core.Find — another VM's PASID is PERMISSION_DENIED and nothing changes), then the IOMMU binds
   * it with the set id, the generation the core just confirmed (so a free and re-allocation in
   * between cannot bind the new owner's IOASID) and the VM's stage-2 domain as parent. For an mdev
   * the bind is made on its parent device.
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`; the core's and the IOMMU's
   *   refusals (IOASID_NOT_IN_SET, IOASID_NOT_FOUND, IOASID_FREE_PENDING, STALE_GENERATION,
   *   SPID_MISMATCH, SPID_IN_USE, PASID_IN_USE, PASID_OUT_OF_RANGE); INVALID_ARGUMENT
   *   `INVALID_FIELD` (hpasid 0, gpasid outside 1..2^20−1, no device).
   */
  async bindGuestPasid(containerId: number, bind: GuestPasidBind): Promise<{ handleId: bigint; firstBind: boolean }> {
    const ref = this.#requireDevice(bind.device);
    if (bind.hpasid === 0) throw invalidField("hpasid", "hpasid is required (PASID 0 is RID_PASID, never allocated)");
    if (bind.gpasid === 0 || bind.gpasid > MAX_GPASID) throw invalidField("gpasid", `gpasid ${bind.gpasid} is outside 1..${MAX_GPASID}`);
    return this.#op(containerId, async (c) => {
      const entry = this.#assigned(c, ref);
      const info = await this.#core.find(c.setId, bind.hpasid, bind.generation);
      const parentDomainId = await this.#stage2(c);
      const r = await this.#iommu.bindGpasid({
        setId: c.setId,
        hpasid: bind.hpasid,
        generation: info.generation,
        gpasid: bind.gpasid,
        deviceId: this.#bindTarget(entry),
        guestPgtable: bind.guestPgtable,
        parentDomainId,
        ownerData: new TextEncoder().encode(JSON.stringify({ containerId: c.id, device: { kind: ref.kind, id: ref.id } })),
      });
      c.binds.set(`${bind.hpasid}/${entry.key}`, {
        hpasid: bind.hpasid,
        generation: info.generation,
        gpasid: bind.gpasid,
        deviceKey: entry.key,
        handleId: r.handleId,
      });
      this.#history.record(
        { $case: "bindGpasid", value: { container: c.id, deviceKind: ref.kind, device: ref.id, handle: r.handleId, first: r.firstBind } },
        { ioasid: bind.hpasid, generation: info.generation, setId: c.setId, spid: bind.gpasid },
      );
      return { handleId: r.handleId, firstBind: r.firstBind };
    });
  }

  /**
   * unbind_gpasid on an assigned device. The hpasid must not belong to another set (core.Find:
   * IOASID_NOT_IN_SET refuses, nothing changes); one that is FREE_PENDING or already reclaimed goes
   * on to the IOMMU, whose FREE teardown has removed (or is removing) the bind: a late unbind after
   * free fails harmlessly with `unbound` false (ioasid.rst, free before unbind, step 30).
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`, `STALE_GENERATION`;
   *   PERMISSION_DENIED `IOASID_NOT_IN_SET`; INVALID_ARGUMENT `INVALID_FIELD`; the container errors.
   */
  async unbindGuestPasid(containerId: number, unbind: GuestPasidUnbind): Promise<{ unbound: boolean; lastUnbind: boolean }> {
    const ref = this.#requireDevice(unbind.device);
    if (unbind.hpasid === 0) throw invalidField("hpasid", "hpasid is required (PASID 0 is RID_PASID, never allocated)");
    if (unbind.gpasid > MAX_GPASID) throw invalidField("gpasid", `gpasid ${unbind.gpasid} is outside 0..${MAX_GPASID}`);
    return this.#op(containerId, async (c) => {
      const entry = this.#assigned(c, ref);
      let generation = unbind.generation;
      try {
        generation = (await this.#core.find(c.setId, unbind.hpasid, unbind.generation)).generation;
      } catch (err) {
        if (!isDomainError(err, "IOASID_FREE_PENDING") && !isDomainError(err, "IOASID_NOT_FOUND")) throw err;
      }
      const r = await this.#iommu.unbindGpasid({
        setId: c.setId,
        hpasid: unbind.hpasid,
        generation,
        gpasid: unbind.gpasid,
        deviceId: this.#bindTarget(entry),
      });
      c.binds.delete(`${unbind.hpasid}/${entry.key}`);
      if (r.unbound) {
        this.#history.record(
          { $case: "unbindGpasid", value: { container: c.id, deviceKind: ref.kind, device: ref.id, last: r.lastUnbind } },
          { ioasid: unbind.hpasid, ...(generation === 0 ? {} : { generation }), setId: c.setId, ...(unbind.gpasid === 0 ? {} : { spid: unbind.gpasid }) },
        );
      }
      return { unbound: r.unbound, lastUnbind: r.lastUnbind };
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Inspection

  /**
   * VFIO's view of one container (or of all, for 0), ascending by id: set, devices, and the set's
   * IOASIDs as the core has them, with the binds made through this VFIO. Changes nothing.
   * @throws DomainError NOT_FOUND `CONTAINER_NOT_FOUND` (a non-zero id that does not exist).
   */
  /**
   * VFIO_IOMMU_MAP_DMA: maps guest physical memory in the VM's stage-2 domain (created with the
   * first need).
   * @throws the IOMMU's refusals (ADDRESS_NOT_ALIGNED, INVALID_RANGE, IOVA_ALREADY_MAPPED, INVALID_FIELD)
   */
  async mapDma(containerId: number, m: DmaMapping): Promise<void> {
    await this.#op(containerId, async (c) => {
      const domainId = await this.#stage2(c);
      await this.#iommu.map(domainId, m);
      this.#history.record({ $case: "vfioMapDma", value: { container: c.id, gpa: m.iova, hpa: m.paddr, size: m.size } }, { setId: c.setId });
    });
  }

  /** VFIO_IOMMU_UNMAP_DMA. @returns bytes unmapped */
  async unmapDma(containerId: number, iova: bigint, size: bigint): Promise<bigint> {
    return this.#op(containerId, async (c) => {
      const domainId = await this.#stage2(c);
      const unmapped = await this.#iommu.unmap(domainId, iova, size);
      if (unmapped > 0n) this.#history.record({ $case: "vfioUnmapDma", value: { container: c.id, gpa: iova, size } }, { setId: c.setId });
      return unmapped;
    });
  }

  async queryState(containerId: number): Promise<ContainerSnapshot[]> {
    const selected = containerId === 0 ? [...this.#containers.values()].sort((a, b) => a.id - b.id) : [this.#get(containerId)];
    return Promise.all(selected.map((c) => this.#snapshot(c)));
  }

  async #snapshot(c: Container): Promise<ContainerSnapshot> {
    let ioasids: readonly IoasidInfo[] = [];
    try {
      ioasids = await this.#core.listIoasids(c.setId);
    } catch (err) {
      // A closing container's set may be gone already.
      if (!isDomainError(err, "SET_UNKNOWN")) throw err;
    }
    const pasids = [...ioasids]
      .sort((a, b) => a.ioasid - b.ioasid)
      .map((i) => ({
        hpasid: i.ioasid,
        generation: i.generation,
        gpasid: i.spid,
        boundDevices: [...c.binds.values()]
          .filter((b) => b.hpasid === i.ioasid && b.generation === i.generation)
          .map((b) => c.devices.get(b.deviceKey)?.ref)
          .filter((d): d is DeviceRef => d !== undefined),
        freePending: i.state === IoasidState.FREE_PENDING,
      }));
    return {
      containerId: c.id,
      setId: c.setId,
      mmToken: c.mmToken,
      vmName: c.vmName,
      quota: c.quota,
      state: c.state,
      devices: [...c.devices.values()]
        .filter((d) => d.state !== "assigning")
        .map((d) => ({ device: d.ref, parentDeviceId: d.parentDeviceId, assignedAt: d.assignedAt })),
      pasids,
      openedAt: c.openedAt,
      sessionDeadline: c.sessionDeadline,
    };
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

  /** The physical device a guest PASID entry is programmed on: the device, or an mdev's parent. */
  #bindTarget(entry: DeviceEntry): string {
    return entry.ref.kind === "device" ? entry.ref.id : entry.parentDeviceId;
  }

  /** A container (other than `except`) that has an mdev whose parent is `deviceId`. */
  #mdevChildOf(deviceId: string, except: number): number | undefined {
    for (const c of this.#containers.values()) {
      if (c.id === except) continue;
      for (const d of c.devices.values()) if (d.ref.kind === "mdev" && d.parentDeviceId === deviceId) return c.id;
    }
    return undefined;
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
