import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { createClient, createVfioSession, vfioCapabilityMetadata, type CallOptions, type VfioSession } from "@ioasid/grpc-kit";
import { iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { refusal, stackSnapshot } from "../support/stack-snapshot.js";

// Issue 14 item 3, VFIO: "VM B naming VM A's container_id, mdev or device could close A's container,
// take A's fault watcher and answer A's faults…" repeated against a real stack. VM A and VM B are
// two VMMs, each with its own VFIO session (its capability store, DESIGN §3 "Authority is a
// capability, not a name"). Every VFIO call B makes naming A's container — with no capability, with
// B's own, with a closed container's — is PERMISSION_DENIED, and the core's, KVM's, VDCM's, the
// IOMMU's and VFIO's state is the same afterwards; B's own container never reaches A's objects; A's
// legitimate path still works.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const GPA = 0x1000_0000n;
const STAGE2 = 0x10_0000n;
const GVA = 0x7f00_0000_0000n;
const PAGE = 0x1000n;
const RW = { read: true, write: true };
const pci = (id: string): vfio.DeviceRef => ({ ref: { $case: "deviceId", value: id } });
const mdevRef = (uuid: string): vfio.DeviceRef => ({ ref: { $case: "mdevUuid", value: uuid } });

let stack: StackFixture;
const sessions = new AbortController();
const vmms: VfioSession[] = [];
/**
 * VM A: a bound guest PASID on a PCI function, an mdev, stage 2 mapped (GPA → `hpa`, the start of the
 * host memory VFIO gave it), a fault group relayed to its watcher.
 */
let a: {
  vmm: VfioSession;
  vmId: number;
  containerId: number;
  setId: number;
  hpa: bigint;
  p: { hpasid: number; generation: number };
  group: vfio.FaultGroup;
};
/** VM B: its own container, an mdev, a guest PASID. */
let b: { vmm: VfioSession; containerId: number; p: { hpasid: number; generation: number } };
const watched: vfio.WatchFaultsResponse["item"][] = [];

/** A VMM of its own: a VFIO client whose capability store holds only the containers it opened. */
function newVmm(): VfioSession {
  const vmm = createVfioSession(
    createClient(vfio.VfioServiceService, stack.addresses.vfio, stack.vmmTls === undefined ? {} : { tls: stack.vmmTls, serverRole: "vfio" }),
  );
  vmms.push(vmm);
  return vmm;
}

/** Opens a container as a VMM does: OpenContainer, then its Session held for the test's life. */
async function openContainer(vmm: VfioSession, token: bigint, name: string): Promise<vfio.OpenContainerResponse> {
  const opened = await vmm.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 8, vmName: name }));
  const attached = new Promise<void>((resolve) => {
    void (async () => {
      try {
        for await (const m of vmm.session({ containerId: opened.containerId }, { signal: sessions.signal })) if (m.event?.$case === "attached") resolve();
      } catch {
        // ended with the test
      }
    })();
  });
  await attached;
  return opened;
}

