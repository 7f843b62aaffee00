import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect, headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { deliverySubject, encodeDeliveryBatch, historyStreamName, readHistory, roleStateStreamName, queueGroup } from "@ioasid/bus";
import { bus, events, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { natsConnectOptions, OP_LOG_STREAM, type NatsRole } from "@ioasid/security";
import { waitFor } from "@ioasid/testkit";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// Issue 14, NATS: each forgery of the issue repeated against a real stack whose nats-server has a
// user per role instance (DESIGN §4.6 "Authenticity", §11). An anonymous client cannot connect at
// all; with a wrong role's credential every forgery is refused by nats-server (a permissions
// violation, logged), and the core's and the roles' state is the same afterwards. The legitimate
// path still works, and the same forged bytes sent with the operator's credential do reach KVM —
// so the refusals are the broker's, not a malformed message's.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const PREFIX = "ioasid.v1";

let stack: StackFixture;
const session = new AbortController();
const opened: NatsConnection[] = [];
let a: { vmId: number; containerId: number; setId: number; mdev: string; hpasid: number; generation: number };

beforeAll(async () => {
  stack = await startStack({}, { auth: { anonymous: "refuse" } });
  const c = stack.clients;
  await c.vdcm.registerDevice(
    P(vdcm.RegisterDeviceRequest, { deviceId: "iax0", maxPasidEntries: 64, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 }] }),
  );
  await c.iommu.registerDevice(
    P(iommu.RegisterDeviceRequest, {
      deviceId: "iax0",
      maxPasids: 1 << 20,
      priCapable: true,
      function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
      iommuGroup: 3,
    }),
  );
  // VM A: guest PASID 101 bound (KVM's VMCS entry installed), programmed in its WQ.
  const token = 0xa11cen;
  const vm = (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 1, vmName: "victim" }))).vm!;
  const container = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 8, vmName: "victim" }));
  void (async () => {
    try {
      for await (const _ of c.vfio.session({ containerId: container.containerId }, { signal: session.signal })) void _;
    } catch {
      // ended with the test
    }
  })();
  const mdev = "mdev-victim";
  await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "iax0", mdevUuid: mdev, wqIds: [0] }));
  await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: container.containerId, device: { ref: { $case: "mdevUuid", value: mdev } } }));
  const x = await c.vfio.allocPasid({ containerId: container.containerId });
  await c.vfio.bindGuestPasid(
    P(vfio.BindGuestPasidRequest, {
      containerId: container.containerId,
      device: { ref: { $case: "mdevUuid", value: mdev } },
      hpasid: x.hpasid,
      generation: x.generation,
      gpasid: 101,
      guestPgtable: 0x3000n,
    }),
  );
  await waitFor(async () => ((await c.kvm.queryState({ vmId: vm.vmId })).vms[0]?.translations.length ?? 0) === 1, { timeoutMs: 10_000 });
  await c.vdcm.writeWqPasid({ mdevUuid: mdev, virtualWq: 0, gpasid: 101 });
  a = { vmId: vm.vmId, containerId: container.containerId, setId: container.setId, mdev, hpasid: x.hpasid, generation: x.generation };
}, 90_000);

afterAll(async () => {
  session.abort();
  for (const nc of opened) await nc.close().catch(() => undefined);
  await stack?.stop();
});

/** What the forgeries must not change: the IOASID in the core, KVM's, VDCM's and the IOMMU's tables, the streams. */
async function snapshot(): Promise<string> {
  const c = stack.clients;
  const jsm = await jetstreamManager(c.nc);
  const streams = await Promise.all(
    [OP_LOG_STREAM, roleStateStreamName(PREFIX), historyStreamName(PREFIX)].map(async (s) => {
      const info = await jsm.streams.info(s);
      // The op log and role state only grow by what the legitimate path writes (none here); the
      // history keeps growing with records, so only its existence and first sequence are compared.
      return s === historyStreamName(PREFIX) ? { s, first: info.state.first_seq } : { s, first: info.state.first_seq, last: info.state.last_seq };
    }),
  );
  return JSON.stringify(
    {
      ioasid: (await c.core.describe({ ioasid: a.hpasid })).info,
      registrations: (await c.core.listRegistrations({})).registrations,
      kvm: (await c.kvm.queryState({ vmId: a.vmId })).vms[0]?.translations,
      vdcm: (await c.vdcm.queryState({ deviceIds: ["iax0"] })).devices[0]?.pasidEntries.map((e) => ({ ...e, programmedAt: undefined })),
      iommu: (await c.iommu.queryState({ deviceIds: ["iax0"], maxIotlbFlushes: 0, viommusOnly: false })).devices,
      streams,
    },
    (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v),
  );
}

