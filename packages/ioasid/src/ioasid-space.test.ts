import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { DEFAULT_CAPACITY, EventType, INVALID_IOASID, MAX_PRIVATE_DATA_BYTES, Priority, RID_PASID, TokenType } from "./constants.js";
import { IoasidSpace, type CustomAllocator, type IoasidEvent } from "./ioasid-space.js";
import type { Holder } from "./holder.js";

const KVM: Holder = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
const VDCM: Holder = { role: "vdcm", instance: "idxd0", purpose: "wq0" };
const IOMMU: Holder = { role: "iommu", instance: "dmar0", purpose: "bind" };

function setup(capacity?: number) {
  const events: IoasidEvent[] = [];
  const space = new IoasidSpace({ ...(capacity === undefined ? {} : { capacity }), onEvent: (e) => events.push(e) });
  const vm = (n: number, quota = 8) => space.createSet({ token: { type: TokenType.MM, value: BigInt(n) }, quota });
  const types = () => events.map((e) => e.type);
  return { space, events, vm, types };
}

function expectError(fn: () => unknown, code: number, reason: string): DomainError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DomainError);
    const e = err as DomainError;
    expect({ code: e.code, reason: e.reason }).toEqual({ code, reason });
    return e;
  }
  throw new Error(`expected ${reason}, but the call succeeded`);
}

describe("IoasidSpace constants", () => {
  it("uses a 2^20 namespace with PASID 0 reserved and INVALID = 0xFFFFFFFF", () => {
    expect(DEFAULT_CAPACITY).toBe(1 << 20);
    expect(RID_PASID).toBe(0);
    expect(INVALID_IOASID).toBe(0xffffffff);
    expect(new IoasidSpace().stats().allocatable).toBe((1 << 20) - 1);
  });

  it("orders priorities CPU → DEVICE → IOMMU → LAST, higher number first", () => {
    expect([Priority.CPU, Priority.DEVICE, Priority.IOMMU, Priority.LAST]).toEqual([3, 2, 1, 0]);
  });
});

