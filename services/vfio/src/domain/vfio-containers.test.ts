import { Code, DomainError } from "@ioasid/errors";
import { EventType, IoasidState, TokenType, type Holder, type IoasidInfo } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import type { HistoryActionCase, HistoryActionInput } from "@ioasid/bus";
import { describe, expect, it } from "vitest";
import { CloseReason, ContainerState } from "./container.js";
import type { DeviceRef } from "./device-ref.js";
import { MAX_GPASID } from "./guest-pasids.js";
import { VfioContainers, type VfioContainersOptions } from "./vfio-containers.js";
import type { GpasidBind, GpasidUnbind, HistoryFields, IommuPort, Scheduler, VdcmPort } from "./vfio-ports.js";

// ------------------------------------------------------------------------------------------------
// The core is the real model (the testkit's InProcessCore); the IOMMU, VDCM, the history and time
// are in-memory fakes. The fake IOMMU keeps just enough of the real rules (a reference per bind,
// the FREE teardown that puts them) for VFIO's own logic to be tested without sockets.

const err = (code: Code, reason: string) => new DomainError(code, reason, reason.toLowerCase());

/** KVM's reference (its VMCS PASID-table entry) when a test needs a holder outside VFIO and the IOMMU. */
const KVM: Holder = { role: "kvm", instance: "vm-7", purpose: "vmcs" };

/** The reference the (fake) IOMMU takes for a bind on a device. */
const bindHolder = (deviceId: string): Holder => ({ role: "iommu", instance: "dmar0", purpose: `bind:${deviceId}` });

/** Every IOASID the core has allocated (ACTIVE or FREE_PENDING), in every set. */
const ioasidsOf = (core: InProcessCore): IoasidInfo[] => core.space.listIoasids();
const setIds = (core: InProcessCore): number[] => core.space.listSets().map((s) => s.id);

/** The core's whole state, to show that a refused call changed nothing. */
function snapshot(core: InProcessCore): string {
  return JSON.stringify(
    { sets: core.space.listSets(), ioasids: core.space.listIoasids(), registrations: core.space.listRegistrations() },
    (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v),
  );
}

class FakeIommu implements IommuPort {
  readonly devices = new Set<string>(["0000:6a:01.0", "0000:6a:02.0", "0000:6a:03.0", "idxd0"]);
  readonly domains = new Map<number, { attached: Set<string> }>();
  readonly rid = new Map<string, number>(); // device → domain attached without PASID
  readonly binds = new Map<string, GpasidBind & { handleId: bigint }>(); // `${deviceId}/${hpasid}`
  readonly log: string[] = [];
  readonly failures = new Map<string, DomainError[]>();
  #nextDomain = 100;
  #nextHandle = 1n;
  readonly mapped: Array<{ domainId: number; iova: bigint; size: bigint }> = [];
  async map(domainId: number, m: { iova: bigint; size: bigint }): Promise<void> {
    this.log.push(`map ${domainId} 0x${m.iova.toString(16)}`);
    this.mapped.push({ domainId, iova: m.iova, size: m.size });
  }
  async unmap(domainId: number, iova: bigint, size: bigint): Promise<bigint> {
    this.log.push(`unmap ${domainId} 0x${iova.toString(16)}`);
    const before = this.mapped.length;
    const kept = this.mapped.filter((x) => !(x.domainId === domainId && x.iova >= iova && x.iova < iova + size));
    this.mapped.splice(0, this.mapped.length, ...kept);
    return before === kept.length ? 0n : size;
  }

  /** Off: the IOMMU is slow and its FREE teardown has not run yet (the test runs it with {@link teardown}). */
  teardownOnFree = true;

