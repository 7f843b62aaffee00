import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { spawnSync } from "node:child_process";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { readHistory, type HistoryActionCase, type HistoryRecord } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { core, events, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { expectRefused, serviceEntry, startCore, type CoreFixture } from "../support/core-fixture.js";
import { coreSet, errorLines, startVfio, startVmm, waitContainerGone, waitSetGone, type VfioFixture, type VmmProcess } from "../support/vfio-fixture.js";

// VFIO as a process, against the real ioasid-core and NATS: containers, sessions (a VMM child
// process killed with -9), guest PASIDs and the isolation between VMs. The IOMMU and VDCM are not
// started here (IOMMU_ADDRESS/VDCM_ADDRESS point at nobody): device assignment and guest binds
// through them are covered by the end-to-end tests.

const KVM = { role: "kvm", instance: "vm-test", purpose: "vmcs" };
let fx: CoreFixture;
let vf: VfioFixture;
let nc: NatsConnection;
let nextToken = 0x7000n;
const vmms: VmmProcess[] = [];

beforeAll(async () => {
  fx = await startCore();
  vf = await startVfio(fx, { VFIO_SESSION_GRACE: "30s" });
  nc = await connect({ servers: fx.nats.url });
});
afterEach(async () => {
  await Promise.all(vmms.splice(0).map((v) => v.proc.stop("SIGKILL")));
});
afterAll(async () => {
  await nc?.close();
  expect(errorLines(vf.proc)).toEqual([]);
  const vfioCode = await vf?.stop();
  const coreCode = await fx?.stop();
  expect([vfioCode, coreCode]).toEqual([0, 0]);
});

type Vfio = VfioFixture["client"];

async function open(c: Vfio, extra: Partial<vfio.OpenContainerRequest> = {}) {
  const mmToken = nextToken++;
  const r = await c.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken, quota: 8, vmName: `vm-${mmToken}`, ...extra }));
  return { ...r, mmToken };
}

/** A Session stream the test holds (the test process plays the VMM). */
function holdSession(c: Vfio, containerId: number) {
  const ac = new AbortController();
  const messages: vfio.SessionResponse[] = [];
  let error: unknown;
  const done = (async () => {
    try {
      for await (const m of c.session({ containerId }, { signal: ac.signal })) messages.push(m);
    } catch (err) {
      error = err;
    }
  })();
  return { messages, done, cancel: () => ac.abort(), error: () => error };
}

async function vfioHistory(since: number, containerId: number): Promise<HistoryRecord[]> {
  const all = await readHistory(nc, { sinceMs: since });
  return all.filter((r) => r.role === "vfio" && (r.action.value as { container?: number }).container === containerId);
}

/** The container_close step of a container's history. */
function closeOf(h: readonly HistoryRecord[]) {
  const a = h.find((r) => r.action?.$case === "containerClose")?.action;
  return a?.$case === "containerClose" ? a.value : undefined;
}

async function waitHistory(since: number, containerId: number, action: HistoryActionCase): Promise<HistoryRecord[]> {
  let records: HistoryRecord[] = [];
  await waitFor(
    async () => {
      records = await vfioHistory(since, containerId);
      return records.some((r) => r.action?.$case === action);
    },
    { timeoutMs: 5000, message: `vfio history ${action} of container ${containerId}` },
  );
  return records;
}

async function ioasidsOf(setId: number): Promise<core.IoasidInfo[]> {
  return (await fx.client.listIoasids({ setId })).ioasids;
}