describe("IoasidSpace sets", () => {
  it("makes a token unique within its type, but not across types", () => {
    const { space } = setup(64);
    space.createSet({ token: { type: TokenType.MM, value: 5n }, quota: 4 });
    expectError(() => space.createSet({ token: { type: TokenType.MM, value: 5n }, quota: 4 }), Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    expect(space.createSet({ token: { type: TokenType.NONE, value: 5n }, quota: 4 }).id).toBe(2);
  });

  it("refuses an empty token or an unknown token type", () => {
    const { space } = setup(64);
    expectError(() => space.createSet({ token: { type: TokenType.MM, value: 0n } }), Code.INVALID_ARGUMENT, "TOKEN_EMPTY");
    expectError(() => space.createSet({ token: { type: "BOGUS" as TokenType, value: 1n } }), Code.INVALID_ARGUMENT, "TOKEN_TYPE_INVALID");
    expect(space.stats().sets).toBe(0);
  });

  it("never lets the sum of quotas exceed the allocatable capacity, and returns quota on destroy", () => {
    const { space, vm } = setup(64); // 63 allocatable
    const a = vm(1, 40);
    expectError(() => vm(2, 24), Code.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED");
    vm(2, 23);
    expect(space.stats().available).toBe(0);
    space.destroySet(a.id);
    expect(space.stats().available).toBe(40);
    expect(vm(3, 40).quota).toBe(40);
  });

  it("gives a quota-0 set all that is available", () => {
    const { space, vm } = setup(64);
    vm(1, 10);
    expect(vm(2, 0).quota).toBe(53);
    expectError(() => vm(3, 0), Code.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED");
    expect(space.stats().available).toBe(0);
  });

  it("refuses to adjust a quota below the number in use, and adjusts within what is available", () => {
    const { space, vm } = setup(64);
    const s = vm(1, 10);
    space.alloc(s.id);
    space.alloc(s.id);
    expectError(() => space.adjustSet(s.id, 1), Code.INVALID_ARGUMENT, "QUOTA_BELOW_USAGE");
    expect(space.adjustSet(s.id, 2).quota).toBe(2);
    expectError(() => space.adjustSet(s.id, 64), Code.INVALID_ARGUMENT, "QUOTA_INVALID");
    expect(space.adjustSet(s.id, 0).quota).toBe(63);
    expect(space.stats().available).toBe(0);
  });

  it("destroys a set only once empty", () => {
    const { space, vm } = setup(64);
    const s = vm(1, 4);
    const { ioasid } = space.alloc(s.id);
    expectError(() => space.destroySet(s.id), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    space.free(s.id, ioasid);
    space.destroySet(s.id);
    expectError(() => space.getSet(s.id), Code.NOT_FOUND, "SET_NOT_FOUND");
  });

  it("frees every IOASID of a set and destroys it when the last one is reclaimed", () => {
    const { space, vm, types } = setup(64);
    const s = vm(1, 8);
    const a = space.alloc(s.id).ioasid;
    const b = space.alloc(s.id).ioasid;
    space.get(s.id, b, KVM);
    const r = space.freeSet(s.id);
    expect(r).toEqual({ freed: 2, destroyed: false });
    expect(space.describe(a)).toBeUndefined(); // only the allocation reference: reclaimed at once
    expect(space.describe(b)?.state).toBe("FREE_PENDING");
    expectError(() => space.alloc(s.id), Code.FAILED_PRECONDITION, "SET_FREEING");
    expect(space.freeSet(s.id)).toEqual({ freed: 0, destroyed: false }); // idempotent
    space.put(s.id, b, KVM);
    expectError(() => space.getSet(s.id), Code.NOT_FOUND, "SET_NOT_FOUND");
    expect(types()).toEqual(["SET_ALLOC", "ALLOC", "ALLOC", "RECLAIM", "FREE", "RECLAIM", "SET_FREE"]);
    expect(space.stats().available).toBe(63);
  });
});

describe("IoasidSpace allocation", () => {
  it("never allocates PASID 0 and allocates the lowest free ID in [min, max]", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    expect(space.alloc(s.id).ioasid).toBe(1);
    expect(space.alloc(s.id, { min: 10, max: 12 }).ioasid).toBe(10);
    expect(space.alloc(s.id, { min: 10, max: 12 }).ioasid).toBe(11);
    expect(space.alloc(s.id, { min: 12, max: 12 }).ioasid).toBe(12);
    expectError(() => space.alloc(s.id, { min: 10, max: 12 }), Code.RESOURCE_EXHAUSTED, "IOASID_RANGE_EXHAUSTED");
  });

  it("refuses out-of-range bounds and min > max, changing nothing", () => {
    const { space, vm, events } = setup(64);
    const s = vm(1);
    const before = events.length;
    expectError(() => space.alloc(s.id, { min: 0, max: 5 }), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE");
    expectError(() => space.alloc(s.id, { min: 1, max: 64 }), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE");
    expectError(() => space.alloc(s.id, { min: 9, max: 5 }), Code.INVALID_ARGUMENT, "INVALID_RANGE");
    expectError(() => space.alloc(99), Code.INVALID_ARGUMENT, "SET_UNKNOWN");
    expect(events.length).toBe(before);
    expect(space.stats().inUse).toBe(0);
  });

  it("enforces the set quota, counting FREE_PENDING IOASIDs as in use", () => {
    const { space, vm } = setup(64);
    const s = vm(1, 2);
    const a = space.alloc(s.id).ioasid;
    space.alloc(s.id);
    expectError(() => space.alloc(s.id), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    space.get(s.id, a, KVM);
    space.free(s.id, a);
    expectError(() => space.alloc(s.id), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    space.put(s.id, a, KVM);
    expect(space.alloc(s.id).ioasid).toBe(a);
  });

  it("gives each reuse of an ID a new generation and refuses stale ones", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const first = space.alloc(s.id);
    space.free(s.id, first.ioasid, first.generation);
    const second = space.alloc(s.id);
    expect(second.ioasid).toBe(first.ioasid);
    expect(second.generation).toBe(first.generation + 1);
    // An unbind that arrives after free and re-allocation can never touch the new owner.
    expectError(() => space.free(s.id, second.ioasid, first.generation), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    expectError(() => space.get(s.id, second.ioasid, KVM, first.generation), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    expect(space.describe(second.ioasid)).toMatchObject({ state: "ACTIVE", refcount: 1 });
    space.get(s.id, second.ioasid, KVM, second.generation);
  });

  it("emits ALLOC with the set, token, generation and private data", () => {
    const { space, vm, events } = setup(64);
    const s = vm(7);
    const data = new Uint8Array([1, 2, 3]);
    const a = space.alloc(s.id, { privateData: data });
    expect(events.at(-1)).toMatchObject({
      type: "ALLOC",
      ioasid: a.ioasid,
      generation: a.generation,
      setId: s.id,
      token: { type: "MM", value: 7n },
      privateData: data,
      refcount: 1,
    });
  });
});

describe("IoasidSpace ownership", () => {
  it("refuses another set's IOASID with PERMISSION_DENIED and leaves it unchanged", () => {
    const { space, vm, events } = setup(64);
    const a = vm(1);
    const b = vm(2);
    const x = space.alloc(a.id).ioasid;
    space.attachSpid(a.id, x, 101);
    const before = events.length;
    const calls: Array<() => unknown> = [
      () => space.free(b.id, x),
      () => space.get(b.id, x, KVM),
      () => space.put(b.id, x, KVM),
      () => space.find(b.id, x),
      () => space.attachSpid(b.id, x, 5),
      () => space.detachSpid(b.id, x),
      () => space.attachData(b.id, x, new Uint8Array(1)),
      () => space.detachData(b.id, x),
    ];
    for (const call of calls) expectError(call, Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    expectError(() => space.findBySpid(b.id, 101), Code.NOT_FOUND, "SPID_NOT_FOUND");
    expect(events.length).toBe(before);
    expect(space.describe(x)).toMatchObject({ state: "ACTIVE", refcount: 1, spid: 101, setId: a.id });
  });
});

describe("IoasidSpace census", () => {
  it("counts each set's IOASIDs by state and the references by holder role, the allocation references as set-owner", () => {
    const { space, vm } = setup(64);
    const a = vm(1);
    const b = vm(2);
    const x = space.alloc(a.id).ioasid;
    const y = space.alloc(a.id).ioasid;
    space.alloc(b.id);
    space.get(a.id, x, KVM);
    space.get(a.id, x, VDCM);
    space.get(a.id, y, VDCM);
    // x freed with references outstanding: FREE_PENDING, its allocation reference gone.
    expect(space.free(a.id, x).outcome).toBe("FREE_PENDING");
    let census = space.census();
    expect(census.sets).toEqual([
      { setId: a.id, active: 1, freePending: 1 },
      { setId: b.id, active: 1, freePending: 0 },
    ]);
    expect(Object.fromEntries(census.referencesByRole)).toEqual({ "set-owner": 2, kvm: 1, vdcm: 2 });
    // The last reference released: reclaimed, and counted nowhere.
    space.put(a.id, x, KVM);
    space.put(a.id, x, VDCM);
    census = space.census();
    expect(census.sets[0]).toEqual({ setId: a.id, active: 1, freePending: 0 });
    expect(Object.fromEntries(census.referencesByRole)).toEqual({ "set-owner": 2, vdcm: 1 });
  });
});

describe("IoasidSpace references", () => {
  it("counts references per named holder", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    expect(space.get(s.id, x, KVM).refcount).toBe(2);
    expect(space.get(s.id, x, VDCM).refcount).toBe(3);
    expect(space.get(s.id, x, VDCM).refcount).toBe(4);
    const holders = space.describe(x)!.holders.map((h) => [`${h.holder.role}/${h.holder.instance}/${h.holder.purpose}`, h.count]);
    expect(holders).toEqual([
      ["set-owner/set-1/allocation", 1],
      ["kvm/vm-1/vmcs", 1],
      ["vdcm/idxd0/wq0", 2],
    ]);
  });

  it("refuses a put by a holder that holds none, and never goes negative", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.get(s.id, x, KVM);
    expectError(() => space.put(s.id, x, VDCM), Code.FAILED_PRECONDITION, "NO_REFERENCE_HELD");
    space.put(s.id, x, KVM);
    expectError(() => space.put(s.id, x, KVM), Code.FAILED_PRECONDITION, "NO_REFERENCE_HELD");
    expect(space.describe(x)!.refcount).toBe(1);
  });

  it("refuses invalid holders and the reserved owner role", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    expectError(() => space.get(s.id, x, { role: "", instance: "a", purpose: "b" }), Code.INVALID_ARGUMENT, "HOLDER_INVALID");
    expectError(() => space.get(s.id, x, { role: "kvm", instance: "a/b", purpose: "b" }), Code.INVALID_ARGUMENT, "HOLDER_INVALID");
    expectError(() => space.put(s.id, x, { role: "set-owner", instance: "set-1", purpose: "allocation" }), Code.INVALID_ARGUMENT, "HOLDER_INVALID");
    expect(space.describe(x)!.refcount).toBe(1);
  });

  it("quotes at most a short prefix of a 50 KB holder name in its refusal (DESIGN §8)", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    const huge = "k".repeat(50_000);
    const e = expectError(() => space.get(s.id, x, { role: huge, instance: "a", purpose: "b" }), Code.INVALID_ARGUMENT, "HOLDER_INVALID");
    expect(e.message).not.toContain("k".repeat(65));
    expect(e.message).toContain("50000 characters");
  });
});

describe("IoasidSpace free", () => {
  it("moves a referenced IOASID to FREE_PENDING and emits one FREE however often it is freed", () => {
    const { space, vm, types } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.get(s.id, x, KVM);
    expect(space.free(s.id, x)).toEqual({ outcome: "FREE_PENDING", refcount: 1 });
    expect(space.free(s.id, x)).toEqual({ outcome: "ALREADY_FREE_PENDING", refcount: 1 });
    expect(types().filter((t) => t === "FREE")).toHaveLength(1);
  });

  it("refuses every new reference in FREE_PENDING with IOASID_FREE_PENDING", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, x, 101);
    space.get(s.id, x, KVM);
    space.free(s.id, x);
    expectError(() => space.get(s.id, x, VDCM), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expectError(() => space.find(s.id, x), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expectError(() => space.findBySpid(s.id, 101, VDCM), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expectError(() => space.findBySpid(s.id, 101), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expectError(() => space.attachData(s.id, x, new Uint8Array(1)), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(space.describe(x)!.refcount).toBe(1);
  });

  it("reclaims when the last reference is dropped, and the ID is allocated again", () => {
    const { space, vm, types } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.get(s.id, x, KVM);
    space.get(s.id, x, IOMMU);
    space.free(s.id, x);
    expect(space.put(s.id, x, KVM)).toEqual({ refcount: 1, reclaimed: false });
    expect(space.describe(x)).toBeDefined();
    expect(space.put(s.id, x, IOMMU)).toEqual({ refcount: 0, reclaimed: true });
    expect(space.describe(x)).toBeUndefined();
    expectError(() => space.put(s.id, x, IOMMU), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    expect(space.alloc(s.id).ioasid).toBe(x);
    expect(types()).toEqual(["SET_ALLOC", "ALLOC", "FREE", "RECLAIM", "ALLOC"]);
  });

  it("reclaims at once with no FREE event when the allocation reference was the only one", () => {
    const { space, vm, types } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    expect(space.free(s.id, x)).toEqual({ outcome: "RECLAIMED", refcount: 0 });
    expect(types()).toEqual(["SET_ALLOC", "ALLOC", "RECLAIM"]);
    expect(space.stats().inUse).toBe(0);
  });

  it("refuses free of an ID that is not allocated", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    expectError(() => space.free(s.id, 5), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    expectError(() => space.free(s.id, 0), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE");
    expectError(() => space.free(s.id, 64), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE");
  });
});

describe("IoasidSpace SPIDs", () => {
  it("maps the same SPID in two sets to different IOASIDs (two VMs with guest PASID 101)", () => {
    const { space, vm } = setup(1024);
    const vm1 = vm(1);
    const vm2 = vm(2);
    const h1 = space.alloc(vm1.id, { min: 201 }).ioasid;
    const h2 = space.alloc(vm2.id, { min: 201 }).ioasid;
    space.attachSpid(vm1.id, h1, 101);
    space.attachSpid(vm2.id, h2, 101);
    expect([h1, h2]).toEqual([201, 202]);
    expect(space.findBySpid(vm1.id, 101).ioasid).toBe(201);
    expect(space.findBySpid(vm2.id, 101).ioasid).toBe(202);
  });

  it("refuses a duplicate SPID in one set and a second SPID on one IOASID", () => {
    const { space, vm, events } = setup(64);
    const s = vm(1);
    const a = space.alloc(s.id).ioasid;
    const b = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, a, 101);
    const before = events.length;
    expectError(() => space.attachSpid(s.id, b, 101), Code.INVALID_ARGUMENT, "SPID_IN_USE");
    expectError(() => space.attachSpid(s.id, a, 102), Code.FAILED_PRECONDITION, "SPID_ALREADY_ATTACHED");
    expectError(() => space.attachSpid(s.id, b, 0), Code.INVALID_ARGUMENT, "SPID_OUT_OF_RANGE");
    expect(events.length).toBe(before);
    expect(space.describe(b)!.spid).toBe(0);
  });

  it("emits BIND on attach and UNBIND carrying the SPID on detach", () => {
    const { space, vm, events } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, x, 101);
    expect(events.at(-1)).toMatchObject({ type: "BIND", ioasid: x, spid: 101 });
    expect(space.detachSpid(s.id, x)).toEqual({ spid: 101, unbindEmitted: true });
    expect(events.at(-1)).toMatchObject({ type: "UNBIND", ioasid: x, spid: 101 });
    expectError(() => space.detachSpid(s.id, x), Code.FAILED_PRECONDITION, "SPID_NOT_ATTACHED");
    expectError(() => space.findBySpid(s.id, 101), Code.NOT_FOUND, "SPID_NOT_FOUND");
  });

  it("emits no UNBIND when the IOASID is already FREE_PENDING: its FREE covers it", () => {
    const { space, vm, types, events } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, x, 101);
    space.get(s.id, x, IOMMU);
    space.free(s.id, x);
    expect(events.at(-1)).toMatchObject({ type: "FREE", spid: 101 });
    expect(space.detachSpid(s.id, x)).toEqual({ spid: 101, unbindEmitted: false });
    expect(types().filter((t) => t === "UNBIND")).toHaveLength(0);
  });

  it("takes a reference through find-by-SPID when a holder is named", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, x, 101);
    expect(space.findBySpid(s.id, 101).refcount).toBe(1);
    expect(space.findBySpid(s.id, 101, VDCM)).toMatchObject({ ioasid: x, refcount: 2 });
  });

  it("releases the SPID of a reclaimed IOASID", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, x, 101);
    space.free(s.id, x);
    const y = space.alloc(s.id).ioasid;
    space.attachSpid(s.id, y, 101);
    expect(space.findBySpid(s.id, 101).ioasid).toBe(y);
  });
});

describe("IoasidSpace private data", () => {
  it("attaches once until detached", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    space.attachData(s.id, x, new Uint8Array([1]));
    expectError(() => space.attachData(s.id, x, new Uint8Array([2])), Code.FAILED_PRECONDITION, "PRIVATE_DATA_ATTACHED");
    expect([...space.detachData(s.id, x)]).toEqual([1]);
    expectError(() => space.detachData(s.id, x), Code.FAILED_PRECONDITION, "PRIVATE_DATA_NOT_ATTACHED");
    space.attachData(s.id, x, new Uint8Array([2]));
    expect([...space.find(s.id, x).privateData!]).toEqual([2]);
  });

  it("refuses oversized private data", () => {
    const { space, vm } = setup(64);
    const s = vm(1);
    const big = new Uint8Array(MAX_PRIVATE_DATA_BYTES + 1);
    expectError(() => space.alloc(s.id, { privateData: big }), Code.INVALID_ARGUMENT, "PRIVATE_DATA_TOO_LARGE");
    const x = space.alloc(s.id).ioasid;
    expectError(() => space.attachData(s.id, x, big), Code.INVALID_ARGUMENT, "PRIVATE_DATA_TOO_LARGE");
    expect(space.stats().inUse).toBe(1);
  });
});

describe("IoasidSpace custom allocators", () => {
  function counting(name: string, start: number): CustomAllocator & { freed: number[] } {
    let next = start;
    const freed: number[] = [];
    return { name, freed, alloc: (min, max) => (next >= min && next <= max ? next++ : undefined), free: (id) => freed.push(id) };
  }

  it("takes precedence over the default allocator and is told of reclaims", () => {
    const { space, vm } = setup(1024);
    const s = vm(1);
    const vcmd = counting("vcmd", 500);
    space.registerAllocator(vcmd);
    expect(space.stats().allocator).toBe("vcmd");
    const x = space.alloc(s.id).ioasid;
    expect(x).toBe(500);
    space.free(s.id, x);
    expect(vcmd.freed).toEqual([500]);
  });

  it("refuses a switch while the allocator in force has outstanding IOASIDs", () => {
    const { space, vm } = setup(1024);
    const s = vm(1);
    const x = space.alloc(s.id).ioasid;
    expectError(() => space.registerAllocator(counting("vcmd", 500)), Code.FAILED_PRECONDITION, "ALLOCATOR_BUSY");
    space.free(s.id, x);
    space.registerAllocator(counting("vcmd", 500));
    expectError(() => space.registerAllocator(counting("other", 600)), Code.ALREADY_EXISTS, "ALLOCATOR_EXISTS");
    const y = space.alloc(s.id).ioasid;
    expectError(() => space.unregisterAllocator("vcmd"), Code.FAILED_PRECONDITION, "ALLOCATOR_BUSY");
    expectError(() => space.unregisterAllocator("nope"), Code.NOT_FOUND, "ALLOCATOR_NOT_FOUND");
    space.free(s.id, y);
    space.unregisterAllocator("vcmd");
    expect(space.alloc(s.id).ioasid).toBe(1);
  });

  it("refuses an ID the custom allocator should not have given, changing nothing", () => {
    const { space, vm } = setup(1024);
    const s = vm(1);
    space.registerAllocator({ name: "bad", alloc: () => 0, free: () => undefined });
    expectError(() => space.alloc(s.id), Code.UNAVAILABLE, "ALLOCATOR_FAILED");
    expect(space.stats().inUse).toBe(0);
  });
});

describe("IoasidSpace notifier registrations", () => {
  const kvm = { name: "kvm", instance: "vm-1" };
  const vdcm = { name: "vdcm", instance: "idxd0" };
  const iommu = { name: "iommu", instance: "dmar0" };

  it("keeps an MM registration pending until the set appears, and pending again after it goes", () => {
    const { space, vm } = setup(64);
    const reg = space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "mm", token: 9n } });
    expect(reg.active).toBe(false);
    const s = vm(9);
    expect(space.listRegistrations()[0]).toMatchObject({ active: true, setId: s.id });
    expect(space.recipients({ type: EventType.ALLOC, setId: s.id }).map((r) => r.id)).toEqual([reg.id]);
    space.destroySet(s.id);
    expect(space.listRegistrations()[0]).toMatchObject({ active: false, setId: 0 });
    const again = vm(9);
    expect(space.listRegistrations()[0]).toMatchObject({ active: true, setId: again.id });
  });

  it("refuses a registration on a set that already has IOASIDs", () => {
    const { space, vm } = setup(64);
    const s = vm(9);
    space.alloc(s.id);
    expectError(
      () => space.register({ subscriber: vdcm, priority: Priority.DEVICE, scope: { kind: "set", setId: s.id } }),
      Code.FAILED_PRECONDITION,
      "SET_NOT_EMPTY",
    );
    expectError(() => space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "mm", token: 9n } }), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    expect(space.listRegistrations()).toHaveLength(0);
  });

  it("refuses the same (scope, subscriber) twice", () => {
    const { space } = setup(64);
    space.register({ subscriber: iommu, priority: Priority.IOMMU, scope: { kind: "global" } });
    expectError(() => space.register({ subscriber: iommu, priority: Priority.IOMMU, scope: { kind: "global" } }), Code.ALREADY_EXISTS, "REGISTRATION_EXISTS");
    space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "mm", token: 3n } });
    expectError(
      () => space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "mm", token: 3n } }),
      Code.ALREADY_EXISTS,
      "REGISTRATION_EXISTS",
    );
  });

  it("delivers by scope, highest priority first", () => {
    const { space, vm } = setup(64);
    const s = vm(9);
    const other = vm(10);
    const gIommu = space.register({ subscriber: iommu, priority: Priority.IOMMU, scope: { kind: "global" } });
    const sVdcm = space.register({ subscriber: vdcm, priority: Priority.DEVICE, scope: { kind: "set", setId: s.id } });
    const mKvm = space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "mm", token: 9n } });
    const ids = (type: EventType, setId: number) => space.recipients({ type, setId }).map((r) => r.id);
    expect(ids(EventType.FREE, s.id)).toEqual([mKvm.id, sVdcm.id, gIommu.id]);
    expect(ids(EventType.FREE, other.id)).toEqual([gIommu.id]); // only the global chain
    expect(ids(EventType.BIND, s.id)).toEqual([mKvm.id, sVdcm.id]); // BIND is set scope only
    expect(ids(EventType.SET_ALLOC, s.id)).toEqual([gIommu.id]);
    expect(ids(EventType.RECLAIM, s.id)).toEqual([]);
  });

  it("answers recipients from a cache that every registration change invalidates", () => {
    const { space, vm } = setup(64);
    const s = vm(9);
    const ids = () => space.recipients({ type: EventType.FREE, setId: s.id }).map((r) => r.id);
    expect(ids()).toEqual([]);
    const g = space.register({ subscriber: iommu, priority: Priority.IOMMU, scope: { kind: "global" } });
    expect(ids()).toEqual([g.id]);
    const k = space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "set", setId: s.id } });
    expect(ids()).toEqual([k.id, g.id]);
    space.unregister(g.id);
    expect(ids()).toEqual([k.id]);
    const m = space.register({ subscriber: vdcm, priority: Priority.DEVICE, scope: { kind: "mm", token: 10n } });
    const t = vm(10);
    expect(space.recipients({ type: EventType.FREE, setId: t.id }).map((r) => r.id)).toEqual([m.id]);
    space.destroySet(t.id);
    expect(space.recipients({ type: EventType.FREE, setId: t.id })).toEqual([]);
  });

  it("filters by the event types a registration asks for, and refuses ones its scope never carries", () => {
    const { space, vm } = setup(64);
    const s = vm(9);
    const r = space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "set", setId: s.id }, events: [EventType.FREE] });
    expect(space.recipients({ type: EventType.FREE, setId: s.id }).map((x) => x.id)).toEqual([r.id]);
    expect(space.recipients({ type: EventType.BIND, setId: s.id })).toEqual([]);
    expectError(
      () => space.register({ subscriber: iommu, priority: Priority.IOMMU, scope: { kind: "global" }, events: [EventType.BIND] }),
      Code.INVALID_ARGUMENT,
      "EVENT_TYPE_INVALID",
    );
  });

  it("refuses invalid subscribers, priorities and scopes", () => {
    const { space } = setup(64);
    expectError(
      () => space.register({ subscriber: { name: "", instance: "x" }, priority: Priority.CPU, scope: { kind: "global" } }),
      Code.INVALID_ARGUMENT,
      "SUBSCRIBER_INVALID",
    );
    expectError(() => space.register({ subscriber: kvm, priority: 7 as Priority, scope: { kind: "global" } }), Code.INVALID_ARGUMENT, "PRIORITY_INVALID");
    expectError(() => space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "mm", token: 0n } }), Code.INVALID_ARGUMENT, "TOKEN_EMPTY");
    expectError(() => space.register({ subscriber: kvm, priority: Priority.CPU, scope: { kind: "set", setId: 77 } }), Code.INVALID_ARGUMENT, "SET_UNKNOWN");
    expectError(() => space.unregister(42), Code.NOT_FOUND, "REGISTRATION_NOT_FOUND");
  });
});

