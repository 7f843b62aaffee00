// The fixtures of VfioContainers' unit tests (vfio-containers*.test.ts), shared by the test files
// that group its behaviours.
import { Code, DomainError } from "@ioasid/errors";
import { EventType, IoasidState, type Holder, type IoasidInfo } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import type { HistoryActionCase, HistoryActionInput, RoleStatePort, StateChange } from "@ioasid/bus";
import { expect } from "vitest";
import type { DeviceRef } from "./device-ref.js";
import { VfioContainers, type VfioContainersOptions } from "./vfio-containers.js";
import type { VfioKeptEntry } from "./vfio-kept-entry.js";
import type { GpasidBind, GpasidUnbind, HistoryFields, IommuPort, Scheduler, VdcmPort } from "./vfio-ports.js";

// ------------------------------------------------------------------------------------------------
// The core is the real model (the testkit's InProcessCore); the IOMMU, VDCM, the history and time
// are in-memory fakes. The fake IOMMU keeps just enough of the real rules (a reference per bind,
// the FREE teardown that puts them) for VFIO's own logic to be tested without sockets.

export const err = (code: Code, reason: string) => new DomainError(code, reason, reason.toLowerCase());

/** KVM's reference (its VMCS PASID-table entry) when a test needs a holder outside VFIO and the IOMMU. */
export const KVM: Holder = { role: "kvm", instance: "vm-7", purpose: "vmcs" };

/** The reference the (fake) IOMMU takes for a bind on a device. */
export const bindHolder = (deviceId: string): Holder => ({ role: "iommu", instance: "dmar0", purpose: `bind:${deviceId}` });

/** Every IOASID the core has allocated (ACTIVE or FREE_PENDING), in every set. */
export const ioasidsOf = (core: InProcessCore): IoasidInfo[] => core.space.listIoasids();
export const setIds = (core: InProcessCore): number[] => core.space.listSets().map((s) => s.id);

/** The core's whole state, to show that a refused call changed nothing. */
export function snapshot(core: InProcessCore): string {
  return JSON.stringify({ sets: core.space.listSets(), ioasids: core.space.listIoasids(), registrations: core.space.listRegistrations() }, (_k, v: unknown) =>
    typeof v === "bigint" ? String(v) : v,
  );
}

