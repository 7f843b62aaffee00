import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { core, errors, events } from "@ioasid/proto";
import { Code } from "@ioasid/errors";
import { CoreReason } from "@ioasid/ioasid";
import { startCore, expectRefused, type CoreFixture } from "../support/core-fixture.js";

// Every rule of DESIGN §3, through the real ioasid-core process over gRPC on loopback.

const { TokenType, Priority, EventType } = events;
const MM = TokenType.TOKEN_TYPE_MM;
const KVM = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
const VDCM = { role: "vdcm", instance: "idxd0", purpose: "wq0" };
const IOMMU = { role: "iommu", instance: "dmar0", purpose: "bind" };

let big: CoreFixture; // default 2^20 namespace
let small: CoreFixture; // 64 IDs, for exhaustion
let nextToken = 1000n;

beforeAll(async () => {
  [big, small] = await Promise.all([startCore(), startCore({ IOASID_CAPACITY: "64" })]);
});
afterAll(async () => {
  const codes = await Promise.all([big?.stop(), small?.stop()]);
  // Graceful shutdown on SIGTERM exits 0.
  expect(codes).toEqual([0, 0]);
});

type Client = CoreFixture["client"];

async function newSet(c: Client, quota = 16, token = nextToken++): Promise<number> {
  const r = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: MM, token, quota }));
  return r.set!.setId;
}

async function alloc(c: Client, setId: number, min = 0, max = 0): Promise<{ ioasid: number; generation: number }> {
  return c.alloc(core.AllocRequest.fromPartial({ setId, min, max }));
}

/** Reads the committed events of the given IOASIDs from `fromSeq` up to the newest one. */
async function eventsOf(c: Client, fromSeq: bigint, ids?: number[]): Promise<events.IoasidEvent[]> {
  const last = (await c.getStats({})).lastSeq;
  const out: events.IoasidEvent[] = [];
  if (last < fromSeq) return out;
  const ac = new AbortController();
  for await (const m of c.watchEvents({ fromSeq, types: [] }, { signal: ac.signal, deadlineMs: 5000 })) {
    out.push(m.event!);
    if (m.event!.seq >= last) break;
  }
  ac.abort();
  return ids === undefined ? out : out.filter((e) => ids.includes(e.ioasid));
}

const typeName = (e: events.IoasidEvent) => events.eventTypeToJSON(e.type).replace("EVENT_TYPE_", "");

async function snapshot(c: Client) {
  const [sets, ioasids, stats, regs] = await Promise.all([c.listSets({}), c.listIoasids({ setId: 0 }), c.getStats({}), c.listRegistrations({})]);
  return { sets, ioasids, stats, regs };
}

describe("ioasid-core over gRPC: sets and quotas", () => {
  it("never lets quotas exceed capacity, and returns a destroyed set's quota", async () => {
    const c = small.client;
    const before = await c.getStats({});
    expect(before.allocatable).toBe(63);
    const a = await newSet(c, 40);
    await expectRefused(newSet(c, 24), Code.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED");
    await c.destroySet({ setId: a });
    expect((await c.getStats({})).available).toBe(before.available);
    const b = await newSet(c, 40);
    await c.destroySet({ setId: b });
  });

  it("refuses allocation past the set's quota (RESOURCE_EXHAUSTED) and accepts it again after a free", async () => {
    const c = big.client;
    const s = await newSet(c, 2);
    const x = await alloc(c, s);
    await alloc(c, s);
    await expectRefused(alloc(c, s), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    expect((await alloc(c, s)).ioasid).toBe(x.ioasid);
  });

  it("makes tokens unique within their type", async () => {
    const c = big.client;
    const token = nextToken++;
    await newSet(c, 1, token);
    await expectRefused(newSet(c, 1, token), Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    const none = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: TokenType.TOKEN_TYPE_NONE, token, quota: 1 }));
    expect(none.set!.tokenType).toBe(TokenType.TOKEN_TYPE_NONE);
    const found = await c.getSet(core.GetSetRequest.fromPartial({ tokenType: MM, token }));
    expect(found.set!.token).toBe(token);
  });

  it("frees a whole set (the crashed-guest path) and destroys it when the last IOASID is reclaimed", async () => {
    const c = big.client;
    const s = await newSet(c, 8);
    const a = await alloc(c, s);
    const b = await alloc(c, s);
    await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: b.ioasid, holder: KVM }));
    expect(await c.freeSet({ setId: s })).toEqual({ freed: 2, destroyed: false });
    await expectRefused(c.describe({ ioasid: a.ioasid }), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    await expectRefused(alloc(c, s), Code.FAILED_PRECONDITION, "SET_FREEING");
    expect((await c.put(core.PutRequest.fromPartial({ setId: s, ioasid: b.ioasid, holder: KVM }))).reclaimed).toBe(true);
    await expectRefused(c.getSet({ setId: s, tokenType: 0, token: 0n }), Code.NOT_FOUND, "SET_NOT_FOUND");
  });
});

