// One cohesive thing, kept whole (~1,050 lines): the IOASID namespace of DESIGN §3, whose sets,
// references, SPIDs, states and notifier registrations are one state with invariants that every
// call keeps together (S1, S2, S4, S6, S8; the property test checks them after every step).
import {
  DEFAULT_CAPACITY,
  EVENT_SCOPES,
  EventType,
  INVALID_IOASID,
  IoasidState,
  MAX_BATCH_ALLOC,
  MAX_CAPACITY,
  MAX_NAME_LENGTH,
  MAX_PRIVATE_DATA_BYTES,
  MAX_SPID,
  Priority,
  RID_PASID,
  TokenType,
} from "./constants.js";
import { assertHolder, checkedHolderKey, fromHolderKey, OWNER_ROLE, toHolderKey, type Holder } from "./holder.js";
import { quote } from "@ioasid/errors";
import { IdBitmap } from "./id-bitmap.js";
import { coreError } from "./reasons.js";

/** A set's token: an opaque u64 (NONE) or the VM's address-space id (MM). */
export interface SetToken {
  readonly type: TokenType;
  readonly value: bigint;
}

/**
 * One IOASID event, committed by the core as the by-product of exactly one state transition.
 * Set events (SET_ALLOC, SET_FREE) carry {@link INVALID_IOASID} as `ioasid`.
 */
export interface IoasidEvent {
  /** Sequence number, 1, 2, 3, … in commit order across the whole core. */
  readonly seq: number;
  readonly type: EventType;
  readonly ioasid: number;
  /** Generation of the allocation the event is about (0 for set events). */
  readonly generation: number;
  /** The SPID attached at the time of the event (0: none). UNBIND carries the SPID detached. */
  readonly spid: number;
  readonly setId: number;
  readonly token: SetToken;
  /** Private data attached at the time of the event, if any. */
  readonly privateData: Uint8Array | undefined;
  /** Reference count right after the transition. */
  readonly refcount: number;
}

/** Scope of a notifier registration (DESIGN §3 "Notifier registration"). */
export type RegistrationScope =
  { readonly kind: "global" } | { readonly kind: "set"; readonly setId: number } | { readonly kind: "mm"; readonly token: bigint };

/** Who registered: a role's name and instance ("kvm", "vm-7"). */
export interface Subscriber {
  readonly name: string;
  readonly instance: string;
}

/** What {@link IoasidSpace.register} takes. */
export interface RegisterOptions {
  readonly subscriber: Subscriber;
  readonly priority: Priority;
  readonly scope: RegistrationScope;
  /** Event types wanted. @default every type the scope carries */
  readonly events?: readonly EventType[];
}

/** A notifier registration. */
export interface Registration {
  readonly id: number;
  readonly subscriber: Subscriber;
  readonly priority: Priority;
  readonly scope: RegistrationScope;
  readonly events: readonly EventType[];
  /** False while an MM-token registration waits for its set (ioasid.rst: the "pending list"). */
  readonly active: boolean;
  /** The set it is attached to (0 for global or pending registrations). */
  readonly setId: number;
}

/** A set as seen from outside. */
export interface SetInfo {
  readonly id: number;
  readonly token: SetToken;
  readonly quota: number;
  /** IOASIDs of the set not yet reclaimed (ACTIVE and FREE_PENDING). */
  readonly inUse: number;
  /** The set is being freed: it takes no allocation and is destroyed when its last IOASID is reclaimed. */
  readonly freeing: boolean;
}

/** One reference holder and how many references it holds. */
export interface HolderCount {
  readonly holder: Holder;
  readonly count: number;
}

/** An IOASID as seen from outside. */
export interface IoasidInfo {
  readonly ioasid: number;
  readonly setId: number;
  readonly state: IoasidState;
  readonly generation: number;
  readonly refcount: number;
  /** Every holder, the allocation reference first (role {@link OWNER_ROLE}) while ACTIVE. */
  readonly holders: readonly HolderCount[];
  readonly spid: number;
  readonly privateData: Uint8Array | undefined;
}

/** An allocation: the IOASID and the generation every later call may name. */
export interface Allocation {
  readonly ioasid: number;
  readonly generation: number;
}

/** What a free did. */
export interface FreeResult {
  /** FREE_PENDING while references remain, RECLAIMED when the allocation reference was the last. */
  readonly outcome: "FREE_PENDING" | "RECLAIMED" | "ALREADY_FREE_PENDING";
  readonly refcount: number;
}

/** What a put did. */
export interface PutResult {
  readonly refcount: number;
  readonly reclaimed: boolean;
}

/**
 * An external allocator that takes precedence over the default one (ioasid.rst "Custom allocator
 * APIs": e.g. the guest's virtual-command allocator). Synchronous: a transport adapter resolves
 * the remote call first and hands the answer in.
 */
export interface CustomAllocator {
  readonly name: string;
  /** Chooses an IOASID in [min, max], or undefined when it has none. */
  alloc(min: number, max: number): number | undefined;
  /** Told when an IOASID it gave is reclaimed. */
  free(ioasid: number): void;
}

/** Options of {@link IoasidSpace}. */
export interface IoasidSpaceOptions {
  /** Size of the namespace; valid IOASIDs are 1..capacity-1. @default 2^20 */
  readonly capacity?: number;
  /** Called synchronously with every event, in sequence order. @default none */
  readonly onEvent?: (event: IoasidEvent) => void;
  /** Sequence number of the last event already committed (a restarted core continues after it). @default 0 */
  readonly lastSeq?: number;
}

/** Global counters (S6: available + Σ quotas = allocatable). */
export interface SpaceStats {
  readonly capacity: number;
  /** IOASIDs that can ever be allocated: capacity − 1 (PASID 0 is reserved). */
  readonly allocatable: number;
  /** Quota not given to any set. */
  readonly available: number;
  readonly quotaTotal: number;
  /** IOASIDs not reclaimed (ACTIVE and FREE_PENDING). */
  readonly inUse: number;
  readonly sets: number;
  readonly registrations: number;
  readonly lastSeq: number;
  /** Name of the allocator in force: "default" or the custom allocator's. */
  readonly allocator: string;
}

/** How many IOASIDs and references there are, by set, state and holder role (see {@link IoasidSpace.census}). */
export interface SpaceCensus {
  /** Every set, with its IOASIDs by state (a set with none is listed with zeros). */
  readonly sets: ReadonlyArray<{ readonly setId: number; readonly active: number; readonly freePending: number }>;
  /** References held, by holder role; the allocation references under {@link OWNER_ROLE}. */
  readonly referencesByRole: ReadonlyMap<string, number>;
}

/**
 * The whole state of an {@link IoasidSpace} at one moment, as {@link IoasidSpace.exportState} copies
 * it and {@link IoasidSpace.restore} rebuilds it: what replaying every operation up to that moment
 * would rebuild (the core's snapshots, issue 15). Plain data; columns are typed arrays of one length.
 */
