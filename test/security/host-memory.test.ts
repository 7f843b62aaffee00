import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, isDomainError } from "@ioasid/errors";
import { createClient, createVfioSession, type VfioSession } from "@ioasid/grpc-kit";
import { iommu, kvm, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { refusal, stackSnapshot } from "../support/stack-snapshot.js";

// Issue 14 item 3: "MapDma accepts only host-physical ranges the VM was given." Before, VFIO took
// any paddr, so VM B's VMM could map VM A's host memory into B's stage 2 and DMA into it. VFIO now
// gives each container host memory at open (OpenContainerResponse.guest_memory, exclusively, from
// VFIO_HOST_MEMORY_BASE/SIZE) and MapDma maps only inside it. Repeated here against a real stack
// with mTLS: VM B's VMM, holding its own valid capability, aims MapDma of its own container at A's
// memory (which anyone can read in QueryState: host addresses are not secret) and is refused with
// nothing changed; B's own memory maps; the pool is a bound that closing a VM gives back.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const GPA = 0x1000_0000n;
const STAGE2 = 0x10_0000n;
const PAGE = 0x1000n;
const RW = { read: true, write: true };
const GiB = 1n << 30n;
/** VFIO's pool for this file: four VMs of the default 1 GiB. */
const POOL = { base: 1n << 32n, size: 4n * GiB };
const pci = (id: string): vfio.DeviceRef => ({ ref: { $case: "deviceId", value: id } });

let stack: StackFixture;
const sessions = new AbortController();
const vmms: VfioSession[] = [];
interface Vm {
  readonly vmm: VfioSession;
  readonly vmId: number;
  readonly containerId: number;
  readonly setId: number;
  readonly guestMemory: readonly vfio.HostRange[];
}
/** VM A: a PCI function assigned, its stage 2 mapping GPA → the start of its host memory. */
let a: Vm;
/** VM B: a PCI function assigned, nothing mapped yet. */
let b: Vm;

/** A VMM of its own: a VFIO client whose capability store holds only the containers it opened. */
function newVmm(): VfioSession {
  const vmm = createVfioSession(
    createClient(vfio.VfioServiceService, stack.addresses.vfio, stack.vmmTls === undefined ? {} : { tls: stack.vmmTls, serverRole: "vfio" }),
  );
  vmms.push(vmm);
  return vmm;
}

/** Opens a container as a VMM does (OpenContainer, its Session held for the test's life), with the VM at KVM first. */
async function openVm(token: bigint, name: string, deviceId?: string): Promise<Vm> {
  const vmId = (await stack.clients.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 1, vmName: name }))).vm!.vmId;
  const vmm = newVmm();
  const opened = await vmm.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 4, vmName: name }));
  await new Promise<void>((resolve) => {
    void (async () => {
      try {
        for await (const m of vmm.session({ containerId: opened.containerId }, { signal: sessions.signal })) if (m.event?.$case === "attached") resolve();
      } catch {
        // ended with the test
      }
    })();
  });
  if (deviceId !== undefined) await vmm.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: pci(deviceId) }));
  return { vmm, vmId, containerId: opened.containerId, setId: opened.setId, guestMemory: opened.guestMemory };
}

/** Device `deviceId`'s DMA at guest physical `gpa` (no PASID: through its VM's stage 2). */
async function dma(deviceId: string, gpa: bigint): Promise<iommu.TranslateResponse> {
  return stack.clients.iommu.translate(P(iommu.TranslateRequest, { deviceId, withoutPasid: true, address: gpa, access: { read: true, write: true } }));
}

beforeAll(async () => {
  stack = await startStack({ VFIO_HOST_MEMORY_BASE: String(POOL.base), VFIO_HOST_MEMORY_SIZE: String(POOL.size) });
  for (const [deviceId, iommuGroup] of [
    ["pf-a", 1],
    ["pf-b", 2],
  ] as const) {
    await stack.clients.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, { deviceId, maxPasids: 1 << 20, priCapable: false, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF, iommuGroup }),
    );
  }
  a = await openVm(0xa11cen, "victim", "pf-a");
  await a.vmm.mapDma(P(vfio.MapDmaRequest, { containerId: a.containerId, iova: GPA, paddr: a.guestMemory[0]!.paddr, size: STAGE2, access: RW }));
  b = await openVm(0xbadn, "attacker", "pf-b");
}, 90_000);

afterAll(async () => {
  sessions.abort();
  for (const v of vmms) v.close();
  await stack?.stop();
});

/** What a refused MapDma must not change: the core (sets, A's and B's IOASIDs), KVM's, VDCM's, the IOMMU's (domains, mappings) and VFIO's state. */
const snapshot = (): Promise<string> => stackSnapshot(stack.clients);

