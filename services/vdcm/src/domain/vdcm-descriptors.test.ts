import { describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { CompletionStatus, DescriptorOp } from "./descriptor-runner.js";
import { PasidSpace } from "./submission.js";
import { DEV, M1, M2, VM1, VM2, alloc, freeIoasid, holders, deferred, refused, setup, noop } from "./vdcm-fixture.js";

// The Vdcm orchestration against the real core model and an in-memory IOMMU (vdcm-fixture.ts): descriptor submission.

describe("Vdcm descriptor submission", () => {
  it("translates a shared work queue's guest PASID, holds a reference while it runs, then puts it", async () => {
    const { core, vdcm, dma, history } = await setup();
    const gen = alloc(core, VM1, 201, 101);
    dma.mapped.add("201:0").add("201:1");
    const gate = deferred();
    dma.gate = gate.promise;
    const run = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.MEMMOVE, srcAddress: 0n, dstAddress: 4096n, size: 4096n } }),
    );
    await new Promise((r) => setImmediate(r));
    expect(holders(core, 201)[`vdcm/vdcm0/${DEV}.wq2.desc`]).toBe(1);
    gate.resolve();
    expect(await run).toEqual({ hpasid: 201, generation: gen, status: CompletionStatus.SUCCESS, bytesCompleted: 4096n, faultAddress: 0n, faultGroupId: 0n });
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(dma.requests.map((r) => [r.pasid, r.address, r.write])).toEqual([
      [201, 0n, false],
      [201, 4096n, true],
    ]);
    expect(history.at(-1)).toMatchObject({ action: "submit", ioasid: 201, spid: 101, setId: VM1 });
  });

  it("drops an untranslatable descriptor with INVALID_ARGUMENT (the portal's -EINVAL), the lookup's reason beside it: nothing reaches the device", async () => {
    const { core, vdcm, dma, history } = await setup();
    const g1 = alloc(core, VM1, 201, 101);
    alloc(core, VM2, 202, 101);
    const untranslatable = async (p: Promise<unknown>, lookup: string) => {
      const err = await p.then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toMatchObject({ code: Code.INVALID_ARGUMENT, reason: "PASID_UNTRANSLATABLE", metadata: { lookup } });
    };
    await untranslatable(vdcm.submitDescriptor(noop({ pasid: 999, pasidSpace: PasidSpace.GUEST })), "SPID_NOT_FOUND");
    // VM2 names VM1's host PASID on its own mdev: another set's IOASID.
    await untranslatable(vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 201, pasidSpace: PasidSpace.HOST })), "IOASID_NOT_IN_SET");
    await untranslatable(vdcm.submitDescriptor(noop({ pasid: 201, pasidSpace: PasidSpace.HOST, generation: g1 + 1 })), "STALE_GENERATION");
    await untranslatable(vdcm.submitDescriptor(noop({ pasid: 555, pasidSpace: PasidSpace.HOST })), "IOASID_NOT_FOUND");
    core.space.get(VM1, 201, { role: "iommu", instance: "i", purpose: "p" }, 0);
    freeIoasid(core, 201);
    await untranslatable(vdcm.submitDescriptor(noop({ pasid: 101, pasidSpace: PasidSpace.GUEST })), "IOASID_FREE_PENDING");
    expect(dma.requests).toEqual([]);
    expect(history.map((h) => h.action)).toEqual(["submit", "submit", "submit", "submit", "submit"]);
    expect(history.every((h) => h.ioasid === undefined && h.step.$case === "submit" && h.step.value.dropped === true)).toBe(true);
    expect(holders(core, 202)).toEqual({ "set-owner": 1 });
  });

  it("runs a host PASID (ENQCMD-translated) of the mdev's own set", async () => {
    const { core, vdcm } = await setup();
    const gen = alloc(core, VM2, 202, 101);
    expect(await vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 202, pasidSpace: PasidSpace.HOST }))).toMatchObject({
      hpasid: 202,
      generation: gen,
      status: CompletionStatus.SUCCESS,
    });
    expect(holders(core, 202)).toEqual({ "set-owner": 1 });
  });

  it("reports DMA faults as completion status, with the bytes done before", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:0");
    expect(
      await vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 4000n, size: 200n } })),
    ).toMatchObject({
      status: CompletionStatus.DMA_FAULT,
      bytesCompleted: 96n,
      faultAddress: 4096n,
    });
  });

  it("refuses malformed submissions with INVALID_FIELD and the wrong work-queue state", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    const calls = core.calls.length; // the registrations setup made
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0 })), Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED");
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0, pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasidSpace: PasidSpace.GUEST })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 1 << 20, pasidSpace: PasidSpace.GUEST })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: undefined })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 9 })), Code.NOT_FOUND, "WQ_NOT_FOUND");
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: "33333333-3333-4333-8333-333333333333" })), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    expect(dma.requests).toEqual([]);
    expect(core.calls.slice(calls)).toEqual([]);
  });
});