describe("vfio: containers", () => {
  it("opens a container: the VM's set exists in the core with its MM token and quota", async () => {
    const since = Date.now();
    const c = await open(vf.client, { quota: 5 });
    const set = await coreSet(fx.client, c.setId);
    expect(set).toMatchObject({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: c.mmToken, quota: 5, inUse: 0, freeing: false });
    const { containers } = await vf.client.queryState({ containerId: c.containerId });
    expect(containers[0]).toMatchObject({
      containerId: c.containerId,
      setId: c.setId,
      mmToken: c.mmToken,
      quota: 5,
      state: vfio.ContainerState.CONTAINER_STATE_AWAITING_SESSION,
    });
    expect(containers[0]!.sessionDeadline!.getTime()).toBe(c.sessionDeadline!.getTime());
    const h = await waitHistory(since, c.containerId, "containerOpen");
    expect(h[0]).toMatchObject({ role: "vfio", instance: "vfio-1", action: { $case: "containerOpen" }, setId: c.setId });
    await vf.client.closeContainer({ containerId: c.containerId });
  });

  it("attaches one Session stream: the container turns ACTIVE; a second session is refused", async () => {
    const c = await open(vf.client);
    const s = holdSession(vf.client, c.containerId);
    await waitFor(() => s.messages.length === 1, { message: "the attached message" });
    expect(s.messages[0]!.event).toEqual({ $case: "attached", value: { containerId: c.containerId, setId: c.setId } });
    const { containers } = await vf.client.queryState({ containerId: c.containerId });
    expect(containers[0]!.state).toBe(vfio.ContainerState.CONTAINER_STATE_ACTIVE);
    expect(containers[0]!.sessionDeadline).toBeUndefined();
    const second = vf.client.session({ containerId: c.containerId });
    await expectRefused(
      (async () => {
        for await (const _ of second) return;
      })(),
      Code.ALREADY_EXISTS,
      "SESSION_ALREADY_ATTACHED",
    );
    await vf.client.closeContainer({ containerId: c.containerId });
    await s.done;
  });
});