export interface SpaceState {
  readonly capacity: number;
  /** Sequence number of the last event emitted. */
  readonly lastSeq: number;
  /** The id the next set gets. */
  readonly nextSetId: number;
  /** The id the next registration gets. */
  readonly nextRegistrationId: number;
  /** Every set, by id. */
  readonly sets: ReadonlyArray<{ readonly id: number; readonly token: SetToken; readonly quota: number; readonly freeing: boolean }>;
  /** Every allocated IOASID (ACTIVE or FREE_PENDING), ascending, as columns. */
  readonly ioasids: {
    readonly ids: Uint32Array;
    readonly setIds: Uint32Array;
    readonly generations: Uint32Array;
    /** Reference counts, the allocation reference included while ACTIVE. */
    readonly refcounts: Uint32Array;
    readonly spids: Uint32Array;
    /** 1: FREE_PENDING, 0: ACTIVE. */
    readonly freePending: Uint8Array;
  };
  /** Named references per IOASID, each IOASID's holders in the order they were first taken. */
  readonly holders: ReadonlyArray<{ readonly ioasid: number; readonly holders: readonly HolderCount[] }>;
  readonly privateData: ReadonlyArray<{ readonly ioasid: number; readonly data: Uint8Array }>;
  /** IOASIDs not allocated whose generation is not 0, ascending, with their generations. */
  readonly freeGenerations: { readonly ids: Uint32Array; readonly generations: Uint32Array };
  /** Every registration, by id (`setId`: where it is attached, 0 for global or pending). */
  readonly registrations: readonly Registration[];
  /** Name of the custom allocator in force (undefined: the default allocator). */
  readonly allocator: string | undefined;
}

interface SetRecord {
  readonly id: number;
  readonly token: SetToken;
  quota: number;
  /** First IOASID of the set's member list (threaded through `next`/`prev`), -1 when empty. */
  head: number;
  /** IOASIDs of the set not yet reclaimed. */
  size: number;
  /** SPID → IOASID (S4: an SPID maps to at most one IOASID per set). */
  readonly spids: Map<number, number>;
  freeing: boolean;
}

interface RegistrationRecord {
  readonly id: number;
  readonly subscriber: Subscriber;
  readonly priority: Priority;
  readonly scope: RegistrationScope;
  readonly events: readonly EventType[];
  readonly mask: number;
  setId: number;
}

/** The result of a free that reclaimed at once: shared, so the hot path allocates nothing for it. */
const RECLAIMED: FreeResult = Object.freeze({ outcome: "RECLAIMED", refcount: 0 });

const STATE_FREE = 0;
const STATE_ACTIVE = 1;
const STATE_FREE_PENDING = 2;

const EVENT_BITS: Record<EventType, number> = {
  ALLOC: 1,
  FREE: 2,
  BIND: 4,
  UNBIND: 8,
  SET_ALLOC: 16,
  SET_FREE: 32,
  RECLAIM: 64,
};
const PRIORITIES = new Set<number>(Object.values(Priority));
const EVENT_TYPES = new Set<string>(Object.values(EventType));
const NAME = /^[A-Za-z0-9._:@-]+$/;
const U64_MAX = (1n << 64n) - 1n;

/**
 * The IOASID namespace of one host: sets, quotas, allocation in [min, max], generations,
 * per-holder references, FREE_PENDING and reclaim, SPIDs, private data, the custom-allocator hook,
 * notifier registrations and event emission (drivers/iommu/ioasid.c, as DESIGN §3 decides it).
 *
 * Pure and synchronous: no I/O, no clocks. Every method either completes its transition and emits
 * its events, or throws a {@link DomainError} and changes nothing.
 *
 * Per-IOASID state lives in typed arrays indexed by IOASID (≈ 17 bytes per ID of capacity), and
 * sparse maps hold only what few IOASIDs have (named references beyond the allocation reference,
 * private data).
 *
 * @example
 * const space = new IoasidSpace({ onEvent: (e) => log.push(e) });
 * const set = space.createSet({ token: { type: TokenType.MM, value: 7n }, quota: 16 });
 * const { ioasid, generation } = space.alloc(set.id);
 */
export class IoasidSpace {
  readonly capacity: number;
  private readonly bitmap: IdBitmap;
  private readonly state: Uint8Array;
  private readonly setOf: Uint32Array;
  private readonly gen: Uint32Array;
  private readonly refs: Uint32Array;
  private readonly spidOf: Uint32Array;
  /** Per-set member lists, intrusive and doubly linked: O(1) insert and remove, no hashing. */
  private readonly next: Int32Array;
  private readonly prev: Int32Array;
  /** Named references per IOASID, holder key → count; absent when only the allocation reference is held. */
  private readonly holders = new Map<number, Map<string, number>>();
  private readonly privateData = new Map<number, Uint8Array>();

  private readonly sets = new Map<number, SetRecord>();
  private readonly setsByToken = new Map<string, number>();
  private nextSetId = 1;
  private available: number;

  private readonly registrations = new Map<number, RegistrationRecord>();
  private readonly globalRegs = new Set<RegistrationRecord>();
  private readonly setRegs = new Map<number, Set<RegistrationRecord>>();
  private readonly pendingMm = new Map<bigint, Set<RegistrationRecord>>();
  private nextRegId = 1;
  /** recipients() answers, cleared whenever a registration is added, removed, attached or detached. */
  private readonly recipientCache = new Map<string, readonly Registration[]>();

  private custom: CustomAllocator | undefined;
  private seq: number;
  private readonly onEvent: ((event: IoasidEvent) => void) | undefined;

  constructor(options: IoasidSpaceOptions = {}) {
    const capacity = options.capacity ?? DEFAULT_CAPACITY;
    if (!Number.isInteger(capacity) || capacity < 2 || capacity > MAX_CAPACITY) {
      throw new RangeError(`capacity must be an integer in 2..${MAX_CAPACITY}, got ${capacity}`);
    }
    this.capacity = capacity;
    this.bitmap = new IdBitmap(capacity);
    this.bitmap.take(RID_PASID); // PASID 0 is RID_PASID: never allocated (ioasid.rst).
    this.state = new Uint8Array(capacity);
    this.setOf = new Uint32Array(capacity);
    this.gen = new Uint32Array(capacity);
    this.refs = new Uint32Array(capacity);
    this.spidOf = new Uint32Array(capacity);
    this.next = new Int32Array(capacity);
    this.prev = new Int32Array(capacity);
    this.available = capacity - 1;
    this.seq = options.lastSeq ?? 0;
    this.onEvent = options.onEvent;
  }

  // ---------------------------------------------------------------------------------------------
  // Sets

  /**
   * Creates a set with a token unique within its type and a quota taken from the pool; quota 0
   * takes all that is available. Emits SET_ALLOC, then activates pending MM registrations for it.
   * @throws DomainError INVALID_ARGUMENT `TOKEN_TYPE_INVALID` / `TOKEN_EMPTY` / `QUOTA_INVALID`;
   *   ALREADY_EXISTS `TOKEN_IN_USE`; RESOURCE_EXHAUSTED `CAPACITY_EXHAUSTED`
   */
  createSet(options: { token: SetToken; quota?: number }): SetInfo {
    const token = this.assertToken(options.token);
    const quota = options.quota ?? 0;
    this.assertQuotaValue(quota);
    const key = tokenKey(token);
    if (this.setsByToken.has(key)) {
      throw coreError("TOKEN_IN_USE", `a set with ${token.type} token ${token.value} already exists`);
    }
    const granted = quota === 0 ? this.available : quota;
    if (granted === 0 || granted > this.available) {
      throw coreError("CAPACITY_EXHAUSTED", `quota ${quota === 0 ? "(all available)" : quota} exceeds the ${this.available} IOASIDs not yet given to a set`);
    }
    const set: SetRecord = {
      id: this.nextSetId++,
      token,
      quota: granted,
      head: -1,
      size: 0,
      spids: new Map(),
      freeing: false,
    };
    this.available -= granted;
    this.sets.set(set.id, set);
    this.setsByToken.set(key, set.id);
    this.emit(EventType.SET_ALLOC, INVALID_IOASID, set, 0, 0, undefined, 0);
    // A registration by MM token made before the set existed becomes active now (L4).
    if (token.type === TokenType.MM) {
      const pending = this.pendingMm.get(token.value);
      if (pending !== undefined) {
        for (const reg of pending) this.attachRegistration(reg, set.id);
        this.pendingMm.delete(token.value);
      }
    }
    return this.setInfo(set);
  }

