import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { iommu, vfio } from "@ioasid/proto";
import { natsEnv, startService, waitFor, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { CODE, GVA_BASE, OUTCOME, SOURCE, dma, isReclaimed, guestAnswers, openGuest, registerDevice, watchFaults } from "../support/fault-fixture.js";

// Issue 6: the IOMMU's own state — PASID tables, attach handles, guest binds, outstanding fault
// groups — survives kill -9. Back on the same address it has the same tables, the outstanding
// group is still there to be answered exactly once, and the guest's later free tears the PASID
// down and releases the bind reference as if nothing had happened.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

let stack: StackFixture;
let revived: ServiceProcess | undefined;
beforeAll(async () => {
  stack = await startStack({ IOMMU_FAULT_TIMEOUT: "30s" });
}, 60_000);
afterAll(async () => {
  await revived?.stop();
  await stack?.stop();
});

describe("a crashed IOMMU", () => {
  it("comes back with its PASID tables, handles and outstanding fault groups; the group is answered once; the FREE still tears down", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-x");
    const g = await openGuest(c, 0xc0ffeen, "pf-x");
    const w = await watchFaults(c, g.containerId);
    const r = await dma(c, "pf-x", g.hpasid, GVA_BASE + 0x1000n);
    expect(r.outcome).toBe(OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST);
    await waitFor(() => w.groups().length === 1, { message: "the group at the VMM" });
    const query = async () => {
      const s = await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: ["pf-x"] }));
      return { devices: s.devices, domains: s.domains, attachHandles: s.attachHandles, faultGroups: s.faultGroups.map((f) => ({ ...f, deadline: undefined })) };
    };
    const before = await query();
    expect(before.faultGroups).toHaveLength(1);

    const address = stack.procs.iommu.address;
    stack.procs.iommu.kill("SIGKILL");
    await stack.procs.iommu.exited;
    revived = await startService({
      name: "iommu",
      entry: serviceEntry("iommu"),
      env: { IOMMU_GRPC_ADDRESS: address, ...(await natsEnv(stack.nats, "iommu")), IOASID_CORE_ADDRESS: stack.addresses.core, IOMMU_FAULT_TIMEOUT: "30s" },
    });
    expect(revived.logs()).toContain("restored the IOMMU's tables");
    // Same tables, same outstanding group (clients reconnect within their bounded backoff).
    await waitFor(
      async () => {
        try {
          await c.iommu.queryState(P(iommu.QueryStateRequest, {}));
          return true;
        } catch {
          return false;
        }
      },
      { timeoutMs: 5000, message: "the IOMMU answering again" },
    );
    expect(await query()).toEqual(before);
    // VFIO's channel to the IOMMU comes back within its bounded backoff (≤ 1 s).
    await waitFor(
      async () => {
        try {
          await c.vfio.unmapGuestPages(
            P(vfio.UnmapGuestPagesRequest, { containerId: g.containerId, hpasid: g.hpasid, iova: GVA_BASE + 0x100_0000n, size: 0x1000n }),
          );
          return true;
        } catch {
          return false;
        }
      },
      { timeoutMs: 3000, intervalMs: 50, message: "VFIO reaching the IOMMU again" },
    );
    // The guest's translation works through the restored nested entry once it answers.
    await guestAnswers(c, g, w.groups()[0]!);
    expect(await c.iommu.awaitPageResponse({ deviceId: "pf-x", faultGroupId: r.faultGroupId }, { deadlineMs: 5000 })).toEqual({
      code: CODE.PAGE_RESPONSE_CODE_SUCCESS,
      source: SOURCE.PAGE_RESPONSE_SOURCE_HANDLER,
    });
    expect((await dma(c, "pf-x", g.hpasid, GVA_BASE + 0x1000n)).outcome).toBe(OUTCOME.TRANSLATE_OUTCOME_TRANSLATED);
    expect(w.groups(), "relayed once, not again after the IOMMU's return").toHaveLength(1);

    // The guest frees the PASID: the restored IOMMU tears it down and releases its bind reference.
    await c.vfio.freePasid({ containerId: g.containerId, hpasid: g.hpasid, generation: g.generation });
    await waitFor(() => isReclaimed(c, g.hpasid), { timeoutMs: 10_000, message: "reclaimed" });
    expect((await query()).attachHandles.filter((h) => h.pasid === g.hpasid)).toEqual([]);
    // Unbinding after that finds nothing, as for any free before unbind.
    const unbound = await c.vfio.unbindGuestPasid(
      P(vfio.UnbindGuestPasidRequest, { containerId: g.containerId, device: { ref: { $case: "deviceId", value: "pf-x" } }, hpasid: g.hpasid }),
    );
    expect(unbound.unbound).toBe(false);
    w.stop();
    g.session.abort();
  }, 60_000);
});