describe("ioasid-core over gRPC: allocation", () => {
  it("never allocates PASID 0, even with the whole namespace in use", async () => {
    const c = small.client;
    const s = await newSet(c, 0); // all that is available
    const { allocations } = await c.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: s, count: 63 }));
    const ids = allocations.map((a) => a.ioasid);
    expect(ids).not.toContain(0);
    expect(new Set(ids).size).toBe(63);
    expect(Math.min(...ids)).toBe(1);
    expect(Math.max(...ids)).toBe(63);
    await expectRefused(c.describe({ ioasid: 0 }), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE");
    await c.freeSet({ setId: s });
    expect((await c.getStats({})).inUse).toBe(0);
  });

  it("allocates the lowest free IOASID within [min, max]", async () => {
    const c = big.client;
    const s = await newSet(c);
    const a = await alloc(c, s, 500_000, 500_002);
    const b = await alloc(c, s, 500_000, 500_002);
    expect([a.ioasid, b.ioasid]).toEqual([500_000, 500_001]);
  });

  it("refuses a stale generation: a late call can never touch the next owner", async () => {
    const c = big.client;
    const s = await newSet(c);
    const first = await alloc(c, s, 700_000, 700_000);
    await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: first.ioasid, generation: first.generation }));
    const second = await alloc(c, s, 700_000, 700_000);
    expect(second).toEqual({ ioasid: first.ioasid, generation: first.generation + 1 });
    await expectRefused(
      c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: first.ioasid, generation: first.generation })),
      Code.FAILED_PRECONDITION,
      "STALE_GENERATION",
    );
    const info = await c.find(core.FindRequest.fromPartial({ setId: s, ioasid: second.ioasid, generation: second.generation }));
    expect(info.info!.state).toBe(core.IoasidState.IOASID_STATE_ACTIVE);
  });
});

describe("ioasid-core over gRPC: ownership", () => {
  it("refuses another set's IOASID with PERMISSION_DENIED and leaves it unchanged", async () => {
    const c = big.client;
    const vm1 = await newSet(c);
    const vm2 = await newSet(c);
    const x = await alloc(c, vm1);
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: vm1, ioasid: x.ioasid, spid: 101 }));
    const fromSeq = (await c.getStats({})).lastSeq + 1n;
    const before = await c.describe({ ioasid: x.ioasid });
    const attempts = [
      c.free(core.FreeRequest.fromPartial({ setId: vm2, ioasid: x.ioasid })),
      c.get(core.GetRequest.fromPartial({ setId: vm2, ioasid: x.ioasid, holder: KVM })),
      c.put(core.PutRequest.fromPartial({ setId: vm2, ioasid: x.ioasid, holder: KVM })),
      c.find(core.FindRequest.fromPartial({ setId: vm2, ioasid: x.ioasid })),
      c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: vm2, ioasid: x.ioasid, spid: 7 })),
      c.detachSpid(core.DetachSpidRequest.fromPartial({ setId: vm2, ioasid: x.ioasid })),
      c.attachData(core.AttachDataRequest.fromPartial({ setId: vm2, ioasid: x.ioasid, data: Buffer.from([1]) })),
      c.detachData(core.DetachDataRequest.fromPartial({ setId: vm2, ioasid: x.ioasid })),
    ];
    for (const attempt of attempts) await expectRefused(attempt, Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await expectRefused(c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: vm2, spid: 101 })), Code.NOT_FOUND, "SPID_NOT_FOUND");
    expect(await c.describe({ ioasid: x.ioasid })).toEqual(before);
    expect(await eventsOf(c, fromSeq, [x.ioasid])).toEqual([]);
  });
});