  /**
   * Changes a set's quota; 0 gives it all that is available on top of what it has.
   * @throws DomainError INVALID_ARGUMENT `SET_UNKNOWN` / `QUOTA_INVALID` /
   *   `QUOTA_BELOW_USAGE`; RESOURCE_EXHAUSTED `CAPACITY_EXHAUSTED`
   */
  adjustSet(setId: number, quota: number): SetInfo {
    const set = this.requireSet(setId);
    this.assertQuotaValue(quota);
    const target = quota === 0 ? set.quota + this.available : quota;
    if (target < set.size) {
      throw coreError("QUOTA_BELOW_USAGE", `set ${setId} has ${set.size} IOASIDs in use; a quota of ${target} is below that`);
    }
    if (target - set.quota > this.available) {
      throw coreError("CAPACITY_EXHAUSTED", `raising set ${setId} to ${target} needs ${target - set.quota} more IOASIDs; ${this.available} are available`);
    }
    if (target === 0) throw coreError("CAPACITY_EXHAUSTED", "no IOASIDs are available for this set");
    this.available -= target - set.quota;
    set.quota = target;
    return this.setInfo(set);
  }

  /**
   * Destroys an empty set and returns its quota to the pool (emits SET_FREE).
   * @throws DomainError INVALID_ARGUMENT `SET_UNKNOWN`; FAILED_PRECONDITION `SET_NOT_EMPTY`
   */
  destroySet(setId: number): void {
    const set = this.requireSet(setId);
    if (set.size > 0) {
      throw coreError("SET_NOT_EMPTY", `set ${setId} still has ${set.size} IOASIDs; free them first or free the whole set`);
    }
    this.destroy(set);
  }

  /**
   * Frees every IOASID of the set (each as {@link free} would) and destroys the set when its last
   * IOASID is reclaimed — at once when none is referenced. Idempotent. The crashed-guest path.
   * @returns how many IOASIDs this call moved out of ACTIVE, and whether the set is gone already
   * @throws DomainError INVALID_ARGUMENT `SET_UNKNOWN`
   */
  freeSet(setId: number): { freed: number; destroyed: boolean } {
    const set = this.requireSet(setId);
    set.freeing = true;
    let freed = 0;
    for (const ioasid of this.membersOf(set).sort((a, b) => a - b)) {
      if (this.state[ioasid] === STATE_ACTIVE) {
        this.freeResolved(ioasid, set);
        freed++;
      }
    }
    if (set.size === 0 && this.sets.has(set.id)) this.destroy(set);
    return { freed, destroyed: !this.sets.has(set.id) };
  }

  /** Looks a set up by id. @throws DomainError NOT_FOUND `SET_NOT_FOUND` */
  getSet(setId: number): SetInfo {
    const set = Number.isInteger(setId) ? this.sets.get(setId) : undefined;
    if (set === undefined) throw coreError("SET_NOT_FOUND", `no IOASID set ${setId}`);
    return this.setInfo(set);
  }

  /** The set with this token, or undefined. */
  findSetByToken(token: SetToken): SetInfo | undefined {
    const id = this.setsByToken.get(tokenKey(token));
    return id === undefined ? undefined : this.setInfo(this.sets.get(id)!);
  }

  /** Every set, by id. */
  listSets(): SetInfo[] {
    return [...this.sets.values()].map((s) => this.setInfo(s));
  }

  // ---------------------------------------------------------------------------------------------
  // IOASIDs

  /**
   * Allocates the lowest free IOASID in [min, max] for the set (or the custom allocator's choice).
   * The IOASID starts ACTIVE with one reference, the allocation reference held by the set owner,
   * and a new generation. Emits ALLOC.
   * @param options.min lowest acceptable IOASID @default 1
   * @param options.max highest acceptable IOASID @default capacity − 1
   * @throws DomainError INVALID_ARGUMENT `IOASID_OUT_OF_RANGE` / `INVALID_RANGE` /
   *   `PRIVATE_DATA_TOO_LARGE` / `SET_UNKNOWN`; FAILED_PRECONDITION `SET_FREEING`;
   *   RESOURCE_EXHAUSTED `SET_QUOTA_EXCEEDED` / `IOASID_RANGE_EXHAUSTED`; UNAVAILABLE `ALLOCATOR_FAILED`
   */
  alloc(setId: number, options: { min?: number; max?: number; privateData?: Uint8Array } = {}): Allocation {
    const { set, min, max } = this.prepareAlloc(setId, options, 1);
    let ioasid: number;
    if (this.custom === undefined) {
      ioasid = this.bitmap.findFree(min, max);
      if (ioasid < 0) throw coreError("IOASID_RANGE_EXHAUSTED", `no free IOASID in [${min}, ${max}]`);
    } else {
      ioasid = this.customAlloc(this.custom, min, max);
    }
    return this.commitAlloc(set, ioasid, options.privateData);
  }

  /**
   * Allocates `count` IOASIDs for the set at once, all or nothing: quota and free IDs in
   * [min, max] are checked before the first one is taken, so a refusal changes nothing. One ALLOC
   * per IOASID, in ascending order.
   * @throws DomainError INVALID_ARGUMENT `COUNT_INVALID` and those of {@link alloc}
   */
  allocMany(setId: number, count: number, options: { min?: number; max?: number } = {}): Allocation[] {
    if (!Number.isInteger(count) || count < 1 || count > MAX_BATCH_ALLOC) {
      throw coreError("COUNT_INVALID", `count ${count} is outside 1..${MAX_BATCH_ALLOC}`);
    }
    const { set, min, max } = this.prepareAlloc(setId, options, count);
    if (this.custom !== undefined) {
      // A custom allocator cannot be asked ahead: take one at a time and undo on failure.
      const done: Allocation[] = [];
      try {
        for (let i = 0; i < count; i++) done.push(this.commitAlloc(set, this.customAlloc(this.custom, min, max), undefined));
      } catch (err) {
        for (const a of done) this.freeResolved(a.ioasid, set);
        throw err;
      }
      return done;
    }
    const ids: number[] = [];
    for (let next = min; ids.length < count;) {
      const id = this.bitmap.findFree(next, max);
      if (id < 0) {
        throw coreError("IOASID_RANGE_EXHAUSTED", `only ${ids.length} of ${count} IOASIDs are free in [${min}, ${max}]`);
      }
      ids.push(id);
      next = id + 1;
    }
    return ids.map((id) => this.commitAlloc(set, id, undefined));
  }

  /**
   * Frees an IOASID: it becomes FREE_PENDING and the allocation reference is dropped. Always
   * succeeds for the owner and is idempotent: a second free changes nothing and emits nothing
   * (ioasid.rst "Exception cases" rule 1, "Level Sensitivity"). When the allocation reference was
   * the only one the IOASID is reclaimed at once and no FREE is emitted.
   * @throws DomainError INVALID_ARGUMENT `IOASID_OUT_OF_RANGE` / `SET_UNKNOWN`; NOT_FOUND
   *   `IOASID_NOT_FOUND`; PERMISSION_DENIED `IOASID_NOT_IN_SET`; FAILED_PRECONDITION `STALE_GENERATION`
   */
  free(setId: number, ioasid: number, generation = 0): FreeResult {
    const set = this.resolve(setId, ioasid, generation);
    if (this.state[ioasid] === STATE_FREE_PENDING) {
      return { outcome: "ALREADY_FREE_PENDING", refcount: this.refs[ioasid]! };
    }
    return this.freeResolved(ioasid, set);
  }

