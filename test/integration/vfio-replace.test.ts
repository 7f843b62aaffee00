import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { iommu, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { expectRefused } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { openGuest, registerDevice } from "../support/fault-fixture.js";

// ReplaceDeviceDomain through VFIO (issue 16 item 1; DESIGN §5 "iommufd model"): a VMM turns its
// guest's nested translation on and off for a device, as QEMU replaces the device's hwpt; the IOMMU
// replaces atomically, VFIO creates and frees the nested domains. Real services; the IOMMU runs with
// failure injection so a replace that fails at the IOMMU can be shown to leave the old domain.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
let stack: StackFixture;
let token = 0xa100n;

beforeAll(async () => {
  stack = await startStack({ IOASID_IOMMU_FAULT_INJECTION: "1" });
});
afterAll(async () => {
  await stack?.stop();
});

const pci = (id: string) => ({ ref: { $case: "deviceId" as const, value: id } });

/** What the device's requests without PASID translate through, and the IOMMU's domains. */
async function iommuView(deviceId: string) {
  const s = await stack.clients.iommu.queryState(P(iommu.QueryStateRequest, {}));
  const rid = s.devices.find((d) => d.deviceId === deviceId)?.pasidEntries.find((e) => e.withoutPasid);
  const handles = s.attachHandles.filter((h) => h.deviceId === deviceId);
  return { rid, domains: new Map(s.domains.map((d) => [d.domainId, d])), handles };
}

async function vfioDevice(containerId: number, deviceId: string) {
  const s = await stack.clients.vfio.queryState({ containerId });
  return s.containers[0]?.devices.find((d) => d.device?.ref?.$case === "deviceId" && d.device.ref.value === deviceId);
}

describe("vfio: ReplaceDeviceDomain", () => {
  it("moves a device between its stage 2 and nested domains over it in one step, frees what it replaced, and leaves the old domain when the IOMMU fails", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-rep");
    const g = await openGuest(c, token++, "pf-rep");
    const before = await iommuView("pf-rep");
    expect(before.rid).toMatchObject({ domainId: g.stage2, domainType: iommu.DomainType.DOMAIN_TYPE_PAGING });
    const bindHandle = before.handles.find((h) => h.pasid === g.hpasid)!;
    const replace = (guestPgtable: bigint) =>
      c.vfio.replaceDeviceDomain(P(vfio.ReplaceDeviceDomainRequest, { containerId: g.containerId, device: pci("pf-rep"), guestPgtable }));

    // Nested translation on: a NESTED domain over the stage 2 with the guest's table.
    const on = await replace(0x9000n);
    expect(on.domainId).not.toBe(g.stage2);
    let v = await iommuView("pf-rep");
    expect(v.rid).toMatchObject({ domainId: on.domainId, domainType: iommu.DomainType.DOMAIN_TYPE_NESTED });
    expect(v.domains.get(on.domainId)).toMatchObject({ parentDomainId: g.stage2, guestPgtable: 0x9000n, attachCount: 1 });
    expect(
      v.handles.find((h) => h.pasid === g.hpasid),
      "the guest PASID's bind is untouched",
    ).toEqual(bindHandle);
    expect(await vfioDevice(g.containerId, "pf-rep")).toMatchObject({ nestedDomainId: on.domainId, guestPgtable: 0x9000n });
    // The same table again changes nothing.
    expect((await replace(0x9000n)).domainId).toBe(on.domainId);

    // Another guest table: a new nested domain; the one replaced is freed.
    const next = await replace(0xa000n);
    v = await iommuView("pf-rep");
    expect(v.rid?.domainId).toBe(next.domainId);
    expect(v.domains.has(on.domainId), "the replaced nested domain freed").toBe(false);

    // The IOMMU fails the replace (its first failure point): the old domain stays attached, the
    // nested domain VFIO created for it is freed again, VFIO's view is unchanged.
    const failing = await iommuView("pf-rep");
    await c.iommu.injectFailure({ operation: iommu.FailureInjectionOperation.FAILURE_INJECTION_OPERATION_REPLACE, nth: 1 });
    const err = await replace(0xb000n).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DomainError);
    expect([(err as DomainError).code, (err as DomainError).reason]).toEqual([Code.RESOURCE_EXHAUSTED, "FAULT_INJECTED"]);
    v = await iommuView("pf-rep");
    expect(v.rid).toEqual(failing.rid);
    expect([...v.domains.keys()].sort()).toEqual([...failing.domains.keys()].sort());
    expect(await vfioDevice(g.containerId, "pf-rep")).toMatchObject({ nestedDomainId: next.domainId, guestPgtable: 0xa000n });

    // Off again: back to the stage 2, the nested domain freed.
    const off = await replace(0n);
    expect(off).toMatchObject({ domainId: g.stage2, guestPgtable: 0n });
    v = await iommuView("pf-rep");
    expect(v.rid?.domainId).toBe(g.stage2);
    expect(v.domains.has(next.domainId)).toBe(false);
    expect(await vfioDevice(g.containerId, "pf-rep")).toMatchObject({ nestedDomainId: 0, guestPgtable: 0n });

    // A guest that crashes with nested translation on: the teardown detaches the nested domain and
    // frees it and the stage 2.
    const last = await replace(0xc000n);
    g.session.abort();
    await waitFor(async () => (await iommuView("pf-rep")).rid === undefined, { message: "the crashed guest's device detached" });
    await waitFor(
      async () => {
        const d = (await iommuView("pf-rep")).domains;
        return !d.has(last.domainId) && !d.has(g.stage2);
      },
      { message: "the nested domain and the stage 2 freed" },
    );
  });

  it("refuses an mdev and a device the container does not have, changing nothing", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-rep2");
    const g = await openGuest(c, token++, "pf-rep2");
    const before = await iommuView("pf-rep2");
    await expectRefused(
      c.vfio.replaceDeviceDomain(
        P(vfio.ReplaceDeviceDomainRequest, {
          containerId: g.containerId,
          device: { ref: { $case: "mdevUuid", value: "0b5e6c1e-0000-4000-8000-000000000001" } },
          guestPgtable: 0x9000n,
        }),
      ),
      Code.INVALID_ARGUMENT,
      "INVALID_FIELD",
    );
    await expectRefused(
      c.vfio.replaceDeviceDomain(P(vfio.ReplaceDeviceDomainRequest, { containerId: g.containerId, device: pci("pf-elsewhere"), guestPgtable: 0x9000n })),
      Code.FAILED_PRECONDITION,
      "DEVICE_NOT_ASSIGNED",
    );
    const after = await iommuView("pf-rep2");
    expect(after.rid).toEqual(before.rid);
    expect([...after.domains.keys()].sort()).toEqual([...before.domains.keys()].sort());
    g.session.abort();
  });
});
