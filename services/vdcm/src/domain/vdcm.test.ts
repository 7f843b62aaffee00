import { describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { TokenType } from "@ioasid/ioasid";
import { CompletionStatus, DescriptorOp } from "./descriptor-runner.js";
import { PasidSpace } from "./submission.js";
import { EntryState } from "./vdcm-model.js";
import { DEV, M1, M2, VM1, VM2, alloc, freeIoasid, holders, exists, puts, registeredSets, deferred, refused, setup, noop } from "./vdcm-fixture.js";

// The Vdcm orchestration against the real core model and an in-memory IOMMU (vdcm-fixture.ts): programming and clearing
// PASIDs, isolation, assignment.

describe("Vdcm mdev_write / mdev_clear (life-cycle steps 8–16)", () => {
  it("translates the guest PASID taking a reference, and programs the host PASID", async () => {
    const { core, vdcm, history } = await setup();
    alloc(core, VM1, 201, 101);
    const entry = await vdcm.writeWqPasid(M1, 0, 101);
    expect(entry).toMatchObject({ hpasid: 201, gpasid: 101, setId: VM1, wqId: 0, mdevUuid: M1, state: EntryState.PROGRAMMED });
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    expect(vdcm.snapshot().devices[0]!.wqs[0]!.hpasid).toBe(201);
    expect(history).toEqual([expect.objectContaining({ action: "vdevWrite", ioasid: 201, spid: 101, setId: VM1, refcount: 2 })]);
  });

  it("refuses a guest PASID never bound, or being freed, and programs nothing", async () => {
    const { core, vdcm } = await setup();
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "SPID_NOT_FOUND");
    alloc(core, VM1, 201, 101);
    core.space.get(VM1, 201, { role: "iommu", instance: "i", purpose: "p" }, 0);
    freeIoasid(core, 201);
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
    // The work queue was not left reserved.
    alloc(core, VM1, 202, 102);
    await vdcm.writeWqPasid(M1, 0, 102);
  });

  it("puts the reference back when the device refuses the PASID (PASID_IN_USE)", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    // An operator force-released VDCM's reference, the IOASID was reclaimed and VM2 got it.
    core.space.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` }, 0);
    freeIoasid(core, 201);
    alloc(core, VM2, 201, 555);
    await refused(vdcm.writeWqPasid(M2, 0, 555), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(vdcm.snapshot().devices[0]!.pasidEntries.map((e) => [e.setId, e.wqId])).toEqual([[VM1, 0]]);
  });

  it("keeps retrying, on its timer, the put of a cleared entry while the core is unreachable", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    for (let i = 0; i < 5; i++) core.failNext("put"); // the clear's three attempts and the first retry fail (UNAVAILABLE)
    expect(await vdcm.clearWqPasid(M1, 0)).toMatchObject({ cleared: true });
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    expect(vdcm.pendingPutCount).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(0);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    // A FREE now reclaims at once: nothing of VDCM's is left.
    freeIoasid(core, 201);
    expect(exists(core, 201)).toBe(false);
  });

  it("releases, on its timer, a reference the core took for a write whose answer was lost, and keeps the ones entries back", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    alloc(core, VM1, 202, 102);
    await vdcm.writeWqPasid(M1, 2, 102); // a programmed entry (device wq 3): its reference stays
    core.loseAnswerOf("findBySpid"); // the core takes the reference, VDCM hears UNAVAILABLE
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 }); // held by nobody
    expect(vdcm.pendingPutCount).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(0);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(holders(core, 202)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq3`]: 1 });
    // The guest's retry then programs it.
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
  });

  it("clears by draining the work queue first, then clears the entry, then puts", async () => {
    const { core, vdcm, dma, history } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:1");
    const gate = deferred();
    dma.gate = gate.promise;
    const running = vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 4096n, size: 64n } }));
    let clearedAt = 0;
    const clear = vdcm.clearWqPasid(M1, 0).then((r) => ((clearedAt = history.length), r));
    await Promise.resolve();
    // Draining: no new descriptor on the entry, and it is not cleared yet.
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0 })), Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED");
    expect(vdcm.snapshot().devices[0]!.pasidEntries[0]!.state).toBe(EntryState.DRAINING);
    gate.resolve();
    expect((await running).status).toBe(CompletionStatus.SUCCESS);
    expect(await clear).toMatchObject({ cleared: true, entry: { hpasid: 201, gpasid: 101 } });
    expect(history.map((h) => h.action)).toEqual(["vdevWrite", "submit", "vdevClear"]);
    expect(clearedAt).toBe(3);
    expect(core.calls.at(-1)).toBe("put");
    expect(puts(core).at(-1)).toBe(`put ${VM1} 201 ${DEV}.wq0`);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(await vdcm.clearWqPasid(M1, 0)).toEqual({ cleared: false, entry: undefined });
  });
});

