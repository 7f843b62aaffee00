import { MemoryRoleState, type HistoryActionCase } from "@ioasid/bus";
import { Code, DomainError } from "@ioasid/errors";
import { EventType, Priority, TokenType, type Holder, type IoasidEvent } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import { beforeEach, describe, expect, it } from "vitest";
import { toIa32Pasid } from "./ia32-pasid.js";
import { kvmStateCodec } from "../adapters/kvm-state-codec.js";
import { KVM_SUBSCRIBER, VMCS_PURPOSE } from "./holder-reference.js";
import { KvmEventType, type KvmEvent, type KvmEventHandler, type NotifierPort } from "./kvm-event.js";
import { VmcsClearCause, VmcsUpdateKind, type HistorySink, type KvmHistoryAction } from "./kvm-history.js";
import type { KvmOptions } from "./kvm-options.js";
import { Kvm } from "./kvm.js";

// The KVM domain against the real core model (the testkit's InProcessCore) and in-memory fakes of
// the bus and the history: the test makes the core commit events (as VFIO and the IOMMU would) and
// delivers them to KVM's handlers by hand. The same rules run against the core service and NATS in
// test/integration/kvm.test.ts.

const unavailable = () => new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core unreachable");

/** The bus: one handler per VM instance; the test delivers events by hand. */
class FakeNotifier implements NotifierPort {
  handlers = new Map<string, KvmEventHandler>();
  stopped: string[] = [];
  async subscribe(instance: string, handler: KvmEventHandler) {
    this.handlers.set(instance, handler);
    return {
      stop: async () => {
        this.handlers.delete(instance);
        this.stopped.push(instance);
      },
    };
  }
  deliver(instance: string, e: KvmEvent, attempt = 1) {
    const handler = this.handlers.get(instance);
    if (handler === undefined) throw new Error(`no subscriber ${instance}`);
    return handler(e, attempt);
  }
}

let core: InProcessCore;
let bus: FakeNotifier;
let history: Array<{ instance: string; action: HistoryActionCase; step: KvmHistoryAction; fields: Parameters<HistorySink["record"]>[1] }>;

function newKvm(options: Partial<KvmOptions> = {}): Kvm {
  return new Kvm({
    core,
    notifier: bus,
    history: (instance) => ({ record: (step, fields) => history.push({ instance, action: step.$case, step, fields }) }),
    ...options,
  });
}

/** The VM's set, as VFIO creates it (token type MM, the VM's MM token). @returns its id */
const createSet = (mmToken: bigint): number => core.space.createSet({ token: { type: TokenType.MM, value: mmToken }, quota: 64 }).id;

/** KVM's holder of a VM's VMCS reference. */
const vmcs = (instance: string): Holder => ({ role: KVM_SUBSCRIBER, instance, purpose: VMCS_PURPOSE });

/** A core event as KVM's subscriber gets it. */
function toKvm(e: IoasidEvent): KvmEvent {
  const type = e.type === EventType.BIND ? KvmEventType.BIND : e.type === EventType.UNBIND ? KvmEventType.UNBIND : e.type === EventType.FREE ? KvmEventType.FREE : KvmEventType.OTHER;
  return { seq: BigInt(e.seq), type, ioasid: e.ioasid, generation: e.generation, spid: e.spid, setId: e.setId };
}

/** The last event of that type the core committed for the IOASID. */
function committed(type: EventType, ioasid: number): KvmEvent {
  const e = core.events.findLast((x) => x.type === type && x.ioasid === ioasid);
  if (e === undefined) throw new Error(`the core committed no ${type} of IOASID ${ioasid}`);
  return toKvm(e);
}

/** The set the VM's registration is attached to (the VM's set must exist). */
function setOf(instance: string): number {
  const r = core.space.listRegistrations().find((x) => x.subscriber.name === KVM_SUBSCRIBER && x.subscriber.instance === instance);
  if (r === undefined || r.setId === 0) throw new Error(`${instance} has no active registration`);
  return r.setId;
}

