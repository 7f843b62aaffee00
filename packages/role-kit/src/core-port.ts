import { isDomainError } from "@ioasid/errors";
import type { Allocation, FreeResult, Holder, IoasidInfo, PutResult, RegisterOptions, Registration, SetInfo, SetToken } from "@ioasid/ioasid";

/**
 * The IOASID core as a role sees it (DESIGN §2, "one port to the core (one name, one shape,
 * domain-typed)"): the calls of drivers/iommu/ioasid.c a role makes, asynchronous, in the domain
 * model's types (`@ioasid/ioasid`), never in generated proto types. Failures are `DomainError`s
 * with the core's reasons (`CoreReason`), whatever the implementation.
 *
 * Two implementations: {@link createGrpcCorePort} (the core service over gRPC, what a running role
 * uses) and the testkit's `InProcessCore` (a real `IoasidSpace` in the test's process, for unit
 * tests). A test in `test/contract/core-port.test.ts` runs the same script through both.
 *
 * Arguments follow `IoasidSpace`: the set first (every call names its set: DESIGN §3
 * "Ownership"), then the IOASID, the holder, and the generation (0: not checked).
 */
export interface CorePort {
  /** ioasid_alloc_set(): a set with its token and quota (0: all that is available). */
  createSet(token: SetToken, quota: number): Promise<SetInfo>;
  /** A set by id. @throws NOT_FOUND `SET_NOT_FOUND` once it is destroyed */
  getSet(setId: number): Promise<SetInfo>;
  /** Every set. */
  listSets(): Promise<SetInfo[]>;
  /** Destroys an empty set. @throws FAILED_PRECONDITION `SET_NOT_EMPTY` */
  destroySet(setId: number): Promise<void>;
  /** Frees every IOASID of the set; the set is destroyed when its last IOASID is reclaimed. */
  freeSet(setId: number): Promise<{ readonly freed: number; readonly destroyed: boolean }>;
  /** ioasid_alloc() in the set, within [min, max] when given. */
  alloc(setId: number, options?: { readonly min?: number; readonly max?: number }): Promise<Allocation>;
  /** ioasid_free(): always succeeds on an IOASID of the set (ioasid.rst "Exception cases"). */
  free(setId: number, ioasid: number, generation?: number): Promise<FreeResult>;
  /** ioasid_find() without a reference. @throws NOT_FOUND `IOASID_FREE_PENDING` once freed */
  find(setId: number, ioasid: number, generation?: number): Promise<IoasidInfo>;
  /**
   * ioasid_find_by_spid(): the IOASID the set's SPID maps to, taking a reference for `holder`
   * when given (refused in FREE_PENDING).
   */
  findBySpid(setId: number, spid: number, holder?: Holder): Promise<Allocation & { readonly refcount: number }>;
  /** ioasid_get() for a named holder. @returns the count right after it */
  get(setId: number, ioasid: number, holder: Holder, generation?: number): Promise<{ readonly refcount: number }>;
  /** ioasid_put() by a named holder; the IOASID is reclaimed at zero. */
  put(setId: number, ioasid: number, holder: Holder, generation?: number): Promise<PutResult>;
  /** ioasid_attach_spid(): emits BIND. */
  attachSpid(setId: number, ioasid: number, spid: number, generation?: number): Promise<void>;
  /** ioasid_detach_spid(): emits UNBIND unless the IOASID is FREE_PENDING. */
  detachSpid(setId: number, ioasid: number, generation?: number): Promise<{ readonly spid: number; readonly unbindEmitted: boolean }>;
  /** An IOASID of any set, or undefined when it is not allocated (operators' and reconcile view). */
  describe(ioasid: number): Promise<IoasidInfo | undefined>;
  /** The IOASIDs of a set, ascending. */
  listIoasids(setId: number): Promise<IoasidInfo[]>;
  /** ioasid_register_notifier() (or _mm()): a registration, pending until its set exists. */
  register(options: RegisterOptions): Promise<Registration>;
  /** Withdraws a registration. */
  unregister(registrationId: number): Promise<void>;
  /** Every registration. */
  listRegistrations(): Promise<Registration[]>;
}

/** The names of {@link CorePort}'s calls (for failure injection and call logs in tests). */
export type CorePortCall = keyof CorePort;

/**
 * Registers a notifier subscriber with the core, or finds the registration it already has (a
 * restarted role): REGISTRATION_EXISTS is not an error here. The one found has the same subscriber
 * and scope.
 * @returns the registration
 * @throws the core's refusals (SET_NOT_EMPTY, SET_UNKNOWN…); REGISTRATION_EXISTS when the existing
 *   registration cannot be found any more
 */
export async function ensureRegistration(core: CorePort, options: RegisterOptions): Promise<Registration> {
  try {
    return await core.register(options);
  } catch (err) {
    if (!isDomainError(err, "REGISTRATION_EXISTS")) throw err;
    const found = (await core.listRegistrations()).find(
      (r) => r.subscriber.name === options.subscriber.name && r.subscriber.instance === options.subscriber.instance && sameScope(r.scope, options.scope),
    );
    if (found === undefined) throw err;
    return found;
  }
}

function sameScope(a: RegisterOptions["scope"], b: RegisterOptions["scope"]): boolean {
  if (a.kind === "global" || b.kind === "global") return a.kind === b.kind;
  if (a.kind === "set") return b.kind === "set" && a.setId === b.setId;
  return b.kind === "mm" && a.token === b.token;
}

/** The references one holder role/instance has on one IOASID, by purpose (see {@link heldReferences}). */
export interface HeldReference {
  readonly setId: number;
  readonly ioasid: number;
  readonly generation: number;
  readonly purpose: string;
  /** References of that purpose (a holder may take several). */
  readonly count: number;
}

/**
 * The references a holder role/instance (`vdcm`/`vdcm0`, `kvm`/`vm-7`) has on the IOASIDs of a
 * set, one entry per purpose and IOASID: what a role reconciles its tables against after a restart.
 * @throws DomainError INVALID_ARGUMENT `SET_UNKNOWN` when the set does not exist (as the core's ListIoasids)
 */
export async function heldReferences(core: CorePort, setId: number, holder: Pick<Holder, "role" | "instance">): Promise<HeldReference[]> {
  const out: HeldReference[] = [];
  for (const info of await core.listIoasids(setId)) {
    for (const h of info.holders) {
      if (h.holder.role === holder.role && h.holder.instance === holder.instance) {
        out.push({ setId: info.setId, ioasid: info.ioasid, generation: info.generation, purpose: h.holder.purpose, count: h.count });
      }
    }
  }
  return out;
}
