import { Code } from "@ioasid/errors";
import { EventType } from "@ioasid/ioasid";
import { describe, expect, it } from "vitest";
import { MemoryRoleState } from "@ioasid/bus";
import { toIa32Pasid } from "../domain/ia32-pasid.js";
import type { Kvm } from "../domain/kvm.js";
import { kvmStateCodec } from "./kvm-state-codec.js";
import {
  bind,
  bus,
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
  useKvmFixture,
  vmcs,
} from "../domain/kvm-fixture.js";

// KVM killed with -9 and back: the domain (kvm-fixture.ts) kept through the real store codec in a
// MemoryRoleState (a bus value, so this test is an adapter test: DESIGN §2).
useKvmFixture();

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