describe("ioasid-core over gRPC: references, free and reclaim", () => {
  it("counts references per named holder and refuses a put by a holder that holds none", async () => {
    const c = big.client;
    const s = await newSet(c);
    const x = await alloc(c, s);
    await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: KVM }));
    await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: VDCM }));
    const info = (await c.describe({ ioasid: x.ioasid })).info!;
    expect(info.refcount).toBe(3);
    expect(info.holders.map((h) => `${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}:${h.count}`)).toEqual([
      "set-owner/set-" + s + "/allocation:1",
      "kvm/vm-1/vmcs:1",
      "vdcm/idxd0/wq0:1",
    ]);
    await expectRefused(c.put(core.PutRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: IOMMU })), Code.FAILED_PRECONDITION, "NO_REFERENCE_HELD");
    expect((await c.describe({ ioasid: x.ioasid })).info!.refcount).toBe(3);
  });

  it("emits one FREE for two frees, refuses get after free with IOASID_FREE_PENDING, reclaims at the last put", async () => {
    const c = big.client;
    const s = await newSet(c);
    const fromSeq = (await c.getStats({})).lastSeq + 1n;
    const x = await alloc(c, s);
    await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: KVM }));
    const f1 = await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    const f2 = await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    expect(f1).toEqual({ outcome: core.FreeOutcome.FREE_OUTCOME_FREE_PENDING, refcount: 1 });
    expect(f2).toEqual({ outcome: core.FreeOutcome.FREE_OUTCOME_ALREADY_FREE_PENDING, refcount: 1 });
    await expectRefused(c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: VDCM })), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    await expectRefused(c.find(core.FindRequest.fromPartial({ setId: s, ioasid: x.ioasid })), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(await c.put(core.PutRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: KVM }))).toEqual({ refcount: 0, reclaimed: true });
    const evs = await eventsOf(c, fromSeq, [x.ioasid]);
    expect(evs.map(typeName)).toEqual(["ALLOC", "FREE", "RECLAIM"]);
    expect(evs[1]).toMatchObject({ setId: s, generation: x.generation, refcount: 1, tokenType: MM });
  });

  it("reclaims at once with no FREE event when the allocation reference was the last", async () => {
    const c = big.client;
    const s = await newSet(c);
    const fromSeq = (await c.getStats({})).lastSeq + 1n;
    const x = await alloc(c, s);
    expect(await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }))).toEqual({
      outcome: core.FreeOutcome.FREE_OUTCOME_RECLAIMED,
      refcount: 0,
    });
    expect((await eventsOf(c, fromSeq, [x.ioasid])).map(typeName)).toEqual(["ALLOC", "RECLAIM"]);
    await expectRefused(c.describe({ ioasid: x.ioasid }), Code.NOT_FOUND, "IOASID_NOT_FOUND");
  });
});