beforeAll(async () => {
  // Fault groups wait for their answer for the whole file (the refused answers must leave A's pending).
  stack = await startStack({ IOMMU_FAULT_TIMEOUT: "10m" });
  const c = stack.clients;
  for (const [deviceId, iommuGroup] of [
    ["pf-a", 1],
    ["pf-spare", 2],
    ["iax0", 3],
  ] as const) {
    await c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, { deviceId, maxPasids: 1 << 20, priCapable: true, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF, iommuGroup }),
    );
  }
  await c.vdcm.registerDevice(
    P(vdcm.RegisterDeviceRequest, {
      deviceId: "iax0",
      maxPasidEntries: 64,
      wqs: [0, 1].map((wqId) => ({ wqId, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 })),
    }),
  );
  await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "iax0", mdevUuid: "mdev-a", wqIds: [0] }));
  await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "iax0", mdevUuid: "mdev-b", wqIds: [1] }));

  // VM A, through its own VMM.
  const tokenA = 0xa11cen;
  const vmA = (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: tokenA, vcpuCount: 1, vmName: "victim" }))).vm!;
  const vmmA = newVmm();
  const openedA = await openContainer(vmmA, tokenA, "victim");
  const ca = openedA.containerId;
  await vmmA.assignDevice(P(vfio.AssignDeviceRequest, { containerId: ca, device: mdevRef("mdev-a") }));
  await vmmA.assignDevice(P(vfio.AssignDeviceRequest, { containerId: ca, device: pci("pf-a") }));
  const hpa = openedA.guestMemory[0]!.paddr;
  await vmmA.mapDma(P(vfio.MapDmaRequest, { containerId: ca, iova: GPA, paddr: hpa, size: STAGE2, access: RW }));
  const p = await vmmA.allocPasid({ containerId: ca });
  await vmmA.bindGuestPasid(
    P(vfio.BindGuestPasidRequest, { containerId: ca, device: pci("pf-a"), hpasid: p.hpasid, generation: p.generation, gpasid: 77, guestPgtable: 0x5000n }),
  );
  void (async () => {
    try {
      for await (const m of vmmA.watchFaults({ containerId: ca }, { signal: sessions.signal })) watched.push(m.item);
    } catch {
      // ended with the test
    }
  })();
  await waitFor(async () => (await vmmA.queryState({ containerId: ca })).containers[0]?.faultWatcherAttached === true, { message: "A's fault watcher" });
  // The device faults at an address the guest has not mapped: a page request group, relayed to A.
  const t = await c.iommu.translate(P(iommu.TranslateRequest, { deviceId: "pf-a", pasid: p.hpasid, address: GVA, access: { read: true } }));
  expect(t.outcome).toBe(iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST);
  await waitFor(async () => watched.some((i) => i?.$case === "group" && i.value.faultGroupId === t.faultGroupId), { message: "A's fault group relayed" });
  const group = watched.flatMap((i) => (i?.$case === "group" ? [i.value] : [])).find((g) => g.faultGroupId === t.faultGroupId)!;
  a = { vmm: vmmA, vmId: vmA.vmId, containerId: ca, setId: openedA.setId, hpa, p, group };

  // VM B, through another VMM.
  const vmmB = newVmm();
  const openedB = await openContainer(vmmB, 0xbadn, "attacker");
  await vmmB.assignDevice(P(vfio.AssignDeviceRequest, { containerId: openedB.containerId, device: mdevRef("mdev-b") }));
  b = { vmm: vmmB, containerId: openedB.containerId, p: await vmmB.allocPasid({ containerId: openedB.containerId }) };
}, 90_000);

afterAll(async () => {
  sessions.abort();
  for (const v of vmms) v.close();
  await stack?.stop();
});

/** What a refused call must not change: the core (A's set, its IOASID), KVM's, VDCM's, the IOMMU's and VFIO's state, and A's watcher. */
const snapshot = async (): Promise<string> =>
  stackSnapshot(
    stack.clients,
    { setId: a.setId, vmId: a.vmId },
    { described: (await stack.clients.core.describe({ ioasid: a.p.hpasid })).info, relayed: watched.length },
  );

/** The first message of a server stream (leaving the loop cancels the call). */
async function firstMessage(stream: AsyncIterable<unknown>): Promise<unknown> {
  for await (const m of stream) return m;
  return undefined;
}

