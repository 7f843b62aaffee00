import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { iommu, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { expectRefused } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { openGuest, registerDevice, type Guest } from "../support/fault-fixture.js";

// The vIOMMU through VFIO (issue 16 items 3 and 5; DESIGN §5 "iommufd model"): a VMM allocates a
// vIOMMU over its VM's stage 2, vdevices and an event queue through its container, nests a device
// under the vIOMMU, reads its DMA faults by virt_id with a LOST_EVENTS marker for an overflow, and
// every object is its container's alone and goes with it. Real services, real NATS.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
let stack: StackFixture;
let token = 0xb100n;
let nextDevice = 0;

beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

const pci = (id: string) => ({ ref: { $case: "deviceId" as const, value: id } });

/** A guest (container, Session, `d0` assigned with a bound PASID) and a second assigned device `d1` that faults without PRI. */
async function guest(): Promise<Guest & { d0: string; d1: string }> {
  const c = stack.clients;
  const n = nextDevice++;
  const [d0, d1] = [`pf-vi${n}a`, `pf-vi${n}b`];
  await registerDevice(c, d0);
  // Without PRI a fault is an unrecoverable DMA fault: what a vIOMMU's event queue carries.
  await registerDevice(c, d1, { priCapable: false });
  const g = await openGuest(c, token++, d0);
  await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: g.containerId, device: pci(d1) }));
  return { ...g, d0, d1 };
}

/** The IOMMU's vIOMMU objects and domains, for before/after comparisons. */
async function iommuObjects() {
  const s = await stack.clients.iommu.queryState(P(iommu.QueryStateRequest, {}));
  return { viommus: s.viommus, vdevices: s.vdevices, veventqs: s.veventqs, domains: s.domains };
}

/** VFIO's view of the container's vIOMMUs (and its devices). */
async function vfioView(containerId: number) {
  const c = (await stack.clients.vfio.queryState({ containerId })).containers[0];
  return { viommus: c?.viommus, devices: c?.devices };
}

/** Both views, to show a refusal changed nothing. */
const views = async (containerId: number) => ({ iommu: await iommuObjects(), vfio: await vfioView(containerId) });

async function refusedUnchanged(containerId: number, call: () => Promise<unknown>, code: Code, reason: string): Promise<void> {
  const before = await views(containerId);
  await expectRefused(call(), code, reason);
  expect(await views(containerId)).toEqual(before);
}

/** A DMA read without PASID at an address the guest's first stage does not map: a NOT_PRESENT fault. */
const faultAt = (deviceId: string, address: bigint) =>
  stack.clients.iommu.translate(P(iommu.TranslateRequest, { deviceId, withoutPasid: true, address, access: { read: true } }));

/** What a reader sees: event sequence numbers, and markers as { lost: [first, count] }. */
const shapeOf = (items: vfio.VeventqItem[]) =>
  items.map((it) => (it.item!.$case === "event" ? it.item!.value.sequence : { lost: [it.item!.value.firstSequence, it.item!.value.count] }));