describe("ioasid-core over gRPC: SPIDs and private data", () => {
  it("maps guest PASID 101 of two VMs to different host IOASIDs (201 and 202)", async () => {
    const c = big.client;
    const vm1 = await newSet(c);
    const vm2 = await newSet(c);
    const h1 = await alloc(c, vm1, 201, 300);
    const h2 = await alloc(c, vm2, 201, 300);
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: vm1, ioasid: h1.ioasid, spid: 101 }));
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: vm2, ioasid: h2.ioasid, spid: 101 }));
    expect([h1.ioasid, h2.ioasid]).toEqual([201, 202]);
    expect((await c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: vm1, spid: 101 }))).ioasid).toBe(201);
    expect((await c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: vm2, spid: 101 }))).ioasid).toBe(202);
  });

  it("refuses a duplicate SPID in one set with INVALID_ARGUMENT", async () => {
    const c = big.client;
    const s = await newSet(c);
    const a = await alloc(c, s);
    const b = await alloc(c, s);
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: a.ioasid, spid: 101 }));
    await expectRefused(c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: b.ioasid, spid: 101 })), Code.INVALID_ARGUMENT, "SPID_IN_USE");
    expect((await c.describe({ ioasid: b.ioasid })).info!.spid).toBe(0);
  });

  it("emits BIND and UNBIND, but no UNBIND once the IOASID is FREE_PENDING", async () => {
    const c = big.client;
    const s = await newSet(c);
    const fromSeq = (await c.getStats({})).lastSeq + 1n;
    const x = await alloc(c, s);
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid, spid: 5 }));
    expect(await c.detachSpid(core.DetachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid }))).toEqual({ spid: 5, unbindEmitted: true });
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid, spid: 6 }));
    await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: IOMMU }));
    await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    expect(await c.detachSpid(core.DetachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid }))).toEqual({ spid: 6, unbindEmitted: false });
    const evs = await eventsOf(c, fromSeq, [x.ioasid]);
    expect(evs.map((e) => `${typeName(e)}:${e.spid}`)).toEqual(["ALLOC:0", "BIND:5", "UNBIND:5", "BIND:6", "FREE:6"]);
  });

  it("finds by SPID taking a reference for a named holder, refused once FREE_PENDING", async () => {
    const c = big.client;
    const s = await newSet(c);
    const x = await alloc(c, s);
    await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid, spid: 9 }));
    const r = await c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: s, spid: 9, holder: VDCM }));
    expect(r).toEqual({ ioasid: x.ioasid, generation: x.generation, refcount: 2 });
    await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    await expectRefused(c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: s, spid: 9, holder: KVM })), Code.NOT_FOUND, "IOASID_FREE_PENDING");
  });

  it("attaches private data once until detached, and carries it in events", async () => {
    const c = big.client;
    const s = await newSet(c);
    const fromSeq = (await c.getStats({})).lastSeq + 1n;
    const x = await c.alloc(core.AllocRequest.fromPartial({ setId: s, privateData: Buffer.from("vm-1:gpasid") }));
    await expectRefused(
      c.attachData(core.AttachDataRequest.fromPartial({ setId: s, ioasid: x.ioasid, data: Buffer.from("x") })),
      Code.FAILED_PRECONDITION,
      "PRIVATE_DATA_ATTACHED",
    );
    expect(Buffer.from((await c.detachData(core.DetachDataRequest.fromPartial({ setId: s, ioasid: x.ioasid }))).data).toString()).toBe("vm-1:gpasid");
    await c.attachData(core.AttachDataRequest.fromPartial({ setId: s, ioasid: x.ioasid, data: Buffer.from("two") }));
    expect(Buffer.from((await c.find(core.FindRequest.fromPartial({ setId: s, ioasid: x.ioasid }))).info!.privateData).toString()).toBe("two");
    const [allocEvent] = await eventsOf(c, fromSeq, [x.ioasid]);
    expect(Buffer.from(allocEvent!.privateData).toString()).toBe("vm-1:gpasid");
  });
});

