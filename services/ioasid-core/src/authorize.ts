import type { DomainError } from "@ioasid/errors";
import { Code, reasonError } from "@ioasid/errors";
import type { TokenType } from "@ioasid/ioasid";
import type { core } from "@ioasid/proto";
import { events } from "@ioasid/proto";
import { formatIdentity, Role, type RoleIdentity } from "@ioasid/security";

// The core authorizes each call by the caller's role (DESIGN §3 "Authority is a capability, not a
// name", §11): the caller is the identity of its client certificate (mTLS), never a name it puts in
// the request. Pure: the method, the decoded request, the caller and a read-only view of the state in,
// a decision out; the gRPC layer applies it before the handler runs, so a refused call changes nothing.

/** Why the core refused a caller (PERMISSION_DENIED), and the status each reason comes with. */
export const AuthorizationReason = {
  /** The caller's role may not make this call (or not on this kind of set). */
  ROLE_NOT_ALLOWED: Code.PERMISSION_DENIED,
  /** Get/Put/FindBySpid names a holder that is not the caller: a role takes and drops only its own references. */
  CALLER_NOT_HOLDER: Code.PERMISSION_DENIED,
  /** Register/Unregister names a subscriber that is not the caller: only role N registers as subscriber N. */
  CALLER_NOT_SUBSCRIBER: Code.PERMISSION_DENIED,
  /** The connection is authenticated but its certificate names no role identity. */
  CALLER_UNKNOWN: Code.UNAUTHENTICATED,
} as const satisfies Record<string, Code>;
export type AuthorizationReason = keyof typeof AuthorizationReason;

const denied = reasonError(AuthorizationReason);

/** The CoreService methods (camelCase, as in the generated definition). */
export type CoreMethod = keyof typeof core.CoreServiceService;

/** What the decision needs to know of the core's state (read-only, at the time of the call). */
export interface AuthorizationView {
  /** The token type of a set, or undefined when there is no such set (the handler then answers SET_UNKNOWN). */
  setTokenType(setId: number): TokenType | undefined;
  /** The subscriber of a registration, or undefined when there is none (the handler then answers NOT_FOUND). */
  subscriberOf(registrationId: number): { readonly name: string; readonly instance: string } | undefined;
}

/** An operator action the history must show (DESIGN §3: "force-release is the operator's, audited"). */
export const AuditKind = {
  /** An operator's Put of another holder's reference. */
  FORCE_RELEASE: "forceRelease",
  /** An operator's RegisterAllocator or UnregisterAllocator. */
  ALLOCATOR: "allocator",
} as const;
export type AuditKind = (typeof AuditKind)[keyof typeof AuditKind];

/** The call may go ahead; `audit` says which audit record its success must leave. */
export interface Authorization {
  readonly audit?: AuditKind;
}

const ALLOWED: Authorization = Object.freeze({});

/**
 * Roles whose holder and subscriber instance is the credential's own instance: an IOMMU holds as
 * `iommu/<IOMMU_INSTANCE>/…` and subscribes as `iommu/<IOMMU_INSTANCE>`, a VDCM likewise (their
 * configs say so). KVM is not one: one KVM process per host takes references and registers per VM
 * (`kvm/vm-7/vmcs`, subscriber `kvm/vm-7`, DESIGN §5 "KVM — per VM"), so the KVM credential
 * (`kvm/kvm0`) speaks for every `kvm/*` instance — and for no other role.
 */
export const INSTANCE_BOUND_ROLES: ReadonlySet<Role> = new Set([Role.IOMMU, Role.VDCM]);

/**
 * Who owns a set, by its token type: an MM set is a VM's, made and run by VFIO (the container);
 * a NONE set is a native-SVA mm's, made and run by the IOMMU (one PASID per mm, DESIGN §5 "Native
 * SVA": `createSet(NONE, 1)`, freed at mm release). Its owner allocates and frees in it.
 */
const SET_OWNER: Readonly<Record<TokenType, Role>> = { MM: Role.VFIO, NONE: Role.IOMMU };