  /**
   * Takes one reference for a named holder. Refused once the IOASID is FREE_PENDING (S2).
   * @throws DomainError NOT_FOUND `IOASID_FREE_PENDING` and those of {@link free}; INVALID_ARGUMENT `HOLDER_INVALID`
   */
  get(setId: number, ioasid: number, holder: Holder, generation = 0): { refcount: number } {
    const key = checkedHolderKey(holder);
    this.resolve(setId, ioasid, generation);
    this.refuseFreePending(ioasid);
    return { refcount: this.addRef(ioasid, key) };
  }

  /**
   * Drops one reference of a named holder; at zero the IOASID is reclaimed (S1).
   * @throws DomainError FAILED_PRECONDITION `NO_REFERENCE_HELD` and those of {@link free}
   */
  put(setId: number, ioasid: number, holder: Holder, generation = 0): PutResult {
    const key = checkedHolderKey(holder);
    this.resolve(setId, ioasid, generation);
    const perHolder = this.holders.get(ioasid);
    const held = perHolder?.get(key) ?? 0;
    if (perHolder === undefined || held === 0) {
      throw coreError("NO_REFERENCE_HELD", `${key} holds no reference to IOASID ${ioasid}`);
    }
    if (held === 1) perHolder.delete(key);
    else perHolder.set(key, held - 1);
    if (perHolder.size === 0) this.holders.delete(ioasid);
    const refcount = --this.refs[ioasid]!;
    if (refcount === 0) {
      this.reclaim(ioasid);
      return { refcount: 0, reclaimed: true };
    }
    return { refcount, reclaimed: false };
  }

  /**
   * Looks an IOASID of the set up, without taking a reference.
   * @throws DomainError NOT_FOUND `IOASID_FREE_PENDING` (the document's -ENOENT) and those of {@link free}
   */
  find(setId: number, ioasid: number, generation = 0): IoasidInfo {
    this.resolve(setId, ioasid, generation);
    this.refuseFreePending(ioasid);
    return this.info(ioasid);
  }

  /**
   * Translates an SPID (guest PASID) of the set to its IOASID, taking a reference for `holder`
   * when one is given (VDCM programming a work queue).
   * @throws DomainError INVALID_ARGUMENT `SPID_OUT_OF_RANGE` / `HOLDER_INVALID` / `SET_UNKNOWN`;
   *   NOT_FOUND `SPID_NOT_FOUND` / `IOASID_FREE_PENDING`
   */
  findBySpid(setId: number, spid: number, holder?: Holder): Allocation & { refcount: number } {
    this.assertSpid(spid);
    const key = holder === undefined ? undefined : checkedHolderKey(holder);
    const set = this.requireSet(setId);
    const ioasid = set.spids.get(spid);
    if (ioasid === undefined) throw coreError("SPID_NOT_FOUND", `set ${setId} has no SPID ${spid}`);
    this.refuseFreePending(ioasid);
    const refcount = key === undefined ? this.refs[ioasid]! : this.addRef(ioasid, key);
    return { ioasid, generation: this.gen[ioasid]!, refcount };
  }

  /**
   * Attaches an SPID to an IOASID (at most one per IOASID, unique within the set) and emits BIND.
   * @throws DomainError INVALID_ARGUMENT `SPID_OUT_OF_RANGE` / `SPID_IN_USE`; FAILED_PRECONDITION
   *   `SPID_ALREADY_ATTACHED`; NOT_FOUND `IOASID_FREE_PENDING` and those of {@link free}
   */
  attachSpid(setId: number, ioasid: number, spid: number, generation = 0): void {
    this.assertSpid(spid);
    const set = this.resolve(setId, ioasid, generation);
    this.refuseFreePending(ioasid);
    const current = this.spidOf[ioasid]!;
    if (current !== 0) {
      throw coreError("SPID_ALREADY_ATTACHED", `IOASID ${ioasid} already has SPID ${current}; detach it first`);
    }
    const other = set.spids.get(spid);
    if (other !== undefined) {
      throw coreError("SPID_IN_USE", `SPID ${spid} already maps to IOASID ${other} in set ${setId}`);
    }
    this.spidOf[ioasid] = spid;
    set.spids.set(spid, ioasid);
    this.emit(EventType.BIND, ioasid, set, this.gen[ioasid]!, spid, this.dataOf(ioasid), this.refs[ioasid]!);
  }

  /**
   * Detaches the IOASID's SPID and emits UNBIND carrying it — except when the IOASID is already
   * FREE_PENDING, whose FREE covers it (ioasid.rst: "IOMMU driver will also avoid sending UNBIND
   * if the PASID is already FREE"): then the SPID is released silently.
   * @returns whether UNBIND was emitted
   * @throws DomainError FAILED_PRECONDITION `SPID_NOT_ATTACHED` and those of {@link free}
   */
  detachSpid(setId: number, ioasid: number, generation = 0): { spid: number; unbindEmitted: boolean } {
    const set = this.resolve(setId, ioasid, generation);
    const spid = this.spidOf[ioasid]!;
    if (spid === 0) throw coreError("SPID_NOT_ATTACHED", `IOASID ${ioasid} has no SPID attached`);
    this.spidOf[ioasid] = 0;
    set.spids.delete(spid);
    if (this.state[ioasid] === STATE_FREE_PENDING) return { spid, unbindEmitted: false };
    this.emit(EventType.UNBIND, ioasid, set, this.gen[ioasid]!, spid, this.dataOf(ioasid), this.refs[ioasid]!);
    return { spid, unbindEmitted: true };
  }

  /**
   * Attaches private data (once: a second attach fails until detached).
   * @throws DomainError INVALID_ARGUMENT `PRIVATE_DATA_TOO_LARGE`; FAILED_PRECONDITION
   *   `PRIVATE_DATA_ATTACHED`; NOT_FOUND `IOASID_FREE_PENDING` and those of {@link free}
   */
  attachData(setId: number, ioasid: number, data: Uint8Array, generation = 0): void {
    this.assertPrivateData(data);
    this.resolve(setId, ioasid, generation);
    this.refuseFreePending(ioasid);
    if (this.privateData.has(ioasid)) {
      throw coreError("PRIVATE_DATA_ATTACHED", `IOASID ${ioasid} already has private data; detach it first`);
    }
    this.privateData.set(ioasid, data.slice());
  }

  /**
   * Detaches the private data and returns it.
   * @throws DomainError FAILED_PRECONDITION `PRIVATE_DATA_NOT_ATTACHED` and those of {@link free}
   */
  detachData(setId: number, ioasid: number, generation = 0): Uint8Array {
    this.resolve(setId, ioasid, generation);
    const data = this.privateData.get(ioasid);
    if (data === undefined) throw coreError("PRIVATE_DATA_NOT_ATTACHED", `IOASID ${ioasid} has no private data`);
    this.privateData.delete(ioasid);
    return data;
  }

  /** An IOASID whatever its set and state (operators and tools), or undefined when not allocated. */
  describe(ioasid: number): IoasidInfo | undefined {
    if (!Number.isInteger(ioasid) || ioasid <= 0 || ioasid >= this.capacity || this.state[ioasid] === STATE_FREE) {
      return undefined;
    }
    return this.info(ioasid);
  }