/** A connection with a role's credential, collecting the permission violations the server reports. */
async function connectAs(role: NatsRole, instance: string): Promise<{ nc: NatsConnection; violations: string[] }> {
  const made = await stack.nats.credentials(role, instance);
  if (made === undefined) throw new Error("the test's nats-server has no authorization");
  const nc = await connect({ servers: stack.nats.url, name: `attacker-as-${role}`, ...natsConnectOptions(made.credential) });
  opened.push(nc);
  const violations: string[] = [];
  void (async () => {
    for await (const s of nc.status()) if (s.type === "error") violations.push(String((s as { error?: unknown }).error));
  })();
  return { nc, violations };
}

/** A FREE of A's IOASID as the core would deliver it: damaging if it reached KVM. */
function forgedFree(seq: bigint, registrationId: number): Uint8Array {
  const event = events.IoasidEvent.fromPartial({
    seq,
    type: events.EventType.EVENT_TYPE_FREE,
    ioasid: a.hpasid,
    generation: a.generation,
    spid: 101,
    setId: a.setId,
    tokenType: events.TokenType.TOKEN_TYPE_MM,
    token: 0xa11cen,
    refcount: 3,
    commitTime: new Date(),
  });
  return encodeDeliveryBatch([{ registrationId, attempt: 1, eventBytes: events.IoasidEvent.encode(event).finish() }]);
}

async function kvmRegistration(): Promise<number> {
  const regs = (await stack.clients.core.listRegistrations({})).registrations;
  const r = regs.find((x) => x.subscriber?.name === "kvm" && x.subscriber.instance === `vm-${a.vmId}`);
  if (r === undefined) throw new Error(`no KVM registration for vm-${a.vmId}: ${JSON.stringify(regs)}`);
  return r.registrationId;
}

async function settle(nc: NatsConnection): Promise<void> {
  // The server answers a PING after it processed everything sent before it (the violations included).
  await nc.flush().catch(() => undefined);
}