describe("host memory between VMs (issue 14 item 3)", () => {
  it("gives each VM its own host memory: inside the pool, the default 1 GiB, never overlapping", () => {
    for (const vm of [a, b]) {
      expect(vm.guestMemory.reduce((s, r) => s + r.size, 0n)).toBe(GiB);
      for (const r of vm.guestMemory) expect(r.paddr >= POOL.base && r.paddr + r.size <= POOL.base + POOL.size).toBe(true);
    }
    for (const x of a.guestMemory) for (const y of b.guestMemory) expect(x.paddr < y.paddr + y.size && y.paddr < x.paddr + x.size).toBe(false);
  });

  it("refuses VM B's VMM, with its own capability, mapping VM A's host memory into B's stage 2: PERMISSION_DENIED HOST_MEMORY_NOT_GIVEN, nothing changed", async () => {
    // Anyone reads A's host memory in QueryState (the operator's inspection): knowing it must not be enough.
    const [seen] = (await b.vmm.queryState({ containerId: a.containerId })).containers;
    expect(seen?.guestMemory).toEqual(a.guestMemory);
    const ra = a.guestMemory[0]!;
    const rb = b.guestMemory[b.guestMemory.length - 1]!;
    const before = await snapshot();
    for (const [what, paddr, size] of [
      ["A's guest RAM, as A's stage 2 maps it", ra.paddr, STAGE2],
      ["all of A's host memory", ra.paddr, ra.size],
      ["a page in the middle of A's memory", ra.paddr + ra.size / 2n, PAGE],
      ["host memory below the pool (the host's own)", 0n, PAGE],
      ["a range straddling the end of B's own memory", rb.paddr + rb.size - PAGE, 2n * PAGE],
    ] as const) {
      const e = await refusal(b.vmm.mapDma(P(vfio.MapDmaRequest, { containerId: b.containerId, iova: GPA, paddr, size, access: RW })), `B's MapDma of ${what}`);
      expect({ what, code: e.code, reason: e.reason }).toEqual({ what, code: Code.PERMISSION_DENIED, reason: "HOST_MEMORY_NOT_GIVEN" });
    }
    expect(await snapshot()).toBe(before);
    // B's device reaches nothing at that guest address: B's stage 2 maps none of A's memory.
    expect((await dma("pf-b", GPA + 0x2345n)).outcome).not.toBe(iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED);
    // A's device still reaches A's memory.
    expect(await dma("pf-a", GPA + 0x2345n)).toMatchObject({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: ra.paddr + 0x2345n });
  });

  it("maps B's own memory for B's VMM: B's device then reaches B's memory, never A's", async () => {
    const rb = b.guestMemory[0]!;
    await b.vmm.mapDma(P(vfio.MapDmaRequest, { containerId: b.containerId, iova: GPA, paddr: rb.paddr, size: STAGE2, access: RW }));
    expect(await dma("pf-b", GPA + 0x2345n)).toMatchObject({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: rb.paddr + 0x2345n });
    expect(await dma("pf-a", GPA + 0x2345n)).toMatchObject({ outputAddress: a.guestMemory[0]!.paddr + 0x2345n });
  });

  it("bounds the VMs by the pool: RESOURCE_EXHAUSTED HOST_MEMORY_EXHAUSTED creating nothing, until a closed VM's memory is back", async () => {
    const c = await openVm(0xc1n, "third");
    const d = await openVm(0xd1n, "fourth");
    const before = await snapshot();
    const e = await refusal(newVmm().openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xe1n, quota: 1, vmName: "one-too-many" })), "a fifth VM");
    expect({ code: e.code, reason: e.reason }).toEqual({ code: Code.RESOURCE_EXHAUSTED, reason: "HOST_MEMORY_EXHAUSTED" });
    expect(await snapshot()).toBe(before);
    // A size that is not whole pages is refused for what it is, whatever is free.
    const bad = await refusal(
      newVmm().openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xe2n, quota: 1, guestMemorySize: PAGE + 1n })),
      "OpenContainer of a size that is not whole pages",
    );
    expect({ code: bad.code, reason: bad.reason, field: bad.metadata["field"] }).toEqual({
      code: Code.INVALID_ARGUMENT,
      reason: "INVALID_FIELD",
      field: "guest_memory_size",
    });
    await c.vmm.closeContainer({ containerId: c.containerId });
    const vmm = newVmm();
    let fifth: vfio.OpenContainerResponse | undefined;
    // The memory goes back once the closed container is released (its stage-2 domain freed).
    await waitFor(
      async () => {
        try {
          fifth = await vmm.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xe1n, quota: 1, vmName: "fifth" }));
          return true;
        } catch (err) {
          if (isDomainError(err, "HOST_MEMORY_EXHAUSTED")) return false;
          throw err;
        }
      },
      { timeoutMs: 20_000, message: "the closed VM's memory back in the pool" },
    );
    expect(fifth!.guestMemory).toEqual(c.guestMemory);
    await vmm.closeContainer({ containerId: fifth!.containerId });
    await d.vmm.closeContainer({ containerId: d.containerId });
  });
});