  /** Every allocated IOASID of a set (or of all sets), in ascending order. */
  listIoasids(setId?: number): IoasidInfo[] {
    const ids = setId === undefined ? [...this.sets.values()].flatMap((s) => this.membersOf(s)) : this.membersOf(this.requireSet(setId));
    return ids.sort((a, b) => a - b).map((id) => this.info(id));
  }

  // ---------------------------------------------------------------------------------------------
  // Custom allocators

  /**
   * Makes an external allocator take precedence over the default one. Switching is allowed only
   * while the allocator in force has no outstanding IOASIDs (the kernel's -EBUSY).
   * @throws DomainError INVALID_ARGUMENT `ALLOCATOR_INVALID`; ALREADY_EXISTS `ALLOCATOR_EXISTS`;
   *   FAILED_PRECONDITION `ALLOCATOR_BUSY`
   */
  registerAllocator(allocator: CustomAllocator): void {
    if (typeof allocator.name !== "string" || !NAME.test(allocator.name) || allocator.name === "default") {
      throw coreError("ALLOCATOR_INVALID", `allocator name ${quote(allocator.name)} is invalid`);
    }
    if (this.custom !== undefined) {
      throw coreError("ALLOCATOR_EXISTS", `allocator ${this.custom.name} is already registered; unregister it first`);
    }
    this.assertNoOutstanding("default");
    this.custom = allocator;
  }

  /**
   * Returns to the default allocator.
   * @throws DomainError NOT_FOUND `ALLOCATOR_NOT_FOUND`; FAILED_PRECONDITION `ALLOCATOR_BUSY`
   */
  unregisterAllocator(name: string): void {
    if (this.custom === undefined || this.custom.name !== name) {
      throw coreError("ALLOCATOR_NOT_FOUND", `allocator ${quote(name)} is not registered`);
    }
    this.assertNoOutstanding(name);
    this.custom = undefined;
  }

  // ---------------------------------------------------------------------------------------------
  // Notifier registrations

  /**
   * Registers a subscriber: globally, on a set, or by MM token. A registration by MM token before
   * the set exists is pending and becomes active when the set is created. Registering on a set
   * that already has IOASIDs is refused (no replay, no lost events).
   * @throws DomainError INVALID_ARGUMENT `SUBSCRIBER_INVALID` / `PRIORITY_INVALID` / `SCOPE_INVALID`
   *   / `EVENT_TYPE_INVALID` / `TOKEN_EMPTY` / `SET_UNKNOWN`; FAILED_PRECONDITION
   *   `SET_NOT_EMPTY`; ALREADY_EXISTS `REGISTRATION_EXISTS`
   */
  register(options: RegisterOptions): Registration {
    const { subscriber, priority, scope } = options;
    for (const field of ["name", "instance"] as const) {
      const v = subscriber?.[field];
      if (typeof v !== "string" || v.length === 0 || v.length > MAX_NAME_LENGTH || !NAME.test(v)) {
        throw coreError("SUBSCRIBER_INVALID", `subscriber ${field} ${quote(v)} is invalid`);
      }
    }
    if (!PRIORITIES.has(priority)) throw coreError("PRIORITY_INVALID", `priority ${String(priority)} is not one of CPU, DEVICE, IOMMU, LAST`);
    const carried = (Object.keys(EVENT_SCOPES) as EventType[]).filter((t) => {
      const s = EVENT_SCOPES[t];
      return scope?.kind === "global" ? s.global : s.set;
    });
    const events = options.events === undefined || options.events.length === 0 ? carried : [...new Set(options.events)];
    let mask = 0;
    for (const t of events) {
      if (!EVENT_TYPES.has(t) || !carried.includes(t)) {
        throw coreError("EVENT_TYPE_INVALID", `event ${String(t)} is not delivered to ${scope?.kind ?? "this"} scope registrations`);
      }
      mask |= EVENT_BITS[t];
    }
    let setId = 0;
    let scopeKey: string;
    if (scope?.kind === "global") {
      scopeKey = "global";
    } else if (scope?.kind === "set") {
      const set = this.requireSet(scope.setId);
      this.assertEmptyForRegistration(set);
      setId = set.id;
      scopeKey = `set:${set.id}`;
    } else if (scope?.kind === "mm") {
      if (typeof scope.token !== "bigint" || scope.token <= 0n || scope.token > U64_MAX) {
        throw coreError("TOKEN_EMPTY", "an MM token (a non-zero u64) is required");
      }
      const id = this.setsByToken.get(tokenKey({ type: TokenType.MM, value: scope.token }));
      if (id !== undefined) {
        const set = this.sets.get(id)!;
        this.assertEmptyForRegistration(set);
        setId = set.id;
      }
      scopeKey = `mm:${scope.token}`;
    } else {
      throw coreError("SCOPE_INVALID", "scope must be global, a set, or an MM token");
    }
    for (const r of this.registrations.values()) {
      if (r.subscriber.name === subscriber.name && r.subscriber.instance === subscriber.instance && registrationScopeKey(r.scope) === scopeKey) {
        throw coreError("REGISTRATION_EXISTS", `${subscriber.name}/${subscriber.instance} is already registered on ${scopeKey} (registration ${r.id})`);
      }
    }
    const reg: RegistrationRecord = {
      id: this.nextRegId++,
      subscriber: { name: subscriber.name, instance: subscriber.instance },
      priority,
      scope: scope.kind === "global" ? { kind: "global" } : scope.kind === "set" ? { kind: "set", setId: scope.setId } : { kind: "mm", token: scope.token },
      events,
      mask,
      setId: 0,
    };
    this.registrations.set(reg.id, reg);
    this.recipientCache.clear();
    if (scope.kind === "global") this.globalRegs.add(reg);
    else if (setId !== 0) this.attachRegistration(reg, setId);
    else this.addPending(reg);
    return toRegistration(reg);
  }

  /** Removes a registration. @throws DomainError NOT_FOUND `REGISTRATION_NOT_FOUND` */
  unregister(registrationId: number): void {
    const reg = this.registrations.get(registrationId);
    if (reg === undefined) throw coreError("REGISTRATION_NOT_FOUND", `no registration ${registrationId}`);
    this.registrations.delete(reg.id);
    this.recipientCache.clear();
    this.globalRegs.delete(reg);
    if (reg.setId !== 0) this.setRegs.get(reg.setId)?.delete(reg);
    if (reg.scope.kind === "mm") this.pendingMm.get(reg.scope.token)?.delete(reg);
  }

  /** Every registration, by id. */
  listRegistrations(): Registration[] {
    return [...this.registrations.values()].map(toRegistration);
  }

  /**
   * The active registrations an event goes to, highest priority first (the delivery order:
   * CPU → DEVICE → IOMMU → LAST). Registrations of equal priority are in registration order.
   */
  recipients(event: Pick<IoasidEvent, "type" | "setId">): readonly Registration[] {
    // Cached per (type, set) until a registration changes: events come in bursts (a set freed).
    const cacheKey = `${event.type}|${event.setId}`;
    const cached = this.recipientCache.get(cacheKey);
    if (cached !== undefined) return cached;
    const scopes = EVENT_SCOPES[event.type];
    const bit = EVENT_BITS[event.type];
    const out: RegistrationRecord[] = [];
    if (scopes.global) for (const r of this.globalRegs) if (r.mask & bit) out.push(r);
    if (scopes.set) {
      const regs = this.setRegs.get(event.setId);
      if (regs !== undefined) for (const r of regs) if (r.mask & bit) out.push(r);
    }
    out.sort((a, b) => b.priority - a.priority || a.id - b.id);
    const result = Object.freeze(out.map(toRegistration));
    if (this.recipientCache.size > 10_000) this.recipientCache.clear();
    this.recipientCache.set(cacheKey, result);
    return result;
  }