describe("ioasid-core over gRPC: notifier registrations", () => {
  it("keeps an MM registration pending until VFIO creates the set, then activates it", async () => {
    const c = big.client;
    const token = nextToken++;
    const reg = await c.register(
      core.RegisterRequest.fromPartial({
        subscriber: { name: "kvm", instance: `vm-${token}` },
        priority: Priority.PRIORITY_CPU,
        scope: { $case: "mmToken", value: token },
      }),
    );
    expect(reg.registration).toMatchObject({ active: false, activeSetId: 0, priority: Priority.PRIORITY_CPU });
    const s = await newSet(c, 4, token);
    const now = (await c.listRegistrations({})).registrations.find((r) => r.registrationId === reg.registration!.registrationId);
    expect(now).toMatchObject({ active: true, activeSetId: s });
    await c.destroySet({ setId: s });
    const after = (await c.listRegistrations({})).registrations.find((r) => r.registrationId === reg.registration!.registrationId);
    expect(after).toMatchObject({ active: false, activeSetId: 0 });
  });

  it("refuses a registration on a set that already has IOASIDs, and duplicates", async () => {
    const c = big.client;
    const s = await newSet(c);
    const sub = { name: "vdcm", instance: `idxd-${s}` };
    await c.register(core.RegisterRequest.fromPartial({ subscriber: sub, priority: Priority.PRIORITY_DEVICE, scope: { $case: "setId", value: s } }));
    await expectRefused(
      c.register(core.RegisterRequest.fromPartial({ subscriber: sub, priority: Priority.PRIORITY_DEVICE, scope: { $case: "setId", value: s } })),
      Code.ALREADY_EXISTS,
      "REGISTRATION_EXISTS",
    );
    await alloc(c, s);
    await expectRefused(
      c.register(
        core.RegisterRequest.fromPartial({
          subscriber: { name: "kvm", instance: "late" },
          priority: Priority.PRIORITY_CPU,
          scope: { $case: "setId", value: s },
        }),
      ),
      Code.FAILED_PRECONDITION,
      "SET_NOT_EMPTY",
    );
  });
});

describe("ioasid-core over gRPC: invalid input", () => {
  it("refuses out-of-range IDs, min > max, an unknown set, an empty token and oversized private data, changing nothing", async () => {
    const c = big.client;
    const s = await newSet(c);
    const x = await alloc(c, s);
    const before = await snapshot(c);
    const cases: Array<[Promise<unknown>, string]> = [
      [alloc(c, s, 1, 1 << 20), "IOASID_OUT_OF_RANGE"],
      [c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: 0xffffffff })), "IOASID_OUT_OF_RANGE"],
      [c.get(core.GetRequest.fromPartial({ setId: s, ioasid: 0, holder: KVM })), "IOASID_OUT_OF_RANGE"],
      [alloc(c, s, 300, 200), "INVALID_RANGE"],
      [alloc(c, 999_999), "SET_UNKNOWN"],
      [c.free(core.FreeRequest.fromPartial({ setId: 999_999, ioasid: x.ioasid })), "SET_UNKNOWN"],
      [c.createSet(core.CreateSetRequest.fromPartial({ tokenType: MM, token: 0n, quota: 1 })), "TOKEN_EMPTY"],
      [c.createSet(core.CreateSetRequest.fromPartial({ tokenType: TokenType.TOKEN_TYPE_UNSPECIFIED, token: 5n, quota: 1 })), "TOKEN_TYPE_INVALID"],
      [c.alloc(core.AllocRequest.fromPartial({ setId: s, privateData: Buffer.alloc(1025) })), "PRIVATE_DATA_TOO_LARGE"],
      [c.attachData(core.AttachDataRequest.fromPartial({ setId: s, ioasid: x.ioasid, data: Buffer.alloc(4096) })), "PRIVATE_DATA_TOO_LARGE"],
      [c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid, spid: 1 << 20 })), "SPID_OUT_OF_RANGE"],
      [c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid })), "HOLDER_INVALID"],
      [c.createSet(core.CreateSetRequest.fromPartial({ tokenType: MM, token: nextToken++, quota: 1 << 20 })), "QUOTA_INVALID"],
    ];
    for (const [call, reason] of cases) await expectRefused(call, Code.INVALID_ARGUMENT, reason);
    expect(await snapshot(c)).toEqual(before);
  });
});

