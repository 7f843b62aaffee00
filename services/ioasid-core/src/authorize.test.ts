import { Code, isDomainError } from "@ioasid/errors";
import { core, errors, events } from "@ioasid/proto";
import { ROLES, type Role, type RoleIdentity } from "@ioasid/security";
import { describe, expect, it } from "vitest";
import { authorize, AuthorizationReason, type AuthorizationView, type CoreMethod } from "./authorize.js";

// Set 1 is a VM's (MM, VFIO's), set 2 a native-SVA mm's (NONE, the IOMMU's), set 9 does not exist.
// Registration 5 is kvm/vm-7's, 6 is iommu/dmar0's, 7 is vdcm/vdcm0's.
const view: AuthorizationView = {
  setTokenType: (setId) => (setId === 1 ? "MM" : setId === 2 ? "NONE" : undefined),
  subscriberOf: (id) =>
    id === 5 ? { name: "kvm", instance: "vm-7" } : id === 6 ? { name: "iommu", instance: "dmar0" } : id === 7 ? { name: "vdcm", instance: "vdcm0" } : undefined,
};

const callers: Readonly<Record<Role, RoleIdentity>> = {
  core: { role: "core", instance: "core" },
  iommu: { role: "iommu", instance: "dmar0" },
  kvm: { role: "kvm", instance: "kvm0" },
  vdcm: { role: "vdcm", instance: "vdcm0" },
  vfio: { role: "vfio", instance: "vfio0" },
  operator: { role: "operator", instance: "alice" },
  vmm: { role: "vmm", instance: "vm-7" },
};

type Expect = "allow" | "audit:forceRelease" | "audit:allocator" | keyof typeof AuthorizationReason;

/** One request of a method and what each role gets for it (roles not named: ROLE_NOT_ALLOWED). */
interface Row {
  readonly method: CoreMethod;
  readonly what: string;
  readonly request: unknown;
  readonly expect: Partial<Record<Role, Expect>>;
}

const holder = (role: string, instance: string, purpose = "p") => ({ role, instance, purpose });
const allButVmm = (e: Expect): Partial<Record<Role, Expect>> => Object.fromEntries(ROLES.filter((r) => r !== "vmm").map((r) => [r, e]));
const MM = events.TokenType.TOKEN_TYPE_MM;
const NONE = events.TokenType.TOKEN_TYPE_NONE;