  constructor(private readonly core: InProcessCore) {
    // The IOMMU's FREE teardown: every bind of the IOASID torn down, its references put.
    core.subscribe((e) => {
      if (e.type === EventType.FREE && this.teardownOnFree) this.teardown(e.ioasid);
    });
  }
  /** Tears down every bind of the IOASID and puts the references they held. */
  teardown(ioasid: number): void {
    for (const [key, b] of [...this.binds]) {
      if (b.hpasid !== ioasid) continue;
      this.binds.delete(key);
      this.log.push(`teardown ${b.deviceId} ${ioasid}`);
      this.core.space.put(b.setId, ioasid, bindHolder(b.deviceId));
    }
  }
  #maybeFail(method: string): void {
    const e = this.failures.get(method)?.shift();
    if (e !== undefined) throw e;
  }
  async createStage2Domain() {
    this.#maybeFail("createStage2Domain");
    const id = this.#nextDomain++;
    this.domains.set(id, { attached: new Set() });
    this.log.push(`createDomain ${id}`);
    return id;
  }
  async freeDomain(domainId: number) {
    this.#maybeFail("freeDomain");
    const d = this.domains.get(domainId);
    if (d === undefined) throw err(Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    if (d.attached.size > 0 || [...this.binds.values()].some((b) => b.parentDomainId === domainId)) throw err(Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    this.domains.delete(domainId);
    this.log.push(`freeDomain ${domainId}`);
  }
  /** While set, attachDevice waits for it (a slow IOMMU). */
  gate: Promise<void> | undefined;
  async attachDevice(domainId: number, deviceId: string) {
    await this.gate;
    this.#maybeFail("attachDevice");
    if (!this.devices.has(deviceId)) throw err(Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    if (this.rid.has(deviceId)) throw err(Code.FAILED_PRECONDITION, "PASID_IN_USE");
    this.rid.set(deviceId, domainId);
    this.domains.get(domainId)!.attached.add(deviceId);
    this.log.push(`attach ${deviceId} ${domainId}`);
  }
  async detachDevice(domainId: number, deviceId: string) {
    this.#maybeFail("detachDevice");
    if (this.rid.get(deviceId) !== domainId) throw err(Code.NOT_FOUND, "ATTACH_HANDLE_NOT_FOUND");
    this.rid.delete(deviceId);
    this.domains.get(domainId)!.attached.delete(deviceId);
    this.log.push(`detach ${deviceId} ${domainId}`);
  }
  async bindGpasid(b: GpasidBind) {
    this.#maybeFail("bindGpasid");
    const i = this.core.space.describe(b.hpasid);
    if (i === undefined) throw err(Code.NOT_FOUND, "IOASID_NOT_FOUND");
    if (i.setId !== b.setId) throw err(Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    if (b.generation !== 0 && b.generation !== i.generation) throw err(Code.FAILED_PRECONDITION, "STALE_GENERATION");
    if (i.state === IoasidState.FREE_PENDING) throw err(Code.NOT_FOUND, "IOASID_FREE_PENDING");
    if (this.binds.has(`${b.deviceId}/${b.hpasid}`)) throw err(Code.FAILED_PRECONDITION, "PASID_IN_USE");
    const firstBind = ![...this.binds.values()].some((x) => x.hpasid === b.hpasid);
    if (i.spid === 0) this.core.space.attachSpid(b.setId, b.hpasid, b.gpasid);
    this.core.space.get(b.setId, b.hpasid, bindHolder(b.deviceId));
    const handleId = this.#nextHandle++;
    this.binds.set(`${b.deviceId}/${b.hpasid}`, { ...b, handleId });
    this.log.push(`bind ${b.deviceId} ${b.hpasid} gpasid ${b.gpasid} set ${b.setId} gen ${b.generation} parent ${b.parentDomainId}`);
    return { handleId, firstBind };
  }
  async unbindGpasid(u: GpasidUnbind) {
    this.#maybeFail("unbindGpasid");
    const i = this.core.space.describe(u.hpasid);
    if (i !== undefined && i.setId !== u.setId) throw err(Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    const b = this.binds.get(`${u.deviceId}/${u.hpasid}`);
    this.log.push(`unbind ${u.deviceId} ${u.hpasid} -> ${b !== undefined}`);
    if (b === undefined) return { unbound: false, lastUnbind: false };
    this.binds.delete(`${u.deviceId}/${u.hpasid}`);
    const lastUnbind = ![...this.binds.values()].some((x) => x.hpasid === u.hpasid);
    if (lastUnbind && i !== undefined && i.spid !== 0) this.core.space.detachSpid(b.setId, u.hpasid);
    this.core.space.put(b.setId, u.hpasid, bindHolder(u.deviceId));
    return { unbound: true, lastUnbind };
  }
}

class FakeVdcm implements VdcmPort {
  readonly mdevs = new Map<string, { parent: string; setId: number }>([
    ["mdev-a", { parent: "idxd0", setId: 0 }],
    ["mdev-b", { parent: "idxd0", setId: 0 }],
    ["mdev-c", { parent: "0000:6a:03.0", setId: 0 }],
  ]);
  readonly log: string[] = [];
  constructor(private readonly core: InProcessCore) {}
  async assignMdev(mdevUuid: string, setId: number) {
    const m = this.mdevs.get(mdevUuid);
    if (m === undefined) throw err(Code.NOT_FOUND, "MDEV_NOT_FOUND");
    if (m.setId === setId) throw err(Code.ALREADY_EXISTS, "MDEV_ALREADY_ASSIGNED");
    if (m.setId !== 0) throw err(Code.FAILED_PRECONDITION, "MDEV_BUSY");
    const first = ![...this.mdevs.values()].some((x) => x.setId === setId);
    if (first && ioasidsOf(this.core).some((i) => i.setId === setId)) throw err(Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    m.setId = setId;
    this.log.push(`assign ${mdevUuid} ${setId}`);
    return { parentDeviceId: m.parent };
  }
  async unassignMdev(mdevUuid: string) {
    const m = this.mdevs.get(mdevUuid);
    if (m === undefined) throw err(Code.NOT_FOUND, "MDEV_NOT_FOUND");
    if (m.setId === 0) throw err(Code.FAILED_PRECONDITION, "MDEV_NOT_ASSIGNED");
    m.setId = 0;
    this.log.push(`unassign ${mdevUuid}`);
    return { clearedEntries: 0 };
  }
}

/** Time under the test's control: timers run only when the test advances the clock. */
class ManualScheduler implements Scheduler {
  #now = 1_700_000_000_000;
  #timers: { at: number; fn: () => void; id: number }[] = [];
  #nextId = 0;
  now(): number {
    return this.#now;
  }
  after(ms: number, fn: () => void): () => void {
    const id = this.#nextId++;
    this.#timers.push({ at: this.#now + ms, fn, id });
    return () => void (this.#timers = this.#timers.filter((t) => t.id !== id));
  }
  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => this.after(ms, resolve));
  }
  get pending(): number {
    return this.#timers.length;
  }
  /** Moves the clock forward by `ms`, running every timer that falls due, in order. */
  async advance(ms: number): Promise<void> {
    const target = this.#now + ms;
    for (let i = 0; i < 10_000; i++) {
      await settle();
      const due = this.#timers.filter((t) => t.at <= target).sort((a, b) => a.at - b.at || a.id - b.id)[0];
      if (due === undefined) break;
      this.#timers = this.#timers.filter((t) => t !== due);
      this.#now = Math.max(this.#now, due.at);
      due.fn();
    }
    this.#now = target;
    await settle();
  }
}

/** Lets every pending promise chain run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
}

function setup(options: Partial<VfioContainersOptions> = {}) {
  const core = new InProcessCore();
  const iommu = new FakeIommu(core);
  const vdcm = new FakeVdcm(core);
  const scheduler = new ManualScheduler();
  const history: { action: HistoryActionCase; step: HistoryActionInput; fields: HistoryFields }[] = [];
  const vfio = new VfioContainers({
    core,
    iommu,
    vdcm,
    history: { record: (step, fields = {}) => void history.push({ action: step.$case, step, fields }) },
    sessionGraceMs: 5000,
    scheduler,
    ...options,
  });
  const actions = () => history.map((h) => h.action);
  return { core, iommu, vdcm, scheduler, history, actions, vfio };
}

async function refused(p: Promise<unknown> | (() => unknown), code: Code, reason: string): Promise<DomainError> {
  try {
    const r = typeof p === "function" ? p() : await p;
    throw new Error(`expected ${reason}, got ${String(r)}`);
  } catch (e) {
    expect(e).toBeInstanceOf(DomainError);
    const d = e as DomainError;
    expect({ code: d.code, reason: d.reason }).toEqual({ code, reason });
    return d;
  }
}

const dev = (id: string): DeviceRef => ({ kind: "device", id });
const mdev = (id: string): DeviceRef => ({ kind: "mdev", id });
const open = (vfio: VfioContainers, mmToken: bigint, extra: { quota?: number; sessionGraceMs?: number } = {}) =>
  vfio.openContainer({ mmToken, quota: extra.quota ?? 8, vmName: `vm-${mmToken}`, sessionGraceMs: extra.sessionGraceMs ?? 0 });

// ------------------------------------------------------------------------------------------------

describe("VfioContainers › opening", () => {
  it("creates the VM's set with its MM token and quota, and records container_open", async () => {
    const { core, vfio, history, scheduler } = setup();
    const c = await open(vfio, 7n, { quota: 4 });
    expect(core.space.getSet(c.setId)).toMatchObject({ token: { type: TokenType.MM, value: 7n }, quota: 4 });
    expect(c).toMatchObject({ containerId: 1, quota: 4, sessionDeadline: scheduler.now() + 5000 });
    expect(history[0]).toMatchObject({ action: "containerOpen", fields: { setId: c.setId } });
    const [snap] = await vfio.queryState(c.containerId);
    expect(snap).toMatchObject({ state: ContainerState.AWAITING_SESSION, mmToken: 7n, vmName: "vm-7", devices: [], pasids: [] });
  });

  it("refuses bad input with INVALID_FIELD and creates no set", async () => {
    const { core, vfio } = setup();
    const e = await refused(open(vfio, 0n), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(e.metadata["field"]).toBe("mm_token");
    await refused(open(vfio, 1n, { sessionGraceMs: 86_400_001 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.openContainer({ mmToken: 1n, quota: 0, vmName: "x".repeat(300), sessionGraceMs: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(setIds(core)).toEqual([]);
    expect(vfio.size).toBe(0);
  });

  it("refuses a second container for the same VM (TOKEN_IN_USE) and leaves the first alone", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    const before = snapshot(core);
    await refused(open(vfio, 7n), Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    expect(snapshot(core)).toBe(before);
    expect((await vfio.queryState(0)).map((s) => s.containerId)).toEqual([a.containerId]);
  });

  it("refuses container id 0 as INVALID_FIELD and an unknown one as CONTAINER_NOT_FOUND", async () => {
    const { vfio } = setup();
    await refused(vfio.allocPasid(0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.allocPasid(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await refused(vfio.queryState(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await refused(() => vfio.attachSession(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await refused(vfio.closeContainer(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });
});

describe("VfioContainers › the VMM session", () => {
  it("turns the container ACTIVE, stops the grace timer, and refuses a second session", async () => {
    const { vfio, scheduler } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    expect(lease).toMatchObject({ containerId: c.containerId, setId: c.setId });
    const [snap] = await vfio.queryState(c.containerId);
    expect(snap).toMatchObject({ state: ContainerState.ACTIVE, sessionDeadline: undefined });
    await refused(() => vfio.attachSession(c.containerId), Code.ALREADY_EXISTS, "SESSION_ALREADY_ATTACHED");
    await scheduler.advance(60_000);
    expect(vfio.size).toBe(1); // the grace period no longer applies
  });

  it("frees every IOASID of the set when the session ends from the VMM's side (crash)", async () => {
    const { core, vfio, history } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    await vfio.allocPasid(c.containerId);
    lease.end();
    await expect(lease.closed).resolves.toBe(CloseReason.SESSION_ENDED);
    await vfio.whenReleased(c.containerId);
    expect(core.calls).toContain("freeSet");
    expect(setIds(core)).not.toContain(c.setId); // nothing held them: reclaimed, set destroyed
    expect(ioasidsOf(core)).toHaveLength(0);
    expect(vfio.size).toBe(0);
    expect(closeOf(history)).toMatchObject({ reason: "SESSION_ENDED", freed: 2 });
    await refused(vfio.allocPasid(c.containerId), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });

  it("keeps closing a crashed guest's container in the background while the core stays unreachable past the FreeSet retries", async () => {
    const { core, vfio, scheduler, history } = setup({ freeSetRetryDelaysMs: [10, 20] });
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    // Three rounds of (3 attempts) fail: nobody calls CloseContainer for a crashed VMM.
    for (let i = 0; i < 9; i++) core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    lease.end();
    await scheduler.advance(30 + 500 + 30 + 1000 + 30 + 1999);
    expect(ioasidsOf(core)).toHaveLength(1);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(9);
    await scheduler.advance(1);
    await expect(lease.closed).resolves.toBe(CloseReason.SESSION_ENDED);
    await vfio.whenReleased(c.containerId);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(10);
    expect(ioasidsOf(core)).toHaveLength(0);
    expect(vfio.size).toBe(0);
    expect(closeOf(history)).toMatchObject({ reason: "SESSION_ENDED", freed: 1 });
  });

  it("takes over, when the session ends, a CloseContainer that is still in progress and then fails", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [10] });
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    const close = refused(vfio.closeContainer(c.containerId), Code.UNAVAILABLE, "UNAVAILABLE");
    lease.end(); // the VMM is killed while its close waits for the core
    await scheduler.advance(10);
    await close;
    expect(ioasidsOf(core)).toHaveLength(1);
    await scheduler.advance(500); // the background close's next round
    await vfio.whenReleased(c.containerId);
    expect(ioasidsOf(core)).toHaveLength(0);
    expect(vfio.size).toBe(0);
  });

  it("stops retrying a background close once VFIO stops; closeAll closes the container", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [] });
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    lease.end();
    await scheduler.advance(0);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(1);
    await vfio.closeAll();
    await expect(lease.closed).resolves.toBe(CloseReason.SERVICE_STOPPED);
    await scheduler.advance(10_000);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(2);
    expect(vfio.size).toBe(0);
  });

  it("closes a container whose session never attaches within the grace period, and only then", async () => {
    const { core, vfio, scheduler, history } = setup();
    const c = await open(vfio, 7n, { sessionGraceMs: 1000 });
    await vfio.allocPasid(c.containerId); // a VMM may set up before it attaches
    await scheduler.advance(999);
    expect(vfio.size).toBe(1);
    await scheduler.advance(1);
    await vfio.whenReleased(c.containerId);
    expect(vfio.size).toBe(0);
    expect(setIds(core)).toEqual([]);
    expect(closeOf(history)).toMatchObject({ reason: "SESSION_NEVER_ATTACHED" });
  });

  it("uses the service default grace period when OpenContainer gives none", async () => {
    const { vfio, scheduler } = setup();
    await open(vfio, 7n);
    await scheduler.advance(4999);
    expect(vfio.size).toBe(1);
    await scheduler.advance(1);
    expect(vfio.size).toBe(0);
  });
});

describe("VfioContainers › CloseContainer", () => {
  it("frees the set, ends the session with CLOSED, and forgets the container", async () => {
    const { core, vfio } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    await expect(vfio.closeContainer(c.containerId)).resolves.toEqual({ freed: 1, unassignedDevices: 0 });
    await expect(lease.closed).resolves.toBe(CloseReason.CLOSED);
    lease.end(); // the stream then ends: no second close
    await vfio.whenReleased(c.containerId);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(1);
    await refused(vfio.closeContainer(c.containerId), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });

  it("refuses every call on a closing container with CONTAINER_CLOSING; a second close joins the first", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [1000] });
    const c = await open(vfio, 7n);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    const first = vfio.closeContainer(c.containerId);
    const second = vfio.closeContainer(c.containerId);
    await refused(vfio.allocPasid(c.containerId), Code.FAILED_PRECONDITION, "CONTAINER_CLOSING");
    await refused(vfio.assignDevice(c.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "CONTAINER_CLOSING");
    await refused(() => vfio.attachSession(c.containerId), Code.FAILED_PRECONDITION, "CONTAINER_CLOSING");
    expect((await vfio.queryState(c.containerId))[0]!.state).toBe(ContainerState.CLOSING);
    await scheduler.advance(1000);
    expect(await first).toEqual(await second);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(2); // one failure, one retry
  });

  it("keeps retrying FreeSet while the core is unreachable, and a later close retries after giving up", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [10, 20] });
    const c = await open(vfio, 7n);
    await vfio.allocPasid(c.containerId);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    core.failNext("freeSet", err(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"));
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    const first = vfio.closeContainer(c.containerId);
    const failed = refused(first, Code.UNAVAILABLE, "UNAVAILABLE");
    await scheduler.advance(30);
    await failed;
    expect(ioasidsOf(core)).toHaveLength(1);
    expect((await vfio.queryState(c.containerId))[0]!.state).toBe(ContainerState.CLOSING); // nothing new may start
    await expect(vfio.closeContainer(c.containerId)).resolves.toMatchObject({ freed: 1 });
    expect(ioasidsOf(core)).toHaveLength(0);
  });

  it("closeAll closes every container with SERVICE_STOPPED", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    await open(vfio, 8n);
    const lease = vfio.attachSession(a.containerId);
    await vfio.closeAll();
    await expect(lease.closed).resolves.toBe(CloseReason.SERVICE_STOPPED);
    expect(vfio.size).toBe(0);
    expect(setIds(core)).toEqual([]);
  });
});

describe("VfioContainers › guest PASIDs (virtual command)", () => {
  it("allocates in the container's set and records vcmd_alloc; frees and records vcmd_free", async () => {
    const { core, vfio, history } = setup();
    const c = await open(vfio, 7n);
    const p = await vfio.allocPasid(c.containerId);
    expect(core.space.describe(p.hpasid)).toMatchObject({ setId: c.setId, generation: p.generation });
    expect(history.at(-1)).toMatchObject({ action: "vcmdAlloc", fields: { ioasid: p.hpasid, generation: p.generation, setId: c.setId } });
    await expect(vfio.freePasid(c.containerId, p.hpasid, p.generation)).resolves.toEqual({ reclaimed: true, alreadyFreePending: false });
    expect(history.at(-1)).toMatchObject({ action: "vcmdFree", fields: { ioasid: p.hpasid, setId: c.setId } });
    await refused(vfio.freePasid(c.containerId, p.hpasid, 0), Code.NOT_FOUND, "IOASID_NOT_FOUND");
  });

  it("surfaces the set's quota as SET_QUOTA_EXCEEDED", async () => {
    const { vfio } = setup();
    const c = await open(vfio, 7n, { quota: 1 });
    await vfio.allocPasid(c.containerId);
    await refused(vfio.allocPasid(c.containerId), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
  });

  it("lets a guest free before unbind (FREE_PENDING, then idempotent) and the late unbind fails harmlessly", async () => {
    const { core, iommu, vfio } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation, gpasid: 101, guestPgtable: 0x1000n });
    iommu.teardownOnFree = false; // the IOMMU is slow: its FREE teardown has not run yet
    await expect(vfio.freePasid(c.containerId, p.hpasid, p.generation)).resolves.toEqual({ reclaimed: false, alreadyFreePending: false });
    await expect(vfio.freePasid(c.containerId, p.hpasid, 0)).resolves.toEqual({ reclaimed: false, alreadyFreePending: true });
    // The IOMMU's teardown runs, the IOASID is reclaimed; the guest's unbind comes too late.
    iommu.teardown(p.hpasid);
    expect(core.space.describe(p.hpasid)).toBeUndefined();
    await expect(
      vfio.unbindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation, gpasid: 101 }),
    ).resolves.toEqual({ unbound: false, lastUnbind: false });
  });

  it("refuses hpasid 0 as INVALID_FIELD", async () => {
    const { vfio } = setup();
    const c = await open(vfio, 7n);
    const e = await refused(vfio.freePasid(c.containerId, 0, 0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(e.metadata["field"]).toBe("hpasid");
  });
});

describe("VfioContainers › isolation between VMs (S3)", () => {
  it("refuses a second VM's free, bind, unbind and lookup of the first VM's PASIDs, changing nothing", async () => {
    const { core, iommu, vfio } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await vfio.assignDevice(a.containerId, dev("0000:6a:01.0"));
    await vfio.assignDevice(b.containerId, dev("0000:6a:02.0"));
    const p = await vfio.allocPasid(a.containerId);
    await vfio.bindGuestPasid(a.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation, gpasid: 101, guestPgtable: 0n });
    const before = snapshot(core);
    const iommuBefore = [...iommu.binds.keys()];
    await refused(vfio.freePasid(b.containerId, p.hpasid, 0), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await refused(
      vfio.bindGuestPasid(b.containerId, { device: dev("0000:6a:02.0"), hpasid: p.hpasid, generation: 0, gpasid: 5, guestPgtable: 0n }),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    await refused(
      vfio.unbindGuestPasid(b.containerId, { device: dev("0000:6a:02.0"), hpasid: p.hpasid, generation: 0, gpasid: 0 }),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    // B cannot even name A's device.
    await refused(
      vfio.bindGuestPasid(b.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 5, guestPgtable: 0n }),
      Code.FAILED_PRECONDITION,
      "DEVICE_NOT_ASSIGNED",
    );
    expect(snapshot(core)).toBe(before);
    expect([...iommu.binds.keys()]).toEqual(iommuBefore);
    expect((await vfio.queryState(b.containerId))[0]!.pasids).toEqual([]);
    expect((await vfio.queryState(a.containerId))[0]!.pasids).toHaveLength(1);
  });

  it("closing one VM frees only its own set", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await vfio.allocPasid(a.containerId);
    const pb = await vfio.allocPasid(b.containerId);
    await vfio.closeContainer(a.containerId);
    expect(ioasidsOf(core).map((i) => i.ioasid)).toEqual([pb.hpasid]);
    expect(setIds(core)).toContain(b.setId);
  });
});

describe("VfioContainers › devices", () => {
  it("attaches a physical device's RID to the VM's stage-2 domain, created once", async () => {
    const { iommu, vfio, history } = setup();
    const c = await open(vfio, 7n);
    await Promise.all([vfio.assignDevice(c.containerId, dev("0000:6a:01.0")), vfio.assignDevice(c.containerId, dev("0000:6a:02.0"))]);
    expect(iommu.log.filter((l) => l.startsWith("createDomain"))).toHaveLength(1);
    expect(iommu.rid.get("0000:6a:01.0")).toBe(iommu.rid.get("0000:6a:02.0"));
    expect(history.filter((h) => h.action === "deviceAssign")).toHaveLength(2);
  });

  it("refuses DEVICE_ALREADY_ASSIGNED in the same container and DEVICE_BUSY from another, even while in flight", async () => {
    const { vfio, iommu } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    const first = vfio.assignDevice(a.containerId, dev("0000:6a:01.0"));
    await refused(vfio.assignDevice(a.containerId, dev("0000:6a:01.0")), Code.ALREADY_EXISTS, "DEVICE_ALREADY_ASSIGNED");
    await refused(vfio.assignDevice(b.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    await first;
    await refused(vfio.assignDevice(b.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect(iommu.log.filter((l) => l.startsWith("attach"))).toHaveLength(1);
  });

  it("keeps a device another VM has an mdev of, and an mdev of a device another VM has whole, apart (DEVICE_BUSY)", async () => {
    const { vfio, vdcm } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await vfio.assignDevice(a.containerId, mdev("mdev-c")); // on 0000:6a:03.0
    await refused(vfio.assignDevice(b.containerId, dev("0000:6a:03.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    await vfio.assignDevice(b.containerId, dev("0000:6a:02.0"));
    vdcm.mdevs.set("mdev-d", { parent: "0000:6a:02.0", setId: 0 });
    await refused(vfio.assignDevice(a.containerId, mdev("mdev-d")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect(vdcm.mdevs.get("mdev-d")!.setId).toBe(0); // VDCM's assignment was undone
  });

  it("passes the device's absence through and leaves nothing assigned when the assignment fails", async () => {
    const { vfio, iommu } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    await refused(vfio.assignDevice(a.containerId, dev("nope")), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await refused(vfio.assignDevice(a.containerId, mdev("nope")), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    iommu.rid.set("0000:6a:02.0", 999); // someone outside VFIO attached its RID
    await refused(vfio.assignDevice(a.containerId, dev("0000:6a:02.0")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect((await vfio.queryState(a.containerId))[0]!.devices).toEqual([]);
    iommu.rid.delete("0000:6a:02.0");
    await vfio.assignDevice(b.containerId, dev("0000:6a:02.0")); // free for another VM
  });

  it("assigns an mdev through VDCM with the set; the first mdev after PASIDs is SET_NOT_EMPTY", async () => {
    const { vfio, vdcm } = setup();
    const a = await open(vfio, 7n);
    const r = await vfio.assignDevice(a.containerId, mdev("mdev-a"));
    expect(r).toMatchObject({ device: mdev("mdev-a"), parentDeviceId: "idxd0" });
    expect(vdcm.log).toEqual([`assign mdev-a ${a.setId}`]);
    const b = await open(vfio, 8n);
    await vfio.allocPasid(b.containerId);
    await refused(vfio.assignDevice(b.containerId, mdev("mdev-b")), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await refused(vfio.assignDevice(b.containerId, mdev("mdev-a")), Code.FAILED_PRECONDITION, "DEVICE_BUSY");
    expect((await vfio.queryState(b.containerId))[0]!.devices).toEqual([]);
  });

  it("unassigns: unbinds the device's guest binds first, then detaches; DEVICE_NOT_ASSIGNED otherwise", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    await refused(vfio.unassignDevice(c.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0n });
    iommu.log.length = 0;
    await expect(vfio.unassignDevice(c.containerId, dev("0000:6a:01.0"))).resolves.toEqual({ unbound: 1 });
    expect(iommu.log).toEqual([`unbind 0000:6a:01.0 ${p.hpasid} -> true`, expect.stringMatching(/^detach 0000:6a:01.0 /)]);
    expect((await vfio.queryState(c.containerId))[0]!.devices).toEqual([]);
  });

  it("keeps the device assigned when the IOMMU cannot detach it", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    iommu.failures.set("detachDevice", [err(Code.UNAVAILABLE, "UNAVAILABLE")]);
    await refused(vfio.unassignDevice(c.containerId, dev("0000:6a:01.0")), Code.UNAVAILABLE, "UNAVAILABLE");
    expect((await vfio.queryState(c.containerId))[0]!.devices).toHaveLength(1);
    await vfio.unassignDevice(c.containerId, dev("0000:6a:01.0"));
  });
});

describe("VfioContainers › guest binds", () => {
  it("binds with the set id, the generation the core confirmed, and the VM's stage-2 domain; an mdev on its parent", async () => {
    const { vfio, iommu, history } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, mdev("mdev-a"));
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const domain = iommu.rid.get("0000:6a:01.0");
    const p = await vfio.allocPasid(c.containerId);
    const r1 = await vfio.bindGuestPasid(c.containerId, { device: mdev("mdev-a"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0x5000n });
    const r2 = await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0x5000n });
    expect([r1.firstBind, r2.firstBind]).toEqual([true, false]);
    expect(iommu.log.filter((l) => l.startsWith("bind"))).toEqual([
      `bind idxd0 ${p.hpasid} gpasid 101 set ${c.setId} gen ${p.generation} parent ${domain}`,
      `bind 0000:6a:01.0 ${p.hpasid} gpasid 101 set ${c.setId} gen ${p.generation} parent ${domain}`,
    ]);
    const owner = JSON.parse(new TextDecoder().decode(iommu.binds.get(`idxd0/${p.hpasid}`)!.ownerData)) as unknown;
    expect(owner).toEqual({ containerId: c.containerId, device: { kind: "mdev", id: "mdev-a" } });
    expect(history.filter((h) => h.action === "bindGpasid")).toHaveLength(2);
    const [snap] = await vfio.queryState(c.containerId);
    expect(snap!.pasids).toEqual([
      { hpasid: p.hpasid, generation: p.generation, gpasid: 101, boundDevices: [mdev("mdev-a"), dev("0000:6a:01.0")], freePending: false },
    ]);
  });

  it("refuses a bind on an unassigned device, a FREE_PENDING or stale IOASID, and malformed input", async () => {
    const { core, vfio } = setup();
    const c = await open(vfio, 7n);
    const p = await vfio.allocPasid(c.containerId);
    const bind = { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0n };
    await refused(vfio.bindGuestPasid(c.containerId, bind), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED");
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, generation: p.generation + 1 }), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, gpasid: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, gpasid: MAX_GPASID + 1 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, device: undefined }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.bindGuestPasid(c.containerId, { ...bind, hpasid: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    core.space.get(c.setId, p.hpasid, KVM); // freed while KVM still holds it: FREE_PENDING
    core.space.free(c.setId, p.hpasid);
    await refused(vfio.bindGuestPasid(c.containerId, bind), Code.NOT_FOUND, "IOASID_FREE_PENDING");
  });

  it("unbinds; an unbind twice finds nothing and changes nothing", async () => {
    const { vfio, core } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    const where = { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: p.generation };
    await vfio.bindGuestPasid(c.containerId, { ...where, gpasid: 101, guestPgtable: 0n });
    await expect(vfio.unbindGuestPasid(c.containerId, { ...where, gpasid: 101 })).resolves.toEqual({ unbound: true, lastUnbind: true });
    const before = snapshot(core);
    await expect(vfio.unbindGuestPasid(c.containerId, { ...where, gpasid: 101 })).resolves.toEqual({ unbound: false, lastUnbind: false });
    expect(snapshot(core)).toBe(before);
  });
});

describe("VfioContainers › teardown order", () => {
  it("frees the set first and unassigns mdevs only once the set is reclaimed (KVM → VDCM → IOMMU, S5)", async () => {
    const { core, vfio, vdcm, scheduler } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, mdev("mdev-a"));
    const p = await vfio.allocPasid(c.containerId);
    core.space.get(c.setId, p.hpasid, KVM); // KVM still holds it: its FREE delivery has not been acknowledged
    const r = await vfio.closeContainer(c.containerId);
    expect(r).toEqual({ freed: 1, unassignedDevices: 1 });
    await scheduler.advance(2000);
    expect(vdcm.log).toEqual([`assign mdev-a ${c.setId}`]); // not unassigned yet
    expect(vfio.size).toBe(1);
    core.space.put(c.setId, p.hpasid, KVM); // KVM acknowledged: reclaimed, set destroyed
    await scheduler.advance(1000);
    expect(vdcm.log).toEqual([`assign mdev-a ${c.setId}`, "unassign mdev-a"]);
    expect(vfio.size).toBe(0);
  });

  it("unassigns the mdevs anyway when the set is not reclaimed within the bound", async () => {
    const { core, vfio, vdcm, scheduler } = setup({ reclaimWaitMs: 3000 });
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, mdev("mdev-a"));
    const p = await vfio.allocPasid(c.containerId);
    core.space.get(c.setId, p.hpasid, KVM); // a subscriber is down and keeps its reference
    await vfio.closeContainer(c.containerId);
    await scheduler.advance(3000);
    expect(vdcm.log).toContain("unassign mdev-a");
    expect(vfio.size).toBe(0);
  });

  it("waits for a call in flight before unassigning, so a device assigned during the close is not leaked", async () => {
    const { vfio, iommu } = setup();
    const c = await open(vfio, 7n);
    let release = (): void => {};
    iommu.gate = new Promise((r) => (release = r));
    const assigning = vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    await expect(vfio.closeContainer(c.containerId)).resolves.toEqual({ freed: 0, unassignedDevices: 1 });
    await settle();
    expect(vfio.size).toBe(1); // the release phase waits for the assignment
    release();
    await assigning;
    await vfio.whenReleased(c.containerId);
    expect(vfio.size).toBe(0);
    expect(iommu.rid.has("0000:6a:01.0")).toBe(false);
    expect(iommu.domains.size).toBe(0);
  });

  it("frees the stage-2 domain once the IOMMU's FREE teardown no longer uses it", async () => {
    const { vfio, iommu, scheduler } = setup();
    const c = await open(vfio, 7n);
    await vfio.assignDevice(c.containerId, dev("0000:6a:01.0"));
    const p = await vfio.allocPasid(c.containerId);
    await vfio.bindGuestPasid(c.containerId, { device: dev("0000:6a:01.0"), hpasid: p.hpasid, generation: 0, gpasid: 101, guestPgtable: 0n });
    iommu.teardownOnFree = false; // the IOMMU's FREE teardown is late
    await vfio.closeContainer(c.containerId);
    await scheduler.advance(500);
    expect(iommu.domains.size).toBe(1); // DOMAIN_IN_USE: retried
    expect(iommu.rid.has("0000:6a:01.0")).toBe(false);
    iommu.teardown(p.hpasid);
    await scheduler.advance(10_000);
    expect(iommu.domains.size).toBe(0);
    expect(scheduler.pending).toBe(0);
  });

  it("records the container's life in history: open, session, alloc, close with the reason, release", async () => {
    const { vfio, actions } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    const p = await vfio.allocPasid(c.containerId);
    await vfio.freePasid(c.containerId, p.hpasid, p.generation);
    lease.end();
    await vfio.whenReleased(c.containerId);
    expect(actions()).toEqual(["containerOpen", "sessionAttach", "vcmdAlloc", "vcmdFree", "containerClose", "containerRelease"]);
  });
});

/** The container_close step of a test's history. */
function closeOf(history: ReadonlyArray<{ step: HistoryActionInput }>) {
  const step = history.find((h) => h.step.$case === "containerClose")?.step;
  return step?.$case === "containerClose" ? step.value : undefined;
}
