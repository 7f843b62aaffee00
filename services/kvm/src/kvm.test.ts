import { MemoryRoleState, type HistoryActionCase, type HistoryActionInput } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { Code, DomainError } from "@ioasid/errors";
import { beforeEach, describe, expect, it } from "vitest";
import { toIa32Pasid } from "./ia32-pasid.js";
import {
  Kvm,
  KvmEventType,
  type HistorySink,
  type HolderReference,
  type KvmCorePort,
  type KvmEvent,
  type KvmEventHandler,
  type KvmOptions,
  type NotifierPort,
  type RegistrationStatus,
} from "./kvm.js";

// The KVM domain against in-memory fakes of the core, the bus and the history. The same rules run
// against the real core and NATS in test/integration/kvm.test.ts.

const unavailable = () => new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core unreachable");
const refused = (code: Code, reason: string) => new DomainError(code, reason, reason);

interface FakeRegistration extends RegistrationStatus {
  readonly mmToken: bigint;
}

/** The core as KVM sees it: registrations by MM token, references per holder. */
class FakeCore implements KvmCorePort {
  sets = new Map<bigint, { setId: number; inUse: number }>();
  regs = new Map<number, FakeRegistration>();
  /** `ioasid:generation:instance:purpose` → count. */
  refs = new Map<string, number>();
  /** IOASID → reason its get is refused with. */
  refuseGet = new Map<number, DomainError>();
  down = false;
  /** The next get is applied but its answer lost (a timeout). */
  loseNextGetAnswer = false;
  calls: string[] = [];
  #nextReg = 1;

  static key(r: HolderReference): string {
    return `${r.ioasid}:${r.generation}:${r.instance}:${r.purpose}`;
  }
  held(r: Omit<HolderReference, "purpose" | "setId"> & { purpose?: string }): number {
    return this.refs.get(FakeCore.key({ setId: 0, purpose: "vmcs", ...r })) ?? 0;
  }
  #check(): void {
    if (this.down) throw unavailable();
  }
  async register(instance: string, mmToken: bigint): Promise<RegistrationStatus> {
    this.#check();
    this.calls.push(`register ${instance} ${mmToken}`);
    const set = this.sets.get(mmToken);
    if (set !== undefined && set.inUse > 0) throw refused(Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    const reg: FakeRegistration = { registrationId: this.#nextReg++, instance, active: set !== undefined, setId: set?.setId ?? 0, mmToken };
    this.regs.set(reg.registrationId, reg);
    return reg;
  }
  async unregister(registrationId: number): Promise<void> {
    this.#check();
    this.calls.push(`unregister ${registrationId}`);
    if (!this.regs.delete(registrationId)) throw refused(Code.NOT_FOUND, "REGISTRATION_NOT_FOUND");
  }
  async registrations(): Promise<RegistrationStatus[]> {
    this.#check();
    return [...this.regs.values()].map((r) => {
      const set = this.sets.get(r.mmToken);
      return { ...r, active: set !== undefined, setId: set?.setId ?? 0 };
    });
  }
  async get(ref: HolderReference): Promise<number> {
    this.#check();
    this.calls.push(`get ${ref.ioasid} ${ref.instance}/${ref.purpose} gen ${ref.generation}`);
    const refusal = this.refuseGet.get(ref.ioasid);
    if (refusal !== undefined) throw refusal;
    const k = FakeCore.key(ref);
    this.refs.set(k, (this.refs.get(k) ?? 0) + 1);
    if (this.loseNextGetAnswer) {
      this.loseNextGetAnswer = false;
      throw new DomainError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "deadline exceeded");
    }
    return 2;
  }
  async put(ref: HolderReference): Promise<void> {
    this.#check();
    this.calls.push(`put ${ref.ioasid} ${ref.instance}/${ref.purpose}`);
    const k = FakeCore.key(ref);
    const n = this.refs.get(k) ?? 0;
    if (n === 0) throw refused(Code.FAILED_PRECONDITION, "NO_REFERENCE_HELD");
    if (n === 1) this.refs.delete(k);
    else this.refs.set(k, n - 1);
  }
  async holds(ref: HolderReference): Promise<boolean> {
    this.#check();
    this.calls.push(`holds ${ref.ioasid}`);
    return (this.refs.get(FakeCore.key(ref)) ?? 0) > 0;
  }
  /** The next calls of heldReferences fail as if the core went away between calls. */
  heldReferencesFailures = 0;
  /** Runs inside the next heldReferences call, before it answers. */
  duringHeldReferences: (() => Promise<void>) | undefined;
  async heldReferences(setId: number, instance: string): Promise<HolderReference[]> {
    this.#check();
    if (this.heldReferencesFailures > 0) {
      this.heldReferencesFailures--;
      throw unavailable();
    }
    const during = this.duringHeldReferences;
    this.duringHeldReferences = undefined;
    await during?.();
    const out: HolderReference[] = [];
    for (const [k, n] of this.refs) {
      const [ioasid, generation, inst, purpose] = k.split(":");
      if (inst !== instance) continue;
      for (let i = 0; i < n; i++) out.push({ setId, ioasid: Number(ioasid), generation: Number(generation), instance, purpose: purpose! });
    }
    return out;
  }
  async orphanReferences(live: ReadonlySet<string>): Promise<HolderReference[]> {
    this.#check();
    this.calls.push("orphanReferences");
    const out: HolderReference[] = [];
    for (const [k, n] of this.refs) {
      const [ioasid, generation, inst, purpose] = k.split(":");
      if (live.has(inst!)) continue;
      for (let i = 0; i < n; i++) out.push({ setId: 1, ioasid: Number(ioasid), generation: Number(generation), instance: inst!, purpose: purpose! });
    }
    return out;
  }
}

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
  deliver(instance: string, e: Partial<KvmEvent> & Pick<KvmEvent, "type" | "ioasid">, attempt = 1) {
    const handler = this.handlers.get(instance);
    if (handler === undefined) throw new Error(`no subscriber ${instance}`);
    return handler({ seq: 1n, generation: 1, spid: 0, setId: 1, ...e }, attempt);
  }
}

