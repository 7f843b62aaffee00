import { Priority } from "@ioasid/ioasid";
import { describe, expect, it } from "vitest";
import { core, createSet, held, history, kvmReferences, kvmRegistrations, newKvm, useKvmFixture, vmcs } from "./kvm-fixture.js";

// The KVM domain against the real core model and in-memory fakes (kvm-fixture.ts): what an earlier KVM process or a gone VM left in the core.
useKvmFixture();

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
