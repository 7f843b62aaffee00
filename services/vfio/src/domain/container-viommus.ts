import { isDomainError } from "@ioasid/errors";
import type { Container, VdeviceEntry, VeventqEntry, ViommuEntry } from "./container.js";
import type { ContainerCalls } from "./container-calls.js";
import { describeDevice, deviceKey, type DeviceRef } from "./device-ref.js";
import { invalidField, vfioError } from "./vfio-errors.js";
import type { HistoryPort, IommuPort, VeventqItem, VfioLog } from "./vfio-ports.js";

// The vIOMMUs of VfioContainers' containers (DESIGN §5 "iommufd model"; issue 16 items 3 and 5):
// a VMM allocates a vIOMMU over its VM's stage 2, vdevices (a guest-visible virt_id for each of its
// physical devices) and an event queue on it, through its container. Every object is the
// container's: it is named only through that container, kept with it, and torn down with it —
// event queues, then vdevices, then the vIOMMU — before the stage 2 it holds is freed.

/** A vIOMMU of a container as the VMM sees it (AllocViommu, QueryState). */
export interface ViommuInfo {
  readonly viommuId: number;
  readonly device: DeviceRef;
  readonly parentDomainId: number;
  /** Wall-clock ms since the epoch. */
  readonly createdAt: number;
  readonly vdevices: readonly VdeviceEntry[];
  readonly veventqs: readonly VeventqEntry[];
}

/** A container's vIOMMU with its objects ascending by id, as QueryState shows it. */
export function viommuInfo(v: ViommuEntry): ViommuInfo {
  return {
    viommuId: v.id,
    device: v.device,
    parentDomainId: v.parentDomainId,
    createdAt: v.createdAt,
    vdevices: [...v.vdevices.values()].sort((a, b) => a.id - b.id),
    veventqs: [...v.veventqs.values()].sort((a, b) => a.id - b.id),
  };
}

/**
 * The container's vIOMMU `viommuId`. Another container's is refused exactly as one never
 * allocated (issue 16: naming another VM's object must not reveal that it exists).
 * @throws DomainError NOT_FOUND `VIOMMU_NOT_FOUND`
 */
export function viommuOf(c: Container, viommuId: number): ViommuEntry {
  const v = viommuId === 0 ? undefined : c.viommus.get(viommuId);
  if (v === undefined) throw vfioError("VIOMMU_NOT_FOUND", `container ${c.id} has no vIOMMU ${viommuId}`);
  return v;
}

/** The container's vdevice and its vIOMMU. @throws DomainError NOT_FOUND `VDEVICE_NOT_FOUND` (also for another container's) */
function vdeviceOf(c: Container, vdeviceId: number): { v: ViommuEntry; d: VdeviceEntry } {
  for (const v of c.viommus.values()) {
    const d = v.vdevices.get(vdeviceId);
    if (d !== undefined) return { v, d };
  }
  throw vfioError("VDEVICE_NOT_FOUND", `container ${c.id} has no vdevice ${vdeviceId}`);
}

/** The container's event queue and its vIOMMU. @throws DomainError NOT_FOUND `VEVENTQ_NOT_FOUND` (also for another container's) */
function veventqOf(c: Container, veventqId: number): { v: ViommuEntry; q: VeventqEntry } {
  for (const v of c.viommus.values()) {
    const q = v.veventqs.get(veventqId);
    if (q !== undefined) return { v, q };
  }
  throw vfioError("VEVENTQ_NOT_FOUND", `container ${c.id} has no event queue ${veventqId}`);
}

/** The IOMMU's refusal `reason` for an object already gone counts as done (a teardown repeated after a restart). */
async function gone(call: Promise<void>, reason: string): Promise<void> {
  await call.catch((err: unknown) => {
    if (!isDomainError(err, reason)) throw err;
  });
}

/**
 * Adds to a closing container the vIOMMU objects the IOMMU has over its stage 2 that VFIO does not
 * know: allocated at the IOMMU by a VFIO killed before it kept them. Only this container's stage 2
 * is their parent, so they are its own; left behind they would hold the stage 2 for ever
 * (DOMAIN_IN_USE). A failure to ask is logged: the kept objects are still destroyed.
 */