describe("NATS permissions enforced by nats-server (issue 14, DESIGN §4.6)", () => {
  it("refuses a client without a credential", async () => {
    await expect(connect({ servers: stack.nats.url, reconnect: false })).rejects.toThrow(/Authorization Violation/);
  });

  it("refuses forged deliveries (FREE to KVM, VDCM, IOMMU; BIND to KVM) from another role's user, and nothing changes", async () => {
    const before = await snapshot();
    const reg = await kvmRegistration();
    // IOMMU's and VDCM's users forging to KVM's VM; KVM's user forging to VDCM and the IOMMU.
    const iommuUser = await connectAs("iommu", "dmar0");
    const kvmUser = await connectAs("kvm", "kvm0");
    const kvmSubject = deliverySubject(PREFIX, "kvm", `vm-${a.vmId}`);
    iommuUser.nc.publish(kvmSubject, forgedFree(1_000_000n, reg));
    const bind = events.IoasidEvent.fromPartial({ seq: 1_000_001n, type: events.EventType.EVENT_TYPE_BIND, ioasid: a.hpasid + 1, spid: 101, setId: a.setId });
    iommuUser.nc.publish(kvmSubject, encodeDeliveryBatch([{ registrationId: reg, attempt: 1, eventBytes: events.IoasidEvent.encode(bind).finish() }]));
    kvmUser.nc.publish(deliverySubject(PREFIX, "vdcm", "vdcm0"), forgedFree(1_000_002n, 1));
    kvmUser.nc.publish(deliverySubject(PREFIX, "iommu", "dmar0"), forgedFree(1_000_003n, 1));
    await Promise.all([settle(iommuUser.nc), settle(kvmUser.nc)]);
    await waitFor(() => iommuUser.violations.length >= 2 && kvmUser.violations.length >= 2, { timeoutMs: 20_000, message: "the violations reported" });
    expect(iommuUser.violations.join("\n")).toContain(`Permissions Violation for Publish to "${kvmSubject}"`);
    expect(kvmUser.violations.join("\n")).toContain(`Publish to "${deliverySubject(PREFIX, "iommu", "dmar0")}"`);
    // nats-server logs each one.
    await waitFor(() => (stack.nats.logs().match(/Publish Violation/g)?.length ?? 0) >= 4, { timeoutMs: 20_000, message: "the server's log lines" });
    expect(await snapshot()).toBe(before);
  });

  it("refuses another role's user joining a role's queue group or reading its deliveries", async () => {
    const kvmUser = await connectAs("kvm", "kvm0");
    const errors: string[] = [];
    const received: string[] = [];
    // Ten members in the IOMMU's queue group (the S9 attack), and a plain subscription.
    for (let i = 0; i < 10; i++)
      kvmUser.nc.subscribe(deliverySubject(PREFIX, "iommu", "dmar0"), {
        queue: queueGroup("iommu", "dmar0"),
        callback: (err, m) => void (err === null ? received.push(m.subject) : errors.push(String(err))),
      });
    kvmUser.nc.subscribe(`${PREFIX}.deliver.vdcm.>`, { callback: (err, m) => void (err === null ? received.push(m.subject) : errors.push(String(err))) });
    // Answering the serving core's lease in its place (issue 18): a standby would wait behind a
    // role forever, or, pinging it, nothing: neither is a role's to do.
    kvmUser.nc.subscribe(`${PREFIX}.core.lease`, { callback: (err, m) => void (err === null ? received.push(m.subject) : errors.push(String(err))) });
    await settle(kvmUser.nc);
    await waitFor(() => errors.length >= 12, { timeoutMs: 20_000, message: "every subscription refused" });
    expect(errors.join("\n")).toContain(`Permissions Violation for Subscription to "${PREFIX}.core.lease"`);
    expect(errors.join("\n")).toContain(`Permissions Violation for Subscription to "${deliverySubject(PREFIX, "iommu", "dmar0")}" using queue "iommu.dmar0"`);
    // The IOMMU still gets its deliveries (below, the legitimate free), and nobody else does.
    expect(received).toEqual([]);
  });

  it("refuses writes to the op log and another role's state, and stream deletes and purges, from a role's user", async () => {
    const before = await snapshot();
    const kvmUser = await connectAs("kvm", "kvm0");
    const vdcmUser = await connectAs("vdcm", "vdcm0");
    // One message on the op log made the core fail-stop; a forged valid one was replayed at start.
    const h = natsHeaders();
    h.set("Ioasid-Op-Format", "ioasid.core.v1.OpBatch");
    kvmUser.nc.publish(`${PREFIX}.core.ops`, new Uint8Array([1, 2, 3]), { headers: h });
    // VDCM's user overwriting the IOMMU's and KVM's state, and its own history under another name.
    vdcmUser.nc.publish(`${PREFIX}.rolestate.iommu.dmar0.ids`, new Uint8Array());
    vdcmUser.nc.publish(`${PREFIX}.rolestate.kvm.kvm0.vm~2f1`, new Uint8Array());
    vdcmUser.nc.publish(`${PREFIX}.history.kvm.vm-${a.vmId}`, new Uint8Array([0]));
    await Promise.all([settle(kvmUser.nc), settle(vdcmUser.nc)]);
    await waitFor(() => kvmUser.violations.length >= 1 && vdcmUser.violations.length >= 3, { timeoutMs: 20_000, message: "the violations reported" });
    // Deleting the op log (IDs and generations back to 1), purging the role state (roles forget).
    for (const user of [kvmUser, vdcmUser]) {
      const jsm = await jetstreamManager(user.nc);
      await expect(jsm.streams.delete(OP_LOG_STREAM)).rejects.toThrow();
      await expect(jsm.streams.purge(roleStateStreamName(PREFIX))).rejects.toThrow();
      await expect(jsm.streams.update(OP_LOG_STREAM, { max_msgs: 1 })).rejects.toThrow();
    }
    expect(await snapshot()).toBe(before);
    // The core is still up and serving.
    expect((await stack.clients.core.getStats({})).capacity).toBeGreaterThan(0);
  });

  it("still runs the legitimate path: A frees its PASID, the teardown runs in priority order and the IOASID is reclaimed", async () => {
    const c = stack.clients;
    await c.vfio.unbindGuestPasid(
      P(vfio.UnbindGuestPasidRequest, {
        containerId: a.containerId,
        device: { ref: { $case: "mdevUuid", value: a.mdev } },
        hpasid: a.hpasid,
        generation: a.generation,
        gpasid: 101,
      }),
    );
    await c.vfio.freePasid({ containerId: a.containerId, hpasid: a.hpasid, generation: a.generation });
    await waitFor(async () => (await c.core.describe({ ioasid: a.hpasid }).catch(() => undefined))?.info?.generation !== a.generation, {
      timeoutMs: 10_000,
      intervalMs: 50,
      message: "the IOASID reclaimed",
    });
    expect((await c.kvm.queryState({ vmId: a.vmId })).vms[0]?.translations ?? []).toEqual([]);
  });

  it("delivers the same forged bytes when the operator sends them: the refusals above were the broker's", async () => {
    const c = stack.clients;
    // A fresh binding, then the forged FREE with the operator's credential: KVM clears its entry.
    const x = await c.vfio.allocPasid({ containerId: a.containerId });
    await c.vfio.bindGuestPasid(
      P(vfio.BindGuestPasidRequest, {
        containerId: a.containerId,
        device: { ref: { $case: "mdevUuid", value: a.mdev } },
        hpasid: x.hpasid,
        generation: x.generation,
        gpasid: 102,
        guestPgtable: 0x3000n,
      }),
    );
    await waitFor(async () => ((await c.kvm.queryState({ vmId: a.vmId })).vms[0]?.translations.length ?? 0) === 1, { timeoutMs: 10_000 });
    a = { ...a, hpasid: x.hpasid, generation: x.generation };
    const reply = await c.nc.request(deliverySubject(PREFIX, "kvm", `vm-${a.vmId}`), forgedFree(2_000_000n, await kvmRegistration()), { timeout: 5000 });
    expect(bus.AckBatch.decode(reply.data).acks.length).toBe(1);
    expect((await c.kvm.queryState({ vmId: a.vmId })).vms[0]?.translations ?? []).toEqual([]);
  });

  it("audits the operator's stream administration: each purge, update and delete is a stream_admin record of the core; the roles' refused attempts left none", async () => {
    const jsm = await jetstreamManager(stack.clients.nc);
    const scratch = "IOASID_AUDIT_SCRATCH";
    await jsm.streams.add({ name: scratch, subjects: ["audit-scratch.>"] });
    await jsm.streams.purge(scratch);
    await jsm.streams.update(scratch, { max_msgs: 10 });
    await jsm.streams.delete(scratch);
    // A refused one is recorded as refused: deleting a stream that no longer exists.
    await expect(jsm.streams.delete(scratch)).rejects.toThrow();
    let records: Awaited<ReturnType<typeof readHistory>> = [];
    await waitFor(
      async () => {
        records = (await readHistory(stack.clients.nc, {})).filter((r) => r.action.$case === "streamAdmin");
        return records.length >= 4;
      },
      { timeoutMs: 20_000, message: "four stream_admin records" },
    );
    expect(records.map((r) => ({ role: r.role, instance: r.instance, ...(r.action.value as object), error: undefined }))).toEqual([
      { role: "ioasid", instance: "core", api: "STREAM.PURGE", stream: scratch, user: "", ok: true, error: undefined },
      { role: "ioasid", instance: "core", api: "STREAM.UPDATE", stream: scratch, user: "", ok: true, error: undefined },
      { role: "ioasid", instance: "core", api: "STREAM.DELETE", stream: scratch, user: "", ok: true, error: undefined },
      { role: "ioasid", instance: "core", api: "STREAM.DELETE", stream: scratch, user: "", ok: false, error: undefined },
    ]);
    expect(records[3]!.action.$case === "streamAdmin" && records[3]!.action.value.error).toMatch(/not found/i);
  });
});