const rows: Row[] = [
  // Read-only queries: any authenticated role but a VMM (VMMs reach only VFIO).
  { method: "getSet", what: "by id", request: core.GetSetRequest.fromPartial({ setId: 1 }), expect: allButVmm("allow") },
  { method: "listSets", what: "", request: {}, expect: allButVmm("allow") },
  { method: "find", what: "", request: core.FindRequest.fromPartial({ setId: 1, ioasid: 3 }), expect: allButVmm("allow") },
  { method: "describe", what: "", request: core.DescribeRequest.fromPartial({ ioasid: 3 }), expect: allButVmm("allow") },
  { method: "listIoasids", what: "", request: {}, expect: allButVmm("allow") },
  { method: "listRegistrations", what: "", request: {}, expect: allButVmm("allow") },
  { method: "getStats", what: "", request: {}, expect: allButVmm("allow") },
  { method: "watchEvents", what: "", request: {}, expect: allButVmm("allow") },
  {
    method: "findBySpid",
    what: "without a holder (a lookup)",
    request: core.FindBySpidRequest.fromPartial({ setId: 1, spid: 101 }),
    expect: allButVmm("allow"),
  },

  // Sets and quotas: VFIO's and the operator's; the IOMMU's own native-SVA sets (NONE, quota 1).
  {
    method: "createSet",
    what: "MM",
    request: core.CreateSetRequest.fromPartial({ tokenType: MM, token: 7n, quota: 8 }),
    expect: { vfio: "allow", operator: "allow" },
  },
  {
    method: "createSet",
    what: "NONE, quota 1 (native SVA)",
    request: core.CreateSetRequest.fromPartial({ tokenType: NONE, token: 7n, quota: 1 }),
    expect: { vfio: "allow", operator: "allow", iommu: "allow" },
  },
  {
    method: "createSet",
    what: "NONE, quota 0 (all)",
    request: core.CreateSetRequest.fromPartial({ tokenType: NONE, token: 7n, quota: 0 }),
    expect: { vfio: "allow", operator: "allow" },
  },
  {
    method: "adjustSet",
    what: "of a VM's set",
    request: core.AdjustSetRequest.fromPartial({ setId: 1, quota: 9 }),
    expect: { vfio: "allow", operator: "allow" },
  },
  { method: "adjustSet", what: "of an SVA set", request: core.AdjustSetRequest.fromPartial({ setId: 2, quota: 9 }), expect: { operator: "allow" } },
  { method: "destroySet", what: "of a VM's set", request: core.DestroySetRequest.fromPartial({ setId: 1 }), expect: { vfio: "allow", operator: "allow" } },
  { method: "destroySet", what: "of an SVA set", request: core.DestroySetRequest.fromPartial({ setId: 2 }), expect: { iommu: "allow", operator: "allow" } },
  {
    method: "destroySet",
    what: "of no set",
    request: core.DestroySetRequest.fromPartial({ setId: 9 }),
    expect: { iommu: "allow", vfio: "allow", operator: "allow" },
  },
  { method: "freeSet", what: "of a VM's set", request: core.FreeSetRequest.fromPartial({ setId: 1 }), expect: { vfio: "allow", operator: "allow" } },
  { method: "freeSet", what: "of an SVA set", request: core.FreeSetRequest.fromPartial({ setId: 2 }), expect: { iommu: "allow", operator: "allow" } },

  // IOASIDs and private data: the set's owner.
  { method: "alloc", what: "in a VM's set", request: core.AllocRequest.fromPartial({ setId: 1 }), expect: { vfio: "allow" } },
  { method: "alloc", what: "in an SVA set", request: core.AllocRequest.fromPartial({ setId: 2 }), expect: { iommu: "allow" } },
  { method: "alloc", what: "in no set", request: core.AllocRequest.fromPartial({ setId: 9 }), expect: { iommu: "allow", vfio: "allow" } },
  { method: "batchAlloc", what: "in a VM's set", request: core.BatchAllocRequest.fromPartial({ setId: 1, count: 2 }), expect: { vfio: "allow" } },
  { method: "free", what: "in a VM's set", request: core.FreeRequest.fromPartial({ setId: 1, ioasid: 3 }), expect: { vfio: "allow" } },
  { method: "free", what: "in an SVA set", request: core.FreeRequest.fromPartial({ setId: 2, ioasid: 3 }), expect: { iommu: "allow" } },
  { method: "attachData", what: "in a VM's set", request: core.AttachDataRequest.fromPartial({ setId: 1, ioasid: 3 }), expect: { vfio: "allow" } },
  { method: "detachData", what: "in an SVA set", request: core.DetachDataRequest.fromPartial({ setId: 2, ioasid: 3 }), expect: { iommu: "allow" } },

  // Guest PASIDs: the IOMMU's bind_gpasid.
  { method: "attachSpid", what: "", request: core.AttachSpidRequest.fromPartial({ setId: 1, ioasid: 3, spid: 101 }), expect: { iommu: "allow" } },
  { method: "detachSpid", what: "", request: core.DetachSpidRequest.fromPartial({ setId: 1, ioasid: 3 }), expect: { iommu: "allow" } },

  // References: only as the caller's own holder (instance too, but KVM speaks for its VMs).
  {
    method: "get",
    what: "as kvm/vm-7",
    request: core.GetRequest.fromPartial({ setId: 1, ioasid: 3, holder: holder("kvm", "vm-7") }),
    expect: {
      kvm: "allow",
      core: "CALLER_NOT_HOLDER",
      iommu: "CALLER_NOT_HOLDER",
      vdcm: "CALLER_NOT_HOLDER",
      vfio: "CALLER_NOT_HOLDER",
      operator: "CALLER_NOT_HOLDER",
    },
  },
  {
    method: "get",
    what: "as iommu/dmar0",
    request: core.GetRequest.fromPartial({ setId: 1, ioasid: 3, holder: holder("iommu", "dmar0") }),
    expect: {
      iommu: "allow",
      core: "CALLER_NOT_HOLDER",
      kvm: "CALLER_NOT_HOLDER",
      vdcm: "CALLER_NOT_HOLDER",
      vfio: "CALLER_NOT_HOLDER",
      operator: "CALLER_NOT_HOLDER",
    },
  },
  {
    method: "get",
    what: "as iommu/dmar1 (another IOMMU instance)",
    request: core.GetRequest.fromPartial({ setId: 1, ioasid: 3, holder: holder("iommu", "dmar1") }),
    expect: allButVmm("CALLER_NOT_HOLDER"),
  },
  {
    method: "put",
    what: "as vdcm/vdcm0",
    request: core.PutRequest.fromPartial({ setId: 1, ioasid: 3, holder: holder("vdcm", "vdcm0") }),
    expect: {
      vdcm: "allow",
      operator: "audit:forceRelease",
      core: "CALLER_NOT_HOLDER",
      kvm: "CALLER_NOT_HOLDER",
      iommu: "CALLER_NOT_HOLDER",
      vfio: "CALLER_NOT_HOLDER",
    },
  },
  {
    method: "put",
    what: "as kvm/vm-8 (another VM of the same KVM)",
    request: core.PutRequest.fromPartial({ setId: 1, ioasid: 3, holder: holder("kvm", "vm-8") }),
    expect: {
      kvm: "allow",
      operator: "audit:forceRelease",
      core: "CALLER_NOT_HOLDER",
      vdcm: "CALLER_NOT_HOLDER",
      iommu: "CALLER_NOT_HOLDER",
      vfio: "CALLER_NOT_HOLDER",
    },
  },
  {
    method: "findBySpid",
    what: "taking a reference as vdcm/vdcm0",
    request: core.FindBySpidRequest.fromPartial({ setId: 1, spid: 101, holder: holder("vdcm", "vdcm0") }),
    expect: {
      vdcm: "allow",
      core: "CALLER_NOT_HOLDER",
      kvm: "CALLER_NOT_HOLDER",
      iommu: "CALLER_NOT_HOLDER",
      vfio: "CALLER_NOT_HOLDER",
      operator: "CALLER_NOT_HOLDER",
    },
  },

  // Notifier registrations: only role N as subscriber N.
  {
    method: "register",
    what: "as kvm/vm-7",
    request: core.RegisterRequest.fromPartial({ subscriber: { name: "kvm", instance: "vm-7" }, scope: { $case: "mmToken", value: 7n } }),
    expect: {
      kvm: "allow",
      core: "CALLER_NOT_SUBSCRIBER",
      iommu: "CALLER_NOT_SUBSCRIBER",
      vdcm: "CALLER_NOT_SUBSCRIBER",
      vfio: "CALLER_NOT_SUBSCRIBER",
      operator: "CALLER_NOT_SUBSCRIBER",
    },
  },
  {
    method: "register",
    what: "as iommu/dmar0",
    request: core.RegisterRequest.fromPartial({ subscriber: { name: "iommu", instance: "dmar0" }, scope: { $case: "global", value: true } }),
    expect: {
      iommu: "allow",
      core: "CALLER_NOT_SUBSCRIBER",
      kvm: "CALLER_NOT_SUBSCRIBER",
      vdcm: "CALLER_NOT_SUBSCRIBER",
      vfio: "CALLER_NOT_SUBSCRIBER",
      operator: "CALLER_NOT_SUBSCRIBER",
    },
  },
  {
    method: "register",
    what: "as vdcm/vdcm1 (another VDCM instance)",
    request: core.RegisterRequest.fromPartial({ subscriber: { name: "vdcm", instance: "vdcm1" }, scope: { $case: "setId", value: 1 } }),
    expect: allButVmm("CALLER_NOT_SUBSCRIBER"),
  },
  {
    method: "unregister",
    what: "kvm/vm-7's registration",
    request: core.UnregisterRequest.fromPartial({ registrationId: 5 }),
    expect: {
      kvm: "allow",
      core: "CALLER_NOT_SUBSCRIBER",
      iommu: "CALLER_NOT_SUBSCRIBER",
      vdcm: "CALLER_NOT_SUBSCRIBER",
      vfio: "CALLER_NOT_SUBSCRIBER",
      operator: "CALLER_NOT_SUBSCRIBER",
    },
  },
  {
    method: "unregister",
    what: "vdcm/vdcm0's registration",
    request: core.UnregisterRequest.fromPartial({ registrationId: 7 }),
    expect: {
      vdcm: "allow",
      core: "CALLER_NOT_SUBSCRIBER",
      iommu: "CALLER_NOT_SUBSCRIBER",
      kvm: "CALLER_NOT_SUBSCRIBER",
      vfio: "CALLER_NOT_SUBSCRIBER",
      operator: "CALLER_NOT_SUBSCRIBER",
    },
  },
  {
    method: "unregister",
    what: "no registration (the handler answers NOT_FOUND)",
    request: core.UnregisterRequest.fromPartial({ registrationId: 99 }),
    expect: { core: "allow", kvm: "allow", iommu: "allow", vdcm: "allow", vfio: "allow" },
  },

  // Custom allocators: the operator's, audited.
  {
    method: "registerAllocator",
    what: "",
    request: core.RegisterAllocatorRequest.fromPartial({ name: "a", address: "127.0.0.1:1" }),
    expect: { operator: "audit:allocator" },
  },
  { method: "unregisterAllocator", what: "", request: core.UnregisterAllocatorRequest.fromPartial({ name: "a" }), expect: { operator: "audit:allocator" } },
];

