import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { createClient } from "@ioasid/grpc-kit";
import { Code } from "@ioasid/errors";
import { iommu } from "@ioasid/proto";
import type { ServiceProcess } from "@ioasid/testkit";
import { expectRefused } from "../support/core-fixture.js";
import { pf, startIommuProcess, startIommuStack, type IommuClient, type IommuStack } from "../support/iommu-fixture.js";

// The vIOMMU objects of the iommufd model (DESIGN §5 "iommufd model"; issue 16 item 3) through the
// built IOMMU process, with the real core and NATS: vIOMMUs over a parent domain, vdevices,
// vEVENTQs with sequence numbers and LOST_EVENTS markers, and the order things must be destroyed in.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const OWNER = "vfio/vfio-1";
const DMA_FAULT = iommu.VeventqType.VEVENTQ_TYPE_DMA_FAULT;
const NESTED = iommu.DomainType.DOMAIN_TYPE_NESTED;
const PAGING = iommu.DomainType.DOMAIN_TYPE_PAGING;

let stack: IommuStack;
let nextDevice = 0;
const newDevices = (n: number) => Array.from({ length: n }, () => `0000:7b:${(nextDevice++).toString(16).padStart(2, "0")}.0`);

beforeAll(async () => {
  stack = await startIommuStack();
});
afterAll(async () => {
  expect(await stack?.stop()).toBe(0);
});

/** Two registered devices, the VM's stage 2 (PAGING) and a vIOMMU over it. */
async function vm(client: IommuClient = stack.iommu) {
  const [d0, d1] = newDevices(2) as [string, string];
  for (const d of [d0, d1]) await client.registerDevice(pf(d));
  const stage2 = (await client.createDomain(P(iommu.CreateDomainRequest, { type: PAGING }))).domain!.domainId;
  const viommu = (await client.allocViommu(P(iommu.AllocViommuRequest, { deviceId: d0, parentDomainId: stage2, owner: OWNER }))).viommu!;
  return { d0, d1, stage2, viommu, viommuId: viommu.viommuId };
}

type Vm = Awaited<ReturnType<typeof vm>>;

const nestedOn = async (v: Vm, client: IommuClient = stack.iommu) =>
  (await client.createDomain(P(iommu.CreateDomainRequest, { type: NESTED, viommuId: v.viommuId, guestPgtable: 0x7000n }))).domain!;

const attachAt = (domainId: number, deviceId: string, pasid = 5) => P(iommu.AttachDomainRequest, { domainId, deviceId, pasid, owner: OWNER });

/** A DMA read at an address the stage 2 does not map: an unrecoverable NOT_PRESENT fault under the handle at PASID 5. */
const faultAt = (deviceId: string, address: bigint, client: IommuClient = stack.iommu) =>
  client.translate(P(iommu.TranslateRequest, { deviceId, pasid: 5, address, access: { read: true } }));

/** The vIOMMU objects and domains of QueryState, for before/after comparisons. */
async function objects(client: IommuClient = stack.iommu) {
  const s = await client.queryState(P(iommu.QueryStateRequest, {}));
  return { viommus: s.viommus, vdevices: s.vdevices, veventqs: s.veventqs, domains: s.domains };
}

const viommuOf = async (viommuId: number) => (await objects()).viommus.find((v) => v.viommuId === viommuId);
const entriesOf = async (deviceId: string) => (await stack.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [deviceId] }))).devices[0]!.pasidEntries;

/** Expects a refusal with this code and reason that leaves the vIOMMU objects and domains as they were. */
async function refusedUnchanged(call: () => Promise<unknown>, code: number, reason: string): Promise<void> {
  const before = await objects();
  await expectRefused(call(), code, reason);
  expect(await objects()).toEqual(before);
}

/** What a reader sees: event sequence numbers, and markers as { lost: [first, count] }. */
const shapeOf = (items: iommu.VeventqItem[]) =>
  items.map((it) => (it.item!.$case === "event" ? it.item!.value.sequence : { lost: [it.item!.value.firstSequence, it.item!.value.count] }));

