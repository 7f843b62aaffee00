import { describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { OWNER_ROLE } from "@ioasid/ioasid";
import type { InProcessCore } from "@ioasid/testkit";
import { DescriptorOp } from "./descriptor-runner.js";
import { PasidSpace } from "./submission.js";
import { DEV, M1, M2, VM1, VM2, alloc, freeIoasid, holders, exists, freeEvent, puts, deferred, refused, setup, noop, FREE } from "./vdcm-fixture.js";

// The Vdcm orchestration against the real core model and an in-memory IOMMU (vdcm-fixture.ts): the FREE handler and stale
// contexts of a reused IOASID.

describe("Vdcm FREE handler (misbehaving-guest table steps 21/24)", () => {
  it("drains and clears every entry using the PASID and releases their references with the ack; a redelivery releases nothing", async () => {
    const { core, vdcm, history } = await setup();
    const gen = alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    await vdcm.writeWqPasid(M1, 2, 101);
    freeIoasid(core, 201);
    const event = freeEvent(core, 201);
    expect(event).toMatchObject({ ioasid: 201, generation: gen, setId: VM1, spid: 101 });
    const ack = await vdcm.onIoasidEvent(event);
    expect(ack.release.sort()).toEqual([`${DEV}.wq0`, `${DEV}.wq3`]);
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
    expect(history.filter((h) => h.action === "vdevClear")).toEqual([
      expect.objectContaining({ ioasid: 201, seq: event.seq, setId: VM1 }),
      expect.objectContaining({ ioasid: 201, seq: event.seq, setId: VM1 }),
    ]);
    expect(await vdcm.onIoasidEvent(event)).toEqual({ release: [] });
    // The core releases them with the acknowledgement: the last one reclaims.
    for (const purpose of ack.release) core.space.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose }, gen);
    expect(exists(core, 201)).toBe(false);
  });

  it("ignores other events and other generations", async () => {
    const { core, vdcm } = await setup();
    const gen = alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(await vdcm.onIoasidEvent({ ...FREE(201, gen, VM1), type: "UNBIND" })).toEqual({ release: [] });
    expect(await vdcm.onIoasidEvent(FREE(201, gen + 1, VM1))).toEqual({ release: [] });
    expect(await vdcm.onIoasidEvent(FREE(201, gen, VM2))).toEqual({ release: [] });
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toHaveLength(1);
  });

  it("waits for a write whose reference was taken before the free, then clears what it programmed", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    const reply = deferred();
    core.holdAnswerOf("findBySpid", reply.promise);
    const write = vdcm.writeWqPasid(M1, 0, 101);
    await new Promise((r) => setImmediate(r));
    expect(holders(core, 201)[`vdcm/vdcm0/${DEV}.wq0`]).toBe(1);
    freeIoasid(core, 201);
    let acked = false;
    const free = vdcm.onIoasidEvent(freeEvent(core, 201)).then((a) => ((acked = true), a));
    await new Promise((r) => setImmediate(r));
    expect(acked).toBe(false);
    reply.resolve();
    await write;
    expect(await free).toEqual({ release: [`${DEV}.wq0`] });
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("leaves a clear in progress its release: one put, never two", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:0");
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }));
    const clear = vdcm.clearWqPasid(M1, 0);
    await Promise.resolve();
    freeIoasid(core, 201);
    const free = vdcm.onIoasidEvent(freeEvent(core, 201));
    gate.resolve();
    await desc;
    expect(await clear).toMatchObject({ cleared: true });
    expect(await free).toEqual({ release: [] });
    expect(puts(core)).toEqual([`put ${VM1} 201 ${DEV}.wq0`]);
    expect(exists(core, 201)).toBe(false);
  });

  it("drains descriptors in flight on shared work queues with the PASID before acknowledging", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    dma.mapped.add("201:0");
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ virtualWq: 1, pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    freeIoasid(core, 201);
    let acked = false;
    const free = vdcm.onIoasidEvent(freeEvent(core, 201)).then(() => (acked = true));
    await new Promise((r) => setImmediate(r));
    expect(acked).toBe(false);
    gate.resolve();
    await desc;
    await free;
    expect(exists(core, 201)).toBe(false);
  });
});

describe("Vdcm stale contexts (an IOASID reused while the device still has the old one)", () => {
  /**
   * Simulates an operator force-release: IOASID 201 is freed, every reference on it dropped (so it
   * is reclaimed while the device still has its context), and it is reallocated to VM2 as SPID 555.
   */
  const reuseForVm2 = (core: InProcessCore) => {
    const before = core.space.describe(201)!;
    core.space.free(before.setId, 201);
    for (const h of before.holders) {
      if (h.holder.role === OWNER_ROLE) continue;
      for (let i = 0; i < h.count; i++) core.space.put(before.setId, 201, h.holder);
    }
    expect(exists(core, 201)).toBe(false);
    return alloc(core, VM2, 201, 555);
  };

  it("refuses to program a PASID a descriptor of another guest is still using", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    reuseForVm2(core);
    await refused(vdcm.writeWqPasid(M2, 0, 555), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    gate.resolve();
    await desc;
    await vdcm.writeWqPasid(M2, 0, 555);
  });

  it("drops a shared-work-queue descriptor whose PASID another guest's entry still uses", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    const gen = reuseForVm2(core);
    await refused(
      vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 201, generation: gen, pasidSpace: PasidSpace.HOST })),
      Code.FAILED_PRECONDITION,
      "PASID_IN_USE",
    );
    expect(dma.requests).toEqual([]);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
  });
});