/** Makes the core bind `spid` to `ioasid` in the VM's set (allocating it first if it is not): commits BIND. */
function attach(instance: string, ioasid: number, spid: number): KvmEvent {
  const setId = setOf(instance);
  if (core.space.describe(ioasid) === undefined) core.space.alloc(setId, { min: ioasid, max: ioasid });
  core.space.attachSpid(setId, ioasid, spid);
  return committed(EventType.BIND, ioasid);
}

/** The core commits BIND of `spid` → `ioasid` and KVM gets it. */
const bind = (instance: string, ioasid: number, spid: number) => bus.deliver(instance, attach(instance, ioasid, spid));

/** The core detaches the IOASID's SPID (commits UNBIND) and KVM gets it. */
function unbind(instance: string, ioasid: number): ReturnType<FakeNotifier["deliver"]> {
  core.space.detachSpid(core.space.describe(ioasid)!.setId, ioasid);
  return bus.deliver(instance, committed(EventType.UNBIND, ioasid));
}

/** The guest frees the IOASID (FREE_PENDING while referenced: commits FREE) and KVM gets the FREE. */
function free(instance: string, ioasid: number): ReturnType<FakeNotifier["deliver"]> {
  core.space.free(core.space.describe(ioasid)!.setId, ioasid);
  return bus.deliver(instance, committed(EventType.FREE, ioasid));
}

/** References `kvm/<instance>/vmcs` holds on the IOASID at that generation. */
function held(ioasid: number, generation: number, instance: string): number {
  const info = core.space.describe(ioasid);
  if (info === undefined || info.generation !== generation) return 0;
  return info.holders.find((h) => h.holder.role === KVM_SUBSCRIBER && h.holder.instance === instance && h.holder.purpose === VMCS_PURPOSE)?.count ?? 0;
}

/** Every reference a `kvm/*` holder has, in every set. */
const kvmReferences = (): number =>
  core.space
    .listIoasids()
    .flatMap((i) => i.holders)
    .filter((h) => h.holder.role === KVM_SUBSCRIBER)
    .reduce((n, h) => n + h.count, 0);

const kvmRegistrations = () => core.space.listRegistrations().filter((r) => r.subscriber.name === KVM_SUBSCRIBER);

/** The reason the core refuses `fn` with. */
function refusalOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    return (err as DomainError).reason;
  }
}