describe("iommu: vIOMMU over a parent domain", () => {
  it("AllocViommu over a PAGING domain holds it: FreeDomain of the parent is FAILED_PRECONDITION DOMAIN_IN_USE until DestroyViommu", async () => {
    const client = stack.iommu;
    const v = await vm();
    expect(v.viommu).toMatchObject({ deviceId: v.d0, parentDomainId: v.stage2, owner: OWNER, nestedDomainIds: [], vdeviceCount: 0, veventqCount: 0 });
    expect(await viommuOf(v.viommuId)).toEqual(v.viommu);

    await refusedUnchanged(() => client.freeDomain({ domainId: v.stage2 }), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    expect((await objects()).domains.some((d) => d.domainId === v.stage2)).toBe(true);

    await client.destroyViommu({ viommuId: v.viommuId });
    expect(await viommuOf(v.viommuId)).toBeUndefined();
    await client.freeDomain({ domainId: v.stage2 });
    expect((await objects()).domains.some((d) => d.domainId === v.stage2)).toBe(false);
    await expectRefused(client.destroyViommu({ viommuId: v.viommuId }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
  });

  it("AllocViommu needs a registered device and a PAGING parent; a refusal allocates nothing", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    const alloc = (x: object) => () => client.allocViommu(P(iommu.AllocViommuRequest, { deviceId: v.d0, parentDomainId: v.stage2, owner: OWNER, ...x }));
    await refusedUnchanged(alloc({ deviceId: "0000:ff:1f.7" }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await refusedUnchanged(alloc({ parentDomainId: 0xfff_fff }), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    await refusedUnchanged(alloc({ parentDomainId: nested.domainId }), Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING");
    await refusedUnchanged(alloc({ owner: "" }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    // The next allocation gets the next id: the refusals took none.
    const next = (await alloc({})()).viommu!;
    expect(next.viommuId).toBe(v.viommuId + 1);
  });

  it("CreateDomain of a NESTED domain on a vIOMMU nests it under the vIOMMU's parent; the vIOMMU lists it", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    expect(nested).toMatchObject({ type: NESTED, parentDomainId: v.stage2, viommuId: v.viommuId, guestPgtable: 0x7000n });
    expect((await objects()).domains.find((d) => d.domainId === nested.domainId)).toMatchObject({ viommuId: v.viommuId });
    expect((await viommuOf(v.viommuId))!.nestedDomainIds).toEqual([nested.domainId]);
    // A plain domain is no vIOMMU's.
    expect((await objects()).domains.find((d) => d.domainId === v.stage2)!.viommuId).toBe(0);

    const create = (x: object) => () => client.createDomain(P(iommu.CreateDomainRequest, { type: NESTED, viommuId: v.viommuId, guestPgtable: 0x7000n, ...x }));
    await refusedUnchanged(create({ viommuId: 0xfff_fff }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    await refusedUnchanged(create({ type: PAGING, guestPgtable: 0n }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    const otherStage2 = (await client.createDomain(P(iommu.CreateDomainRequest, { type: PAGING }))).domain!.domainId;
    await refusedUnchanged(create({ parentDomainId: otherStage2 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    // Freeing the nested domain lets go of the vIOMMU.
    await client.freeDomain({ domainId: nested.domainId });
    expect((await viommuOf(v.viommuId))!.nestedDomainIds).toEqual([]);
  });
});

describe("iommu: QueryState viommus_only", () => {
  it("answers the vIOMMU objects as a full QueryState has them, and nothing that grows with what the IOMMU holds", async () => {
    const v = await vm();
    await stack.iommu.allocVdevice(P(iommu.AllocVdeviceRequest, { viommuId: v.viommuId, deviceId: v.d1, virtId: 7n }));
    const nested = await nestedOn(v);
    await stack.iommu.attachDomain(attachAt(nested.domainId, v.d1));
    const full = await stack.iommu.queryState(P(iommu.QueryStateRequest, { maxIotlbFlushes: 10 }));
    expect(full.attachHandles.length).toBeGreaterThan(0);
    const only = await stack.iommu.queryState(P(iommu.QueryStateRequest, { viommusOnly: true, maxIotlbFlushes: 10 }));
    expect({ viommus: only.viommus, vdevices: only.vdevices, veventqs: only.veventqs }).toEqual({
      viommus: full.viommus,
      vdevices: full.vdevices,
      veventqs: full.veventqs,
    });
    expect(only.viommus.some((x) => x.viommuId === v.viommuId)).toBe(true);
    expect([only.devices, only.domains, only.attachHandles, only.svaBonds, only.faultGroups, only.iotlbFlushes]).toEqual([[], [], [], [], [], []]);
  });
});

describe("iommu: vdevices", () => {
  it("a second vdevice with the same virt_id in one vIOMMU is ALREADY_EXISTS VDEVICE_EXISTS, and so is a device's second vdevice; another vIOMMU may reuse the virt_id", async () => {
    const client = stack.iommu;
    const v = await vm();
    const vdev = (await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d0, virtId: 0x10n })).vdevice!;
    expect(vdev).toMatchObject({ viommuId: v.viommuId, deviceId: v.d0, virtId: 0x10n });
    expect((await objects()).vdevices).toContainEqual(vdev);
    expect((await viommuOf(v.viommuId))!.vdeviceCount).toBe(1);

    await refusedUnchanged(() => client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0x10n }), Code.ALREADY_EXISTS, "VDEVICE_EXISTS");
    await refusedUnchanged(() => client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d0, virtId: 0x11n }), Code.ALREADY_EXISTS, "VDEVICE_EXISTS");
    await refusedUnchanged(() => client.allocVdevice({ viommuId: v.viommuId, deviceId: "0000:ff:1f.7", virtId: 0x12n }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await refusedUnchanged(() => client.allocVdevice({ viommuId: 0xfff_fff, deviceId: v.d1, virtId: 0x12n }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");

    const other = (await client.allocViommu(P(iommu.AllocViommuRequest, { deviceId: v.d1, parentDomainId: v.stage2, owner: OWNER }))).viommu!;
    expect((await client.allocVdevice({ viommuId: other.viommuId, deviceId: v.d1, virtId: 0x10n })).vdevice!.virtId).toBe(0x10n);
  });

  it("AttachDomain of a nested domain on a vIOMMU to a device without a vdevice in it is NOT_FOUND VDEVICE_NOT_FOUND and programs nothing", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    const before = await entriesOf(v.d1);
    await refusedUnchanged(() => client.attachDomain(attachAt(nested.domainId, v.d1)), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    expect(await entriesOf(v.d1)).toEqual(before);
    // A vdevice in another vIOMMU does not count.
    const other = (await client.allocViommu(P(iommu.AllocViommuRequest, { deviceId: v.d1, parentDomainId: v.stage2, owner: OWNER }))).viommu!;
    await client.allocVdevice({ viommuId: other.viommuId, deviceId: v.d1, virtId: 0x21n });
    await expectRefused(client.attachDomain(attachAt(nested.domainId, v.d1)), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");

    await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0x21n });
    const h = (await client.attachDomain(attachAt(nested.domainId, v.d1))).handle!;
    expect(await entriesOf(v.d1)).toEqual([expect.objectContaining({ pasid: 5, domainId: nested.domainId, domainType: NESTED, handleId: h.handleId })]);
    // A plain stage 2 needs no vdevice.
    await client.attachDomain(P(iommu.AttachDomainRequest, { domainId: v.stage2, deviceId: v.d0, withoutPasid: true, owner: OWNER }));
  });

  it("ReplaceDomain to a nested domain on a vIOMMU needs the device's vdevice too (NOT_FOUND VDEVICE_NOT_FOUND: the old domain stays); the replaced-in attachment holds the vdevice", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    await client.attachDomain(attachAt(v.stage2, v.d1));
    const replace = (domainId: number) => client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId, deviceId: v.d1, pasid: 5, owner: OWNER }));
    const before = await entriesOf(v.d1);
    await refusedUnchanged(() => replace(nested.domainId), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    expect(await entriesOf(v.d1)).toEqual(before);
    expect(before.map((e) => e.domainId)).toEqual([v.stage2]);

    const vdev = (await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0x21n })).vdevice!;
    await replace(nested.domainId);
    expect((await entriesOf(v.d1)).map((e) => e.domainId)).toEqual([nested.domainId]);
    await refusedUnchanged(() => client.destroyVdevice({ vdeviceId: vdev.vdeviceId }), Code.FAILED_PRECONDITION, "VDEVICE_IN_USE");
    await replace(v.stage2);
    await client.destroyVdevice({ vdeviceId: vdev.vdeviceId });
  });

  it("DestroyVdevice while a nested attachment uses it is FAILED_PRECONDITION VDEVICE_IN_USE; after DetachDomain it goes", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    const vdev = (await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0x21n })).vdevice!;
    await client.attachDomain(attachAt(nested.domainId, v.d1));

    await refusedUnchanged(() => client.destroyVdevice({ vdeviceId: vdev.vdeviceId }), Code.FAILED_PRECONDITION, "VDEVICE_IN_USE");
    await client.detachDomain(P(iommu.DetachDomainRequest, { domainId: nested.domainId, deviceId: v.d1, pasid: 5 }));
    await client.destroyVdevice({ vdeviceId: vdev.vdeviceId });
    expect((await objects()).vdevices.some((d) => d.vdeviceId === vdev.vdeviceId)).toBe(false);
    await expectRefused(client.destroyVdevice({ vdeviceId: vdev.vdeviceId }), Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
  });

  it("RemoveDevice destroys the device's vdevices (with its nested attachments)", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    const vdev = (await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0x21n })).vdevice!;
    await client.attachDomain(attachAt(nested.domainId, v.d1));
    expect(await client.removeDevice({ deviceId: v.d1 })).toMatchObject({ detachedHandles: 1 });
    expect((await objects()).vdevices.some((d) => d.vdeviceId === vdev.vdeviceId)).toBe(false);
    expect((await viommuOf(v.viommuId))!.vdeviceCount).toBe(0);
  });
});

describe("iommu: vEVENTQs", () => {
  it("AllocVeventq: one queue per type per vIOMMU (ALREADY_EXISTS VEVENTQ_EXISTS), a depth of 1..4096 and a type are required", async () => {
    const client = stack.iommu;
    const v = await vm();
    const q = (await client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 4 })).veventq!;
    expect(q).toMatchObject({ viommuId: v.viommuId, type: DMA_FAULT, depth: 4, queuedEvents: 0, nextSequence: 1n, lostEvents: 0n });
    expect((await objects()).veventqs).toContainEqual(q);
    await refusedUnchanged(() => client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 8 }), Code.ALREADY_EXISTS, "VEVENTQ_EXISTS");
    for (const bad of [{ depth: 0 }, { depth: 4097 }, { type: iommu.VeventqType.VEVENTQ_TYPE_UNSPECIFIED }]) {
      await refusedUnchanged(() => client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 4, ...bad }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    }
    await refusedUnchanged(() => client.allocVeventq({ viommuId: 0xfff_fff, type: DMA_FAULT, depth: 4 }), Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    await client.destroyVeventq({ veventqId: q.veventqId });
    await expectRefused(client.readVeventq({ veventqId: q.veventqId, maxItems: 0 }), Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
    await expectRefused(client.destroyVeventq({ veventqId: q.veventqId }), Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
  });

  it("delivers a DMA fault under a nested attachment with the device's virt_id and a sequence number, never the host's device id", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0xbeefn });
    await client.attachDomain(attachAt(nested.domainId, v.d1));
    const q = (await client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 8 })).veventq!;

    const r = await faultAt(v.d1, 0x20_0000n);
    expect(r).toMatchObject({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT, faultReason: iommu.FaultReason.FAULT_REASON_NOT_PRESENT });
    expect((await objects()).veventqs.find((x) => x.veventqId === q.veventqId)).toMatchObject({ queuedEvents: 1, nextSequence: 2n });

    const { items } = await client.readVeventq({ veventqId: q.veventqId, maxItems: 0 });
    expect(items).toHaveLength(1);
    const e = items[0]!.item;
    expect(e?.$case).toBe("event");
    expect(e!.value).toMatchObject({
      sequence: 1n,
      virtId: 0xbeefn,
      pasid: 5,
      withoutPasid: false,
      address: 0x20_0000n,
      reason: iommu.FaultReason.FAULT_REASON_NOT_PRESENT,
      access: { read: true, write: false },
    });
    expect(iommu.Vevent.toJSON(e!.value as iommu.Vevent)).not.toHaveProperty("deviceId");
    // Read means taken.
    expect((await client.readVeventq({ veventqId: q.veventqId, maxItems: 0 })).items).toEqual([]);
    expect((await objects()).veventqs.find((x) => x.veventqId === q.veventqId)).toMatchObject({ queuedEvents: 0 });

    // A fault of a device under the plain stage 2 is not the vIOMMU's.
    await client.attachDomain(P(iommu.AttachDomainRequest, { domainId: v.stage2, deviceId: v.d0, pasid: 5, owner: OWNER }));
    await faultAt(v.d0, 0x20_0000n);
    expect((await client.readVeventq({ veventqId: q.veventqId, maxItems: 0 })).items).toEqual([]);
  });

  it("reports an overflow as a LOST_EVENTS marker carrying the gap, before the next event delivered: never a silent hole", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 7n });
    await client.attachDomain(attachAt(nested.domainId, v.d1));
    const q = (await client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 2 })).veventq!;

    for (let i = 1; i <= 5; i++) await faultAt(v.d1, BigInt(i) * 0x10_0000n);
    expect((await objects()).veventqs.find((x) => x.veventqId === q.veventqId)).toMatchObject({ queuedEvents: 2, nextSequence: 6n, lostEvents: 3n });

    // One read: the oldest event; its slot takes the next fault, behind the marker.
    expect(shapeOf((await client.readVeventq({ veventqId: q.veventqId, maxItems: 1 })).items)).toEqual([1n]);
    await faultAt(v.d1, 0x60_0000n);
    const rest = (await client.readVeventq({ veventqId: q.veventqId, maxItems: 0 })).items;
    expect(shapeOf(rest)).toEqual([2n, { lost: [3n, 3n] }, 6n]);
    expect(rest[2]!.item!.value).toMatchObject({ address: 0x60_0000n, virtId: 7n });
  });
});