describe("vfio: vIOMMU objects of a container", () => {
  it("allocates a vIOMMU over the container's stage 2, a vdevice and an event queue; both VFIO and the IOMMU show them", async () => {
    const c = stack.clients.vfio;
    const g = await guest();
    const before = await iommuObjects();
    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: g.containerId, device: pci(g.d0) }))).viommu!;
    expect(v).toMatchObject({ device: pci(g.d0), parentDomainId: g.stage2, vdevices: [], veventqs: [] });
    const d = (await c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: g.containerId, viommuId: v.viommuId, device: pci(g.d1), virtId: 0x42n })))
      .vdevice!;
    expect(d).toMatchObject({ device: pci(g.d1), virtId: 0x42n });
    const q = (await c.allocVeventq({ containerId: g.containerId, viommuId: v.viommuId, depth: 8 })).veventq!;
    expect(q.depth).toBe(8);

    expect((await vfioView(g.containerId)).viommus).toEqual([{ ...v, vdevices: [d], veventqs: [q] }]);
    const after = await iommuObjects();
    expect(after.viommus.filter((x) => !before.viommus.some((y) => y.viommuId === x.viommuId))).toEqual([
      expect.objectContaining({ viommuId: v.viommuId, deviceId: g.d0, parentDomainId: g.stage2, owner: "vfio/vfio-1", vdeviceCount: 1, veventqCount: 1 }),
    ]);
    expect(after.vdevices).toContainEqual({ vdeviceId: d.vdeviceId, viommuId: v.viommuId, deviceId: g.d1, virtId: 0x42n });
    expect(after.veventqs).toContainEqual(expect.objectContaining({ veventqId: q.veventqId, viommuId: v.viommuId, depth: 8 }));
    g.session.abort();
  });

  it("refuses by code and reason, changing nothing at VFIO or the IOMMU", async () => {
    const c = stack.clients.vfio;
    const g = await guest();
    const id = g.containerId;
    const mdev = { ref: { $case: "mdevUuid" as const, value: "0b5e6c1e-0000-4000-8000-00000000000a" } };
    await refusedUnchanged(
      id,
      () => c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci("pf-not-here") })),
      Code.FAILED_PRECONDITION,
      "DEVICE_NOT_ASSIGNED",
    );
    await refusedUnchanged(id, () => c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: mdev })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refusedUnchanged(id, () => c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id })), Code.INVALID_ARGUMENT, "INVALID_FIELD");

    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci(g.d0) }))).viommu!;
    const vdev = (x: object) => () =>
      c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: id, viommuId: v.viommuId, device: pci(g.d1), virtId: 7n, ...x }));
    await vdev({})();
    // virt_id unique per vIOMMU; one vdevice per device per vIOMMU (the IOMMU's refusals, passed through).
    await refusedUnchanged(id, vdev({ device: pci(g.d0) }), Code.ALREADY_EXISTS, "VDEVICE_EXISTS");
    await refusedUnchanged(id, vdev({ virtId: 8n }), Code.ALREADY_EXISTS, "VDEVICE_EXISTS");
    await refusedUnchanged(id, vdev({ device: pci("pf-not-here"), virtId: 9n }), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    await refusedUnchanged(id, vdev({ viommuId: 0xff_ffff, virtId: 9n }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");

    const q = (depth: number) => () => c.allocVeventq({ containerId: id, viommuId: v.viommuId, depth });
    await refusedUnchanged(id, q(0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refusedUnchanged(id, q(4097), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await q(4)();
    await refusedUnchanged(id, q(4), Code.ALREADY_EXISTS, "VEVENTQ_EXISTS");

    // A nested domain on the vIOMMU needs the device's vdevice: the old domain (the stage 2) stays.
    const replace = (x: object) => () =>
      c.replaceDeviceDomain(P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci(g.d0), guestPgtable: 0x9000n, viommuId: v.viommuId, ...x }));
    await refusedUnchanged(id, replace({}), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    await refusedUnchanged(id, replace({ viommuId: 0xff_ffff }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    await refusedUnchanged(id, replace({ guestPgtable: 0n }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    g.session.abort();
  });

  it("never shows a VM another VM's objects: naming them through its own container is NOT_FOUND exactly as ids never allocated", async () => {
    const c = stack.clients.vfio;
    const a = await guest();
    const b = await guest();
    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: a.containerId, device: pci(a.d0) }))).viommu!;
    const d = (await c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: a.containerId, viommuId: v.viommuId, device: pci(a.d1), virtId: 1n }))).vdevice!;
    const q = (await c.allocVeventq({ containerId: a.containerId, viommuId: v.viommuId, depth: 4 })).veventq!;
    const cb = b.containerId;
    const calls = (viommuId: number, vdeviceId: number, veventqId: number) =>
      [
        [() => c.destroyViommu({ containerId: cb, viommuId }), "VIOMMU_NOT_FOUND"],
        [() => c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: cb, viommuId, device: pci(b.d1), virtId: 2n })), "VIOMMU_NOT_FOUND"],
        [() => c.allocVeventq({ containerId: cb, viommuId, depth: 4 }), "VIOMMU_NOT_FOUND"],
        [
          () => c.replaceDeviceDomain(P(vfio.ReplaceDeviceDomainRequest, { containerId: cb, device: pci(b.d1), guestPgtable: 0x9000n, viommuId })),
          "VIOMMU_NOT_FOUND",
        ],
        [() => c.destroyVdevice({ containerId: cb, vdeviceId }), "VDEVICE_NOT_FOUND"],
        [() => c.destroyVeventq({ containerId: cb, veventqId }), "VEVENTQ_NOT_FOUND"],
        [() => c.readVeventq({ containerId: cb, veventqId, maxItems: 0 }), "VEVENTQ_NOT_FOUND"],
      ] as const;
    const before = { a: await views(a.containerId), b: await views(cb) };
    const unknown = 0xff_fff0;
    const others = calls(v.viommuId, d.vdeviceId, q.veventqId);
    const nevers = calls(unknown, unknown, unknown);
    for (let i = 0; i < others.length; i++) {
      const [call, reason] = others[i]!;
      const e = await expectRefused(call(), Code.NOT_FOUND, reason);
      const never = await expectRefused(nevers[i]![0](), Code.NOT_FOUND, reason);
      // The same answer, but for the id itself: nothing says the other VM's object exists.
      expect(e.message.replaceAll(String(v.viommuId), "N").replaceAll(String(d.vdeviceId), "N").replaceAll(String(q.veventqId), "N")).toBe(
        never.message.replaceAll(String(unknown), "N"),
      );
    }
    expect({ a: await views(a.containerId), b: await views(cb) }).toEqual(before);
    a.session.abort();
    b.session.abort();
  });
});

