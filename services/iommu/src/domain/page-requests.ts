import type { StateChange } from "@ioasid/bus";
import { iommuError, invalidField } from "./iommu-errors.js";
import type { AttachHandle, DmaAccess, IommuKeptEntry } from "./iommu-hardware.js";

// The page-request queue of the IOMMU (the kernel's io-pgfault: iopf_queue, the per-device
// partial list and iopf_group; DESIGN §5 "Faults"). Pure and synchronous; the clock is injected.
//
// Rules kept here, each tested in page-requests.test.ts:
// - requests gather into a group keyed by (device, prgi); non-last requests wait on the partial
//   list; the group is complete with its last request;
// - every group gets exactly one response: once RESPONDED, every later answer is refused;
// - a group has one owner at a time: the owner of the attach handle its first request used;
// - each outstanding request holds one of its device's credits until its group is answered; over
//   the limit, the request is not queued and its partial group (if any) is answered INVALID;
// - answering by handle (detach), device (removal), PASID (IOASID free) or owner (session loss)
//   touches only the groups selected;
// - a group not answered by its deadline is answered INVALID (`expire`).

/** Page request group index range (9 bits). */
export const MAX_PRGI = 511;
/** Answered groups remembered, so a late answer is told "already responded" rather than "unknown". */
export const RESPONDED_MEMORY = 8192;

/** Fault group ids reserved at a time: the id counter is written once per block, not with every group. */
export const FAULT_GROUP_ID_BLOCK = 1024n;

/** The answer to a fault group (IOMMU_PAGE_RESP_*). */
export const PageResponseCode = { SUCCESS: "SUCCESS", INVALID: "INVALID", FAILURE: "FAILURE" } as const;
export type PageResponseCode = (typeof PageResponseCode)[keyof typeof PageResponseCode];

/** Who answered a fault group. */
export const ResponseSource = {
  HANDLER: "HANDLER",
  NO_HANDLER: "NO_HANDLER",
  DETACH: "DETACH",
  DEVICE_REMOVED: "DEVICE_REMOVED",
  IOASID_FREED: "IOASID_FREED",
  TIMEOUT: "TIMEOUT",
  CREDITS_EXHAUSTED: "CREDITS_EXHAUSTED",
  REPLACE: "REPLACE",
} as const;
export type ResponseSource = (typeof ResponseSource)[keyof typeof ResponseSource];

/** Where a fault group is in its life. */
export const GroupState = { PARTIAL: "PARTIAL", PENDING: "PENDING", RESPONDED: "RESPONDED" } as const;
export type GroupState = (typeof GroupState)[keyof typeof GroupState];

/** One page request of a group. */
export interface PageRequest {
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  /** Rounded down to its 4 KiB page. */
  readonly address: bigint;
  readonly access: DmaAccess;
  readonly prgi: number;
  readonly lastRequest: boolean;
  readonly receivedAt: Date;
}

/** A page request group (iopf_group). */
export interface FaultGroup {
  readonly faultGroupId: bigint;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly prgi: number;
  readonly requests: readonly PageRequest[];
  readonly handleId: bigint;
  readonly domainId: number;
  readonly owner: string;
  readonly ownerData: Uint8Array;
  readonly setId: number;
  readonly gpasid: number;
  /** Generation of the handle's IOASID; 0 when unchecked. */
  readonly generation: number;
  readonly state: GroupState;
  readonly responseCode: PageResponseCode | undefined;
  readonly responseSource: ResponseSource | undefined;
  readonly createdAt: Date;
  /** When it is answered INVALID if nobody has answered it. */
  readonly deadline: Date;
  readonly respondedAt: Date | undefined;
}

/** What one page request did. */
export type RaiseResult =
  | { readonly kind: "queued"; readonly group: FaultGroup; readonly complete: boolean }
  /** Over the device's credits: nothing queued; `answered` is the partial group answered INVALID. */
  | { readonly kind: "credits_exhausted"; readonly answered: FaultGroup | undefined };

/** One page request as the device sends it. */
export interface RaiseSpec {
  readonly deviceId: string;
  readonly credits: number;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly address: bigint;
  readonly access: DmaAccess;
  /** undefined: the request is a group by itself, at a free prgi. */
  readonly prgi: number | undefined;
  readonly lastRequest: boolean;
}