describe("IoasidSpace events", () => {
  it("numbers events 1, 2, 3 … and continues after a given last sequence", () => {
    const events: IoasidEvent[] = [];
    const space = new IoasidSpace({ capacity: 64, lastSeq: 41, onEvent: (e) => events.push(e) });
    const s = space.createSet({ token: { type: TokenType.NONE, value: 1n } });
    space.alloc(s.id);
    expect(events.map((e) => e.seq)).toEqual([42, 43]);
    expect(events[0]).toMatchObject({ type: "SET_ALLOC", ioasid: INVALID_IOASID, setId: s.id });
  });
});

describe("IoasidSpace batch allocation", () => {
  it("allocates a batch in ascending order with one ALLOC each", () => {
    const { space, vm, types } = setup(64);
    const s = vm(1, 10);
    space.alloc(s.id, { min: 3, max: 3 });
    expect(space.allocMany(s.id, 4).map((a) => a.ioasid)).toEqual([1, 2, 4, 5]);
    expect(types().filter((t) => t === "ALLOC")).toHaveLength(5);
  });

  it("is all or nothing: over quota or over the free IDs of the range, nothing is taken", () => {
    const { space, vm, events } = setup(64);
    const s = vm(1, 10);
    const before = events.length;
    expectError(() => space.allocMany(s.id, 11), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    expectError(() => space.allocMany(s.id, 5, { min: 1, max: 4 }), Code.RESOURCE_EXHAUSTED, "IOASID_RANGE_EXHAUSTED");
    expectError(() => space.allocMany(s.id, 0), Code.INVALID_ARGUMENT, "COUNT_INVALID");
    expect(events.length).toBe(before);
    expect(space.stats().inUse).toBe(0);
  });
});
