import type { RoleStatePort } from "@ioasid/bus";
import { describe, expect, it } from "vitest";
import { EventType, Priority } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import { Vdcm } from "./vdcm.js";
import type { VdcmKeptEntry } from "./vdcm-kept-entry.js";
import { EntryState } from "./vdcm-model.js";
import { VdcmState } from "./vdcm-state.js";
import { memoryVdcmState } from "../adapters/memory-vdcm-state.js";
import { DEV, M1, VM1, createSets, alloc, freeIoasid, holders, freeEvent, FakeDma, setup } from "./vdcm-fixture.js";

// The Vdcm orchestration against the real core model and an in-memory IOMMU (vdcm-fixture.ts): reconcile after a restart.

describe("Vdcm reconcile", () => {
  it("releases the references and registrations an earlier run left behind", async () => {
    const core = new InProcessCore();
    createSets(core);
    core.space.register({
      subscriber: { name: "vdcm", instance: "vdcm0" },
      priority: Priority.DEVICE,
      scope: { kind: "set", setId: VM1 },
      events: [EventType.FREE],
    });
    alloc(core, VM1, 201, 101);
    const stale = { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` };
    core.space.get(VM1, 201, stale, 0);
    core.space.get(VM1, 201, { ...stale, purpose: `${DEV}.wq2.desc` }, 0);
    core.space.get(VM1, 201, { ...stale, purpose: `${DEV}.wq2.desc` }, 0);
    core.space.get(VM1, 201, { ...stale, instance: "vdcm1" }, 0);
    const vdcm = new Vdcm({ instance: "vdcm0", core, dma: new FakeDma() });
    expect(await vdcm.reconcile()).toEqual({ released: 3, unregistered: 1, cleared: 0 });
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm1/${DEV}.wq0`]: 1 });
    expect(core.space.listRegistrations()).toEqual([]);
  });

  it("comes back from its store with its devices, mdevs, programmed PASIDs and registrations, keeping the references they back", async () => {
    const store = memoryVdcmState();
    const { core, vdcm: first } = await setup({ store });
    alloc(core, VM1, 201, 101);
    await first.writeWqPasid(M1, 0, 101);
    // A crash: a new process restores from what was written.
    const again = new Vdcm({ instance: "vdcm0", core, dma: new FakeDma(), state: VdcmState.restore(store.saved), store });
    expect(again.snapshot()).toEqual(first.snapshot());
    expect(await again.reconcile()).toEqual({ released: 0, unregistered: 0, cleared: 0 });
    expect(again.snapshot().devices[0]!.pasidEntries.map((e) => [e.hpasid, e.wqId, e.state])).toEqual([[201, 0, EntryState.PROGRAMMED]]);
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    // Its FREE (delivered again after the restart) clears the device and releases with the ack.
    freeIoasid(core, 201);
    expect((await again.onIoasidEvent(freeEvent(core, 201))).release).toEqual([`${DEV}.wq0`]);
    expect(VdcmState.restore(store.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("acknowledges a FREE only once the clear it relies on is kept, even one made by another call", async () => {
    // Chaos soak, seed 21: an mdev_clear cleared the entry in memory, its store write hung; the FREE
    // found nothing to clear and was acknowledged; VDCM then fail-stopped, came back with the entry
    // (never kept cleared), and nothing was left to deliver the FREE again.
    const saved = memoryVdcmState();
    const gate: { hold?: Promise<void> } = {};
    const store: RoleStatePort<VdcmKeptEntry> = {
      write: async (changes) => {
        await gate.hold;
        await saved.write(changes);
      },
    };
    const { core, vdcm } = await setup({ store });
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    let open!: () => void;
    gate.hold = new Promise<void>((resolve) => (open = resolve));
    const clearing = vdcm.clearWqPasid(M1, 0);
    await new Promise((r) => setImmediate(r));
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]); // cleared in memory, not kept yet
    freeIoasid(core, 201);
    let acked = false;
    const ack = vdcm.onIoasidEvent(freeEvent(core, 201)).then((a) => {
      acked = true;
      return a;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(acked).toBe(false);
    open();
    expect(await ack).toEqual({ release: [] }); // the mdev_clear releases its own reference
    expect(await clearing).toMatchObject({ cleared: true });
    expect(VdcmState.restore(saved.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("clears, after a restart, a programmed entry whose reference the core no longer records", async () => {
    const store = memoryVdcmState();
    const { core, vdcm } = await setup({ store });
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    // An operator force-released VDCM's reference while it was down.
    core.space.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` }, 0);
    const again = new Vdcm({ instance: "vdcm0", core, dma: new FakeDma(), state: VdcmState.restore(store.saved), store });
    expect(await again.reconcile()).toEqual({ released: 0, unregistered: 0, cleared: 1 });
    expect(again.snapshot().devices[0]!.pasidEntries).toEqual([]);
    expect(VdcmState.restore(store.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });
});