export async function adoptViommusOver(iommu: IommuPort, c: Container, stage2: number, log: VfioLog): Promise<void> {
  let found;
  try {
    found = await iommu.viommusOver(stage2);
  } catch (err) {
    log.warn({ err, containerId: c.id, domainId: stage2 }, "could not ask the IOMMU for the vIOMMUs over the stage 2: destroying the kept ones only");
    return;
  }
  for (const x of found) {
    let v = c.viommus.get(x.id);
    if (v === undefined) {
      v = { id: x.id, device: { kind: "device", id: x.deviceId }, parentDomainId: stage2, createdAt: 0, vdevices: new Map(), veventqs: new Map() };
      c.viommus.set(x.id, v);
      log.warn({ containerId: c.id, viommuId: x.id }, "a vIOMMU over the container's stage 2 was not kept: destroying it too");
    }
    for (const d of x.vdevices) if (!v.vdevices.has(d.id)) v.vdevices.set(d.id, { id: d.id, device: { kind: "device", id: d.deviceId }, virtId: d.virtId });
    for (const q of x.veventqs) if (!v.veventqs.has(q.id)) v.veventqs.set(q.id, { id: q.id, depth: q.depth });
  }
}

/**
 * Destroys every vIOMMU of a closing container (container-teardown.ts) in the order their
 * dependencies need — each one's event queues, then its vdevices, then the vIOMMU (iommufd refuses
 * a vIOMMU that still has them, VIOMMU_IN_USE) — after the container's devices were detached and
 * their nested domains freed, and before its stage 2 is freed: a vIOMMU holds a reference on the
 * stage 2, so left behind it would make that FreeDomain DOMAIN_IN_USE for ever. Each object is
 * forgotten once gone; objects the IOMMU no longer has (a teardown repeated after a restart) count
 * as destroyed.
 * @returns whether every vIOMMU is gone; failures are logged
 */
export async function destroyAllViommus(iommu: IommuPort, history: HistoryPort, c: Container, log: VfioLog): Promise<boolean> {
  let ok = true;
  const fields = { setId: c.setId };
  for (const v of [...c.viommus.values()]) {
    try {
      for (const q of [...v.veventqs.values()]) {
        await gone(iommu.destroyVeventq(q.id), "VEVENTQ_NOT_FOUND");
        v.veventqs.delete(q.id);
        history.record({ $case: "veventqDestroy", value: { container: c.id, viommu: v.id, veventq: q.id, teardown: true } }, fields);
      }
      for (const d of [...v.vdevices.values()]) {
        await gone(iommu.destroyVdevice(d.id), "VDEVICE_NOT_FOUND");
        v.vdevices.delete(d.id);
        history.record({ $case: "vdeviceDestroy", value: { container: c.id, viommu: v.id, vdevice: d.id, teardown: true } }, fields);
      }
      await gone(iommu.destroyViommu(v.id), "VIOMMU_NOT_FOUND");
      c.viommus.delete(v.id);
      history.record({ $case: "viommuDestroy", value: { container: c.id, viommu: v.id, teardown: true } }, fields);
    } catch (err) {
      ok = false;
      log.error({ err, containerId: c.id, viommuId: v.id }, "teardown could not destroy a vIOMMU of the container");
    }
  }
  return ok;
}

/**
 * UnassignDevice's part (after the device's nested domain was detached and freed): the device's
 * vdevices in every vIOMMU of the container are destroyed, as the kernel destroys a vdevice when
 * its device is unbound. The vIOMMUs stay: they hold no reference on the device they were
 * allocated through (iommu.proto AllocViommu). Vdevices the IOMMU no longer has count as destroyed.
 * @throws the IOMMU's refusal; the vdevices destroyed before it stay forgotten
 */
export async function destroyVdevicesOf(iommu: IommuPort, history: HistoryPort, c: Container, ref: DeviceRef): Promise<number> {
  let destroyed = 0;
  for (const v of c.viommus.values()) {
    for (const d of [...v.vdevices.values()]) {
      if (d.device.kind !== ref.kind || d.device.id !== ref.id) continue;
      await gone(iommu.destroyVdevice(d.id), "VDEVICE_NOT_FOUND");
      v.vdevices.delete(d.id);
      destroyed++;
      history.record({ $case: "vdeviceDestroy", value: { container: c.id, viommu: v.id, vdevice: d.id, unassign: true } }, { setId: c.setId });
    }
  }
  return destroyed;
}