describe("vfio: vIOMMU events", () => {
  it("delivers a DMA fault under a nested domain on the vIOMMU by virt_id, and an overflow as a LOST_EVENTS marker with the gap", async () => {
    const c = stack.clients.vfio;
    const g = await guest();
    const id = g.containerId;
    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci(g.d0) }))).viommu!;
    await c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: id, viommuId: v.viommuId, device: pci(g.d1), virtId: 0xbeefn }));
    const q = (await c.allocVeventq({ containerId: id, viommuId: v.viommuId, depth: 2 })).veventq!;
    const nested = await c.replaceDeviceDomain(
      P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci(g.d1), guestPgtable: 0x9000n, viommuId: v.viommuId }),
    );
    expect((await iommuObjects()).domains.find((x) => x.domainId === nested.domainId)).toMatchObject({
      viommuId: v.viommuId,
      parentDomainId: g.stage2,
      guestPgtable: 0x9000n,
    });
    expect((await vfioView(id)).devices!.find((x) => x.device?.ref?.value === g.d1)).toMatchObject({
      nestedDomainId: nested.domainId,
      viommuId: v.viommuId,
    });

    const r = await faultAt(g.d1, 0x20_0000n);
    expect(r.outcome).toBe(iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT);
    const first = (await c.readVeventq({ containerId: id, veventqId: q.veventqId, maxItems: 0 })).items;
    expect(first).toHaveLength(1);
    expect(first[0]!.item).toMatchObject({
      $case: "event",
      value: { sequence: 1n, virtId: 0xbeefn, withoutPasid: true, address: 0x20_0000n, reason: "FAULT_REASON_NOT_PRESENT", access: { read: true } },
    });
    expect(vfio.Vevent.toJSON(first[0]!.item!.value as vfio.Vevent)).not.toHaveProperty("deviceId");
    expect((await c.readVeventq({ containerId: id, veventqId: q.veventqId, maxItems: 0 })).items, "read means taken").toEqual([]);

    // Five faults into a queue two deep: 2 and 3 queued, 4..6 lost; one read of one item frees a
    // slot the next fault takes, behind the marker.
    for (let i = 1; i <= 5; i++) await faultAt(g.d1, BigInt(i) * 0x10_0000n);
    expect(shapeOf((await c.readVeventq({ containerId: id, veventqId: q.veventqId, maxItems: 1 })).items)).toEqual([2n]);
    await faultAt(g.d1, 0x60_0000n);
    const rest = (await c.readVeventq({ containerId: id, veventqId: q.veventqId, maxItems: 0 })).items;
    expect(shapeOf(rest)).toEqual([3n, { lost: [4n, 3n] }, 7n]);
    expect(rest[2]!.item!.value).toMatchObject({ address: 0x60_0000n, virtId: 0xbeefn });
    g.session.abort();
  });
});