describe("Vdcm isolation between VMs", () => {
  it("translates a guest PASID in the writing mdev's own set; another VM's clear leaves the first VM's entry alone", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    alloc(core, VM2, 202, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(await vdcm.clearWqPasid(M2, 0)).toEqual({ cleared: false, entry: undefined });
    expect((await vdcm.writeWqPasid(M2, 0, 101)).hpasid).toBe(202);
    expect(vdcm.snapshot().devices[0]!.pasidEntries.map((e) => [e.hpasid, e.setId, e.mdevUuid])).toEqual([
      [201, VM1, M1],
      [202, VM2, M2],
    ]);
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
  });
});

describe("Vdcm assignment and registration", () => {
  it("registers on a set with its first mdev and withdraws with its last", async () => {
    const { core, vdcm } = await setup();
    expect(registeredSets(core).sort()).toEqual([VM1, VM2]);
    const m3 = (await vdcm.createMdev(DEV, "", [2])).mdevUuid;
    expect((await vdcm.assignMdev(m3, VM1)).registered).toBe(false);
    expect(await vdcm.unassignMdev(M1)).toEqual({ clearedEntries: 0, unregistered: false });
    expect(await vdcm.unassignMdev(m3)).toEqual({ clearedEntries: 0, unregistered: true });
    expect(registeredSets(core)).toEqual([VM2]);
    expect(vdcm.snapshot().registeredSetIds).toEqual([VM2]);
  });

  it("surfaces the core's refusal to register on a non-empty set (SET_NOT_EMPTY) and an unknown set (SET_NOT_FOUND)", async () => {
    const { core, vdcm } = await setup();
    const m3 = (await vdcm.createMdev(DEV, "", [2])).mdevUuid;
    const nonEmpty = core.space.createSet({ token: { type: TokenType.MM, value: 90n }, quota: 4 }).id;
    core.space.alloc(nonEmpty);
    const unknown = nonEmpty + 1; // never created
    await refused(vdcm.assignMdev(m3, nonEmpty), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await refused(vdcm.assignMdev(m3, unknown), Code.NOT_FOUND, "SET_NOT_FOUND");
    expect(vdcm.state.getMdev(m3)!.setId).toBe(0);
    expect(vdcm.snapshot().registeredSetIds).toEqual([VM1, VM2]);
  });

  it("unassigning clears the mdev's programmed PASIDs, releasing their references", async () => {
    const { core, vdcm, history } = await setup();
    alloc(core, VM1, 201, 101);
    alloc(core, VM1, 203, 103);
    await vdcm.writeWqPasid(M1, 0, 101);
    await vdcm.writeWqPasid(M1, 2, 103);
    await refused(vdcm.destroyMdev(M1), Code.FAILED_PRECONDITION, "MDEV_ASSIGNED");
    expect(await vdcm.unassignMdev(M1)).toEqual({ clearedEntries: 2, unregistered: true });
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(holders(core, 203)).toEqual({ "set-owner": 1 });
    expect(history.filter((h) => h.action === "vdevClear")).toHaveLength(2);
    await vdcm.destroyMdev(M1);
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await refused(vdcm.unassignMdev(M1), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await refused(vdcm.unassignMdev(""), Code.INVALID_ARGUMENT, "INVALID_FIELD");
  });
});

describe("Vdcm unassignment drains", () => {
  it("waits for descriptors in flight on the mdev's shared work queue before it returns", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    let done = false;
    const unassign = vdcm.unassignMdev(M1).then(() => (done = true));
    await new Promise((r) => setImmediate(r));
    expect(done).toBe(false);
    gate.resolve();
    await desc;
    await unassign;
    expect(vdcm.state.getMdev(M1)!.setId).toBe(0);
  });
});