/** The quota of the IOMMU's native-SVA set: one PASID per mm. */
const SVA_SET_QUOTA = 1;

/**
 * Decides whether `caller` may make the CoreService call `method` with `request`.
 *
 * - Read-only queries are open to every authenticated role but a VMM.
 * - VMMs reach only VFIO (DESIGN §11): every core call of a VMM is refused.
 * - Sets and quotas are VFIO's (MM sets) and the operator's; the IOMMU makes and frees its own
 *   native-SVA sets (NONE, quota 1). Alloc, Free and private data are the set owner's.
 * - Get/Put/FindBySpid with a holder: only as the caller's own holder role (and instance, for
 *   {@link INSTANCE_BOUND_ROLES}); an operator's Put of another holder is a force-release, audited.
 * - AttachSpid/DetachSpid are the IOMMU's (bind_gpasid attaches the guest PASID).
 * - Register/Unregister: only role N as subscriber N (and its instance, for INSTANCE_BOUND_ROLES).
 * - RegisterAllocator/UnregisterAllocator: the operator's, audited.
 *
 * @throws DomainError PERMISSION_DENIED with an {@link AuthorizationReason}; UNAUTHENTICATED
 *   `CALLER_UNKNOWN` without a caller identity.
 */
export function authorize(method: CoreMethod, request: unknown, caller: RoleIdentity | undefined, view: AuthorizationView): Authorization {
  if (caller === undefined)
    throw denied("CALLER_UNKNOWN", `${methodName(method)}: the client certificate names no role (spiffe://ioasid-fabric/<role>/<instance>)`);
  if (caller.role === Role.VMM) throw notAllowed(method, caller, "a VMM reaches only VFIO");
  switch (method) {
    case "getSet":
    case "listSets":
    case "find":
    case "describe":
    case "listIoasids":
    case "listRegistrations":
    case "getStats":
    case "watchEvents":
      return ALLOWED;

    case "createSet": {
      const r = request as core.CreateSetRequest;
      if (caller.role === Role.OPERATOR || caller.role === Role.VFIO) return ALLOWED;
      if (caller.role === Role.IOMMU && r.tokenType === events.TokenType.TOKEN_TYPE_NONE && r.quota === SVA_SET_QUOTA) return ALLOWED;
      throw notAllowed(method, caller, "sets are VFIO's and the operator's (the IOMMU's own: token NONE, quota 1)");
    }
    case "adjustSet":
      // Quotas are VFIO's and the operator's: the IOMMU's native-SVA sets keep their quota of 1.
      return ownerOrOperator(method, caller, (request as core.AdjustSetRequest).setId, view, [Role.VFIO]);
    case "destroySet":
    case "freeSet":
      return ownerOrOperator(method, caller, (request as { setId: number }).setId, view, [Role.VFIO, Role.IOMMU]);

    case "alloc":
    case "batchAlloc":
    case "free":
    case "attachData":
    case "detachData":
      return setOwner(method, caller, (request as { setId: number }).setId, view);

    case "attachSpid":
    case "detachSpid":
      if (caller.role === Role.IOMMU) return ALLOWED;
      throw notAllowed(method, caller, "guest PASIDs are attached by the IOMMU (bind_gpasid)");

    case "get":
      return ownHolder(method, caller, (request as core.GetRequest).holder);
    case "findBySpid": {
      const holder = (request as core.FindBySpidRequest).holder;
      // Without a holder it is a lookup; with one it takes a reference.
      return holder === undefined ? ALLOWED : ownHolder(method, caller, holder);
    }
    case "put": {
      const holder = (request as core.PutRequest).holder;
      // DESIGN §4.4: a dead holder's references stay until it reconciles "or an operator
      // force-releases with an audit record".
      if (caller.role === Role.OPERATOR && holder !== undefined && holder.role !== Role.OPERATOR) return { audit: AuditKind.FORCE_RELEASE };
      return ownHolder(method, caller, holder);
    }

    case "register": {
      const s = (request as core.RegisterRequest).subscriber;
      return ownSubscriber(method, caller, s === undefined ? undefined : { name: s.name, instance: s.instance });
    }
    case "unregister": {
      const s = view.subscriberOf((request as core.UnregisterRequest).registrationId);
      // No such registration: nothing to protect, the handler answers REGISTRATION_NOT_FOUND (to a
      // role that could register at all).
      if (s === undefined) {
        if (caller.role === Role.OPERATOR) throw notAllowed(method, caller, "registrations are their subscribers'");
        return ALLOWED;
      }
      return ownSubscriber(method, caller, s);
    }

    case "registerAllocator":
    case "unregisterAllocator":
      if (caller.role === Role.OPERATOR) return { audit: AuditKind.ALLOCATOR };
      throw notAllowed(method, caller, "custom allocators are the operator's");
  }
  // A method this table does not know (a newer core.proto): refused until it is decided.
  throw notAllowed(method, caller, "no rule for this method");
}

