import { Code, DomainError } from "@ioasid/errors";
import { EventType, type Holder } from "@ioasid/ioasid";
import { beforeEach, describe, expect, it } from "vitest";
import { KvmEventType } from "./kvm-event.js";
import { VmcsClearCause, VmcsUpdateKind } from "./kvm-history.js";
import type { Kvm } from "./kvm.js";
import { attach, bind, bus, committed, core, createSet, free, held, history, newKvm, refusalOf, unbind, useKvmFixture, vmcs } from "./kvm-fixture.js";

// The KVM domain against the real core model and in-memory fakes (kvm-fixture.ts): the notifier events (BIND, UNBIND, FREE) and the VMCS table.
useKvmFixture();

describe("Kvm notifier events", () => {
  let kvm: Kvm;
  let setId: number;
  beforeEach(async () => {
    kvm = newKvm();
    await kvm.createVm({ mmToken: 1n, vcpuCount: 2, vmName: "" });
    setId = createSet(1n);
  });
  const table = async () => (await kvm.queryState(1))[0]!.translations.map((t) => `${t.gpasid}->${t.hpasid}`);
  /** Another tier's reference (the IOMMU's bind), to keep an IOASID FREE_PENDING. */
  const IOMMU: Holder = { role: "iommu", instance: "dmar0", purpose: "bind" };

  it("BIND takes a reference for kvm/vm-1/vmcs at the event's generation, then installs the entry", async () => {
    // An earlier life of 201 makes its generation 2: the reference must name the event's.
    core.space.alloc(setId, { min: 201, max: 201 });
    core.space.free(setId, 201);
    const e = attach("vm-1", 201, 101);
    expect(e.generation).toBe(2);
    expect(await bus.deliver("vm-1", e)).toEqual({});
    expect(core.requests).toContainEqual({ call: "get", args: [setId, 201, vmcs("vm-1"), 2] });
    expect(held(201, 2, "vm-1")).toBe(1);
    expect(await table()).toEqual(["101->201"]);
    expect((await kvm.queryState(1))[0]!.referencesHeld).toBe(1);
    const rec = history.find((h) => h.action === "vmcsUpdate")!;
    expect(rec.fields).toMatchObject({ ioasid: 201, spid: 101, generation: 2, refcount: 2, seq: Number(e.seq) });
  });

  it("handles a redelivered BIND without a second reference", async () => {
    const e = attach("vm-1", 201, 101);
    await bus.deliver("vm-1", e);
    await bus.deliver("vm-1", e, 2);
    expect(held(201, e.generation, "vm-1")).toBe(1);
    expect(history.filter((h) => h.action === "vmcsUpdate")).toHaveLength(1);
  });

  // A BIND delivered after the IOASID went on: freed while the IOMMU held it, freed and reallocated,
  // or freed and reclaimed. Each time the FREE that follows is delivered too.
  const late = {
    IOASID_FREE_PENDING: () => {},
    STALE_GENERATION: () => {
      core.space.put(setId, 201, IOMMU); // reclaimed…
      core.space.alloc(setId, { min: 201, max: 201 }); // …and allocated again
    },
    IOASID_NOT_FOUND: () => core.space.put(setId, 201, IOMMU), // reclaimed
  } as const;
  it.each(Object.keys(late) as (keyof typeof late)[])("installs nothing when ioasid_get() is refused with %s", async (reason) => {
    const e = attach("vm-1", 201, 101);
    core.space.get(setId, 201, IOMMU);
    core.space.free(setId, 201);
    const freed = committed(EventType.FREE, 201);
    late[reason]();
    expect(refusalOf(() => core.space.get(setId, 201, vmcs("vm-1"), e.generation))).toBe(reason);
    expect(await bus.deliver("vm-1", e)).toEqual({});
    expect(await table()).toEqual([]);
    expect((await kvm.queryState(1))[0]!.referencesHeld).toBe(0);
    // The FREE that follows finds nothing and releases nothing.
    expect(await bus.deliver("vm-1", freed)).toEqual({});
  });

  it("makes a BIND whose get failed for lack of the core count as missed (thrown), and installs on the retry", async () => {
    const e = attach("vm-1", 201, 101);
    core.unreachable = true;
    await expect(bus.deliver("vm-1", e)).rejects.toThrow(/unreachable/);
    core.unreachable = false;
    await bus.deliver("vm-1", e, 2);
    expect(await table()).toEqual(["101->201"]);
    expect(held(201, e.generation, "vm-1")).toBe(1);
  });

  it("does not take a second reference when the answer of the first get was lost", async () => {
    core.loseAnswerOf("get", 1, new DomainError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "deadline exceeded"));
    const e = attach("vm-1", 201, 101);
    await expect(bus.deliver("vm-1", e)).rejects.toThrow(/deadline/);
    await bus.deliver("vm-1", e, 2);
    expect(core.requests.filter((r) => r.call === "describe")).toEqual([{ call: "describe", args: [201] }]);
    expect(held(201, e.generation, "vm-1")).toBe(1);
    expect(await table()).toEqual(["101->201"]);
  });

  it("UNBIND removes the entry and releases vmcs; a second UNBIND is harmless", async () => {
    await bind("vm-1", 201, 101);
    expect(await unbind("vm-1", 201)).toEqual({ release: ["vmcs"] });
    expect(await table()).toEqual([]);
    expect((await kvm.queryState(1))[0]!.referencesHeld).toBe(0);
    expect(await bus.deliver("vm-1", committed(EventType.UNBIND, 201), 2)).toEqual({});
    expect(history.filter((h) => h.action === "vmcsUpdate").map((h) => h.step.value)).toEqual([
      { kind: VmcsUpdateKind.INSTALL, gpasid: 101, hpasid: 201 },
      { kind: VmcsUpdateKind.CLEAR, gpasid: 101, hpasid: 201, cause: VmcsClearCause.UNBIND },
    ]);
  });

  it("FREE removes the entry and releases vmcs; an UNBIND after FREE is harmless", async () => {
    await bind("vm-1", 201, 101);
    expect(await free("vm-1", 201)).toEqual({ release: ["vmcs"] });
    expect(await table()).toEqual([]);
    // The core emits no UNBIND once the IOASID is FREE_PENDING (ioasid.rst): one arriving anyway
    // (the UNBIND of that binding, redelivered) finds nothing.
    const bound = committed(EventType.BIND, 201);
    expect(await bus.deliver("vm-1", { ...bound, type: KvmEventType.UNBIND })).toEqual({});
    expect(await bus.deliver("vm-1", committed(EventType.FREE, 201), 2)).toEqual({});
  });

  it("leaves an entry of another generation alone on FREE", async () => {
    // 201's first life is freed while the IOMMU holds it; its FREE reaches KVM only after the
    // BIND of its second life.
    core.space.alloc(setId, { min: 201, max: 201 });
    core.space.get(setId, 201, IOMMU);
    core.space.free(setId, 201);
    const oldFree = committed(EventType.FREE, 201);
    core.space.put(setId, 201, IOMMU);
    await bind("vm-1", 201, 101);
    expect(oldFree.generation).not.toBe(committed(EventType.BIND, 201).generation);
    expect(await bus.deliver("vm-1", oldFree)).toEqual({});
    expect(await table()).toEqual(["101->201"]);
  });

  it("keeps the later mapping when BIND 101→202 overtakes the UNBIND of 101→201", async () => {
    await bind("vm-1", 201, 101);
    core.space.detachSpid(setId, 201); // its UNBIND is delivered late
    const lateUnbind = committed(EventType.UNBIND, 201);
    await bind("vm-1", 202, 101);
    expect(await table()).toEqual(["101->202"]);
    expect(await bus.deliver("vm-1", lateUnbind)).toEqual({ release: ["vmcs"] });
    expect(await table()).toEqual(["101->202"]);
    expect(held(201, lateUnbind.generation, "vm-1")).toBe(1); // released with the ack, by the core
  });

  it("takes nothing for a BIND 101→201 that arrives after the later BIND 101→202", async () => {
    const early = attach("vm-1", 201, 101);
    core.space.detachSpid(setId, 201); // its UNBIND
    await bind("vm-1", 202, 101);
    expect(await bus.deliver("vm-1", early)).toEqual({});
    expect(held(201, early.generation, "vm-1")).toBe(0);
    expect(await table()).toEqual(["101->202"]);
  });

  it("ignores event types it did not ask for", async () => {
    core.space.alloc(setId, { min: 201, max: 201 });
    expect(await bus.deliver("vm-1", committed(EventType.ALLOC, 201))).toEqual({});
    expect(core.calls.filter((c) => c === "get")).toEqual([]);
  });
});