let core: FakeCore;
let bus: FakeNotifier;
let history: Array<{ instance: string; action: HistoryActionCase; step: HistoryActionInput; fields: Parameters<HistorySink["record"]>[1] }>;
let seq: bigint;

function newKvm(options: Partial<KvmOptions> = {}): Kvm {
  return new Kvm({
    core,
    notifier: bus,
    history: (instance) => ({ record: (step, fields) => history.push({ instance, action: step.$case, step, fields }) }),
    ...options,
  });
}

const bind = (instance: string, ioasid: number, spid: number, extra: Partial<KvmEvent> = {}) =>
  bus.deliver(instance, { seq: ++seq, type: KvmEventType.BIND, ioasid, spid, ...extra });
const unbind = (instance: string, ioasid: number, spid: number, extra: Partial<KvmEvent> = {}) =>
  bus.deliver(instance, { seq: ++seq, type: KvmEventType.UNBIND, ioasid, spid, ...extra });
const free = (instance: string, ioasid: number, extra: Partial<KvmEvent> = {}) =>
  bus.deliver(instance, { seq: ++seq, type: KvmEventType.FREE, ioasid, ...extra });

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
  core = new FakeCore();
  bus = new FakeNotifier();
  history = [];
  seq = 0n;
});

describe("Kvm.createVm", () => {
  it("registers kvm/vm-<id> by MM token, PENDING before the set exists and ACTIVE once it does", async () => {
    const kvm = newKvm();
    const vm = await kvm.createVm({ mmToken: 0x7001n, vcpuCount: 0, vmName: "guest" });
    expect(vm).toMatchObject({ vmId: 1, instance: "vm-1", vcpuCount: 1, registration: "PENDING", setId: 0, translations: [], referencesHeld: 0 });
    expect(core.calls).toEqual(["register vm-1 28673"]);
    expect(bus.handlers.has("vm-1")).toBe(true);
    core.sets.set(0x7001n, { setId: 9, inUse: 0 });
    expect((await kvm.queryState(1))[0]).toMatchObject({ registration: "ACTIVE", setId: 9 });
    expect(history.map((h) => h.action)).toEqual(["kvmCreateVm"]);
  });

  it("refuses a second VM with the same MM token, even while the first is being created", async () => {
    const kvm = newKvm();
    const first = kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" });
    await expectRefused(kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" }), Code.ALREADY_EXISTS, "VM_EXISTS");
    await first;
    await expectRefused(kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" }), Code.ALREADY_EXISTS, "VM_EXISTS");
    expect(core.regs.size).toBe(1);
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
    core.sets.set(8n, { setId: 3, inUse: 2 });
    await expectRefused(kvm.createVm({ mmToken: 8n, vcpuCount: 1, vmName: "" }), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    expect(bus.handlers.size).toBe(0);
    expect(await kvm.queryState(0)).toEqual([]);
    core.sets.delete(8n);
    expect((await kvm.createVm({ mmToken: 8n, vcpuCount: 1, vmName: "" })).registration).toBe("PENDING");
  });

  it("fails UNAVAILABLE when the core is down, leaving nothing", async () => {
    const kvm = newKvm();
    core.down = true;
    await expectRefused(kvm.createVm({ mmToken: 8n, vcpuCount: 1, vmName: "" }), Code.UNAVAILABLE, "UNAVAILABLE");
    core.down = false;
    expect(bus.handlers.size).toBe(0);
    expect(await kvm.queryState(0)).toEqual([]);
  });
});

describe("Kvm notifier events", () => {
  let kvm: Kvm;
  beforeEach(async () => {
    kvm = newKvm();
    await kvm.createVm({ mmToken: 1n, vcpuCount: 2, vmName: "" });
    core.sets.set(1n, { setId: 1, inUse: 0 });
  });
  const table = async () => (await kvm.queryState(1))[0]!.translations.map((t) => `${t.gpasid}->${t.hpasid}`);

  it("BIND takes a reference for kvm/vm-1/vmcs at the event's generation, then installs the entry", async () => {
    expect(await bind("vm-1", 201, 101, { generation: 4 })).toEqual({});
    expect(core.calls).toContain("get 201 vm-1/vmcs gen 4");
    expect(core.held({ ioasid: 201, generation: 4, instance: "vm-1" })).toBe(1);
    expect(await table()).toEqual(["101->201"]);
    expect((await kvm.queryState(1))[0]!.referencesHeld).toBe(1);
    const rec = history.find((h) => h.action === "vmcsUpdate")!;
    expect(rec.fields).toMatchObject({ ioasid: 201, spid: 101, generation: 4, refcount: 2, seq: 1 });
  });

  it("handles a redelivered BIND without a second reference", async () => {
    await bind("vm-1", 201, 101);
    await bus.deliver("vm-1", { seq: seq, type: KvmEventType.BIND, ioasid: 201, spid: 101 }, 2);
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1);
    expect(history.filter((h) => h.action === "vmcsUpdate")).toHaveLength(1);
  });

  it.each(["IOASID_FREE_PENDING", "STALE_GENERATION", "IOASID_NOT_FOUND"])("installs nothing when ioasid_get() is refused with %s", async (reason) => {
    core.refuseGet.set(201, refused(reason === "STALE_GENERATION" ? Code.FAILED_PRECONDITION : Code.NOT_FOUND, reason));
    expect(await bind("vm-1", 201, 101)).toEqual({});
    expect(await table()).toEqual([]);
    expect((await kvm.queryState(1))[0]!.referencesHeld).toBe(0);
    // The FREE that follows finds nothing and releases nothing.
    expect(await free("vm-1", 201, { spid: 101 })).toEqual({});
  });

  it("makes a BIND whose get failed for lack of the core count as missed (thrown), and installs on the retry", async () => {
    core.down = true;
    await expect(bind("vm-1", 201, 101)).rejects.toThrow(/unreachable/);
    core.down = false;
    await bus.deliver("vm-1", { seq, type: KvmEventType.BIND, ioasid: 201, spid: 101 }, 2);
    expect(await table()).toEqual(["101->201"]);
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1);
  });

  it("does not take a second reference when the answer of the first get was lost", async () => {
    core.loseNextGetAnswer = true;
    await expect(bind("vm-1", 201, 101)).rejects.toThrow(/deadline/);
    await bus.deliver("vm-1", { seq, type: KvmEventType.BIND, ioasid: 201, spid: 101 }, 2);
    expect(core.calls.filter((c) => c.startsWith("holds"))).toEqual(["holds 201"]);
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1);
    expect(await table()).toEqual(["101->201"]);
  });

  it("UNBIND removes the entry and releases vmcs; a second UNBIND is harmless", async () => {
    await bind("vm-1", 201, 101);
    expect(await unbind("vm-1", 201, 101)).toEqual({ release: ["vmcs"] });
    expect(await table()).toEqual([]);
    expect((await kvm.queryState(1))[0]!.referencesHeld).toBe(0);
    expect(await unbind("vm-1", 201, 101)).toEqual({});
    expect(history.filter((h) => h.action === "vmcsUpdate").map((h) => h.step.value)).toEqual([
      { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL, gpasid: 101, hpasid: 201 },
      { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 101, hpasid: 201, cause: h.VmcsClearCause.VMCS_CLEAR_CAUSE_UNBIND },
    ]);
  });

  it("FREE removes the entry and releases vmcs; an UNBIND after FREE is harmless", async () => {
    await bind("vm-1", 201, 101);
    expect(await free("vm-1", 201, { spid: 101 })).toEqual({ release: ["vmcs"] });
    expect(await table()).toEqual([]);
    expect(await unbind("vm-1", 201, 101)).toEqual({});
    expect(await free("vm-1", 201, { spid: 101 })).toEqual({});
  });

  it("leaves an entry of another generation alone on FREE", async () => {
    await bind("vm-1", 201, 101, { generation: 2 });
    expect(await free("vm-1", 201, { generation: 1 })).toEqual({});
    expect(await table()).toEqual(["101->201"]);
  });

  it("keeps the later mapping when BIND 101→202 overtakes the UNBIND of 101→201", async () => {
    await bind("vm-1", 201, 101); // seq 1
    const unbindSeq = ++seq; // seq 2: UNBIND of 201, delivered late
    await bind("vm-1", 202, 101); // seq 3
    expect(await table()).toEqual(["101->202"]);
    expect(await bus.deliver("vm-1", { seq: unbindSeq, type: KvmEventType.UNBIND, ioasid: 201, spid: 101 })).toEqual({ release: ["vmcs"] });
    expect(await table()).toEqual(["101->202"]);
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1); // released with the ack, by the core
  });

  it("takes nothing for a BIND 101→201 that arrives after the later BIND 101→202", async () => {
    const early = ++seq;
    ++seq; // its UNBIND
    await bind("vm-1", 202, 101);
    expect(await bus.deliver("vm-1", { seq: early, type: KvmEventType.BIND, ioasid: 201, spid: 101 })).toEqual({});
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(0);
    expect(await table()).toEqual(["101->202"]);
  });

  it("ignores event types it did not ask for", async () => {
    expect(await bus.deliver("vm-1", { type: KvmEventType.OTHER, ioasid: 201 })).toEqual({});
    expect(core.calls.filter((c) => c.startsWith("get"))).toEqual([]);
  });
});