function outcome(method: CoreMethod, request: unknown, caller: RoleIdentity | undefined): Expect | string {
  try {
    const a = authorize(method, request, caller, view);
    return a.audit === undefined ? "allow" : `audit:${a.audit}`;
  } catch (err) {
    if (!isDomainError(err)) throw err;
    if (err.reason !== "CALLER_UNKNOWN") expect(err.code).toBe(Code.PERMISSION_DENIED);
    return err.reason;
  }
}

describe("authorize (the core's authorization by the caller's role)", () => {
  for (const row of rows) {
    for (const role of ROLES) {
      const want = row.expect[role] ?? "ROLE_NOT_ALLOWED";
      it(`${row.method}${row.what === "" ? "" : ` ${row.what}`}: ${role} → ${want}`, () => {
        expect(outcome(row.method, row.request, callers[role])).toBe(want);
      });
    }
  }

  it("has rows for every CoreService RPC, each refused to someone", () => {
    const methods = Object.keys(core.CoreServiceService).sort();
    expect([...new Set(rows.map((r) => r.method))].sort()).toEqual(methods);
    for (const m of methods) {
      const refused = rows.filter((r) => r.method === m).some((r) => ROLES.some((role) => (r.expect[role] ?? "ROLE_NOT_ALLOWED") !== "allow"));
      expect(refused, `${m} is refused to nobody`).toBe(true);
    }
  });

  it("refuses only with reasons of errors.proto", () => {
    const listed = Object.keys(errors.ErrorReason).map((k) => k.replace(/^ERROR_REASON_/, ""));
    for (const reason of Object.keys(AuthorizationReason)) expect(listed, `errors.proto lacks ${reason}`).toContain(reason);
  });

  it("refuses a connection whose certificate names no role (UNAUTHENTICATED)", () => {
    expect(() => authorize("listSets", {}, undefined, view)).toThrow(expect.objectContaining({ code: Code.UNAUTHENTICATED, reason: "CALLER_UNKNOWN" }));
  });

  it("quotes at most a short prefix of a client's holder in its refusal", () => {
    const request = core.PutRequest.fromPartial({ setId: 1, ioasid: 3, holder: holder("kvm", "x".repeat(50_000)) });
    try {
      authorize("put", request, callers.vdcm, view);
      expect.unreachable();
    } catch (err) {
      expect((err as Error).message.length).toBeLessThan(300);
    }
  });
});