/** An outstanding fault group as the IOMMU keeps it in its store: `fg/<id>`. */
export interface KeptFaultGroup {
  readonly faultGroupId: bigint;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly prgi: number;
  readonly requests: readonly PageRequest[];
  /** The attach handle its first request used, as it was then. */
  readonly handle: AttachHandle;
  /** PARTIAL or PENDING. */
  readonly state: GroupState;
  readonly createdAt: Date;
  readonly deadline: Date;
}

/** One entry of the page-request queue as the IOMMU keeps it: an outstanding group, or the id counter (`fgid`). */
export type PageRequestKeptEntry =
  { readonly kind: "faultGroup"; readonly group: KeptFaultGroup } | { readonly kind: "faultGroupCounter"; readonly nextFaultGroupId: bigint };

interface GroupRecord {
  readonly faultGroupId: bigint;
  readonly deviceId: string;
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly prgi: number;
  readonly requests: PageRequest[];
  readonly handle: AttachHandle;
  state: GroupState;
  responseCode: PageResponseCode | undefined;
  responseSource: ResponseSource | undefined;
  readonly createdAt: Date;
  deadline: Date;
  respondedAt: Date | undefined;
}

interface DeviceQueue {
  /** prgi → outstanding (PARTIAL or PENDING) group id. */
  readonly byPrgi: Map<number, bigint>;
  /** Requests of outstanding groups (credits in use). */
  outstandingRequests: number;
}

/**
 * Fault groups of every device. Methods either change state and return what changed, or throw
 * before changing anything.
 */
export class PageRequestQueue {
  readonly #groups = new Map<bigint, GroupRecord>();
  readonly #devices = new Map<string, DeviceQueue>();
  /** Answered groups, oldest first (bounded by {@link RESPONDED_MEMORY}). */
  readonly #responded = new Map<bigint, GroupRecord>();
  #nextId = 1n;
  /**
   * Ids below this may be handed out without writing the counter: ids are reserved a block at a
   * time ({@link FAULT_GROUP_ID_BLOCK}) and the store keeps the block's end, so a page request
   * writes its group alone, not its group and the counter (issue 15). A restart starts at the kept
   * end: ids skip what the block had left, and none is used twice.
   */
  #reservedTo = 1n;
  /** The reserved end the store was last given. */
  #reservedKept = 1n;
  readonly #now: () => Date;
  readonly #timeoutMs: number;
  /** Groups changed since {@link takeChanges}. */
  readonly #dirty = new Set<bigint>();

  /**
   * @param options.timeoutMs how long a group may stay unanswered (from its first request)
   * @param options.now clock (tests)
   */
  constructor(options: { timeoutMs: number; now?: () => Date }) {
    this.#timeoutMs = options.timeoutMs;
    this.#now = options.now ?? (() => new Date());
  }