  /** Global counters. */
  stats(): SpaceStats {
    let quotaTotal = 0;
    for (const s of this.sets.values()) quotaTotal += s.quota;
    return {
      capacity: this.capacity,
      allocatable: this.capacity - 1,
      available: this.available,
      quotaTotal,
      inUse: this.bitmap.size - 1,
      sets: this.sets.size,
      registrations: this.registrations.size,
      lastSeq: this.seq,
      allocator: this.custom?.name ?? "default",
    };
  }

  /**
   * The IOASIDs of each set by state, and the references by holder role: what an operator's gauges
   * show (DESIGN §13), counted when asked — one pass over the sets' members and the holder table —
   * so that no operation pays for it.
   */
  census(): SpaceCensus {
    const sets: Array<{ setId: number; active: number; freePending: number }> = [];
    let allocationRefs = 0;
    for (const set of this.sets.values()) {
      let freePending = 0;
      for (let id = set.head; id >= 0; id = this.next[id]!) if (this.state[id] === STATE_FREE_PENDING) freePending++;
      sets.push({ setId: set.id, active: set.size - freePending, freePending });
      // The allocation reference is held while ACTIVE and dropped by the free (ioasid.rst "Reference counting").
      allocationRefs += set.size - freePending;
    }
    const referencesByRole = new Map<string, number>([[OWNER_ROLE, allocationRefs]]);
    for (const perHolder of this.holders.values()) {
      for (const [key, count] of perHolder) {
        const role = key.slice(0, key.indexOf("/")); // toHolderKey: role/instance/purpose
        referencesByRole.set(role, (referencesByRole.get(role) ?? 0) + count);
      }
    }
    return { sets, referencesByRole };
  }

  // ---------------------------------------------------------------------------------------------
  // Snapshots

