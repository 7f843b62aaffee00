import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { eventOf, readHistory } from "@ioasid/bus";
import { core, iommu, vdcm, vfio } from "@ioasid/proto";
import { natsEnv, startService, waitFor, type ServiceProcess } from "@ioasid/testkit";
import { forceRelease, heldBy } from "@ioasid/cli";
import { serviceEntry } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { attachSession, isReclaimed } from "../support/fault-fixture.js";

// DESIGN §4.4 and issue 6: a VDCM killed (kill -9) while a PASID is programmed in one of its
// devices keeps that IOASID from being reclaimed — its reference stays, whatever the guest does —
// until it comes back with its device tables (kept in JetStream), receives the FREE it missed,
// drains and clears the device, and releases the reference with the acknowledgement.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

let stack: StackFixture;
let nc: NatsConnection;
let revived: ServiceProcess | undefined;
beforeAll(async () => {
  stack = await startStack();
  nc = await connect({ servers: stack.nats.url });
}, 60_000);
afterAll(async () => {
  await revived?.stop();
  await nc?.close();
  await stack?.stop();
});

const reclaimed = (ioasid: number) => isReclaimed(stack.clients, ioasid);

describe("a crashed VDCM", () => {
  it("keeps a programmed PASID's IOASID from being reclaimed until it returns and clears the device", async () => {
    const c = stack.clients;
    const since = Date.now() - 1;
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, { deviceId: "dsa-x", maxPasidEntries: 16, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 }] }),
    );
    await c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, {
        deviceId: "dsa-x",
        maxPasids: 1 << 20,
        priCapable: true,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
        iommuGroup: 3,
      }),
    );
    await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "dsa-x", mdevUuid: "mdev-x", wqIds: [0] }));
    const opened = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xdead_1n, quota: 4, vmName: "vdcm-crash" }));
    const session = await attachSession(c, opened.containerId);
    const mdev = { ref: { $case: "mdevUuid" as const, value: "mdev-x" } };
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: mdev }));
    const a = await c.vfio.allocPasid({ containerId: opened.containerId });
    await c.vfio.bindGuestPasid(
      P(vfio.BindGuestPasidRequest, {
        containerId: opened.containerId,
        device: mdev,
        hpasid: a.hpasid,
        generation: a.generation,
        gpasid: 55,
        guestPgtable: 0x5000n,
      }),
    );
    await c.vdcm.writeWqPasid(P(vdcm.WriteWqPasidRequest, { mdevUuid: "mdev-x", virtualWq: 0, gpasid: 55 }));
    const holder = "vdcm/vdcm0/dsa-x.wq0";
    const holders = async () =>
      (await c.core.describe({ ioasid: a.hpasid })).info!.holders.map((h) => `${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}`);
    expect(await holders()).toContain(holder);

    // kill -9 VDCM with the PASID programmed; then the guest frees it.
    const vdcmAddress = stack.procs.vdcm.address;
    stack.procs.vdcm.kill("SIGKILL");
    await stack.procs.vdcm.exited;
    await c.vfio.freePasid({ containerId: opened.containerId, hpasid: a.hpasid, generation: a.generation });

    // Free returned; every live role acted (the IOMMU released its bind reference) but VDCM's
    // reference holds the IOASID: FREE_PENDING, not reclaimed, for as long as VDCM is away.
    await waitFor(async () => !(await holders()).some((h) => h.startsWith("iommu/")), { timeoutMs: 10_000, message: "the IOMMU's FREE teardown" });
    await new Promise((r) => setTimeout(r, 3000));
    const info = (await c.core.describe({ ioasid: a.hpasid })).info!;
    expect(info.state).toBe(core.IoasidState.IOASID_STATE_FREE_PENDING);
    expect(await holders()).toEqual([holder]);

    // VDCM comes back (same instance, same address): its device still has the PASID programmed.
    const restartedAt = Date.now();
    revived = await startService({
      name: "vdcm",
      entry: serviceEntry("vdcm"),
      env: {
        VDCM_GRPC_ADDRESS: vdcmAddress,
        ...(await natsEnv(stack.nats, "vdcm")),
        IOASID_CORE_ADDRESS: stack.addresses.core,
        IOMMU_ADDRESS: stack.addresses.iommu,
      },
    });
    expect(revived.logs()).toContain("restored the device tables");
    await waitFor(() => reclaimed(a.hpasid), { timeoutMs: 5000, intervalMs: 50, message: "reclaimed within 5 s of VDCM's return" });
    const reclaimMs = Date.now() - restartedAt;
    const state = await c.vdcm.queryState(P(vdcm.QueryStateRequest, { deviceIds: ["dsa-x"] }));
    expect(state.devices[0]!.pasidEntries).toEqual([]);

    // The history: VDCM's clear of the device (after its return) comes before the RECLAIM.
    let hist = await readHistory(nc, { sinceMs: since });
    await waitFor(
      async () => {
        hist = await readHistory(nc, { sinceMs: since });
        return hist.some((r) => eventOf(r) === "RECLAIM" && r.ioasid === a.hpasid);
      },
      { timeoutMs: 5000 },
    );
    const clear = hist.find((r) => r.role === "vdcm" && r.action?.$case === "vdevClear" && r.ioasid === a.hpasid);
    const reclaim = hist.find((r) => eventOf(r) === "RECLAIM" && r.ioasid === a.hpasid);
    expect(clear, "VDCM cleared the device").toBeDefined();
    expect(clear!.ts).toBeGreaterThanOrEqual(restartedAt);
    expect(clear!.ts).toBeLessThanOrEqual(reclaim!.ts);
    expect(reclaimMs).toBeLessThan(5000);
    session.abort();
  }, 60_000);

  it("an operator force-releases the references of a VDCM that will not come back, with an audit record first", async () => {
    const c = stack.clients;
    const since = Date.now() - 1;
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, { deviceId: "dsa-y", maxPasidEntries: 16, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 }] }),
    );
    await c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, {
        deviceId: "dsa-y",
        maxPasids: 1 << 20,
        priCapable: true,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
        iommuGroup: 4,
      }),
    );
    await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "dsa-y", mdevUuid: "mdev-y", wqIds: [0] }));
    const opened = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0xdead_2n, quota: 4, vmName: "vdcm-gone" }));
    const session = await attachSession(c, opened.containerId);
    const mdev = { ref: { $case: "mdevUuid" as const, value: "mdev-y" } };
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: mdev }));
    const a = await c.vfio.allocPasid({ containerId: opened.containerId });
    await c.vfio.bindGuestPasid(
      P(vfio.BindGuestPasidRequest, {
        containerId: opened.containerId,
        device: mdev,
        hpasid: a.hpasid,
        generation: a.generation,
        gpasid: 56,
        guestPgtable: 0x5000n,
      }),
    );
    await c.vdcm.writeWqPasid(P(vdcm.WriteWqPasidRequest, { mdevUuid: "mdev-y", virtualWq: 0, gpasid: 56 }));
    // VDCM dies for good (the revived one of the previous test); the guest crashes.
    revived!.kill("SIGKILL");
    await revived!.exited;
    revived = undefined;
    session.abort();
    const sel = { role: "vdcm", instance: "vdcm0" };
    await waitFor(async () => (await c.core.describe({ ioasid: a.hpasid })).info!.state === core.IoasidState.IOASID_STATE_FREE_PENDING, { timeoutMs: 10_000 });
    await waitFor(async () => (await heldBy(c, sel)).length === 1 && (await c.core.describe({ ioasid: a.hpasid })).info!.refcount === 1, {
      timeoutMs: 10_000,
      message: "only VDCM's reference left",
    });

    const r = await forceRelease(c, stack.addresses, sel, { operator: "test-operator", reason: "vdcm0 decommissioned" });
    expect(r).toMatchObject({ released: 1, reclaimed: [a.hpasid] });
    expect(await reclaimed(a.hpasid)).toBe(true);
    let hist = await readHistory(nc, { sinceMs: since });
    await waitFor(
      async () => {
        hist = await readHistory(nc, { sinceMs: since });
        return hist.some((x) => x.action?.$case === "forceRelease") && hist.some((x) => eventOf(x) === "RECLAIM" && x.ioasid === a.hpasid);
      },
      { timeoutMs: 5000 },
    );
    // The stack runs with mTLS: the core authenticated the operator and wrote the audit record, one
    // per released reference, with the reason and the name the command gave (issue 14).
    const audits = hist.filter((x) => x.action?.$case === "forceRelease");
    expect(audits).toHaveLength(1);
    const audit = audits[0]!;
    expect(audit).toMatchObject({ role: "ioasid", instance: "core", ioasid: a.hpasid });
    expect(audit.action.value).toMatchObject({
      holder: "vdcm/vdcm0/dsa-y.wq0",
      operator: expect.stringMatching(/^operator\//),
      onBehalfOf: "test-operator",
      reason: "vdcm0 decommissioned",
      references: [{ ioasid: a.hpasid, purpose: "dsa-y.wq0", count: 1 }],
    });
    const put = hist.find(
      (x) => x.action.$case === "ioasidPut" && x.ioasid === a.hpasid && x.action.value.holder?.role === "vdcm" && x.action.value.holder.instance === "vdcm0",
    )!;
    expect(audit.ts).toBeLessThanOrEqual(put.ts);
  }, 60_000);
});