/** Every VFIO call that names a container (all but OpenContainer and QueryState), made by `vmm` about `containerId` and A's objects. */
function callsNaming(vmm: VfioSession, containerId: number): ReadonlyArray<readonly [string, (o: CallOptions) => Promise<unknown>]> {
  const { p, group, hpa } = a;
  // A stream the server accepted would wait for messages: a deadline ends it (and the assertion fails).
  const stream = (o: CallOptions): CallOptions => ({ ...o, deadlineMs: 3000 });
  return [
    ["Session", (o) => firstMessage(vmm.session({ containerId }, stream(o)))],
    ["CloseContainer", (o) => vmm.closeContainer({ containerId }, o)],
    ["AssignDevice", (o) => vmm.assignDevice(P(vfio.AssignDeviceRequest, { containerId, device: pci("pf-spare") }), o)],
    ["UnassignDevice (device)", (o) => vmm.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId, device: pci("pf-a") }), o)],
    ["UnassignDevice (mdev)", (o) => vmm.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId, device: mdevRef("mdev-a") }), o)],
    ["ReplaceDeviceDomain", (o) => vmm.replaceDeviceDomain(P(vfio.ReplaceDeviceDomainRequest, { containerId, device: pci("pf-a"), guestPgtable: 0x9000n }), o)],
    ["AllocPasid", (o) => vmm.allocPasid({ containerId }, o)],
    ["FreePasid", (o) => vmm.freePasid({ containerId, hpasid: p.hpasid, generation: p.generation }, o)],
    [
      "BindGuestPasid",
      (o) =>
        vmm.bindGuestPasid(
          P(vfio.BindGuestPasidRequest, {
            containerId,
            device: mdevRef("mdev-a"),
            hpasid: p.hpasid,
            generation: p.generation,
            gpasid: 78,
            guestPgtable: 0x6000n,
          }),
          o,
        ),
    ],
    [
      "UnbindGuestPasid",
      (o) =>
        vmm.unbindGuestPasid(P(vfio.UnbindGuestPasidRequest, { containerId, device: pci("pf-a"), hpasid: p.hpasid, generation: p.generation, gpasid: 77 }), o),
    ],
    ["WatchFaults", (o) => firstMessage(vmm.watchFaults({ containerId }, stream(o)))],
    [
      "SendPageResponse",
      (o) => vmm.sendPageResponse({ containerId, faultGroupId: group.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID }, o),
    ],
    ["MapDma", (o) => vmm.mapDma(P(vfio.MapDmaRequest, { containerId, iova: GPA + STAGE2, paddr: hpa + STAGE2, size: PAGE, access: RW }), o)],
    ["UnmapDma", (o) => vmm.unmapDma(P(vfio.UnmapDmaRequest, { containerId, iova: GPA, size: STAGE2 }), o)],
    [
      "MapGuestPages",
      (o) =>
        vmm.mapGuestPages(
          P(vfio.MapGuestPagesRequest, { containerId, hpasid: p.hpasid, generation: p.generation, iova: GVA, gpa: GPA, size: PAGE, access: RW }),
          o,
        ),
    ],
    [
      "UnmapGuestPages",
      (o) => vmm.unmapGuestPages(P(vfio.UnmapGuestPagesRequest, { containerId, hpasid: p.hpasid, generation: p.generation, iova: GVA, size: PAGE }), o),
    ],
    // The vIOMMU calls (issue 16): the capability is checked before any id is looked at.
    ["AllocViommu", (o) => vmm.allocViommu(P(vfio.AllocViommuRequest, { containerId, device: pci("pf-a") }), o)],
    ["DestroyViommu", (o) => vmm.destroyViommu({ containerId, viommuId: 1 }, o)],
    ["AllocVdevice", (o) => vmm.allocVdevice(P(vfio.AllocVdeviceRequest, { containerId, viommuId: 1, device: pci("pf-a"), virtId: 1n }), o)],
    ["DestroyVdevice", (o) => vmm.destroyVdevice({ containerId, vdeviceId: 1 }, o)],
    ["AllocVeventq", (o) => vmm.allocVeventq({ containerId, viommuId: 1, depth: 4 }, o)],
    ["DestroyVeventq", (o) => vmm.destroyVeventq({ containerId, veventqId: 1 }, o)],
    ["ReadVeventq", (o) => vmm.readVeventq({ containerId, veventqId: 1, maxItems: 0 }, o)],
  ];
}