export class FakeIommu implements IommuPort {
  readonly devices = new Set<string>(["0000:6a:01.0", "0000:6a:02.0", "0000:6a:03.0", "idxd0"]);
  readonly domains = new Map<number, { attached: Set<string>; parent?: number; viommu?: number }>();
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
    const parentOfNested = [...this.domains.values()].some((x) => x.parent === domainId);
    if (d.attached.size > 0 || parentOfNested || [...this.binds.values()].some((b) => b.parentDomainId === domainId)) {
      throw err(Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    }
    this.domains.delete(domainId);
    this.log.push(`freeDomain ${domainId}`);
  }
  async checkDevice(deviceId: string) {
    this.#maybeFail("checkDevice");
    if (!this.devices.has(deviceId)) throw err(Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    if (this.rid.has(deviceId)) throw err(Code.FAILED_PRECONDITION, "PASID_IN_USE");
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
  async createNestedDomain(parentDomainId: number, guestPgtable: bigint) {
    this.#maybeFail("createNestedDomain");
    if (!this.domains.has(parentDomainId)) throw err(Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    const id = this.#nextDomain++;
    this.domains.set(id, { attached: new Set(), parent: parentDomainId });
    this.log.push(`createNested ${id} over ${parentDomainId} pgtable ${guestPgtable}`);
    return id;
  }
  async replaceDevice(oldDomainId: number, domainId: number, deviceId: string) {
    this.#maybeFail("replaceDevice");
    if (!this.domains.has(domainId)) throw err(Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    const current = this.rid.get(deviceId);
    if (current === undefined) throw err(Code.INVALID_ARGUMENT, "PASID_NOT_ATTACHED");
    if (current !== oldDomainId) throw err(Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
    if (current === domainId) return 0;
    this.domains.get(current)!.attached.delete(deviceId);
    this.domains.get(domainId)!.attached.add(deviceId);
    this.rid.set(deviceId, domainId);
    this.log.push(`replace ${deviceId} ${oldDomainId} -> ${domainId}`);
    return 0;
  }
  // vIOMMU objects: ids from one space, the IOMMU's destruction order (in use: refused).
  readonly viommus = new Map<number, { parent: number; deviceId: string; vdevices: Set<number>; veventqs: Set<number> }>();
  #nextObject = 500;
  async allocViommu(deviceId: string, parentDomainId: number) {
    this.#maybeFail("allocViommu");
    if (!this.devices.has(deviceId)) throw err(Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    const d = this.domains.get(parentDomainId);
    if (d === undefined) throw err(Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    const id = this.#nextObject++;
    this.viommus.set(id, { parent: parentDomainId, deviceId, vdevices: new Set(), veventqs: new Set() });
    // The vIOMMU holds its parent: FreeDomain of it is DOMAIN_IN_USE meanwhile.
    d.attached.add(`viommu:${id}`);
    this.log.push(`allocViommu ${id} over ${parentDomainId}`);
    return id;
  }
  async destroyViommu(viommuId: number) {
    this.#maybeFail("destroyViommu");
    const v = this.viommus.get(viommuId);
    if (v === undefined) throw err(Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    if (v.vdevices.size > 0 || v.veventqs.size > 0 || [...this.domains.values()].some((d) => d.viommu === viommuId)) {
      throw err(Code.FAILED_PRECONDITION, "VIOMMU_IN_USE");
    }
    this.viommus.delete(viommuId);
    this.domains.get(v.parent)?.attached.delete(`viommu:${viommuId}`);
    this.log.push(`destroyViommu ${viommuId}`);
  }
  /** While set, allocVdevice waits for it (a slow IOMMU). */
  vdeviceGate: Promise<void> | undefined;
  async allocVdevice(viommuId: number, deviceId: string, _virtId: bigint) {
    await this.vdeviceGate;
    this.#maybeFail("allocVdevice");
    const v = this.viommus.get(viommuId);
    if (v === undefined) throw err(Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    const id = this.#nextObject++;
    v.vdevices.add(id);
    this.log.push(`allocVdevice ${id} ${deviceId} in ${viommuId}`);
    return id;
  }
  async destroyVdevice(vdeviceId: number) {
    this.#maybeFail("destroyVdevice");
    const v = [...this.viommus.values()].find((x) => x.vdevices.has(vdeviceId));
    if (v === undefined) throw err(Code.NOT_FOUND, "VDEVICE_NOT_FOUND");
    v.vdevices.delete(vdeviceId);
    this.log.push(`destroyVdevice ${vdeviceId}`);
  }
  async allocVeventq(viommuId: number, depth: number) {
    this.#maybeFail("allocVeventq");
    const v = this.viommus.get(viommuId);
    if (v === undefined) throw err(Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    const id = this.#nextObject++;
    v.veventqs.add(id);
    this.log.push(`allocVeventq ${id} in ${viommuId} depth ${depth}`);
    return id;
  }
  async destroyVeventq(veventqId: number) {
    this.#maybeFail("destroyVeventq");
    const v = [...this.viommus.values()].find((x) => x.veventqs.has(veventqId));
    if (v === undefined) throw err(Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
    v.veventqs.delete(veventqId);
    this.log.push(`destroyVeventq ${veventqId}`);
  }
  async readVeventq(veventqId: number, _maxItems: number) {
    if (![...this.viommus.values()].some((x) => x.veventqs.has(veventqId))) throw err(Code.NOT_FOUND, "VEVENTQ_NOT_FOUND");
    return [];
  }
  async viommusOver(parentDomainId: number) {
    this.#maybeFail("viommusOver");
    return [...this.viommus]
      .filter(([, v]) => v.parent === parentDomainId)
      .map(([id, v]) => ({
        id,
        deviceId: v.deviceId,
        vdevices: [...v.vdevices].map((d) => ({ id: d, deviceId: "?", virtId: 0n })),
        veventqs: [...v.veventqs].map((q) => ({ id: q, depth: 0 })),
      }));
  }
  async createViommuNestedDomain(viommuId: number, guestPgtable: bigint) {
    this.#maybeFail("createViommuNestedDomain");
    const v = this.viommus.get(viommuId);
    if (v === undefined) throw err(Code.NOT_FOUND, "VIOMMU_NOT_FOUND");
    const id = this.#nextDomain++;
    this.domains.set(id, { attached: new Set(), parent: v.parent, viommu: viommuId });
    this.log.push(`createNested ${id} on viommu ${viommuId} pgtable ${guestPgtable}`);
    return id;
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

export class FakeVdcm implements VdcmPort {
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
export class ManualScheduler implements Scheduler {
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
export async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
}

export function setup(options: Partial<VfioContainersOptions> = {}) {
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

export async function refused(p: Promise<unknown> | (() => unknown), code: Code, reason: string): Promise<DomainError> {
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

export const dev = (id: string): DeviceRef => ({ kind: "device", id });
export const mdev = (id: string): DeviceRef => ({ kind: "mdev", id });
export const open = (vfio: VfioContainers, mmToken: bigint, extra: { quota?: number; sessionGraceMs?: number; guestMemorySize?: bigint } = {}) =>
  vfio.openContainer({
    mmToken,
    quota: extra.quota ?? 8,
    vmName: `vm-${mmToken}`,
    sessionGraceMs: extra.sessionGraceMs ?? 0,
    guestMemorySize: extra.guestMemorySize ?? 0n,
  });

/** The container_close step of a test's history. */
export function closeOf(history: ReadonlyArray<{ step: HistoryActionInput }>): Extract<HistoryActionInput, { $case: "containerClose" }>["value"] | undefined {
  const step = history.find((h) => h.step.$case === "containerClose")?.step;
  return step?.$case === "containerClose" ? step.value : undefined;
}

/** VFIO's kept state in memory (the role-state stream's last value per key). */
export class MapStore implements RoleStatePort<VfioKeptEntry> {
  readonly saved = new Map<string, VfioKeptEntry>();
  async write(changes: readonly StateChange<VfioKeptEntry>[]): Promise<void> {
    for (const c of changes) {
      if (c.value === undefined) this.saved.delete(c.key);
      else this.saved.set(c.key, c.value);
    }
  }
}

/** The ports of a {@link setup}, for a second VfioContainers over them (a VFIO back from kill -9). */
export function optionsOf(s: ReturnType<typeof setup>) {
  return { core: s.core, iommu: s.iommu, vdcm: s.vdcm, scheduler: s.scheduler, history: { record: () => {} }, sessionGraceMs: 5000 };
}