  /**
   * One page request raised by a translation miss under `handle`.
   * @throws INVALID_FIELD (prgi out of range; the prgi's partial group is of another PASID),
   *   PRGI_IN_USE (the prgi's group is complete and not answered yet)
   */
  raise(spec: RaiseSpec, handle: AttachHandle): RaiseResult {
    if (spec.prgi !== undefined && (spec.prgi < 0 || spec.prgi > MAX_PRGI || !Number.isInteger(spec.prgi))) {
      throw invalidField("page_request_group.prgi", `prgi must be 0..${MAX_PRGI}`);
    }
    const q = this.#queue(spec.deviceId);
    let group: GroupRecord | undefined;
    let prgi = spec.prgi;
    if (prgi !== undefined) {
      const id = q.byPrgi.get(prgi);
      group = id === undefined ? undefined : this.#groups.get(id);
      if (group !== undefined && group.state === GroupState.PENDING) {
        throw iommuError("PRGI_IN_USE", `device ${spec.deviceId} prgi ${prgi} names group ${group.faultGroupId}, complete and not answered yet`);
      }
      if (group !== undefined && (group.pasid !== spec.pasid || group.withoutPasid !== spec.withoutPasid || group.handle.handleId !== handle.handleId)) {
        throw invalidField("page_request_group.prgi", `device ${spec.deviceId} prgi ${prgi} is a partial group of another PASID or handle`);
      }
    } else {
      prgi = this.#freePrgi(q);
      if (prgi === undefined) return this.#overCredits(q, undefined);
    }
    if (q.outstandingRequests >= spec.credits) return this.#overCredits(q, group);
    const now = this.#now();
    const request: PageRequest = {
      deviceId: spec.deviceId,
      pasid: spec.pasid,
      withoutPasid: spec.withoutPasid,
      address: spec.address - (spec.address % 4096n),
      access: { ...spec.access },
      prgi,
      lastRequest: spec.prgi === undefined ? true : spec.lastRequest,
      receivedAt: now,
    };
    if (group === undefined) {
      group = {
        faultGroupId: this.#takeId(),
        deviceId: spec.deviceId,
        pasid: spec.pasid,
        withoutPasid: spec.withoutPasid,
        prgi,
        requests: [],
        handle,
        state: GroupState.PARTIAL,
        responseCode: undefined,
        responseSource: undefined,
        createdAt: now,
        deadline: new Date(now.getTime() + this.#timeoutMs),
        respondedAt: undefined,
      };
      this.#groups.set(group.faultGroupId, group);
      q.byPrgi.set(prgi, group.faultGroupId);
    }
    this.#dirty.add(group.faultGroupId);
    group.requests.push(request);
    q.outstandingRequests++;
    if (request.lastRequest) {
      group.state = GroupState.PENDING;
      group.deadline = new Date(now.getTime() + this.#timeoutMs);
    }
    return { kind: "queued", group: view(group), complete: request.lastRequest };
  }

  /**
   * Answers one group: the owner's answer (source HANDLER) or the IOMMU's own (NO_HANDLER).
   * @throws FAULT_GROUP_NOT_FOUND, FAULT_GROUP_NOT_OWNED (`owner` given and not the group's),
   *   FAULT_GROUP_ALREADY_RESPONDED, FAULT_GROUP_INCOMPLETE
   */
  respond(faultGroupId: bigint, code: PageResponseCode, source: ResponseSource, owner?: string): FaultGroup {
    const g = this.#groups.get(faultGroupId);
    if (g === undefined) {
      const done = this.#responded.get(faultGroupId);
      if (done === undefined) throw iommuError("FAULT_GROUP_NOT_FOUND", `fault group ${faultGroupId} does not exist (or was answered and forgotten)`);
      if (owner !== undefined && done.handle.owner !== owner) throw iommuError("FAULT_GROUP_NOT_OWNED", `fault group ${faultGroupId} is not owned by ${owner}`);
      throw iommuError("FAULT_GROUP_ALREADY_RESPONDED", `fault group ${faultGroupId} was answered ${done.responseCode} (${done.responseSource})`);
    }
    if (owner !== undefined && g.handle.owner !== owner) throw iommuError("FAULT_GROUP_NOT_OWNED", `fault group ${faultGroupId} is not owned by ${owner}`);
    if (g.state === GroupState.PARTIAL) throw iommuError("FAULT_GROUP_INCOMPLETE", `fault group ${faultGroupId} has not received its last request`);
    return this.#answer(g, code, source);
  }

  /** Answers INVALID every outstanding group `select` picks (partial and pending). */
  answerWhere(select: (g: FaultGroup) => boolean, source: ResponseSource): FaultGroup[] {
    const picked = [...this.#groups.values()].filter((g) => select(view(g)));
    return picked.map((g) => this.#answer(g, PageResponseCode.INVALID, source));
  }

  /**
   * Frees every partial group `select` picks without a response (its credits come back, its id is
   * forgotten): io-pgfault since v6.9 frees partial requests of a removed device silently — a
   * partial group was never given to anyone, and only a complete group gets a response (DESIGN §5).
   * @returns the groups freed, as they were
   */
  discardPartialWhere(select: (g: FaultGroup) => boolean): FaultGroup[] {
    const picked = [...this.#groups.values()].filter((g) => g.state === GroupState.PARTIAL && select(view(g)));
    for (const g of picked) {
      this.#dirty.add(g.faultGroupId);
      this.#groups.delete(g.faultGroupId);
      const q = this.#devices.get(g.deviceId)!;
      q.outstandingRequests -= g.requests.length;
      if (q.byPrgi.get(g.prgi) === g.faultGroupId) q.byPrgi.delete(g.prgi);
    }
    return picked.map(view);
  }

  /** Answers INVALID every outstanding group of a handle. */
  answerHandle(handleId: bigint, source: ResponseSource): FaultGroup[] {
    return this.answerWhere((g) => g.handleId === handleId, source);
  }

  /** Answers INVALID every outstanding group whose deadline has passed. */
  expire(): FaultGroup[] {
    const now = this.#now().getTime();
    return this.answerWhere((g) => g.deadline.getTime() <= now, ResponseSource.TIMEOUT);
  }

  /** The earliest deadline of an outstanding group, or undefined. */
  nextDeadline(): Date | undefined {
    let first: Date | undefined;
    for (const g of this.#groups.values()) if (first === undefined || g.deadline < first) first = g.deadline;
    return first;
  }

  /** A group, outstanding or remembered after its answer. */
  get(faultGroupId: bigint): FaultGroup | undefined {
    const g = this.#groups.get(faultGroupId) ?? this.#responded.get(faultGroupId);
    return g === undefined ? undefined : view(g);
  }

  /** Outstanding groups, ascending by id; optionally only some devices' or one owner's PENDING ones. */
  outstanding(filter: { deviceIds?: ReadonlySet<string>; pendingOwner?: string } = {}): FaultGroup[] {
    const out: FaultGroup[] = [];
    for (const g of this.#groups.values()) {
      if (filter.deviceIds !== undefined && !filter.deviceIds.has(g.deviceId)) continue;
      if (filter.pendingOwner !== undefined && (g.state !== GroupState.PENDING || g.handle.owner !== filter.pendingOwner)) continue;
      out.push(view(g));
    }
    return out.sort((a, b) => (a.faultGroupId < b.faultGroupId ? -1 : 1));
  }

  /** Requests of a device's outstanding groups (credits in use). */
  outstandingRequests(deviceId: string): number {
    return this.#devices.get(deviceId)?.outstandingRequests ?? 0;
  }

  /** Outstanding groups of a handle. */
  countForHandle(handleId: bigint): number {
    let n = 0;
    for (const g of this.#groups.values()) if (g.handle.handleId === handleId) n++;
    return n;
  }

  /** Forgets a device's queue once it has no outstanding group (device removal). */
  forgetDevice(deviceId: string): void {
    if (this.outstandingRequests(deviceId) === 0) this.#devices.delete(deviceId);
  }

  /**
   * Outstanding groups changed since the last call (`fg/<id>`; undefined once answered) and the id
   * counter, for the role's state store: a restarted IOMMU gets its outstanding groups back (their
   * deadlines still run; answers remembered before the crash are not kept).
   */
  hasChanges(): boolean {
    return this.#dirty.size > 0;
  }

  takeChanges(): StateChange<PageRequestKeptEntry>[] {
    if (this.#dirty.size === 0 && this.#reservedKept === this.#reservedTo) return [];
    const out: StateChange<PageRequestKeptEntry>[] = [];
    // The counter first: a group is never kept without the block its id came from.
    if (this.#reservedKept !== this.#reservedTo) {
      out.push({ key: "fgid", value: { kind: "faultGroupCounter", nextFaultGroupId: this.#reservedTo } });
      this.#reservedKept = this.#reservedTo;
    }
    for (const id of this.#dirty) {
      const g = this.#groups.get(id);
      out.push({ key: `fg/${id}`, value: g === undefined ? undefined : { kind: "faultGroup", group: keptGroup(g) } });
    }
    this.#dirty.clear();
    return out;
  }

  /** The next fault group id, reserving a new block when the kept one is used up. */
  #takeId(): bigint {
    const id = this.#nextId++;
    if (id >= this.#reservedTo) this.#reservedTo = id + FAULT_GROUP_ID_BLOCK;
    return id;
  }

  /** A queue rebuilt from what {@link takeChanges} wrote. */
  static restore(saved: ReadonlyMap<string, IommuKeptEntry>, options: { timeoutMs: number; now?: () => Date }): PageRequestQueue {
    const q = new PageRequestQueue(options);
    for (const v of saved.values()) {
      if (v.kind === "faultGroupCounter" && v.nextFaultGroupId > q.#nextId) q.#nextId = v.nextFaultGroupId;
      if (v.kind !== "faultGroup") continue;
      const g = groupRecord(v.group);
      // Never below a kept group's id (a counter written before blocks, or lost): no id twice.
      if (g.faultGroupId >= q.#nextId) q.#nextId = g.faultGroupId + 1n;
      q.#groups.set(g.faultGroupId, g);
      const dq = q.#queue(g.deviceId);
      dq.byPrgi.set(g.prgi, g.faultGroupId);
      dq.outstandingRequests += g.requests.length;
    }
    // Nothing reserved yet in this run: the first group reserves (and writes) a block from here.
    q.#reservedTo = q.#reservedKept = q.#nextId;
    return q;
  }

  #queue(deviceId: string): DeviceQueue {
    let q = this.#devices.get(deviceId);
    if (q === undefined) {
      q = { byPrgi: new Map(), outstandingRequests: 0 };
      this.#devices.set(deviceId, q);
    }
    return q;
  }

  #freePrgi(q: DeviceQueue): number | undefined {
    for (let p = 0; p <= MAX_PRGI; p++) if (!q.byPrgi.has(p)) return p;
    return undefined;
  }

  #overCredits(q: DeviceQueue, partial: GroupRecord | undefined): RaiseResult {
    void q;
    const answered = partial === undefined ? undefined : this.#answer(partial, PageResponseCode.INVALID, ResponseSource.CREDITS_EXHAUSTED);
    return { kind: "credits_exhausted", answered };
  }

  #answer(g: GroupRecord, code: PageResponseCode, source: ResponseSource): FaultGroup {
    this.#dirty.add(g.faultGroupId);
    g.state = GroupState.RESPONDED;
    g.responseCode = code;
    g.responseSource = source;
    g.respondedAt = this.#now();
    this.#groups.delete(g.faultGroupId);
    const q = this.#devices.get(g.deviceId)!;
    q.outstandingRequests -= g.requests.length;
    if (q.byPrgi.get(g.prgi) === g.faultGroupId) q.byPrgi.delete(g.prgi);
    this.#responded.set(g.faultGroupId, g);
    if (this.#responded.size > RESPONDED_MEMORY) this.#responded.delete(this.#responded.keys().next().value!);
    return view(g);
  }
}

function keptGroup(g: GroupRecord): KeptFaultGroup {
  return {
    faultGroupId: g.faultGroupId,
    deviceId: g.deviceId,
    pasid: g.pasid,
    withoutPasid: g.withoutPasid,
    prgi: g.prgi,
    requests: g.requests.map((r) => ({ ...r, access: { ...r.access } })),
    handle: { ...g.handle, ownerData: Uint8Array.from(g.handle.ownerData) },
    state: g.state,
    createdAt: g.createdAt,
    deadline: g.deadline,
  };
}

function groupRecord(v: KeptFaultGroup): GroupRecord {
  return {
    faultGroupId: v.faultGroupId,
    deviceId: v.deviceId,
    pasid: v.pasid,
    withoutPasid: v.withoutPasid,
    prgi: v.prgi,
    requests: v.requests.map((r) => ({ ...r, access: { ...r.access } })),
    handle: { ...v.handle, ownerData: Uint8Array.from(v.handle.ownerData) },
    state: v.state,
    responseCode: undefined,
    responseSource: undefined,
    createdAt: v.createdAt,
    deadline: v.deadline,
    respondedAt: undefined,
  };
}

function view(g: GroupRecord): FaultGroup {
  return {
    faultGroupId: g.faultGroupId,
    deviceId: g.deviceId,
    pasid: g.pasid,
    withoutPasid: g.withoutPasid,
    prgi: g.prgi,
    requests: [...g.requests],
    handleId: g.handle.handleId,
    domainId: g.handle.domainId,
    owner: g.handle.owner,
    ownerData: g.handle.ownerData,
    setId: g.handle.setId,
    gpasid: g.handle.gpasid,
    generation: g.handle.generation,
    state: g.state,
    responseCode: g.responseCode,
    responseSource: g.responseSource,
    createdAt: g.createdAt,
    deadline: g.deadline,
    respondedAt: g.respondedAt,
  };
}