describe("VFIO capabilities between VMMs", () => {
  it("lists every VfioService call that names a container (all but OpenContainer and QueryState)", () => {
    const listed = new Set(callsNaming(b.vmm, a.containerId).map(([rpc]) => rpc.split(" ")[0]));
    const rpcs = Object.values(vfio.VfioServiceService).map((m) => m.path.split("/").pop()!);
    expect(rpcs.filter((r) => r !== "OpenContainer" && r !== "QueryState" && !listed.has(r))).toEqual([]);
  });

  it("refuses every call of VM B naming A's container, without a capability or with B's own, PERMISSION_DENIED, and changes nothing", async () => {
    const before = await snapshot();
    const withB = { metadata: vfioCapabilityMetadata(b.vmm.capabilityOf(b.containerId)!) };
    for (const [how, options, reason] of [
      ["without a capability", {}, "CAPABILITY_MISSING"],
      ["with B's capability", withB, "CAPABILITY_NOT_FOR_CONTAINER"],
    ] as const) {
      for (const [rpc, call] of callsNaming(b.vmm, a.containerId)) {
        const e = await refusal(call(options), `B's ${rpc} naming A's container ${how}`);
        expect({ rpc, code: e.code, reason: e.reason }).toEqual({ rpc, code: Code.PERMISSION_DENIED, reason });
      }
    }
    expect(await snapshot()).toBe(before);
  });

  it("keeps B's own container away from A's PASID, device, mdev and fault group, and changes nothing", async () => {
    const before = await snapshot();
    const vmm = b.vmm;
    const cb = b.containerId;
    const { p, group } = a;
    const refusals: Array<readonly [string, () => Promise<unknown>, Code, string]> = [
      ["FreePasid of A's PASID", () => vmm.freePasid({ containerId: cb, hpasid: p.hpasid, generation: 0 }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET"],
      [
        "BindGuestPasid of A's PASID",
        () =>
          vmm.bindGuestPasid(
            P(vfio.BindGuestPasidRequest, { containerId: cb, device: mdevRef("mdev-b"), hpasid: p.hpasid, generation: 0, gpasid: 77, guestPgtable: 0x6000n }),
          ),
        Code.PERMISSION_DENIED,
        "IOASID_NOT_IN_SET",
      ],
      [
        "MapGuestPages of A's PASID",
        () => vmm.mapGuestPages(P(vfio.MapGuestPagesRequest, { containerId: cb, hpasid: p.hpasid, iova: GVA, gpa: GPA, size: PAGE, access: RW })),
        Code.PERMISSION_DENIED,
        "IOASID_NOT_IN_SET",
      ],
      [
        "SendPageResponse to A's fault group",
        () => vmm.sendPageResponse({ containerId: cb, faultGroupId: group.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS }),
        Code.INVALID_ARGUMENT,
        "FAULT_GROUP_NOT_GIVEN",
      ],
      // A device serves one VM: vfio.proto names these FAILED_PRECONDITION (EBUSY), and nothing changes.
      [
        "AssignDevice of A's device",
        () => vmm.assignDevice(P(vfio.AssignDeviceRequest, { containerId: cb, device: pci("pf-a") })),
        Code.FAILED_PRECONDITION,
        "DEVICE_BUSY",
      ],
      [
        "AssignDevice of A's mdev",
        () => vmm.assignDevice(P(vfio.AssignDeviceRequest, { containerId: cb, device: mdevRef("mdev-a") })),
        Code.FAILED_PRECONDITION,
        "DEVICE_BUSY",
      ],
      [
        "UnassignDevice of A's mdev",
        () => vmm.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId: cb, device: mdevRef("mdev-a") })),
        Code.FAILED_PRECONDITION,
        "DEVICE_NOT_ASSIGNED",
      ],
    ];
    for (const [what, call, code, reason] of refusals) {
      const e = await refusal(call(), what);
      expect({ what, code: e.code, reason: e.reason }).toEqual({ what, code, reason });
    }
    expect(await snapshot()).toBe(before);
  });

  it("refuses a closed container's capability: its container is gone, and A's container does not take it", async () => {
    const vmm = newVmm();
    const closed = await openContainer(vmm, 0xc105edn, "closed");
    const capability = vfioCapabilityMetadata(closed.capability);
    await vmm.closeContainer({ containerId: closed.containerId });
    await waitFor(async () => !(await stack.clients.vfio.queryState({ containerId: 0 })).containers.some((x) => x.containerId === closed.containerId), {
      message: "the closed container gone",
    });
    const before = await snapshot();
    const gone = await refusal(vmm.allocPasid({ containerId: closed.containerId }), "AllocPasid naming the closed container");
    expect({ code: gone.code, reason: gone.reason }).toEqual({ code: Code.NOT_FOUND, reason: "CONTAINER_NOT_FOUND" });
    for (const [rpc, call] of callsNaming(vmm, a.containerId)) {
      const e = await refusal(call({ metadata: capability }), `${rpc} naming A's container with a closed container's capability`);
      expect({ rpc, code: e.code, reason: e.reason }).toEqual({ rpc, code: Code.PERMISSION_DENIED, reason: "CAPABILITY_NOT_FOR_CONTAINER" });
    }
    expect(await snapshot()).toBe(before);
  });

  it("serves A's own VMM: it answers its fault group, unbinds, frees and closes its container", async () => {
    const { vmm, containerId, p, group } = a;
    // QueryState stays open to anyone (the operator's inspection) and shows no capability.
    expect(JSON.stringify((await b.vmm.queryState({ containerId }, {})).containers, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))).not.toContain(
      Buffer.from(vmm.capabilityOf(containerId)!).toString("hex"),
    );
    await vmm.mapGuestPages(
      P(vfio.MapGuestPagesRequest, { containerId, hpasid: p.hpasid, generation: p.generation, iova: GVA, gpa: GPA, size: PAGE, access: RW }),
    );
    await vmm.sendPageResponse({ containerId, faultGroupId: group.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS });
    const retried = await stack.clients.iommu.translate(P(iommu.TranslateRequest, { deviceId: "pf-a", pasid: p.hpasid, address: GVA, access: { read: true } }));
    expect(retried.outcome).toBe(iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED);
    expect(
      await vmm.unbindGuestPasid(P(vfio.UnbindGuestPasidRequest, { containerId, device: pci("pf-a"), hpasid: p.hpasid, generation: p.generation })),
    ).toMatchObject({
      unbound: true,
    });
    await vmm.freePasid({ containerId, hpasid: p.hpasid, generation: p.generation });
    await vmm.closeContainer({ containerId });
    await waitFor(async () => !(await stack.clients.core.listSets({})).sets.some((s) => s.setId === a.setId), { message: "A's set freed" });
  });
});