describe("ioasid-core over gRPC: error reasons", () => {
  // Each reason the core can return, reached through a scenario of its own, with its status code.
  type Scenario = (c: Client) => Promise<unknown>;
  const scenarios: Record<string, Scenario> = {
    IOASID_OUT_OF_RANGE: async (c) => alloc(c, await newSet(c), 0, 1 << 21),
    INVALID_RANGE: async (c) => alloc(c, await newSet(c), 9, 8),
    SPID_OUT_OF_RANGE: async (c) => c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: await newSet(c), spid: 0 })),
    SPID_IN_USE: async (c) => {
      const s = await newSet(c);
      const [a, b] = [await alloc(c, s), await alloc(c, s)];
      await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: a.ioasid, spid: 3 }));
      return c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: b.ioasid, spid: 3 }));
    },
    TOKEN_EMPTY: (c) => c.createSet(core.CreateSetRequest.fromPartial({ tokenType: MM, token: 0n })),
    TOKEN_TYPE_INVALID: (c) => c.createSet(core.CreateSetRequest.fromPartial({ tokenType: 9 as events.TokenType, token: 1n })),
    PRIVATE_DATA_TOO_LARGE: async (c) => c.alloc(core.AllocRequest.fromPartial({ setId: await newSet(c), privateData: Buffer.alloc(2000) })),
    QUOTA_BELOW_USAGE: async (c) => {
      const s = await newSet(c, 4);
      await alloc(c, s);
      await alloc(c, s);
      return c.adjustSet({ setId: s, quota: 1 });
    },
    QUOTA_INVALID: async (c) => c.adjustSet({ setId: await newSet(c), quota: 1 << 20 }),
    HOLDER_INVALID: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      return c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: { role: "set-owner", instance: "x", purpose: "y" } }));
    },
    SUBSCRIBER_INVALID: (c) => c.register(core.RegisterRequest.fromPartial({ priority: Priority.PRIORITY_CPU, scope: { $case: "global", value: true } })),
    PRIORITY_INVALID: (c) =>
      c.register(core.RegisterRequest.fromPartial({ subscriber: { name: "x", instance: "y" }, scope: { $case: "global", value: true } })),
    SCOPE_INVALID: (c) => c.register(core.RegisterRequest.fromPartial({ subscriber: { name: "x", instance: "y" }, priority: Priority.PRIORITY_CPU })),
    EVENT_TYPE_INVALID: (c) =>
      c.register(
        core.RegisterRequest.fromPartial({
          subscriber: { name: "iommu", instance: "evt" },
          priority: Priority.PRIORITY_IOMMU,
          scope: { $case: "global", value: true },
          events: [EventType.EVENT_TYPE_BIND],
        }),
      ),
    ALLOCATOR_INVALID: (c) => c.registerAllocator({ name: "vcmd", address: "not an address" }),
    COUNT_INVALID: async (c) => c.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: await newSet(c), count: 0 })),
    SET_UNKNOWN: (c) => c.destroySet({ setId: 888_888 }),
    SET_NOT_FOUND: (c) => c.getSet({ setId: 888_888, tokenType: 0, token: 0n }),
    IOASID_NOT_FOUND: async (c) => c.free(core.FreeRequest.fromPartial({ setId: await newSet(c), ioasid: 999_000 })),
    IOASID_FREE_PENDING: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: KVM }));
      await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
      return c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: VDCM }));
    },
    SPID_NOT_FOUND: async (c) => c.findBySpid(core.FindBySpidRequest.fromPartial({ setId: await newSet(c), spid: 77 })),
    REGISTRATION_NOT_FOUND: (c) => c.unregister({ registrationId: 999_999 }),
    ALLOCATOR_NOT_FOUND: (c) => c.unregisterAllocator({ name: "nobody" }),
    TOKEN_IN_USE: async (c) => {
      const t = nextToken++;
      await newSet(c, 1, t);
      return newSet(c, 1, t);
    },
    REGISTRATION_EXISTS: async (c) => {
      const sub = { name: "iommu", instance: `dup-${nextToken++}` };
      const r = core.RegisterRequest.fromPartial({ subscriber: sub, priority: Priority.PRIORITY_IOMMU, scope: { $case: "global", value: true } });
      await c.register(r);
      return c.register(r);
    },
    CAPACITY_EXHAUSTED: (c) => newSet(c, (1 << 20) - 1),
    SET_QUOTA_EXCEEDED: async (c) => c.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: await newSet(c, 3), count: 4 })),
    IOASID_RANGE_EXHAUSTED: async (c) => {
      const s = await newSet(c);
      await alloc(c, s, 900_000, 900_000);
      return alloc(c, s, 900_000, 900_000);
    },
    STALE_GENERATION: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      return c.find(core.FindRequest.fromPartial({ setId: s, ioasid: x.ioasid, generation: x.generation + 1 }));
    },
    NO_REFERENCE_HELD: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      return c.put(core.PutRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: KVM }));
    },
    SPID_ALREADY_ATTACHED: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid, spid: 1 }));
      return c.attachSpid(core.AttachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid, spid: 2 }));
    },
    SPID_NOT_ATTACHED: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      return c.detachSpid(core.DetachSpidRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    },
    PRIVATE_DATA_ATTACHED: async (c) => {
      const s = await newSet(c);
      const x = await c.alloc(core.AllocRequest.fromPartial({ setId: s, privateData: Buffer.from([1]) }));
      return c.attachData(core.AttachDataRequest.fromPartial({ setId: s, ioasid: x.ioasid, data: Buffer.from([2]) }));
    },
    PRIVATE_DATA_NOT_ATTACHED: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      return c.detachData(core.DetachDataRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    },
    SET_NOT_EMPTY: async (c) => {
      const s = await newSet(c);
      await alloc(c, s);
      return c.destroySet({ setId: s });
    },
    SET_FREEING: async (c) => {
      const s = await newSet(c);
      const x = await alloc(c, s);
      await c.get(core.GetRequest.fromPartial({ setId: s, ioasid: x.ioasid, holder: KVM }));
      await c.freeSet({ setId: s });
      return alloc(c, s);
    },
    ALLOCATOR_BUSY: async (c) => {
      await alloc(c, await newSet(c)); // the default allocator has outstanding IDs
      return c.registerAllocator({ name: "vcmd", address: "127.0.0.1:1" });
    },
    IOASID_NOT_IN_SET: async (c) => {
      const x = await alloc(c, await newSet(c));
      return c.free(core.FreeRequest.fromPartial({ setId: await newSet(c), ioasid: x.ioasid }));
    },
  };
  // Reached elsewhere: ALLOCATOR_EXISTS and ALLOCATOR_FAILED need a custom allocator server
  // (core-allocator.test.ts); INTERNAL only on a bug (grpc-kit's tests show how it is sent).
  const elsewhere = new Set(["ALLOCATOR_EXISTS", "ALLOCATOR_FAILED", "INTERNAL"]);

  it("has a scenario for every reason of the model, and every reason is in errors.proto", () => {
    const model = Object.keys(CoreReason).sort();
    expect([...Object.keys(scenarios), ...elsewhere].sort()).toEqual(model);
    const proto = Object.keys(errors.ErrorReason)
      .filter((k) => Number.isNaN(Number(k)))
      .map((k) => k.replace(/^ERROR_REASON_/, ""));
    for (const reason of model) expect(proto, `errors.proto lacks ${reason}`).toContain(reason);
  });

  for (const [reason, scenario] of Object.entries(scenarios)) {
    it(`returns ${reason} with ${CoreReason[reason as keyof typeof CoreReason]}`, async () => {
      await expectRefused(scenario(big.client), CoreReason[reason as keyof typeof CoreReason], reason);
    });
  }
});