describe("iommu: vIOMMU destruction order", () => {
  it("DestroyViommu with vdevices, vEVENTQs or nested domains is FAILED_PRECONDITION VIOMMU_IN_USE; undone in order, everything goes", async () => {
    const client = stack.iommu;
    const v = await vm();
    const nested = await nestedOn(v);
    const vdev = (await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 1n })).vdevice!;
    const q = (await client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 2 })).veventq!;
    await client.attachDomain(attachAt(nested.domainId, v.d1));
    expect(await viommuOf(v.viommuId)).toMatchObject({ nestedDomainIds: [nested.domainId], vdeviceCount: 1, veventqCount: 1 });

    const destroy = () => client.destroyViommu({ viommuId: v.viommuId });
    await refusedUnchanged(destroy, Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    await client.detachDomain(P(iommu.DetachDomainRequest, { domainId: nested.domainId, deviceId: v.d1, pasid: 5 }));
    await client.destroyVdevice({ vdeviceId: vdev.vdeviceId });
    await refusedUnchanged(destroy, Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    await client.destroyVeventq({ veventqId: q.veventqId });
    await refusedUnchanged(destroy, Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    await client.freeDomain({ domainId: nested.domainId });
    await destroy();
    await client.freeDomain({ domainId: v.stage2 });
    const after = await objects();
    expect(after.viommus.some((x) => x.viommuId === v.viommuId)).toBe(false);
    expect(after.domains.some((d) => d.domainId === v.stage2 || d.domainId === nested.domainId)).toBe(false);
  });
});