describe("vfio: vIOMMU destruction", () => {
  it("destroys in dependency order: VIOMMU_IN_USE and VDEVICE_IN_USE until undone in order; destroyed ids are NOT_FOUND", async () => {
    const c = stack.clients.vfio;
    const g = await guest();
    const id = g.containerId;
    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci(g.d0) }))).viommu!;
    const d = (await c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: id, viommuId: v.viommuId, device: pci(g.d1), virtId: 3n }))).vdevice!;
    const q = (await c.allocVeventq({ containerId: id, viommuId: v.viommuId, depth: 2 })).veventq!;
    const nested = await c.replaceDeviceDomain(
      P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci(g.d1), guestPgtable: 0x9000n, viommuId: v.viommuId }),
    );

    const destroyViommu = () => c.destroyViommu({ containerId: id, viommuId: v.viommuId });
    await refusedUnchanged(id, destroyViommu, Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    await refusedUnchanged(id, () => c.destroyVdevice({ containerId: id, vdeviceId: d.vdeviceId }), Code.FAILED_PRECONDITION, "VDEVICE_IN_USE");
    // Nested translation off: the nested domain on the vIOMMU is freed.
    await c.replaceDeviceDomain(P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci(g.d1), guestPgtable: 0n }));
    expect((await iommuObjects()).domains.some((x) => x.domainId === nested.domainId)).toBe(false);
    await refusedUnchanged(id, destroyViommu, Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    await c.destroyVdevice({ containerId: id, vdeviceId: d.vdeviceId });
    await refusedUnchanged(id, destroyViommu, Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    await c.destroyVeventq({ containerId: id, veventqId: q.veventqId });
    await destroyViommu();

    expect((await vfioView(id)).viommus).toEqual([]);
    const after = await iommuObjects();
    expect(after.viommus.some((x) => x.viommuId === v.viommuId)).toBe(false);
    expect(after.vdevices.some((x) => x.vdeviceId === d.vdeviceId)).toBe(false);
    expect(after.veventqs.some((x) => x.veventqId === q.veventqId)).toBe(false);
    await expectRefused(destroyViommu(), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    await expectRefused(c.destroyVdevice({ containerId: id, vdeviceId: d.vdeviceId }), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    await expectRefused(c.readVeventq({ containerId: id, veventqId: q.veventqId, maxItems: 0 }), Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
    g.session.abort();
  });

  it("UnassignDevice replaces nothing else: it frees the device's nested domain and destroys its vdevices; the vIOMMU stays", async () => {
    const c = stack.clients.vfio;
    const g = await guest();
    const id = g.containerId;
    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci(g.d0) }))).viommu!;
    const d = (await c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: id, viommuId: v.viommuId, device: pci(g.d1), virtId: 5n }))).vdevice!;
    const nested = await c.replaceDeviceDomain(
      P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci(g.d1), guestPgtable: 0x9000n, viommuId: v.viommuId }),
    );
    await c.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId: id, device: pci(g.d1) }));
    const after = await iommuObjects();
    expect(after.domains.some((x) => x.domainId === nested.domainId)).toBe(false);
    expect(after.vdevices.some((x) => x.vdeviceId === d.vdeviceId)).toBe(false);
    expect(after.viommus.find((x) => x.viommuId === v.viommuId)).toMatchObject({ vdeviceCount: 0, nestedDomainIds: [] });
    expect((await vfioView(id)).viommus).toEqual([{ ...v, vdevices: [] }]);
    g.session.abort();
  });

  it("a VMM crash with a vIOMMU, a vdevice, an event queue and a nested domain on it leaves nothing at the IOMMU, and frees the stage 2", async () => {
    const c = stack.clients.vfio;
    const g = await guest();
    const id = g.containerId;
    const v = (await c.allocViommu(P(vfio.AllocViommuRequest, { containerId: id, device: pci(g.d0) }))).viommu!;
    const d = (await c.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId: id, viommuId: v.viommuId, device: pci(g.d1), virtId: 6n }))).vdevice!;
    const q = (await c.allocVeventq({ containerId: id, viommuId: v.viommuId, depth: 2 })).veventq!;
    const nested = await c.replaceDeviceDomain(
      P(vfio.ReplaceDeviceDomainRequest, { containerId: id, device: pci(g.d1), guestPgtable: 0x9000n, viommuId: v.viommuId }),
    );
    await faultAt(g.d1, 0x20_0000n); // an unread event goes with its queue

    g.session.abort(); // the VMM crashes: its Session stream ends
    await waitFor(async () => (await stack.clients.vfio.queryState({ containerId: 0 })).containers.every((x) => x.containerId !== id), {
      message: "the crashed VMM's container released",
    });
    await waitFor(async () => !(await iommuObjects()).domains.some((x) => x.domainId === g.stage2), { message: "the stage 2 freed" });
    const after = await iommuObjects();
    expect(after.viommus.some((x) => x.viommuId === v.viommuId)).toBe(false);
    expect(after.vdevices.some((x) => x.vdeviceId === d.vdeviceId)).toBe(false);
    expect(after.veventqs.some((x) => x.veventqId === q.veventqId)).toBe(false);
    expect(after.domains.some((x) => x.domainId === nested.domainId)).toBe(false);
  });
});
