import { Code } from "@ioasid/errors";
import { EventType, Priority, TokenType } from "@ioasid/ioasid";
import { beforeEach, describe, expect, it } from "vitest";
import { toIa32Pasid } from "./ia32-pasid.js";
import type { Kvm } from "./kvm.js";
import {
  bind,
  bus,
  clearHistory,
  committed,
  core,
  createSet,
  expectRefused,
  free,
  held,
  history,
  kvmReferences,
  kvmRegistrations,
  newKvm,
  unavailable,
  useKvmFixture,
} from "./kvm-fixture.js";

// The KVM domain against the real core model and in-memory fakes (kvm-fixture.ts): creating, running and destroying VMs.
useKvmFixture();

describe("Kvm.createVm", () => {
  it("registers kvm/vm-<id> by MM token, PENDING before the set exists and ACTIVE once it does", async () => {
    const kvm = newKvm();
    const vm = await kvm.createVm({ mmToken: 0x7001n, vcpuCount: 0, vmName: "guest" });
    expect(vm).toMatchObject({ vmId: 1, instance: "vm-1", vcpuCount: 1, registration: "PENDING", setId: 0, translations: [], referencesHeld: 0 });
    expect(core.requests.filter((r) => r.call !== "listRegistrations")).toEqual([
      {
        call: "register",
        args: [
          {
            subscriber: { name: "kvm", instance: "vm-1" },
            priority: Priority.CPU,
            scope: { kind: "mm", token: 0x7001n },
            events: [EventType.BIND, EventType.UNBIND, EventType.FREE],
          },
        ],
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
    clearHistory();
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