describe("iommu: vIOMMU objects across a restart", () => {
  let own: IommuStack | undefined;
  let restarted: ServiceProcess | undefined;
  afterEach(async () => {
    await restarted?.stop();
    await own?.stop();
    restarted = undefined;
    own = undefined;
  });

  it("a vIOMMU, its nested domain, vdevice and vEVENTQ with unread items come back after kill -9", async () => {
    own = await startIommuStack();
    const client = own.iommu;
    const v = await vm(client);
    const nested = await nestedOn(v, client);
    await client.allocVdevice({ viommuId: v.viommuId, deviceId: v.d1, virtId: 0x33n });
    await client.attachDomain(attachAt(nested.domainId, v.d1));
    const q = (await client.allocVeventq({ viommuId: v.viommuId, type: DMA_FAULT, depth: 1 })).veventq!;
    await faultAt(v.d1, 0x10_0000n, client);
    await faultAt(v.d1, 0x20_0000n, client);
    const before = await objects(client);

    own.proc.kill("SIGKILL");
    await own.proc.exited;
    restarted = await startIommuProcess(own.core);
    const back = createClient(iommu.IommuServiceService, restarted.address, { deadlineMs: 5000 });
    try {
      expect(await objects(back)).toEqual(before);
      await expectRefused(back.freeDomain({ domainId: v.stage2 }), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
      expect(shapeOf((await back.readVeventq({ veventqId: q.veventqId, maxItems: 0 })).items)).toEqual([1n, { lost: [2n, 1n] }]);
      // Ids are not reused, and the rules still hold.
      const next = (
        await back.allocVeventq({
          viommuId: (await back.allocViommu(P(iommu.AllocViommuRequest, { deviceId: v.d0, parentDomainId: v.stage2, owner: OWNER }))).viommu!.viommuId,
          type: DMA_FAULT,
          depth: 1,
        })
      ).veventq!;
      expect(next.veventqId).toBeGreaterThan(q.veventqId);
      await expectRefused(back.destroyViommu({ viommuId: v.viommuId }), Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    } finally {
      back.close();
    }
  });
});
