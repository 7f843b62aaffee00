import { spawnSync } from "node:child_process";
import { connect } from "@nats-io/transport-node";
import { readHistory, type HistoryRecord } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { core, history, kvm } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { afterEach, describe, expect, it } from "vitest";
import { expectRefused, serviceEntry } from "../support/core-fixture.js";
import { allocBound, createMmSet, holdersOf, ia32Pasid, startKvmProcess, startKvmStack, tableOf, type KvmStack } from "../support/kvm-fixture.js";

// KVM (DESIGN §5 "KVM", ioasid.rst "KVM PASID Translation Table Updates") as a process against the
// real ioasid-core and nats-server. The test plays VFIO and the IOMMU driver through the core:
// createSet with the VM's MM token, alloc, attachSpid (BIND), detachSpid (UNBIND), free.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const { RegistrationState, EnqcmdOutcome, GpCause } = kvm;

let stack: KvmStack | undefined;
afterEach(async () => {
  await stack?.stop();
  stack = undefined;
});

async function createVm(mmToken: bigint, vcpuCount = 2, vmName = "guest"): Promise<kvm.Vm> {
  return (await stack!.kvm.client.createVm(P(kvm.CreateVmRequest, { mmToken, vcpuCount, vmName }))).vm!;
}

/** Waits until KVM's table for the VM reads `expected`. */
async function tableIs(vmId: number, expected: string[]): Promise<void> {
  await waitFor(async () => JSON.stringify(await tableOf(stack!.kvm.client, vmId)) === JSON.stringify(expected), {
    timeoutMs: 10_000,
    message: `VM ${vmId}'s table to be ${JSON.stringify(expected)}`,
  });
}

/** Waits until the IOASID's holders read `expected` (undefined: reclaimed). */
async function holdersAre(ioasid: number, expected: string[] | undefined): Promise<void> {
  await waitFor(async () => JSON.stringify(await holdersOf(stack!.c, ioasid)) === JSON.stringify(expected), {
    timeoutMs: 10_000,
    message: `IOASID ${ioasid}'s holders to be ${JSON.stringify(expected)}`,
  });
}

describe("KVM VM creation and BIND", () => {
  it("registers a VM created before VFIO's set as PENDING; the set activates it and BIND installs the translation with a vmcs reference", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    const vm = await createVm(0x7001n);
    expect(vm).toMatchObject({ vmId: 1, mmToken: 0x7001n, vcpuCount: 2, registration: RegistrationState.REGISTRATION_STATE_PENDING, setId: 0 });
    const reg = (await c.listRegistrations({})).registrations.find((r) => r.subscriber?.name === "kvm")!;
    expect(reg).toMatchObject({ subscriber: { name: "kvm", instance: "vm-1" }, active: false, scope: { $case: "mmToken", value: 0x7001n } });
    expect(reg.priority).toBe(4); // PRIORITY_CPU

    const setId = await createMmSet(c, 0x7001n);
    expect((await k.queryState({ vmId: 1 })).vms[0]).toMatchObject({ registration: RegistrationState.REGISTRATION_STATE_ACTIVE, setId });

    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    // Step 6 "-> ioasid_get() 3": the allocation reference plus KVM's, named kvm/vm-1/vmcs.
    const holders = await holdersOf(c, x.ioasid);
    expect(holders).toContain("kvm/vm-1/vmcs×1");
    expect((await c.describe({ ioasid: x.ioasid })).info!.refcount).toBe(2);
    const state = (await k.queryState({ vmId: 1 })).vms[0]!;
    expect(state.referencesHeld).toBe(1);
    expect(state.translations[0]).toMatchObject({ gpasid: 101, hpasid: x.ioasid, generation: x.generation });
    expect(state.translations[0]!.bindEventSeq).toBeGreaterThan(0n);

    const r = await k.enqcmd({ vmId: 1, vcpu: 1, ia32Pasid: ia32Pasid(101) });
    expect(r).toEqual(P(kvm.EnqcmdResponse, { outcome: EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED, gpasid: 101, hpasid: x.ioasid, generation: x.generation }));
  });

  it("raises #GP for an unknown guest PASID, a clear valid bit and reserved bits, and changes nothing", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    await createVm(0x7002n, 1);
    const setId = await createMmSet(c, 0x7002n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);

    const gp = async (value: number) => k.enqcmd({ vmId: 1, vcpu: 0, ia32Pasid: value });
    expect(await gp(ia32Pasid(102))).toMatchObject({
      outcome: EnqcmdOutcome.ENQCMD_OUTCOME_GP,
      gpasid: 102,
      hpasid: 0,
      gpCause: GpCause.GP_CAUSE_NO_TRANSLATION,
    });
    expect(await gp(101)).toMatchObject({ outcome: EnqcmdOutcome.ENQCMD_OUTCOME_GP, gpasid: 101, hpasid: 0, gpCause: GpCause.GP_CAUSE_PASID_NOT_VALID });
    expect(await gp((ia32Pasid(101) | 0x0400_0000) >>> 0)).toMatchObject({
      outcome: EnqcmdOutcome.ENQCMD_OUTCOME_GP,
      gpasid: 101,
      gpCause: GpCause.GP_CAUSE_RESERVED_BITS,
    });
    expect(await tableOf(k, 1)).toEqual([`101->${x.ioasid}`]);
    expect((await c.describe({ ioasid: x.ioasid })).info!.refcount).toBe(2);
  });
});