describe("Kvm.enqcmd", () => {
  let kvm: Kvm;
  beforeEach(async () => {
    kvm = newKvm();
    await kvm.createVm({ mmToken: 1n, vcpuCount: 2, vmName: "a" });
    await kvm.createVm({ mmToken: 2n, vcpuCount: 1, vmName: "b" });
    await bind("vm-1", 201, 101, { setId: 1 });
    await bind("vm-2", 202, 101, { setId: 2 });
    history = [];
  });

  it("translates the guest PASID through the VM's own table", () => {
    expect(kvm.enqcmd(1, 1, toIa32Pasid(101))).toEqual({ outcome: "TRANSLATED", gpasid: 101, hpasid: 201, generation: 1 });
    expect(kvm.enqcmd(2, 0, toIa32Pasid(101))).toEqual({ outcome: "TRANSLATED", gpasid: 101, hpasid: 202, generation: 1 });
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
    await bind("vm-1", 201, 101);
    await bind("vm-1", 202, 102);
  });

  it("clears the table, drops every reference, withdraws the registration and stops the subscription", async () => {
    expect(await kvm.destroyVm(1)).toEqual({ clearedEntries: 2, releasedReferences: 2 });
    expect(core.refs.size).toBe(0);
    expect(core.regs.size).toBe(0);
    expect(bus.stopped).toEqual(["vm-1"]);
    await expectRefused(kvm.queryState(1), Code.NOT_FOUND, "VM_NOT_FOUND");
    await expectRefused(kvm.destroyVm(1), Code.NOT_FOUND, "VM_NOT_FOUND");
    // The token is free again.
    expect((await kvm.createVm({ mmToken: 1n, vcpuCount: 1, vmName: "" })).vmId).toBe(2);
    // Entries cleared before the references are dropped (S9).
    const actions = history.filter((h) => h.instance === "vm-1").map((h) => h.action);
    expect(actions.slice(-3)).toEqual(["vmcsUpdate", "vmcsUpdate", "kvmDestroyVm"]);
  });

  it("leaves the VM as it was when the core cannot withdraw the registration", async () => {
    core.down = true;
    await expectRefused(kvm.destroyVm(1), Code.UNAVAILABLE, "UNAVAILABLE");
    core.down = false;
    expect((await kvm.queryState(1))[0]!.translations).toHaveLength(2);
    expect(kvm.enqcmd(1, 0, toIa32Pasid(101)).outcome).toBe("TRANSLATED");
    expect(await kvm.destroyVm(1)).toEqual({ clearedEntries: 2, releasedReferences: 2 });
  });

  it("lets a BIND in flight during destruction put its own reference back", async () => {
    let resolveGet!: () => void;
    const realGet = core.get.bind(core);
    core.get = async (ref) => {
      await new Promise<void>((r) => (resolveGet = r));
      return realGet(ref);
    };
    const inFlight = bind("vm-1", 203, 103);
    await kvm.destroyVm(1);
    resolveGet();
    expect(await inFlight).toEqual({});
    expect(core.refs.size).toBe(0);
  });

  it("defers the puts the core could not take and drops them later", async () => {
    const realPut = core.put.bind(core);
    core.put = async () => {
      throw unavailable();
    };
    expect(await kvm.destroyVm(1)).toEqual({ clearedEntries: 2, releasedReferences: 0 });
    expect(kvm.pendingReleases).toBe(2);
    core.put = realPut;
    expect(await kvm.retryPendingReleases()).toBe(0);
    expect(core.refs.size).toBe(0);
  });

  it("reports a reference leaked after the last attempt", async () => {
    const logs: string[] = [];
    const k = newKvm({ maxReleaseAttempts: 2, log: (level, msg) => logs.push(`${level}: ${msg}`) });
    await k.createVm({ mmToken: 7n, vcpuCount: 1, vmName: "" });
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
    core.sets.set(1n, { setId: 4, inUse: 1 });
    const stale = await core.register("vm-7", 99n);
    core.sets.set(99n, { setId: 4, inUse: 1 });
    await core.get({ setId: 4, ioasid: 201, generation: 1, instance: "vm-7", purpose: "vmcs" });
    core.calls = [];
    const kvm = newKvm();
    await kvm.reconcile();
    expect(core.refs.size).toBe(0);
    expect(core.regs.has(stale.registrationId)).toBe(false);
    expect(history.map((h) => [h.instance, h.action])).toEqual([["vm-7", "kvmDestroyVm"]]);
    core.sets.clear();
    expect((await kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" })).instance).toBe("vm-8");
  });

  it("only renumbers when reaping is off", async () => {
    await core.register("vm-3", 99n);
    await core.get({ setId: 4, ioasid: 201, generation: 1, instance: "vm-3", purpose: "vmcs" });
    const kvm = newKvm({ reapStale: false });
    expect((await kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" })).instance).toBe("vm-4");
    expect(core.refs.size).toBe(1);
    expect(core.regs.size).toBe(2);
  });

  it("is retried by CreateVm when the core was unreachable at start", async () => {
    const kvm = newKvm();
    core.down = true;
    await expect(kvm.reconcile()).rejects.toThrow(/unreachable/);
    expect(kvm.reconciled).toBe(false);
    core.down = false;
    await kvm.createVm({ mmToken: 5n, vcpuCount: 1, vmName: "" });
    expect(kvm.reconciled).toBe(true);
  });
});

/** KVM crashed with VM 1 (set 4) translating 101 → 201: a new KVM restored from its store, not yet reconciled. */
async function crashedWithOneTranslation(): Promise<Kvm> {
  const store = new MemoryRoleState();
  core.sets.set(0x70n, { setId: 4, inUse: 0 });
  const first = newKvm({ store });
  await first.createVm({ mmToken: 0x70n, vcpuCount: 1, vmName: "g" });
  await bind("vm-1", 201, 101, { setId: 4 });
  bus.handlers.clear();
  return newKvm({ store, saved: store.saved });
}

describe("Kvm kept in a store (kill -9 and back)", () => {
  it("comes back with its VMs and VMCS tables, keeps the references they back, and handles the FREE it missed", async () => {
    const store = new MemoryRoleState();
    core.sets.set(0x70n, { setId: 4, inUse: 0 });
    const first = newKvm({ store });
    await first.createVm({ mmToken: 0x70n, vcpuCount: 2, vmName: "g" });
    await bind("vm-1", 201, 101, { setId: 4 });
    await bind("vm-1", 202, 102, { setId: 4 });
    expect(first.enqcmd(1, 0, toIa32Pasid(101))).toMatchObject({ outcome: "TRANSLATED", hpasid: 201 });
    // A crash: the process and its subscriptions are gone; a new KVM restores from the store.
    bus.handlers.clear();
    const again = newKvm({ store, saved: store.saved });
    await again.reconcile();
    expect(again.enqcmd(1, 1, toIa32Pasid(101))).toMatchObject({ outcome: "TRANSLATED", hpasid: 201 });
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1);
    expect(core.regs.size).toBe(1);
    expect(history.some((h) => h.action === "kvmRestoreVm")).toBe(true);
    expect(await free("vm-1", 202, { setId: 4 })).toEqual({ release: ["vmcs"] });
    expect(again.enqcmd(1, 0, toIa32Pasid(102)).outcome).toBe("GP");
    expect([...store.saved.keys()].sort()).toEqual(["vm/1", "vmcs/1/201"]);
    expect((await again.createVm({ mmToken: 0x71n, vcpuCount: 1, vmName: "" })).instance).toBe("vm-2");
  });

  it("resubscribes a restored VM on the reconcile retried after the core went away in the middle of it", async () => {
    const again = await crashedWithOneTranslation();
    // registrations() answers, then the core is gone for the VM's own reconcile (chaos soak, seed 2:
    // the VM was never resubscribed, so the FREE it missed was never delivered and its reference leaked).
    core.heldReferencesFailures = 1;
    await expectRefused(again.reconcile(), Code.UNAVAILABLE, "UNAVAILABLE");
    await again.reconcile();
    expect(bus.handlers.has("vm-1")).toBe(true);
    expect(await free("vm-1", 201, { setId: 4 })).toEqual({ release: ["vmcs"] });
    expect(again.enqcmd(1, 0, toIa32Pasid(101)).outcome).toBe("GP");
  });

  it("leaves alone a restored VM destroyed between a failed reconcile and its retry", async () => {
    const again = await crashedWithOneTranslation();
    core.heldReferencesFailures = 1;
    await expectRefused(again.reconcile(), Code.UNAVAILABLE, "UNAVAILABLE");
    await again.destroyVm(1);
    const logged = core.calls.length;
    await again.reconcile();
    expect(bus.handlers.has("vm-1")).toBe(false);
    expect(core.calls.slice(logged).filter((c) => c.startsWith("put"))).toEqual([]);
    expect(core.refs.size).toBe(0);
  });

  it("does not resubscribe a restored VM destroyed while its reconcile was under way", async () => {
    const again = await crashedWithOneTranslation();
    core.duringHeldReferences = async () => {
      await again.destroyVm(1);
    };
    await again.reconcile();
    expect(bus.handlers.has("vm-1")).toBe(false);
    expect(core.refs.size).toBe(0);
    expect(core.regs.size).toBe(0);
  });

  it("clears after a restart an entry whose reference the core no longer records, and drops a reference no entry backs", async () => {
    const store = new MemoryRoleState();
    core.sets.set(0x70n, { setId: 4, inUse: 0 });
    const first = newKvm({ store });
    await first.createVm({ mmToken: 0x70n, vcpuCount: 1, vmName: "g" });
    await bind("vm-1", 201, 101, { setId: 4 });
    // While KVM is down: an operator releases its reference on 201; a stray one appears on 203.
    await core.put({ setId: 4, ioasid: 201, generation: 1, instance: "vm-1", purpose: "vmcs" });
    await core.get({ setId: 4, ioasid: 203, generation: 1, instance: "vm-1", purpose: "vmcs" });
    bus.handlers.clear();
    const again = newKvm({ store, saved: store.saved });
    await again.reconcile();
    expect(again.enqcmd(1, 0, toIa32Pasid(101)).outcome).toBe("GP");
    expect(core.refs.size).toBe(0);
    expect([...store.saved.keys()]).toEqual(["vm/1"]);
  });
});

describe("Kvm.destroyVm and a lost acknowledgement", () => {
  it("releases what the core still records for the VM, even a reference whose release went with an ack the core lost", async () => {
    core.sets.set(0x90n, { setId: 4, inUse: 0 });
    const kvm = newKvm();
    await kvm.createVm({ mmToken: 0x90n, vcpuCount: 1, vmName: "g" });
    await bind("vm-1", 201, 101, { setId: 4 });
    // The FREE is handled and acknowledged with the release, but the core crashes before it keeps
    // the ack: the reference is still recorded, while KVM has let go of it.
    expect(await free("vm-1", 201, { setId: 4 })).toEqual({ release: ["vmcs"] });
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1);
    // The VMM crashes and the VM is destroyed: no redelivery can bring the release any more.
    expect(await kvm.destroyVm(1)).toMatchObject({ releasedReferences: 1 });
    expect(core.refs.size).toBe(0);
  });
});

describe("Kvm and references no live VM accounts for", () => {
  it("releases, after a VM whose set it never learnt is destroyed, the reference the core records for it", async () => {
    // The VM was created PENDING; its BIND's ioasid_get reached the core, but the KVM process died
    // before it kept the change, so the restored VM knows neither its set nor the reference.
    const kvm = newKvm();
    await kvm.reconcile();
    await kvm.createVm({ mmToken: 0xa0n, vcpuCount: 1, vmName: "g" });
    await core.get({ setId: 4, ioasid: 201, generation: 1, instance: "vm-1", purpose: "vmcs" });
    await core.get({ setId: 4, ioasid: 202, generation: 1, instance: "vm-2", purpose: "vmcs" }); // a VM of another life
    expect(kvm.releaseWorkDue).toBe(true); // what the server's release timer looks at
    await kvm.retryPendingReleases(); // the sweep after the start: vm-2 is nobody's
    expect(kvm.releaseWorkDue).toBe(false);
    expect(core.held({ ioasid: 202, generation: 1, instance: "vm-2" })).toBe(0);
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1); // vm-1 is live
    expect(await kvm.destroyVm(1)).toMatchObject({ releasedReferences: 0 });
    expect(core.held({ ioasid: 201, generation: 1, instance: "vm-1" })).toBe(1);
    expect(kvm.releaseWorkDue).toBe(true);
    core.down = true;
    await kvm.retryPendingReleases(); // the core unreachable: the sweep waits
    core.down = false;
    await kvm.retryPendingReleases();
    expect(core.refs.size).toBe(0);
    expect(history.filter((h) => h.action === "kvmOrphanRelease").map((h) => [h.instance, h.fields?.ioasid])).toEqual([
      ["vm-2", 202],
      ["vm-1", 201],
    ]);
    core.calls = [];
    await kvm.retryPendingReleases(); // nothing more to look for
    expect(core.calls).toEqual([]);
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