/** The physical device a vIOMMU call names: an mdev is refused (it sits behind its parent's IOMMU). */
function requirePhysical(calls: ContainerCalls, device: DeviceRef | undefined): DeviceRef {
  const ref = calls.requireDevice(device);
  if (ref.kind === "mdev") throw invalidField("device", "an mdev has no vIOMMU identity of its own: name its parent physical device");
  return ref;
}

/** The vIOMMU calls of VfioContainers (AllocViommu … ReadVeventq), each on one container's objects. */
export class ContainerViommus {
  readonly #calls: ContainerCalls;
  readonly #iommu: IommuPort;

  constructor(calls: ContainerCalls) {
    this.#calls = calls;
    this.#iommu = calls.iommu;
  }

  /**
   * AllocViommu over the container's stage 2 through one of its assigned physical devices (which
   * implies the stage 2 exists: AssignDevice attached it, so nothing is created lazily here).
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`; INVALID_ARGUMENT `INVALID_FIELD`
   *   (no device, an mdev); the IOMMU's refusals; and the container errors.
   */
  async allocViommu(containerId: number, device: DeviceRef | undefined): Promise<ViommuInfo> {
    const ref = requirePhysical(this.#calls, device);
    return this.#calls.op(containerId, async (c) => {
      this.#calls.assigned(c, ref);
      const stage2 = await this.#calls.stage2(c);
      const id = await this.#iommu.allocViommu(ref.id, stage2);
      const v: ViommuEntry = { id, device: ref, parentDomainId: stage2, createdAt: this.#calls.scheduler.now(), vdevices: new Map(), veventqs: new Map() };
      c.viommus.set(id, v);
      await this.#calls.save(c);
      this.#calls.history.record({ $case: "viommuAlloc", value: { container: c.id, viommu: id, device: ref.id, parentDomain: stage2 } }, { setId: c.setId });
      return viommuInfo(v);
    });
  }