async function expectRefused(p: Promise<unknown> | (() => unknown), code: Code, reason: string): Promise<DomainError> {
  let err: unknown;
  try {
    await (typeof p === "function" ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(DomainError);
  expect({ code: (err as DomainError).code, reason: (err as DomainError).reason }).toEqual({ code, reason });
  return err as DomainError;
}

beforeEach(() => {
  core = new InProcessCore();
  bus = new FakeNotifier();
  history = [];
});

describe("Kvm.createVm", () => {
  it("registers kvm/vm-<id> by MM token, PENDING before the set exists and ACTIVE once it does", async () => {
    const kvm = newKvm();
    const vm = await kvm.createVm({ mmToken: 0x7001n, vcpuCount: 0, vmName: "guest" });
    expect(vm).toMatchObject({ vmId: 1, instance: "vm-1", vcpuCount: 1, registration: "PENDING", setId: 0, translations: [], referencesHeld: 0 });
    expect(core.requests.filter((r) => r.call !== "listRegistrations")).toEqual([
      {
        call: "register",
        args: [{ subscriber: { name: "kvm", instance: "vm-1" }, priority: Priority.CPU, scope: { kind: "mm", token: 0x7001n }, events: [EventType.BIND, EventType.UNBIND, EventType.FREE] }],
      },
    ]);
    expect(bus.handlers.has("vm-1")).toBe(true);
    const setId = createSet(0x7001n);
    expect((await kvm.queryState(1))[0]).toMatchObject({ registration: "ACTIVE", setId });
    expect(history.map((h) => h.action)).toEqual(["kvmCreateVm"]);
  });

  it("refuses a second VM with the same MM token, even while the first is being created", async () => {
    const kvm = newKvm();
    const first = kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" });
    await expectRefused(kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" }), Code.ALREADY_EXISTS, "VM_EXISTS");
    await first;
    await expectRefused(kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" }), Code.ALREADY_EXISTS, "VM_EXISTS");
    expect(kvmRegistrations()).toHaveLength(1);
  });

  it("refuses bad input with INVALID_FIELD naming the field, and changes nothing", async () => {
    const kvm = newKvm();
    const bad = [
      [{ mmToken: 0n, vcpuCount: 1, vmName: "" }, "mm_token"],
      [{ mmToken: 1n << 64n, vcpuCount: 1, vmName: "" }, "mm_token"],
      [{ mmToken: 1n, vcpuCount: 1025, vmName: "" }, "vcpu_count"],
      [{ mmToken: 1n, vcpuCount: 1, vmName: "x".repeat(129) }, "vm_name"],
    ] as const;
    for (const [spec, field] of bad) {
      const err = await expectRefused(kvm.createVm(spec), Code.INVALID_ARGUMENT, "INVALID_FIELD");
      expect(err.metadata["field"]).toBe(field);
    }
    expect(core.calls).toEqual([]);
    expect(bus.handlers.size).toBe(0);
    expect(await kvm.queryState(0)).toEqual([]);
  });

  it("passes SET_NOT_EMPTY through and leaves no VM or subscription behind", async () => {
    const kvm = newKvm();
    const setId = createSet(8n);
    core.space.alloc(setId);
    core.space.alloc(setId);
    await expectRefused(kvm.createVm({ mmToken: 8n, vcpuCount: 1, vmName: "" }), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    expect(bus.handlers.size).toBe(0);
    expect(await kvm.queryState(0)).toEqual([]);
    core.space.freeSet(setId); // destroyed at once: nothing referenced
    expect((await kvm.createVm({ mmToken: 8n, vcpuCount: 1, vmName: "" })).registration).toBe("PENDING");
  });

  it("fails UNAVAILABLE when the core is down, leaving nothing", async () => {
    const kvm = newKvm();
    core.unreachable = true;
    await expectRefused(kvm.createVm({ mmToken: 8n, vcpuCount: 1, vmName: "" }), Code.UNAVAILABLE, "UNAVAILABLE");
    core.unreachable = false;
    expect(bus.handlers.size).toBe(0);
    expect(await kvm.queryState(0)).toEqual([]);
  });
});

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

describe("Kvm.enqcmd", () => {
  let kvm: Kvm;
  beforeEach(async () => {
    kvm = newKvm();
    await kvm.createVm({ mmToken: 1n, vcpuCount: 2, vmName: "a" });
    await kvm.createVm({ mmToken: 2n, vcpuCount: 1, vmName: "b" });
    createSet(1n);
    createSet(2n);
    await bind("vm-1", 201, 101);
    await bind("vm-2", 202, 101);
    history = [];
  });

  it("translates the guest PASID through the VM's own table", () => {
    const generation = (ioasid: number) => core.space.describe(ioasid)!.generation;
    expect(kvm.enqcmd(1, 1, toIa32Pasid(101))).toEqual({ outcome: "TRANSLATED", gpasid: 101, hpasid: 201, generation: generation(201) });
    expect(kvm.enqcmd(2, 0, toIa32Pasid(101))).toEqual({ outcome: "TRANSLATED", gpasid: 101, hpasid: 202, generation: generation(202) });
    expect(history.map((h) => [h.instance, h.action, h.fields?.ioasid])).toEqual([
      ["vm-1", "enqcmd", 201],
      ["vm-2", "enqcmd", 202],
    ]);
  });

  it("raises #GP for an unknown guest PASID, a clear valid bit, or reserved bits", () => {
    expect(kvm.enqcmd(1, 0, toIa32Pasid(102))).toEqual({ outcome: "GP", gpasid: 102, cause: "NO_TRANSLATION" });
    expect(kvm.enqcmd(1, 0, 101)).toEqual({ outcome: "GP", gpasid: 101, cause: "PASID_NOT_VALID" });
    expect(kvm.enqcmd(1, 0, toIa32Pasid(101) | 0x0010_0000)).toEqual({ outcome: "GP", gpasid: 101, cause: "RESERVED_BITS" });
    expect(history.every((h) => h.step.$case === "enqcmd" && !h.step.value.translated && h.step.value.gpCause !== "")).toBe(true);
  });

  it("refuses an unknown VM, a vCPU out of range and a missing vm_id", async () => {
    await expectRefused(() => kvm.enqcmd(9, 0, toIa32Pasid(101)), Code.NOT_FOUND, "VM_NOT_FOUND");
    await expectRefused(() => kvm.enqcmd(1, 2, toIa32Pasid(101)), Code.INVALID_ARGUMENT, "VCPU_OUT_OF_RANGE");
    const err = await expectRefused(() => kvm.enqcmd(0, 0, toIa32Pasid(101)), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(err.metadata["field"]).toBe("vm_id");
    expect(history).toEqual([]);
  });
});

describe("Kvm.destroyVm", () => {
  let kvm: Kvm;
  beforeEach(async () => {
    kvm = newKvm();
    await kvm.createVm({ mmToken: 1n, vcpuCount: 1, vmName: "" });
    createSet(1n);
    await bind("vm-1", 201, 101);
    await bind("vm-1", 202, 102);
  });

  it("clears the table, drops every reference, withdraws the registration and stops the subscription", async () => {
    expect(await kvm.destroyVm(1)).toEqual({ clearedEntries: 2, releasedReferences: 2 });
    expect(kvmReferences()).toBe(0);
    expect(kvmRegistrations()).toEqual([]);
    expect(bus.stopped).toEqual(["vm-1"]);
    await expectRefused(kvm.queryState(1), Code.NOT_FOUND, "VM_NOT_FOUND");
    await expectRefused(kvm.destroyVm(1), Code.NOT_FOUND, "VM_NOT_FOUND");
    // The token is free again (once VFIO has freed the VM's set: the core refuses a registration on
    // a set that still has IOASIDs, SET_NOT_EMPTY).
    core.space.freeSet(core.space.findSetByToken({ type: TokenType.MM, value: 1n })!.id);
    expect((await kvm.createVm({ mmToken: 1n, vcpuCount: 1, vmName: "" })).vmId).toBe(2);
    // Entries cleared before the references are dropped (S9).
    const actions = history.filter((h) => h.instance === "vm-1").map((h) => h.action);
    expect(actions.slice(-3)).toEqual(["vmcsUpdate", "vmcsUpdate", "kvmDestroyVm"]);
  });

  it("leaves the VM as it was when the core cannot withdraw the registration", async () => {
    core.unreachable = true;
    await expectRefused(kvm.destroyVm(1), Code.UNAVAILABLE, "UNAVAILABLE");
    core.unreachable = false;
    expect((await kvm.queryState(1))[0]!.translations).toHaveLength(2);
    expect(kvm.enqcmd(1, 0, toIa32Pasid(101)).outcome).toBe("TRANSLATED");
    expect(await kvm.destroyVm(1)).toEqual({ clearedEntries: 2, releasedReferences: 2 });
  });

  it("lets a BIND in flight during destruction put its own reference back", async () => {
    let resolveGet!: () => void;
    const realGet = core.get;
    // The get reaches the core only after the VM is destroyed.
    core.get = async (...args) => {
      await new Promise<void>((r) => (resolveGet = r));
      return realGet(...args);
    };
    const inFlight = bind("vm-1", 203, 103);
    await kvm.destroyVm(1);
    resolveGet();
    expect(await inFlight).toEqual({});
    expect(kvmReferences()).toBe(0);
  });

  it("defers the puts the core could not take and drops them later", async () => {
    const realPut = core.put;
    core.put = async () => {
      throw unavailable();
    };
    expect(await kvm.destroyVm(1)).toEqual({ clearedEntries: 2, releasedReferences: 0 });
    expect(kvm.pendingReleases).toBe(2);
    core.put = realPut;
    expect(await kvm.retryPendingReleases()).toBe(0);
    expect(kvmReferences()).toBe(0);
  });

  it("reports a reference leaked after the last attempt", async () => {
    const logs: string[] = [];
    const k = newKvm({ maxReleaseAttempts: 2, log: (level, msg) => logs.push(`${level}: ${msg}`) });
    await k.createVm({ mmToken: 7n, vcpuCount: 1, vmName: "" });
    createSet(7n);
    await bind("vm-2", 301, 1);
    core.put = async () => {
      throw unavailable();
    };
    await k.destroyVm(2);
    expect(await k.retryPendingReleases()).toBe(0);
    expect(logs.some((l) => l.startsWith("error: reference could not be dropped"))).toBe(true);
  });
});

describe("Kvm.reconcile", () => {
  it("drops what VMs of an earlier KVM process held, withdraws their registrations, and numbers VMs after them", async () => {
    const stale = core.space.register({ subscriber: { name: "kvm", instance: "vm-7" }, priority: Priority.CPU, scope: { kind: "mm", token: 99n } });
    const setId = createSet(99n);
    core.space.alloc(setId, { min: 201, max: 201 });
    core.space.get(setId, 201, vmcs("vm-7"));
    const kvm = newKvm();
    await kvm.reconcile();
    expect(kvmReferences()).toBe(0);
    expect(core.space.listRegistrations().map((r) => r.id)).not.toContain(stale.id);
    expect(history.map((h) => [h.instance, h.action])).toEqual([["vm-7", "kvmDestroyVm"]]);
    expect((await kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" })).instance).toBe("vm-8");
  });

  it("only renumbers when reaping is off", async () => {
    core.space.register({ subscriber: { name: "kvm", instance: "vm-3" }, priority: Priority.CPU, scope: { kind: "mm", token: 99n } });
    const setId = createSet(99n);
    core.space.alloc(setId, { min: 201, max: 201 });
    core.space.get(setId, 201, vmcs("vm-3"));
    const kvm = newKvm({ reapStale: false });
    expect((await kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" })).instance).toBe("vm-4");
    expect(kvmReferences()).toBe(1);
    expect(kvmRegistrations()).toHaveLength(2);
  });

  it("is retried by CreateVm when the core was unreachable at start", async () => {
    const kvm = newKvm();
    core.unreachable = true;
    await expect(kvm.reconcile()).rejects.toThrow(/unreachable/);
    expect(kvm.reconciled).toBe(false);
    core.unreachable = false;
    await kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" });
    expect(kvm.reconciled).toBe(true);
  });
});

/** KVM crashed with VM 1 translating 101 → 201: a new KVM restored from its store, not yet reconciled. */
async function crashedWithOneTranslation(): Promise<Kvm> {
  const store = new MemoryRoleState(kvmStateCodec);
  createSet(0x70n);
  const first = newKvm({ store });
  await first.createVm({ mmToken: 0x70n, vcpuCount: 1, vmName: "g" });
  await bind("vm-1", 201, 101);
  bus.handlers.clear();
  return newKvm({ store, saved: store.saved });
}

describe("Kvm kept in a store (kill -9 and back)", () => {
  it("comes back with its VMs and VMCS tables, keeps the references they back, and handles the FREE it missed", async () => {
    const store = new MemoryRoleState(kvmStateCodec);
    createSet(0x70n);
    const first = newKvm({ store });
    await first.createVm({ mmToken: 0x70n, vcpuCount: 2, vmName: "g" });
    await bind("vm-1", 201, 101);
    await bind("vm-1", 202, 102);
    expect(first.enqcmd(1, 0, toIa32Pasid(101))).toMatchObject({ outcome: "TRANSLATED", hpasid: 201 });
    // A crash: the process and its subscriptions are gone; a new KVM restores from the store.
    bus.handlers.clear();
    const again = newKvm({ store, saved: store.saved });
    await again.reconcile();
    expect(again.enqcmd(1, 1, toIa32Pasid(101))).toMatchObject({ outcome: "TRANSLATED", hpasid: 201 });
    expect(held(201, committed(EventType.BIND, 201).generation, "vm-1")).toBe(1);
    expect(kvmRegistrations()).toHaveLength(1);
    expect(history.some((h) => h.action === "kvmRestoreVm")).toBe(true);
    expect(await free("vm-1", 202)).toEqual({ release: ["vmcs"] });
    expect(again.enqcmd(1, 0, toIa32Pasid(102)).outcome).toBe("GP");
    expect([...store.saved.keys()].sort()).toEqual(["vm/1", "vmcs/1/201"]);
    expect((await again.createVm({ mmToken: 0x71n, vcpuCount: 1, vmName: "" })).instance).toBe("vm-2");
  });

  it("resubscribes a restored VM on the reconcile retried after the core went away in the middle of it", async () => {
    const again = await crashedWithOneTranslation();
    // registrations() answers, then the core is gone for the VM's own reconcile (chaos soak, seed 2:
    // the VM was never resubscribed, so the FREE it missed was never delivered and its reference leaked).
    core.failNext("listIoasids"); // the VM's references (heldReferences)
    await expectRefused(again.reconcile(), Code.UNAVAILABLE, "UNAVAILABLE");
    await again.reconcile();
    expect(bus.handlers.has("vm-1")).toBe(true);
    expect(await free("vm-1", 201)).toEqual({ release: ["vmcs"] });
    expect(again.enqcmd(1, 0, toIa32Pasid(101)).outcome).toBe("GP");
  });

  it("leaves alone a restored VM destroyed between a failed reconcile and its retry", async () => {
    const again = await crashedWithOneTranslation();
    core.failNext("listIoasids"); // the VM's references (heldReferences)
    await expectRefused(again.reconcile(), Code.UNAVAILABLE, "UNAVAILABLE");
    await again.destroyVm(1);
    const logged = core.calls.length;
    await again.reconcile();
    expect(bus.handlers.has("vm-1")).toBe(false);
    expect(core.calls.slice(logged).filter((c) => c === "put")).toEqual([]);
    expect(kvmReferences()).toBe(0);
  });

  it("does not resubscribe a restored VM destroyed while its reconcile was under way", async () => {
    const again = await crashedWithOneTranslation();
    // The VM is destroyed while the core is being asked for its references.
    const realList = core.listIoasids;
    let during: (() => Promise<unknown>) | undefined = () => again.destroyVm(1);
    core.listIoasids = async (setId) => {
      const d = during;
      during = undefined;
      await d?.();
      return realList(setId);
    };
    await again.reconcile();
    expect(bus.handlers.has("vm-1")).toBe(false);
    expect(kvmReferences()).toBe(0);
    expect(kvmRegistrations()).toEqual([]);
  });

  it("clears after a restart an entry whose reference the core no longer records, and drops a reference no entry backs", async () => {
    const store = new MemoryRoleState(kvmStateCodec);
    const setId = createSet(0x70n);
    const first = newKvm({ store });
    await first.createVm({ mmToken: 0x70n, vcpuCount: 1, vmName: "g" });
    await bind("vm-1", 201, 101);
    // While KVM is down: an operator releases its reference on 201; a stray one appears on 203.
    core.space.put(setId, 201, vmcs("vm-1"));
    core.space.alloc(setId, { min: 203, max: 203 });
    core.space.get(setId, 203, vmcs("vm-1"));
    bus.handlers.clear();
    const again = newKvm({ store, saved: store.saved });
    await again.reconcile();
    expect(again.enqcmd(1, 0, toIa32Pasid(101)).outcome).toBe("GP");
    expect(kvmReferences()).toBe(0);
    expect([...store.saved.keys()]).toEqual(["vm/1"]);
  });
});

describe("Kvm.destroyVm and a lost acknowledgement", () => {
  it("releases what the core still records for the VM, even a reference whose release went with an ack the core lost", async () => {
    createSet(0x90n);
    const kvm = newKvm();
    await kvm.createVm({ mmToken: 0x90n, vcpuCount: 1, vmName: "g" });
    await bind("vm-1", 201, 101);
    // The FREE is handled and acknowledged with the release, but the core crashes before it keeps
    // the ack: the reference is still recorded, while KVM has let go of it.
    expect(await free("vm-1", 201)).toEqual({ release: ["vmcs"] });
    expect(held(201, committed(EventType.FREE, 201).generation, "vm-1")).toBe(1);
    // The VMM crashes and the VM is destroyed: no redelivery can bring the release any more.
    expect(await kvm.destroyVm(1)).toMatchObject({ releasedReferences: 1 });
    expect(kvmReferences()).toBe(0);
    expect(core.space.describe(201)).toBeUndefined(); // the last reference: reclaimed
  });
});

describe("Kvm and references no live VM accounts for", () => {
  it("releases, after a VM whose set it never learnt is destroyed, the reference the core records for it", async () => {
    // The VM was created PENDING; its BIND's ioasid_get reached the core, but the KVM process died
    // before it kept the change, so the restored VM knows neither its set nor the reference.
    const kvm = newKvm();
    await kvm.reconcile();
    await kvm.createVm({ mmToken: 0xa0n, vcpuCount: 1, vmName: "g" });
    const mine = createSet(0xa0n); // the VM is not told (no event is delivered)
    const { generation: g1 } = core.space.alloc(mine, { min: 201, max: 201 });
    core.space.get(mine, 201, vmcs("vm-1"));
    const other = createSet(0xb0n);
    const { generation: g2 } = core.space.alloc(other, { min: 202, max: 202 });
    core.space.get(other, 202, vmcs("vm-2")); // a VM of another life
    expect(kvm.releaseWorkDue).toBe(true); // what the server's release timer looks at
    await kvm.retryPendingReleases(); // the sweep after the start: vm-2 is nobody's
    expect(kvm.releaseWorkDue).toBe(false);
    expect(held(202, g2, "vm-2")).toBe(0);
    expect(held(201, g1, "vm-1")).toBe(1); // vm-1 is live
    expect(await kvm.destroyVm(1)).toMatchObject({ releasedReferences: 0 });
    expect(held(201, g1, "vm-1")).toBe(1);
    expect(kvm.releaseWorkDue).toBe(true);
    core.unreachable = true;
    await kvm.retryPendingReleases(); // the core unreachable: the sweep waits
    core.unreachable = false;
    await kvm.retryPendingReleases();
    expect(kvmReferences()).toBe(0);
    expect(history.filter((h) => h.action === "kvmOrphanRelease").map((h) => [h.instance, h.fields?.ioasid])).toEqual([
      ["vm-2", 202],
      ["vm-1", 201],
    ]);
    const calls = core.calls.length;
    await kvm.retryPendingReleases(); // nothing more to look for
    expect(core.calls.slice(calls)).toEqual([]);
  });
});

describe("Kvm.queryState", () => {
  it("lists VMs ascending by id and refuses an unknown VM", async () => {
    const kvm = newKvm();
    await kvm.createVm({ mmToken: 2n, vcpuCount: 1, vmName: "b" });
    await kvm.createVm({ mmToken: 1n, vcpuCount: 4, vmName: "a" });
    expect((await kvm.queryState(0)).map((v) => [v.vmId, v.vmName, v.vcpuCount])).toEqual([
      [1, "b", 1],
      [2, "a", 4],
    ]);
    await expectRefused(kvm.queryState(3), Code.NOT_FOUND, "VM_NOT_FOUND");
  });
});