describe("KVM UNBIND and FREE", () => {
  it("UNBIND removes the entry and releases kvm/vm-1/vmcs; the history shows vmcs_update and enqcmd", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    const since = Date.now();
    await createVm(0x7003n);
    const setId = await createMmSet(c, 0x7003n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    expect((await k.enqcmd({ vmId: 1, vcpu: 0, ia32Pasid: ia32Pasid(101) })).outcome).toBe(EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED);

    const d = await c.detachSpid(P(core.DetachSpidRequest, { setId, ioasid: x.ioasid, generation: x.generation }));
    expect(d.unbindEmitted).toBe(true);
    await tableIs(1, []);
    await waitFor(async () => (await c.describe({ ioasid: x.ioasid })).info!.refcount === 1, { timeoutMs: 10_000, message: "KVM's reference released" });
    expect(await holdersOf(c, x.ioasid)).not.toContain("kvm/vm-1/vmcs×1");
    expect((await k.queryState({ vmId: 1 })).vms[0]!.referencesHeld).toBe(0);
    expect(await k.enqcmd({ vmId: 1, vcpu: 0, ia32Pasid: ia32Pasid(101) })).toMatchObject({
      outcome: EnqcmdOutcome.ENQCMD_OUTCOME_GP,
      gpCause: GpCause.GP_CAUSE_NO_TRANSLATION,
    });
    // Step 22–24: the free drops the last reference.
    expect((await c.free(P(core.FreeRequest, { setId, ioasid: x.ioasid }))).outcome).toBe(core.FreeOutcome.FREE_OUTCOME_RECLAIMED);

    const nc = await connect({ servers: stack.core.nats.url });
    try {
      let kvmSteps: HistoryRecord[] = [];
      await waitFor(
        async () => {
          const h = await readHistory(nc, { sinceMs: since });
          kvmSteps = h.filter((r) => r.role === "kvm" && r.instance === "vm-1");
          return kvmSteps.length >= 5;
        },
        { timeoutMs: 10_000, message: "KVM's history records" },
      );
      expect(kvmSteps.map((s) => s.action?.$case)).toEqual(["kvmCreateVm", "vmcsUpdate", "enqcmd", "vmcsUpdate", "enqcmd"]);
      expect(kvmSteps[1]!.action?.value).toEqual({
        kind: history.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL,
        gpasid: 101,
        hpasid: x.ioasid,
        cause: history.VmcsClearCause.VMCS_CLEAR_CAUSE_UNSPECIFIED,
      });
      expect(kvmSteps[3]!.action?.value).toEqual({
        kind: history.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR,
        gpasid: 101,
        hpasid: x.ioasid,
        cause: history.VmcsClearCause.VMCS_CLEAR_CAUSE_UNBIND,
      });
      expect(kvmSteps[4]!.action?.value).toMatchObject({ translated: false, gpCause: "NO_TRANSLATION" });
    } finally {
      await nc.close();
    }
  });

  it("FREE before UNBIND (misbehaving guest): the entry goes, vmcs is released, the IOASID is reclaimed at the last put, and the late unbind is harmless", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    await createVm(0x7004n);
    const setId = await createMmSet(c, 0x7004n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    // Another holder (the device) keeps it FREE_PENDING after KVM lets go.
    const vdcm = { role: "vdcm", instance: "idxd0", purpose: "wq0" };
    await c.get(P(core.GetRequest, { setId, ioasid: x.ioasid, holder: vdcm }));

    expect((await c.free(P(core.FreeRequest, { setId, ioasid: x.ioasid }))).outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
    await tableIs(1, []);
    await holdersAre(x.ioasid, ["vdcm/idxd0/wq0×1"]);
    expect((await k.enqcmd({ vmId: 1, vcpu: 0, ia32Pasid: ia32Pasid(101) })).outcome).toBe(EnqcmdOutcome.ENQCMD_OUTCOME_GP);
    // The guest's unbind after the free: no UNBIND is sent, nothing changes in KVM.
    expect((await c.detachSpid(P(core.DetachSpidRequest, { setId, ioasid: x.ioasid }))).unbindEmitted).toBe(false);
    const put = await c.put(P(core.PutRequest, { setId, ioasid: x.ioasid, holder: vdcm }));
    expect(put.reclaimed).toBe(true);
    expect(await tableOf(k, 1)).toEqual([]);
  });

  it("FREE when KVM holds the last reference besides the allocation reclaims the IOASID once KVM acknowledges", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    await createVm(0x7005n);
    const setId = await createMmSet(c, 0x7005n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    expect((await c.free(P(core.FreeRequest, { setId, ioasid: x.ioasid }))).outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
    await holdersAre(x.ioasid, undefined);
    await tableIs(1, []);
    expect((await stack.kvm.client.queryState({ vmId: 1 })).vms[0]!.referencesHeld).toBe(0);
  });
});

describe("KVM isolation", () => {
  it("maps guest PASID 101 of two VMs to different host PASIDs; each VM's ENQCMD sees only its own table", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    const a = await createVm(0xa1n);
    const b = await createVm(0xb2n);
    const setA = await createMmSet(c, 0xa1n);
    const setB = await createMmSet(c, 0xb2n);
    const xa = await allocBound(c, setA, 101);
    const xb = await allocBound(c, setB, 101);
    const yb = await allocBound(c, setB, 102);
    expect(xa.ioasid).not.toBe(xb.ioasid);
    await tableIs(a.vmId, [`101->${xa.ioasid}`]);
    await tableIs(b.vmId, [`101->${xb.ioasid}`, `102->${yb.ioasid}`]);

    expect((await k.enqcmd({ vmId: a.vmId, vcpu: 0, ia32Pasid: ia32Pasid(101) })).hpasid).toBe(xa.ioasid);
    expect((await k.enqcmd({ vmId: b.vmId, vcpu: 0, ia32Pasid: ia32Pasid(101) })).hpasid).toBe(xb.ioasid);
    expect(await k.enqcmd({ vmId: a.vmId, vcpu: 0, ia32Pasid: ia32Pasid(102) })).toMatchObject({
      outcome: EnqcmdOutcome.ENQCMD_OUTCOME_GP,
      gpCause: GpCause.GP_CAUSE_NO_TRANSLATION,
    });
    expect(await holdersOf(c, xa.ioasid)).toContain("kvm/vm-1/vmcs×1");
    expect(await holdersOf(c, xb.ioasid)).toContain("kvm/vm-2/vmcs×1");

    // Unbinding B's 101 leaves A's alone.
    await c.detachSpid(P(core.DetachSpidRequest, { setId: setB, ioasid: xb.ioasid }));
    await tableIs(b.vmId, [`102->${yb.ioasid}`]);
    expect(await tableOf(k, a.vmId)).toEqual([`101->${xa.ioasid}`]);
    const all = (await k.queryState({ vmId: 0 })).vms;
    expect(all.map((v) => [v.vmId, v.setId])).toEqual([
      [a.vmId, setA],
      [b.vmId, setB],
    ]);
  });
});

describe("KVM VM destruction", () => {
  it("DestroyVm clears the table, drops every reference and withdraws the registration", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    await createVm(0x7006n);
    const setId = await createMmSet(c, 0x7006n);
    const x = await allocBound(c, setId, 101);
    const y = await allocBound(c, setId, 102);
    await tableIs(1, [`101->${x.ioasid}`, `102->${y.ioasid}`]);

    expect(await k.destroyVm({ vmId: 1 })).toEqual({ clearedEntries: 2, releasedReferences: 2 });
    for (const id of [x.ioasid, y.ioasid]) {
      expect((await holdersOf(c, id))!.some((h) => h.startsWith("kvm/"))).toBe(false);
      expect((await c.describe({ ioasid: id })).info!.refcount).toBe(1);
    }
    expect((await c.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "kvm")).toEqual([]);
    await expectRefused(k.queryState({ vmId: 1 }), Code.NOT_FOUND, "VM_NOT_FOUND");
    await expectRefused(k.enqcmd({ vmId: 1, vcpu: 0, ia32Pasid: ia32Pasid(101) }), Code.NOT_FOUND, "VM_NOT_FOUND");
    // Nothing of KVM's holds the IOASIDs now: free reclaims at once.
    for (const id of [x.ioasid, y.ioasid]) {
      expect((await c.free(P(core.FreeRequest, { setId, ioasid: id }))).outcome).toBe(core.FreeOutcome.FREE_OUTCOME_RECLAIMED);
    }
    // The token is free again, and the set is empty: a new VM registers ACTIVE at once.
    expect(await createVm(0x7006n)).toMatchObject({ vmId: 2, registration: RegistrationState.REGISTRATION_STATE_ACTIVE, setId });
  });

  it("SIGTERM destroys the VMs: their references are dropped and registrations withdrawn before exit 0", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    await createVm(0x7007n);
    const setId = await createMmSet(c, 0x7007n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    expect(await stack.kvm.stop("SIGTERM")).toBe(0);
    expect((await holdersOf(c, x.ioasid))!.some((h) => h.startsWith("kvm/"))).toBe(false);
    expect((await c.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "kvm")).toEqual([]);
  });

  it("a KVM killed with a bound VM comes back with the VM and its VMCS table; the FREE it missed clears the entry and the IOASID is reclaimed", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    await createVm(0x7008n);
    const setId = await createMmSet(c, 0x7008n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    await stack.kvm.stop("SIGKILL");
    // Free always succeeds (ioasid.rst "Exception cases"); KVM's reference keeps it FREE_PENDING.
    expect((await c.free(P(core.FreeRequest, { setId, ioasid: x.ioasid }))).outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
    expect(await holdersOf(c, x.ioasid)).toEqual(["kvm/vm-1/vmcs×1"]);

    stack.kvm = await startKvmProcess(stack.core);
    // The VM came back with its table (kept in JetStream); the FREE it missed was delivered again:
    // entry cleared, reference released with the ack, IOASID reclaimed.
    await holdersAre(x.ioasid, undefined);
    await tableIs(1, []);
    expect((await c.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "kvm").map((r) => r.subscriber?.instance)).toEqual(["vm-1"]);
    // VM ids continue after the restored ones (history stays unambiguous).
    expect((await createVm(0x7009n)).vmId).toBe(2);
  });
});

describe("KVM bad input", () => {
  it("refuses an unknown VM, a vCPU out of range, a zero MM token, a duplicate token and a non-empty set, changing nothing", async () => {
    stack = await startKvmStack();
    const { c } = stack;
    const k = stack.kvm.client;
    await createVm(0x7010n, 2);
    const setId = await createMmSet(c, 0x7010n);
    const x = await allocBound(c, setId, 101);
    await tableIs(1, [`101->${x.ioasid}`]);
    const before = JSON.stringify(
      (await k.queryState({ vmId: 0 })).vms.map((v) => ({ ...v, createdAt: undefined })),
      (_k, v) => (typeof v === "bigint" ? String(v) : v),
    );
    const regsBefore = (await c.listRegistrations({})).registrations.length;

    const zero = await expectRefused(k.createVm(P(kvm.CreateVmRequest, { mmToken: 0n })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(zero.metadata["field"]).toBe("mm_token");
    await expectRefused(k.createVm(P(kvm.CreateVmRequest, { mmToken: 0x7010n })), Code.ALREADY_EXISTS, "VM_EXISTS");
    const other = await createMmSet(c, 0x7011n);
    await c.alloc(P(core.AllocRequest, { setId: other }));
    await expectRefused(k.createVm(P(kvm.CreateVmRequest, { mmToken: 0x7011n })), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await expectRefused(k.enqcmd({ vmId: 9, vcpu: 0, ia32Pasid: ia32Pasid(101) }), Code.NOT_FOUND, "VM_NOT_FOUND");
    await expectRefused(k.enqcmd({ vmId: 1, vcpu: 2, ia32Pasid: ia32Pasid(101) }), Code.INVALID_ARGUMENT, "VCPU_OUT_OF_RANGE");
    await expectRefused(k.destroyVm({ vmId: 9 }), Code.NOT_FOUND, "VM_NOT_FOUND");
    await expectRefused(k.queryState({ vmId: 9 }), Code.NOT_FOUND, "VM_NOT_FOUND");

    const after = JSON.stringify(
      (await k.queryState({ vmId: 0 })).vms.map((v) => ({ ...v, createdAt: undefined })),
      (_k, v) => (typeof v === "bigint" ? String(v) : v),
    );
    expect(after).toBe(before);
    expect((await c.listRegistrations({})).registrations.length).toBe(regsBefore);
    expect((await c.describe({ ioasid: x.ioasid })).info!.refcount).toBe(2);
    // KVM still works after the refusals. (A refused CreateVm may use up a VM id: ids are never
    // reused, so a registration a failed call left behind can never reach a later VM.)
    expect((await createVm(0x7012n)).registration).toBe(RegistrationState.REGISTRATION_STATE_PENDING);
  });

  it("exits 2 on bad configuration before listening", () => {
    const r = spawnSync(process.execPath, [serviceEntry("kvm")], { env: { ...process.env, KVM_GRPC_ADDRESS: "nowhere" }, encoding: "utf8", timeout: 10_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("KVM_GRPC_ADDRESS");
  });
});