  /**
   * DestroyViommu of one of the container's vIOMMUs. The IOMMU refuses one that still has vdevices,
   * event queues or nested domains (VIOMMU_IN_USE), and then nothing changes.
   * @throws DomainError NOT_FOUND `VIOMMU_NOT_FOUND`; FAILED_PRECONDITION `VIOMMU_IN_USE`; and the container errors.
   */
  async destroyViommu(containerId: number, viommuId: number): Promise<void> {
    await this.#calls.op(containerId, async (c) => {
      const v = viommuOf(c, viommuId);
      // A device translating through a nested domain on it: the IOMMU would say the same (the
      // domain exists), but VFIO knows why and can say what to do.
      const user = [...c.devices.values()].find((d) => d.nested?.viommuId === v.id);
      if (user !== undefined) {
        throw vfioError("VIOMMU_IN_USE", `device ${user.ref.id} translates through a nested domain on vIOMMU ${v.id}: ReplaceDeviceDomain it away first`);
      }
      await this.#iommu.destroyViommu(v.id);
      c.viommus.delete(v.id);
      await this.#calls.save(c);
      this.#calls.history.record({ $case: "viommuDestroy", value: { container: c.id, viommu: v.id } }, { setId: c.setId });
    });
  }

  /**
   * AllocVdevice: the guest-visible `virtId` of one of the container's physical devices in one of
   * its vIOMMUs.
   * @throws DomainError NOT_FOUND `VIOMMU_NOT_FOUND`; FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`;
   *   INVALID_ARGUMENT `INVALID_FIELD` (an mdev); the IOMMU's ALREADY_EXISTS `VDEVICE_EXISTS`; and the container errors.
   */
  async allocVdevice(containerId: number, viommuId: number, device: DeviceRef | undefined, virtId: bigint): Promise<VdeviceEntry> {
    const ref = requirePhysical(this.#calls, device);
    return this.#calls.op(containerId, async (c) => {
      const v = viommuOf(c, viommuId);
      this.#calls.assigned(c, ref);
      const id = await this.#iommu.allocVdevice(v.id, ref.id, virtId);
      // UnassignDevice of the device may have run meanwhile and destroyed its vdevices before this
      // one existed: no vdevice may name a device the VM no longer has, so it is undone and refused.
      if (c.devices.get(deviceKey(ref))?.state !== "assigned") {
        await this.#iommu
          .destroyVdevice(id)
          .catch((err: unknown) => this.#calls.log.warn({ err, vdeviceId: id }, "could not undo the vdevice of a device unassigned meanwhile"));
        throw vfioError("DEVICE_NOT_ASSIGNED", `${describeDevice(ref)} was unassigned from container ${c.id} while its vdevice was being allocated`);
      }
      const d: VdeviceEntry = { id, device: ref, virtId };
      v.vdevices.set(id, d);
      await this.#calls.save(c);
      this.#calls.history.record({ $case: "vdeviceAlloc", value: { container: c.id, viommu: v.id, vdevice: id, device: ref.id, virtId } }, { setId: c.setId });
      return d;
    });
  }

  /**
   * DestroyVdevice of one of the container's vdevices.
   * @throws DomainError NOT_FOUND `VDEVICE_NOT_FOUND`; the IOMMU's FAILED_PRECONDITION `VDEVICE_IN_USE`; and the container errors.
   */
  async destroyVdevice(containerId: number, vdeviceId: number): Promise<void> {
    await this.#calls.op(containerId, async (c) => {
      const { v, d } = vdeviceOf(c, vdeviceId);
      await this.#iommu.destroyVdevice(d.id);
      v.vdevices.delete(d.id);
      await this.#calls.save(c);
      this.#calls.history.record({ $case: "vdeviceDestroy", value: { container: c.id, viommu: v.id, vdevice: d.id } }, { setId: c.setId });
    });
  }

  /**
   * AllocVeventq: the DMA-fault event queue of one of the container's vIOMMUs, `depth` deep.
   * @throws DomainError NOT_FOUND `VIOMMU_NOT_FOUND`; the IOMMU's ALREADY_EXISTS `VEVENTQ_EXISTS`,
   *   INVALID_ARGUMENT `INVALID_FIELD` (depth); and the container errors.
   */
  async allocVeventq(containerId: number, viommuId: number, depth: number): Promise<VeventqEntry> {
    return this.#calls.op(containerId, async (c) => {
      const v = viommuOf(c, viommuId);
      const id = await this.#iommu.allocVeventq(v.id, depth);
      const q: VeventqEntry = { id, depth };
      v.veventqs.set(id, q);
      await this.#calls.save(c);
      this.#calls.history.record({ $case: "veventqAlloc", value: { container: c.id, viommu: v.id, veventq: id, depth } }, { setId: c.setId });
      return q;
    });
  }

  /**
   * DestroyVeventq of one of the container's event queues (unread items go with it).
   * @throws DomainError NOT_FOUND `VEVENTQ_NOT_FOUND`; and the container errors.
   */
  async destroyVeventq(containerId: number, veventqId: number): Promise<void> {
    await this.#calls.op(containerId, async (c) => {
      const { v, q } = veventqOf(c, veventqId);
      await gone(this.#iommu.destroyVeventq(q.id), "VEVENTQ_NOT_FOUND");
      v.veventqs.delete(q.id);
      await this.#calls.save(c);
      this.#calls.history.record({ $case: "veventqDestroy", value: { container: c.id, viommu: v.id, veventq: q.id } }, { setId: c.setId });
    });
  }

  /**
   * ReadVeventq of one of the container's event queues: the IOMMU's items as they are, LOST_EVENTS
   * markers included (the VMM must see the gap, never a silent hole).
   * @throws DomainError NOT_FOUND `VEVENTQ_NOT_FOUND`; and the container errors.
   */
  async readVeventq(containerId: number, veventqId: number, maxItems: number): Promise<VeventqItem[]> {
    return this.#calls.op(containerId, async (c) => {
      const { q } = veventqOf(c, veventqId);
      return this.#iommu.readVeventq(q.id, maxItems);
    });
  }
}