  /**
   * A copy of the whole state (see {@link SpaceState}): nothing in it changes with later calls. Costs
   * one pass over the namespace (the generations of unallocated IDs) plus the allocated IOASIDs.
   */
  exportState(): SpaceState {
    const n = this.bitmap.size - 1;
    const ids = new Uint32Array(n);
    let k = 0;
    for (const set of this.sets.values()) for (let id = set.head; id >= 0; id = this.next[id]!) ids[k++] = id;
    ids.sort();
    const setIds = new Uint32Array(n);
    const generations = new Uint32Array(n);
    const refcounts = new Uint32Array(n);
    const spids = new Uint32Array(n);
    const freePending = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const id = ids[i]!;
      setIds[i] = this.setOf[id]!;
      generations[i] = this.gen[id]!;
      refcounts[i] = this.refs[id]!;
      spids[i] = this.spidOf[id]!;
      freePending[i] = this.state[id] === STATE_FREE_PENDING ? 1 : 0;
    }
    const freeIds: number[] = [];
    const freeGens: number[] = [];
    for (let id = 1; id < this.capacity; id++) {
      if (this.state[id] === STATE_FREE && this.gen[id] !== 0) {
        freeIds.push(id);
        freeGens.push(this.gen[id]!);
      }
    }
    return {
      capacity: this.capacity,
      lastSeq: this.seq,
      nextSetId: this.nextSetId,
      nextRegistrationId: this.nextRegId,
      sets: [...this.sets.values()].map((s) => ({ id: s.id, token: s.token, quota: s.quota, freeing: s.freeing })),
      ioasids: { ids, setIds, generations, refcounts, spids, freePending },
      holders: [...this.holders].map(([ioasid, m]) => ({ ioasid, holders: [...m].map(([key, count]) => ({ holder: fromHolderKey(key), count })) })),
      // Entries are replaced, never changed in place, so sharing the bytes is a copy.
      privateData: [...this.privateData].map(([ioasid, data]) => ({ ioasid, data })),
      freeGenerations: { ids: Uint32Array.from(freeIds), generations: Uint32Array.from(freeGens) },
      registrations: [...this.registrations.values()].map(toRegistration),
      allocator: this.custom?.name,
    };
  }

  /**
   * Rebuilds a state {@link exportState} copied, into this space, which must be new (nothing
   * created, no event emitted). Emits nothing. `allocator` is the custom allocator the state names
   * (its name must match). Checks what it takes — ranges, sets named, reference counts against
   * holders, quotas against capacity, SPIDs unique per set — so a damaged snapshot is refused, not
   * half-loaded into a state no call sequence could make.
   * @throws RangeError when the state is inconsistent or this space is not new
   */
  restore(state: SpaceState, allocator?: CustomAllocator): void {
    const fail = (what: string): never => {
      throw new RangeError(`snapshot state refused: ${what}`);
    };
    if (this.seq !== 0 || this.sets.size !== 0 || this.registrations.size !== 0 || this.nextSetId !== 1) fail("the space is not new");
    if (state.capacity !== this.capacity) fail(`it was taken with capacity ${state.capacity}, this space has ${this.capacity}`);
    if (state.allocator !== allocator?.name)
      fail(`it names allocator ${quote(state.allocator ?? "default")}, ${quote(allocator?.name ?? "default")} was given`);
    let quotas = 0;
    for (const s of state.sets) {
      if (!Number.isInteger(s.id) || s.id < 1 || s.id >= state.nextSetId || this.sets.has(s.id)) fail(`set id ${s.id}`);
      const token = this.assertToken(s.token);
      if (this.setsByToken.has(tokenKey(token))) fail(`token ${token.value} of set ${s.id} twice`);
      if (!Number.isInteger(s.quota) || s.quota < 1) fail(`quota ${s.quota} of set ${s.id}`);
      quotas += s.quota;
      this.sets.set(s.id, { id: s.id, token, quota: s.quota, head: -1, size: 0, spids: new Map(), freeing: s.freeing });
      this.setsByToken.set(tokenKey(token), s.id);
    }
    if (quotas > this.capacity - 1) fail(`quotas add up to ${quotas}, beyond ${this.capacity - 1}`);
    this.available = this.capacity - 1 - quotas;
    const named = new Map<number, number>();
    for (const { ioasid, holders } of state.holders) {
      const m = new Map<string, number>();
      let total = 0;
      for (const h of holders) {
        assertHolder(h.holder);
        if (!Number.isInteger(h.count) || h.count < 1) fail(`reference count ${h.count} of IOASID ${ioasid}`);
        m.set(toHolderKey(h.holder), h.count);
        total += h.count;
      }
      if (m.size > 0) this.holders.set(ioasid, m);
      named.set(ioasid, total);
    }
    const c = state.ioasids;
    for (let i = 0; i < c.ids.length; i++) {
      const id = c.ids[i]!;
      if (id <= RID_PASID || id >= this.capacity || (i > 0 && id <= c.ids[i - 1]!)) fail(`IOASID ${id} out of range or order`);
      const set = this.sets.get(c.setIds[i]!) ?? fail(`IOASID ${id} names no set (${c.setIds[i]})`);
      const pending = c.freePending[i] === 1;
      if (c.generations[i] === 0) fail(`IOASID ${id} has generation 0`);
      if (c.refcounts[i] !== (pending ? 0 : 1) + (named.get(id) ?? 0) || c.refcounts[i] === 0)
        fail(`IOASID ${id}: reference count ${c.refcounts[i]} against its holders`);
      named.delete(id);
      this.bitmap.take(id);
      this.state[id] = pending ? STATE_FREE_PENDING : STATE_ACTIVE;
      this.setOf[id] = set.id;
      this.gen[id] = c.generations[i]!;
      this.refs[id] = c.refcounts[i]!;
      const spid = c.spids[i]!;
      if (spid !== 0) {
        if (spid > MAX_SPID || set.spids.has(spid)) fail(`SPID ${spid} of IOASID ${id}`);
        set.spids.set(spid, id);
        this.spidOf[id] = spid;
      }
      this.linkMember(set, id);
      if (set.size > set.quota) fail(`set ${set.id} holds more IOASIDs than its quota`);
    }
    if (named.size > 0) fail(`references held on IOASIDs not allocated (${[...named.keys()].slice(0, 3).join(", ")})`);
    for (const { ioasid, data } of state.privateData) {
      if (this.state[ioasid] !== STATE_ACTIVE && this.state[ioasid] !== STATE_FREE_PENDING) fail(`private data of IOASID ${ioasid}, not allocated`);
      this.assertPrivateData(data);
      this.privateData.set(ioasid, data.slice());
    }
    const f = state.freeGenerations;
    for (let i = 0; i < f.ids.length; i++) {
      const id = f.ids[i]!;
      if (id <= RID_PASID || id >= this.capacity || this.state[id] !== STATE_FREE) fail(`generation of IOASID ${id}, which is allocated or out of range`);
      this.gen[id] = f.generations[i]!;
    }
    for (const r of state.registrations) {
      if (!Number.isInteger(r.id) || r.id < 1 || r.id >= state.nextRegistrationId || this.registrations.has(r.id)) fail(`registration id ${r.id}`);
      let mask = 0;
      for (const t of r.events) mask |= EVENT_BITS[t] ?? fail(`event type ${String(t)} of registration ${r.id}`);
      if (!PRIORITIES.has(r.priority)) fail(`priority of registration ${r.id}`);
      const reg: RegistrationRecord = {
        id: r.id,
        subscriber: { ...r.subscriber },
        priority: r.priority,
        scope: r.scope,
        events: [...r.events],
        mask,
        setId: 0,
      };
      this.registrations.set(reg.id, reg);
      if (r.scope.kind === "global") this.globalRegs.add(reg);
      else if (r.setId !== 0) {
        if (!this.sets.has(r.setId)) fail(`registration ${r.id} is attached to no set (${r.setId})`);
        this.attachRegistration(reg, r.setId);
      } else if (r.scope.kind === "mm") this.addPending(reg);
      else fail(`set registration ${r.id} attached to no set`);
    }
    this.nextSetId = state.nextSetId;
    this.nextRegId = state.nextRegistrationId;
    this.seq = state.lastSeq;
    this.custom = allocator;
    this.recipientCache.clear();
  }

  // ---------------------------------------------------------------------------------------------
  // Internals

  private prepareAlloc(
    setId: number,
    options: { min?: number; max?: number; privateData?: Uint8Array },
    count: number,
  ): { set: SetRecord; min: number; max: number } {
    const min = options.min ?? 1;
    const max = options.max ?? this.capacity - 1;
    this.assertIoasid(min, "min");
    this.assertIoasid(max, "max");
    if (min > max) throw coreError("INVALID_RANGE", `min ${min} is greater than max ${max}`);
    if (options.privateData !== undefined) this.assertPrivateData(options.privateData);
    const set = this.requireSet(setId);
    if (set.freeing) throw coreError("SET_FREEING", `set ${setId} is being freed and takes no new IOASIDs`);
    if (set.size + count > set.quota) {
      throw coreError("SET_QUOTA_EXCEEDED", `set ${setId} has ${set.quota - set.size} of its quota of ${set.quota} left; ${count} asked`);
    }
    return { set, min, max };
  }

  private customAlloc(custom: CustomAllocator, min: number, max: number): number {
    const chosen = custom.alloc(min, max);
    if (chosen === undefined) {
      throw coreError("IOASID_RANGE_EXHAUSTED", `allocator ${custom.name} has no free IOASID in [${min}, ${max}]`);
    }
    if (!Number.isInteger(chosen) || chosen < min || chosen > max || this.bitmap.has(chosen)) {
      throw coreError("ALLOCATOR_FAILED", `allocator ${custom.name} returned ${chosen}, which is not a free IOASID in [${min}, ${max}]`);
    }
    return chosen;
  }

  private commitAlloc(set: SetRecord, ioasid: number, privateData: Uint8Array | undefined): Allocation {
    this.bitmap.take(ioasid);
    const generation = (this.gen[ioasid]! % 0xffffffff) + 1; // never 0: 0 means "unchecked"
    this.gen[ioasid] = generation;
    this.state[ioasid] = STATE_ACTIVE;
    this.setOf[ioasid] = set.id;
    this.refs[ioasid] = 1;
    this.linkMember(set, ioasid);
    if (privateData !== undefined) this.privateData.set(ioasid, privateData.slice());
    this.emit(EventType.ALLOC, ioasid, set, generation, 0, this.dataOf(ioasid), 1);
    return { ioasid, generation };
  }

  private freeResolved(ioasid: number, set: SetRecord): FreeResult {
    this.state[ioasid] = STATE_FREE_PENDING;
    const refcount = --this.refs[ioasid]!; // the allocation reference
    if (refcount === 0) {
      this.reclaim(ioasid);
      return RECLAIMED;
    }
    this.emit(EventType.FREE, ioasid, set, this.gen[ioasid]!, this.spidOf[ioasid]!, this.dataOf(ioasid), refcount);
    return { outcome: "FREE_PENDING", refcount };
  }

  private reclaim(ioasid: number): void {
    const set = this.sets.get(this.setOf[ioasid]!)!;
    const spid = this.spidOf[ioasid]!;
    const data = this.dataOf(ioasid);
    const generation = this.gen[ioasid]!;
    if (spid !== 0) set.spids.delete(spid);
    this.unlinkMember(set, ioasid);
    this.state[ioasid] = STATE_FREE;
    this.setOf[ioasid] = 0;
    this.spidOf[ioasid] = 0;
    // Sparse maps are usually empty: skip the hashing then (the allocator's hot path).
    if (this.holders.size !== 0) this.holders.delete(ioasid);
    if (data !== undefined) this.privateData.delete(ioasid);
    this.bitmap.release(ioasid);
    this.emit(EventType.RECLAIM, ioasid, set, generation, spid, data, 0);
    this.custom?.free(ioasid);
    if (set.freeing && set.size === 0) this.destroy(set);
  }

  private destroy(set: SetRecord): void {
    this.sets.delete(set.id);
    this.setsByToken.delete(tokenKey(set.token));
    this.available += set.quota; // Destroying a set returns its quota.
    this.emit(EventType.SET_FREE, INVALID_IOASID, set, 0, 0, undefined, 0);
    const regs = this.setRegs.get(set.id);
    this.setRegs.delete(set.id);
    this.recipientCache.clear();
    if (regs !== undefined) {
      for (const reg of regs) {
        reg.setId = 0;
        // An MM registration outlives its set: pending again until a set with the token returns.
        if (reg.scope.kind === "mm") this.addPending(reg);
        else this.registrations.delete(reg.id);
      }
    }
  }

  private dataOf(ioasid: number): Uint8Array | undefined {
    return this.privateData.size === 0 ? undefined : this.privateData.get(ioasid);
  }

  private linkMember(set: SetRecord, ioasid: number): void {
    this.next[ioasid] = set.head;
    this.prev[ioasid] = -1;
    if (set.head >= 0) this.prev[set.head] = ioasid;
    set.head = ioasid;
    set.size++;
  }

  private unlinkMember(set: SetRecord, ioasid: number): void {
    const p = this.prev[ioasid]!;
    const n = this.next[ioasid]!;
    if (p >= 0) this.next[p] = n;
    else set.head = n;
    if (n >= 0) this.prev[n] = p;
    set.size--;
  }

  private membersOf(set: SetRecord): number[] {
    const out: number[] = [];
    for (let id = set.head; id >= 0; id = this.next[id]!) out.push(id);
    return out;
  }

  private addRef(ioasid: number, key: string): number {
    let perHolder = this.holders.get(ioasid);
    if (perHolder === undefined) {
      perHolder = new Map();
      this.holders.set(ioasid, perHolder);
    }
    perHolder.set(key, (perHolder.get(key) ?? 0) + 1);
    return ++this.refs[ioasid]!;
  }

  private attachRegistration(reg: RegistrationRecord, setId: number): void {
    this.recipientCache.clear();
    reg.setId = setId;
    let regs = this.setRegs.get(setId);
    if (regs === undefined) {
      regs = new Set();
      this.setRegs.set(setId, regs);
    }
    regs.add(reg);
  }

  private addPending(reg: RegistrationRecord): void {
    if (reg.scope.kind !== "mm") return;
    let pending = this.pendingMm.get(reg.scope.token);
    if (pending === undefined) {
      pending = new Set();
      this.pendingMm.set(reg.scope.token, pending);
    }
    pending.add(reg);
  }

  private emit(type: EventType, ioasid: number, set: SetRecord, generation: number, spid: number, privateData: Uint8Array | undefined, refcount: number): void {
    const seq = ++this.seq;
    if (this.onEvent === undefined) return;
    this.onEvent({ seq, type, ioasid, generation, spid, setId: set.id, token: set.token, privateData, refcount });
  }

  /** Validates the ID, set, ownership and generation of a call that names an IOASID. */
  private resolve(setId: number, ioasid: number, generation: number): SetRecord {
    this.assertIoasid(ioasid, "ioasid");
    if (!Number.isInteger(generation) || generation < 0 || generation > 0xffffffff) {
      throw coreError("IOASID_OUT_OF_RANGE", `generation ${generation} is not a uint32`);
    }
    const set = this.requireSet(setId);
    if (this.state[ioasid] === STATE_FREE) throw coreError("IOASID_NOT_FOUND", `IOASID ${ioasid} is not allocated`);
    if (this.setOf[ioasid] !== set.id) {
      // Ownership: a guest can never reach another guest's IOASIDs (ioasid.rst "IOASID Set Level APIs").
      throw coreError("IOASID_NOT_IN_SET", `IOASID ${ioasid} does not belong to set ${setId}`);
    }
    if (generation !== 0 && generation !== this.gen[ioasid]) {
      throw coreError("STALE_GENERATION", `IOASID ${ioasid} is at generation ${this.gen[ioasid]}, the call names generation ${generation}`);
    }
    return set;
  }

  private refuseFreePending(ioasid: number): void {
    if (this.state[ioasid] === STATE_FREE_PENDING) {
      throw coreError("IOASID_FREE_PENDING", `IOASID ${ioasid} is being freed; no new reference can be taken`);
    }
  }

  /**
   * The set a call names. A set that does not exist is a bad argument (INVALID_ARGUMENT
   * `SET_UNKNOWN`, the kernel's -EINVAL for an invalid set), unlike a lookup that finds nothing
   * ({@link getSet}: NOT_FOUND `SET_NOT_FOUND`).
   */
  private requireSet(setId: number): SetRecord {
    const set = Number.isInteger(setId) ? this.sets.get(setId) : undefined;
    if (set === undefined) throw coreError("SET_UNKNOWN", `no IOASID set ${setId}`);
    return set;
  }

  private assertIoasid(value: number, what: string): void {
    if (!Number.isInteger(value) || value <= RID_PASID || value >= this.capacity) {
      throw coreError("IOASID_OUT_OF_RANGE", `${what} ${value} is outside 1..${this.capacity - 1} (PASID 0 is reserved)`);
    }
  }

  private assertSpid(spid: number): void {
    if (!Number.isInteger(spid) || spid <= 0 || spid > MAX_SPID) {
      throw coreError("SPID_OUT_OF_RANGE", `SPID ${spid} is outside 1..${MAX_SPID} (a 20-bit guest PASID, 0 reserved)`);
    }
  }

  private assertToken(token: SetToken | undefined): SetToken {
    if (token === undefined || (token.type !== TokenType.NONE && token.type !== TokenType.MM)) {
      throw coreError("TOKEN_TYPE_INVALID", `token type must be NONE or MM`);
    }
    if (typeof token.value !== "bigint" || token.value <= 0n || token.value > U64_MAX) {
      throw coreError("TOKEN_EMPTY", "a set token must be a non-zero u64");
    }
    return { type: token.type, value: token.value };
  }

  private assertQuotaValue(quota: number): void {
    if (!Number.isInteger(quota) || quota < 0 || quota > this.capacity - 1) {
      throw coreError("QUOTA_INVALID", `quota ${quota} is outside 0..${this.capacity - 1} (0: all available)`);
    }
  }

  private assertPrivateData(data: Uint8Array): void {
    if (!(data instanceof Uint8Array) || data.length > MAX_PRIVATE_DATA_BYTES) {
      throw coreError("PRIVATE_DATA_TOO_LARGE", `private data is ${data?.length} bytes; at most ${MAX_PRIVATE_DATA_BYTES} are accepted`);
    }
  }

  private assertEmptyForRegistration(set: SetRecord): void {
    if (set.size > 0) {
      throw coreError("SET_NOT_EMPTY", `set ${set.id} already has ${set.size} IOASIDs: register before the first allocation (no replay)`);
    }
  }

  private assertNoOutstanding(name: string): void {
    const outstanding = this.bitmap.size - 1;
    if (outstanding > 0) {
      throw coreError("ALLOCATOR_BUSY", `allocator ${name} has ${outstanding} outstanding IOASIDs`);
    }
  }

  private setInfo(set: SetRecord): SetInfo {
    return { id: set.id, token: set.token, quota: set.quota, inUse: set.size, freeing: set.freeing };
  }

  private info(ioasid: number): IoasidInfo {
    const holders: HolderCount[] = [];
    const active = this.state[ioasid] === STATE_ACTIVE;
    if (active) {
      holders.push({ holder: { role: OWNER_ROLE, instance: `set-${this.setOf[ioasid]}`, purpose: "allocation" }, count: 1 });
    }
    for (const [key, count] of this.holders.get(ioasid) ?? []) holders.push({ holder: fromHolderKey(key), count });
    const data = this.privateData.get(ioasid);
    return {
      ioasid,
      setId: this.setOf[ioasid]!,
      state: active ? IoasidState.ACTIVE : IoasidState.FREE_PENDING,
      generation: this.gen[ioasid]!,
      refcount: this.refs[ioasid]!,
      holders,
      spid: this.spidOf[ioasid]!,
      privateData: data === undefined ? undefined : data.slice(),
    };
  }
}

function tokenKey(token: SetToken): string {
  return `${token.type}:${token.value}`;
}

function registrationScopeKey(scope: RegistrationScope): string {
  return scope.kind === "global" ? "global" : scope.kind === "set" ? `set:${scope.setId}` : `mm:${scope.token}`;
}

function toRegistration(r: RegistrationRecord): Registration {
  return {
    id: r.id,
    subscriber: r.subscriber,
    priority: r.priority,
    scope: r.scope,
    events: r.events,
    active: r.scope.kind === "global" || r.setId !== 0,
    setId: r.setId,
  };
}