/** A set's owner role (by token type) may; an unknown set goes to the handler (SET_UNKNOWN) for an owner role. */
function setOwner(method: CoreMethod, caller: RoleIdentity, setId: number, view: AuthorizationView): Authorization {
  const type = view.setTokenType(setId);
  if (type === undefined) {
    if (Object.values(SET_OWNER).includes(caller.role)) return ALLOWED;
    throw notAllowed(method, caller, "IOASIDs are allocated and freed by their set's owner (VFIO, or the IOMMU for native SVA)");
  }
  if (SET_OWNER[type] === caller.role) return ALLOWED;
  throw notAllowed(method, caller, `set ${setId} (token ${type}) is ${SET_OWNER[type]}'s`);
}

/** Set and quota management: the operator, or one of `owners` on a set it owns. */
function ownerOrOperator(method: CoreMethod, caller: RoleIdentity, setId: number, view: AuthorizationView, owners: readonly Role[]): Authorization {
  if (caller.role === Role.OPERATOR) return ALLOWED;
  if (!owners.includes(caller.role)) throw notAllowed(method, caller, "sets and quotas are VFIO's and the operator's");
  return setOwner(method, caller, setId, view);
}

function ownHolder(method: CoreMethod, caller: RoleIdentity, holder: core.Holder | undefined): Authorization {
  // An empty holder is the model's to refuse (HOLDER_INVALID); it names nobody else.
  if (holder === undefined || (holder.role === "" && holder.instance === "")) return ALLOWED;
  if (holder.role === caller.role && (!INSTANCE_BOUND_ROLES.has(caller.role) || holder.instance === caller.instance)) return ALLOWED;
  throw denied(
    "CALLER_NOT_HOLDER",
    `${methodName(method)}: ${formatIdentity(caller)} may take and drop only its own references, not those of holder ${short(`${holder.role}/${holder.instance}`)}`,
  );
}

function ownSubscriber(method: CoreMethod, caller: RoleIdentity, subscriber: { readonly name: string; readonly instance: string } | undefined): Authorization {
  if (subscriber === undefined || (subscriber.name === "" && subscriber.instance === "")) return ALLOWED;
  if (subscriber.name === caller.role && (!INSTANCE_BOUND_ROLES.has(caller.role) || subscriber.instance === caller.instance)) return ALLOWED;
  throw denied(
    "CALLER_NOT_SUBSCRIBER",
    `${methodName(method)}: ${formatIdentity(caller)} may register only as itself, not as subscriber ${short(`${subscriber.name}/${subscriber.instance}`)}`,
  );
}

function notAllowed(method: CoreMethod, caller: RoleIdentity, why: string): DomainError {
  return denied("ROLE_NOT_ALLOWED", `${methodName(method)} is not allowed to ${formatIdentity(caller)}: ${why}`);
}

/** `CreateSet` from `createSet`. */
function methodName(method: CoreMethod): string {
  return method.charAt(0).toUpperCase() + method.slice(1);
}

/** At most a short prefix of a client's string in a message (DESIGN §8). */
function short(s: string): string {
  return JSON.stringify(s.length <= 64 ? s : `${s.slice(0, 64)}…`);
}