describe("vfio: guest PASIDs (virtual command)", () => {
  it("allocates in the container's set and frees: reclaimed at once, or FREE_PENDING while referenced", async () => {
    const since = Date.now();
    const c = await open(vf.client);
    const a = await vf.client.allocPasid({ containerId: c.containerId });
    const b = await vf.client.allocPasid({ containerId: c.containerId });
    expect((await ioasidsOf(c.setId)).map((i) => [i.ioasid, i.generation])).toEqual([
      [a.hpasid, a.generation],
      [b.hpasid, b.generation],
    ]);
    expect(await vf.client.freePasid({ containerId: c.containerId, hpasid: a.hpasid, generation: a.generation })).toEqual({
      reclaimed: true,
      alreadyFreePending: false,
    });
    // Another holder (KVM, say) still references b: free leaves it FREE_PENDING, and is idempotent.
    await fx.client.get(core.GetRequest.fromPartial({ setId: c.setId, ioasid: b.hpasid, holder: KVM }));
    expect(await vf.client.freePasid({ containerId: c.containerId, hpasid: b.hpasid, generation: 0 })).toEqual({ reclaimed: false, alreadyFreePending: false });
    expect(await vf.client.freePasid({ containerId: c.containerId, hpasid: b.hpasid, generation: 0 })).toEqual({ reclaimed: false, alreadyFreePending: true });
    const { containers } = await vf.client.queryState({ containerId: c.containerId });
    expect(containers[0]!.pasids).toEqual([{ hpasid: b.hpasid, generation: b.generation, gpasid: 0, boundDevices: [], freePending: true }]);
    await fx.client.put(core.PutRequest.fromPartial({ setId: c.setId, ioasid: b.hpasid, holder: KVM }));
    expect(await ioasidsOf(c.setId)).toEqual([]);
    await expectRefused(vf.client.freePasid({ containerId: c.containerId, hpasid: a.hpasid, generation: 0 }), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    // Records are published after each call answers: wait for the last free's, not the first.
    let h: HistoryRecord[] = [];
    await waitFor(
      async () => {
        h = await vfioHistory(since, c.containerId);
        return h.filter((r) => r.action?.$case === "vcmdFree").length >= 3;
      },
      { timeoutMs: 5000, message: `vfio history: the three vcmd_free of container ${c.containerId}` },
    );
    expect(h.filter((r) => r.action?.$case === "vcmdAlloc" || r.action?.$case === "vcmdFree").map((r) => `${r.action?.$case}:${r.ioasid}`)).toEqual([
      `vcmdAlloc:${a.hpasid}`,
      `vcmdAlloc:${b.hpasid}`,
      `vcmdFree:${a.hpasid}`,
      `vcmdFree:${b.hpasid}`,
      `vcmdFree:${b.hpasid}`,
    ]);
    await vf.client.closeContainer({ containerId: c.containerId });
  });

  it("enforces the set's quota (SET_QUOTA_EXCEEDED)", async () => {
    const c = await open(vf.client, { quota: 1 });
    await vf.client.allocPasid({ containerId: c.containerId });
    await expectRefused(vf.client.allocPasid({ containerId: c.containerId }), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    await vf.client.closeContainer({ containerId: c.containerId });
  });
});

describe("vfio: the container lives as long as its VMM's session", () => {
  it("frees every IOASID of the set when the VMM process is killed (kill -9)", async () => {
    const since = Date.now();
    const vmm = await startVmm(vf.proc.address, { mmToken: nextToken++, pasids: 3 });
    vf.client.remember(vmm.containerId, vmm.capability);
    vmms.push(vmm);
    expect(vmm.pasids).toHaveLength(3);
    const [held] = vmm.pasids;
    // KVM holds a reference on one of them: the set is freeing, not gone, until KVM lets go.
    await fx.client.get(core.GetRequest.fromPartial({ setId: vmm.setId, ioasid: held!.hpasid, holder: KVM }));
    expect((await vf.client.queryState({ containerId: vmm.containerId })).containers[0]!.state).toBe(vfio.ContainerState.CONTAINER_STATE_ACTIVE);

    vmm.proc.kill("SIGKILL");
    await vmm.proc.exited;
    await waitFor(async () => (await coreSet(fx.client, vmm.setId))?.freeing === true, { message: "set freeing" });
    expect((await ioasidsOf(vmm.setId)).map((i) => [i.ioasid, core.ioasidStateToJSON(i.state)])).toEqual([[held!.hpasid, "IOASID_STATE_FREE_PENDING"]]);
    await fx.client.put(core.PutRequest.fromPartial({ setId: vmm.setId, ioasid: held!.hpasid, holder: KVM }));
    await waitSetGone(fx.client, vmm.setId);
    await waitContainerGone(vf.client, vmm.containerId);
    await expectRefused(vf.client.allocPasid({ containerId: vmm.containerId }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    const h = await waitHistory(since, vmm.containerId, "containerClose");
    expect(closeOf(h)).toMatchObject({ reason: "SESSION_ENDED", freed: 3 });
  });

  it("frees the set when the VMM cancels its Session stream", async () => {
    const c = await open(vf.client);
    await vf.client.allocPasid({ containerId: c.containerId });
    const s = holdSession(vf.client, c.containerId);
    await waitFor(() => s.messages.length === 1, { message: "the attached message" });
    s.cancel();
    await s.done;
    await waitSetGone(fx.client, c.setId);
    await waitContainerGone(vf.client, c.containerId);
  });

  it("frees the set on CloseContainer, and the Session stream ends with CLOSED and OK", async () => {
    const since = Date.now();
    const vmm = await startVmm(vf.proc.address, { mmToken: nextToken++, pasids: 2 });
    vf.client.remember(vmm.containerId, vmm.capability);
    vmms.push(vmm);
    expect(await vf.client.closeContainer({ containerId: vmm.containerId })).toEqual({ freedPasids: 2, unassignedDevices: 0 });
    await vmm.proc.exited;
    expect(vmm.events()).toEqual([
      { msg: "session_closed", reason: "CLOSE_REASON_CLOSED" },
      { msg: "session_end", ok: true },
    ]);
    await waitSetGone(fx.client, vmm.setId);
    await waitContainerGone(vf.client, vmm.containerId);
    await expectRefused(vf.client.closeContainer({ containerId: vmm.containerId }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    const h = await waitHistory(since, vmm.containerId, "containerRelease");
    expect(h.map((r) => r.action?.$case)).toEqual(["containerOpen", "vcmdAlloc", "vcmdAlloc", "sessionAttach", "containerClose", "containerRelease"]);
    expect(closeOf(h)).toMatchObject({ reason: "CLOSED", freed: 2 });
  });

  it("frees the set of a container whose session never attaches within the grace period", async () => {
    const since = Date.now();
    const c = await open(vf.client, { sessionGraceMs: 300 });
    await vf.client.allocPasid({ containerId: c.containerId });
    await waitSetGone(fx.client, c.setId);
    await waitContainerGone(vf.client, c.containerId);
    const h = await waitHistory(since, c.containerId, "containerClose");
    expect(closeOf(h)).toMatchObject({ reason: "SESSION_NEVER_ATTACHED", freed: 1 });
    // Too late to attach now.
    await expectRefused(
      (async () => {
        for await (const _ of vf.client.session({ containerId: c.containerId })) return;
      })(),
      Code.NOT_FOUND,
      "CONTAINER_NOT_FOUND",
    );
  });
});

describe("vfio: isolation between VMs (S3)", () => {
  it("refuses a second VM's attempts on the first VM's PASIDs and changes nothing", async () => {
    const a = await open(vf.client);
    const b = await open(vf.client);
    const pa = await vf.client.allocPasid({ containerId: a.containerId });
    const pb = await vf.client.allocPasid({ containerId: b.containerId });
    const before = await fx.client.listIoasids({ setId: 0 });

    await expectRefused(vf.client.freePasid({ containerId: b.containerId, hpasid: pa.hpasid, generation: 0 }), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await expectRefused(
      vf.client.freePasid({ containerId: b.containerId, hpasid: pa.hpasid, generation: pa.generation }),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    // B has no device of A's to bind or unbind on: refused before anything is asked.
    const device = { ref: { $case: "deviceId" as const, value: "0000:6a:01.0" } };
    await expectRefused(
      vf.client.bindGuestPasid(vfio.BindGuestPasidRequest.fromPartial({ containerId: b.containerId, device, hpasid: pa.hpasid, gpasid: 101 })),
      Code.FAILED_PRECONDITION,
      "DEVICE_NOT_ASSIGNED",
    );
    await expectRefused(
      vf.client.unbindGuestPasid(vfio.UnbindGuestPasidRequest.fromPartial({ containerId: b.containerId, device, hpasid: pa.hpasid })),
      Code.FAILED_PRECONDITION,
      "DEVICE_NOT_ASSIGNED",
    );
    // B's view shows only its own PASID.
    const { containers } = await vf.client.queryState({ containerId: b.containerId });
    expect(containers[0]!.pasids.map((p) => p.hpasid)).toEqual([pb.hpasid]);
    expect(await fx.client.listIoasids({ setId: 0 })).toEqual(before);

    // Closing B frees B's set only.
    await vf.client.closeContainer({ containerId: b.containerId });
    await waitSetGone(fx.client, b.setId);
    expect((await ioasidsOf(a.setId)).map((i) => i.ioasid)).toEqual([pa.hpasid]);
    await vf.client.closeContainer({ containerId: a.containerId });
  });
});

describe("vfio: bad input", () => {
  it("is refused with the contract's codes, changes nothing, and leaves the service serving", async () => {
    const c = await open(vf.client);
    const p = await vf.client.allocPasid({ containerId: c.containerId });
    const sets = await fx.client.listSets({});
    const ioasids = await fx.client.listIoasids({ setId: 0 });
    const field = async (call: Promise<unknown>, name: string) =>
      expect((await expectRefused(call, Code.INVALID_ARGUMENT, "INVALID_FIELD")).metadata["field"]).toBe(name);

    await field(vf.client.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 0n })), "mm_token");
    await field(vf.client.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 1n, sessionGraceMs: 4_000_000_000 })), "session_grace_ms");
    await expectRefused(open(vf.client, { mmToken: c.mmToken }), Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    await expectRefused(
      vf.client.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: nextToken++, quota: 1 << 21 })),
      Code.INVALID_ARGUMENT,
      "QUOTA_INVALID",
    );
    await field(vf.client.allocPasid({ containerId: 0 }), "container_id");
    await expectRefused(vf.client.allocPasid({ containerId: 99_999 }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await expectRefused(vf.client.queryState({ containerId: 99_999 }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await field(vf.client.freePasid({ containerId: c.containerId, hpasid: 0, generation: 0 }), "hpasid");
    await expectRefused(
      vf.client.freePasid({ containerId: c.containerId, hpasid: p.hpasid, generation: p.generation + 1 }),
      Code.FAILED_PRECONDITION,
      "STALE_GENERATION",
    );
    await field(vf.client.assignDevice({ containerId: c.containerId, device: undefined }), "device");
    await field(
      vf.client.bindGuestPasid(
        vfio.BindGuestPasidRequest.fromPartial({ containerId: c.containerId, device: { ref: { $case: "mdevUuid", value: "m" } }, hpasid: p.hpasid, gpasid: 0 }),
      ),
      "gpasid",
    );
    // The IOMMU is unreachable here: the assignment fails UNAVAILABLE and nothing is assigned.
    await expectRefused(
      vf.client.assignDevice({ containerId: c.containerId, device: { ref: { $case: "deviceId", value: "0000:6a:01.0" } } }),
      Code.UNAVAILABLE,
      "UNAVAILABLE",
    );
    // A page response for a group never relayed to this VMM is refused, and changes nothing.
    await expectRefused(
      vf.client.sendPageResponse({ containerId: c.containerId, faultGroupId: 1n, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS }),
      Code.INVALID_ARGUMENT,
      "FAULT_GROUP_NOT_GIVEN",
    );
    // FAILURE is the host's answer alone (it disables PRI for the whole function): refused from a
    // VMM before the group is even looked up.
    await field(vf.client.sendPageResponse({ containerId: c.containerId, faultGroupId: 1n, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE }), "code");
    await field(
      vf.client.sendPageResponse({ containerId: c.containerId, faultGroupId: 1n, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_UNSPECIFIED }),
      "code",
    );

    expect(await fx.client.listSets({})).toEqual(sets);
    expect(await fx.client.listIoasids({ setId: 0 })).toEqual(ioasids);
    const { containers } = await vf.client.queryState({ containerId: c.containerId });
    expect(containers[0]).toMatchObject({ devices: [], pasids: [{ hpasid: p.hpasid }] });
    await vf.client.closeContainer({ containerId: c.containerId });
  });
});

describe("vfio: the process", () => {
  it("closes every container on SIGTERM (sessions end with SERVICE_STOPPED) and exits 0", async () => {
    const own = await startVfio(fx);
    let stopped = false;
    try {
      const vmm = await startVmm(own.proc.address, { mmToken: nextToken++, pasids: 2 });
      vmms.push(vmm);
      const idle = await open(own.client);
      expect(await own.stop()).toBe(0);
      stopped = true;
      await vmm.proc.exited;
      expect(vmm.events()).toEqual([
        { msg: "session_closed", reason: "CLOSE_REASON_SERVICE_STOPPED" },
        { msg: "session_end", ok: true },
      ]);
      await waitSetGone(fx.client, vmm.setId);
      await waitSetGone(fx.client, idle.setId);
    } finally {
      if (!stopped) await own.stop();
    }
  });

  it("exits 2 on bad configuration before listening, and lists its variables with --help", () => {
    const bad = spawnSync(process.execPath, [serviceEntry("vfio")], {
      env: { ...process.env, VFIO_GRPC_ADDRESS: "nowhere", VFIO_SESSION_GRACE: "soon" },
      encoding: "utf8",
      timeout: 10_000,
    });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain("VFIO_GRPC_ADDRESS");
    expect(bad.stderr).toContain("VFIO_SESSION_GRACE");
    expect(bad.stdout).not.toContain("listening");
    const badInstance = spawnSync(process.execPath, [serviceEntry("vfio")], {
      env: { ...process.env, VFIO_INSTANCE: "no spaces/here", VFIO_SESSION_GRACE: "0" },
      encoding: "utf8",
      timeout: 10_000,
    });
    expect(badInstance.status).toBe(2);
    expect(badInstance.stderr).toContain("VFIO_INSTANCE");
    expect(badInstance.stderr).toContain("VFIO_SESSION_GRACE");
    const help = spawnSync(process.execPath, [serviceEntry("vfio"), "--help"], { encoding: "utf8", timeout: 10_000 });
    expect(help.status).toBe(0);
    for (const name of ["VFIO_GRPC_ADDRESS", "IOMMU_ADDRESS", "VDCM_ADDRESS", "VFIO_SESSION_GRACE", "IOASID_CORE_ADDRESS", "NATS_URL"]) {
      expect(help.stdout).toContain(name);
    }
  });
});
