import { DomainError, isDomainError } from "@ioasid/errors";
import { bindTarget, type DeviceEntry } from "./container.js";
import type { ContainerCalls } from "./container-calls.js";
import type { AssignedDeviceInfo } from "./container-snapshot.js";
import { describeDevice, deviceKey, type DeviceRef } from "./device-ref.js";
import { destroyVdevicesOf, viommuOf } from "./container-viommus.js";
import { invalidField, vfioError, VfioReason } from "./vfio-errors.js";
import type { HistoryPort, IommuPort, Scheduler, VdcmPort, VfioLog } from "./vfio-ports.js";

// The devices of VfioContainers' containers (DESIGN §5 "VFIO"): assignment of physical devices and
// mdevs, and their unassignment with their guest binds. Cut out of vfio-containers.ts along its
// "Devices" seam; VfioContainers delegates AssignDevice and UnassignDevice here.

/** Renames another service's refusal into the VFIO contract's reason, keeping the original as cause. */
function renamed(err: unknown, reasons: Readonly<Record<string, "DEVICE_BUSY" | "DEVICE_ALREADY_ASSIGNED">>, message: string): unknown {
  if (!(err instanceof DomainError)) return err;
  const reason = reasons[err.reason];
  return reason === undefined ? err : new DomainError(VfioReason[reason], reason, `${message}: ${err.message}`, { cause: err });
}

/** Assigns devices and mdevs to containers and takes them back (the calls of VfioContainers that name a device). */
export class DeviceAssignments {
  readonly #calls: ContainerCalls;
  readonly #iommu: IommuPort;
  readonly #vdcm: VdcmPort;
  readonly #history: HistoryPort;
  readonly #scheduler: Scheduler;
  readonly #log: VfioLog;
  readonly #owners: Map<string, number>;

  constructor(calls: ContainerCalls) {
    this.#calls = calls;
    this.#iommu = calls.iommu;
    this.#vdcm = calls.vdcm;
    this.#history = calls.history;
    this.#scheduler = calls.scheduler;
    this.#log = calls.log;
    this.#owners = calls.owners;
  }

  /**
   * Assigns a physical device (its RID attached to the VM's stage-2 paging domain at the IOMMU) or
   * an mdev (VDCM AssignMdev with the container's set: VDCM registers on the set with the first
   * mdev, so mdevs must be assigned before PASIDs are allocated).
   * @throws DomainError ALREADY_EXISTS `DEVICE_ALREADY_ASSIGNED`; FAILED_PRECONDITION `DEVICE_BUSY`
   *   (another container has it, its parent, or one of its mdevs), `SET_NOT_EMPTY`; NOT_FOUND
   *   `DEVICE_NOT_FOUND`, `MDEV_NOT_FOUND`; and the container errors.
   */
  async assignDevice(containerId: number, device: DeviceRef | undefined): Promise<AssignedDeviceInfo> {
    const ref = this.#calls.requireDevice(device);
    return this.#calls.op(containerId, async (c) => {
      const key = deviceKey(ref);
      if (c.devices.has(key)) throw vfioError("DEVICE_ALREADY_ASSIGNED", `${describeDevice(ref)} is already assigned to container ${c.id}`);
      const owner = this.#owners.get(key);
      if (owner !== undefined) throw vfioError("DEVICE_BUSY", `${describeDevice(ref)} is assigned to another container`);
      if (ref.kind === "device") {
        const other = this.#mdevChildOf(ref.id, c.id);
        if (other !== undefined) throw vfioError("DEVICE_BUSY", `device ${ref.id} is the parent of an mdev another container has`);
      }
      // Reserved before the first await: a concurrent assignment of the same device sees it.
      const entry: DeviceEntry = { ref, key, state: "assigning", parentDeviceId: "", assignedAt: 0 };
      c.devices.set(key, entry);
      this.#owners.set(key, c.id);
      try {
        if (ref.kind === "device") {
          const busy = (err: unknown): never => {
            throw renamed(err, { PASID_IN_USE: "DEVICE_BUSY" }, `device ${ref.id} already has a domain attached to its requests without PASID`);
          };
          // Validate first, then create: a refused first assignment created the VM's stage-2
          // domain at the IOMMU (issue 14; DESIGN §8, no lazily created object on a refusal).
          if (c.stage2 === undefined) await this.#iommu.checkDevice(ref.id).catch(busy);
          const domainId = await this.#calls.stage2(c);
          await this.#iommu.attachDevice(domainId, ref.id).catch(busy);
        } else {
          const r = await this.#vdcm.assignMdev(ref.id, c.setId).catch((err: unknown) => {
            throw renamed(err, { MDEV_BUSY: "DEVICE_BUSY", MDEV_ALREADY_ASSIGNED: "DEVICE_ALREADY_ASSIGNED" }, `mdev ${ref.id}`);
          });
          const parentOwner = this.#owners.get(deviceKey({ kind: "device", id: r.parentDeviceId }));
          if (parentOwner !== undefined && parentOwner !== c.id) {
            await this.#vdcm.unassignMdev(ref.id).catch((err: unknown) => {
              this.#log.error({ err, mdev: ref.id }, "could not undo an mdev assignment");
            });
            throw vfioError("DEVICE_BUSY", `mdev ${ref.id} is on device ${r.parentDeviceId}, which another container has whole`);
          }
          entry.parentDeviceId = r.parentDeviceId;
        }
      } catch (err) {
        c.devices.delete(key);
        if (this.#owners.get(key) === c.id) this.#owners.delete(key);
        throw err;
      }
      entry.state = "assigned";
      entry.assignedAt = this.#scheduler.now();
      await this.#calls.save(c);
      this.#history.record(
        { $case: "deviceAssign", value: { container: c.id, deviceKind: ref.kind, device: ref.id, parent: entry.parentDeviceId } },
        { setId: c.setId },
      );
      return { device: ref, parentDeviceId: entry.parentDeviceId, assignedAt: entry.assignedAt };
    });
  }

  /**
   * Unassigns a device or mdev: its guest binds are unbound first (as UnbindGuestPasid), then the
   * device is detached from the stage-2 domain, or the mdev handed back to VDCM (which drains and
   * clears its programmed PASIDs).
   * @returns how many binds were unbound
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`; and the container errors.
   */
  async unassignDevice(containerId: number, device: DeviceRef | undefined): Promise<{ unbound: number }> {
    const ref = this.#calls.requireDevice(device);
    return this.#calls.op(containerId, async (c) => {
      const entry = this.#calls.assigned(c, ref);
      entry.state = "unassigning";
      let unbound = 0;
      try {
        for (const [key, bind] of [...c.binds].filter(([, b]) => b.deviceKey === entry.key)) {
          try {
            const r = await this.#iommu.unbindGpasid({
              setId: c.setId,
              hpasid: bind.hpasid,
              generation: bind.generation,
              gpasid: bind.gpasid,
              deviceId: bindTarget(entry),
            });
            if (r.unbound) {
              unbound++;
              this.#history.record(
                { $case: "unbindGpasid", value: { container: c.id, deviceKind: ref.kind, device: ref.id, unassign: true, last: r.lastUnbind } },
                { ioasid: bind.hpasid, generation: bind.generation, setId: c.setId, spid: bind.gpasid },
              );
            }
          } catch (err) {
            // The IOASID was freed and allocated again elsewhere: its bind is long gone.
            if (!isDomainError(err, "STALE_GENERATION") && !isDomainError(err, "IOASID_NOT_IN_SET")) throw err;
          }
          c.binds.delete(key);
        }
        if (ref.kind === "mdev") {
          await this.#vdcm.unassignMdev(ref.id).catch((err: unknown) => {
            if (!isDomainError(err, "MDEV_NOT_ASSIGNED")) throw err;
          });
        } else {
          const domainId = entry.nested?.domainId ?? (await this.#calls.stage2(c));
          await this.#iommu.detachDevice(domainId, ref.id).catch((err: unknown) => {
            if (!isDomainError(err, "ATTACH_HANDLE_NOT_FOUND")) throw err;
          });
          if (entry.nested !== undefined) {
            await this.#iommu.freeDomain(entry.nested.domainId).catch((err: unknown) => {
              if (!isDomainError(err, "DOMAIN_NOT_FOUND")) throw err;
            });
            entry.nested = undefined;
          }
          // Its vdevices go with it (issue 16): none is left naming a device the VM no longer has.
          await destroyVdevicesOf(this.#iommu, this.#history, c, ref);
        }
      } catch (err) {
        entry.state = "assigned";
        throw err;
      }
      c.devices.delete(entry.key);
      if (this.#owners.get(entry.key) === c.id) this.#owners.delete(entry.key);
      await this.#calls.save(c);
      this.#history.record({ $case: "deviceUnassign", value: { container: c.id, deviceKind: ref.kind, device: ref.id, unbound } }, { setId: c.setId });
      return { unbound };
    });
  }

  /**
   * ReplaceDeviceDomain (iommufd replace through VFIO; DESIGN §5 "iommufd model"): the device's
   * requests without PASID move in one step from what they translate through now to a NESTED domain
   * over the stage 2 with `guestPgtable` (created here), or back to the stage 2 (0). A NESTED domain
   * replaced away is freed; one created for a replace that failed is freed again, so a refusal
   * leaves the old domain attached and nothing created (DESIGN §8).
   * With `viommuId` (one of the container's vIOMMUs) the NESTED domain is allocated on that vIOMMU,
   * so the device's DMA faults under it reach the vIOMMU's event queue with its virt_id.
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`; INVALID_ARGUMENT `INVALID_FIELD`
   *   (an mdev; a `viommuId` without a `guestPgtable`); NOT_FOUND `VIOMMU_NOT_FOUND`; the IOMMU's
   *   refusals (VDEVICE_NOT_FOUND); and the container errors.
   */
  async replaceDeviceDomain(
    containerId: number,
    device: DeviceRef | undefined,
    guestPgtable: bigint,
    viommuId = 0,
  ): Promise<{ domainId: number; guestPgtable: bigint; answeredFaultGroups: number }> {
    const ref = this.#calls.requireDevice(device);
    if (ref.kind === "mdev") throw invalidField("device", "an mdev has no requests without PASID of its own: replace the domain of its parent device");
    if (viommuId !== 0 && guestPgtable === 0n) throw invalidField("viommu_id", "viommu_id needs a guest_pgtable: the stage 2 alone is on no vIOMMU");
    return this.#calls.op(containerId, async (c) => {
      const entry = this.#calls.assigned(c, ref);
      // Only the container's own vIOMMU: another VM's is NOT_FOUND like one never allocated.
      if (viommuId !== 0) viommuOf(c, viommuId);
      const stage2 = await this.#calls.stage2(c);
      const current = entry.nested?.domainId ?? stage2;
      if ((entry.nested?.guestPgtable ?? 0n) === guestPgtable && (entry.nested?.viommuId ?? 0) === viommuId) {
        return { domainId: current, guestPgtable, answeredFaultGroups: 0 };
      }
      // On a vIOMMU (issue 16): the IOMMU nests the domain under the vIOMMU's parent (the stage 2)
      // and refuses the replace without the device's vdevice in it (VDEVICE_NOT_FOUND).
      const target =
        guestPgtable === 0n
          ? stage2
          : viommuId === 0
            ? await this.#iommu.createNestedDomain(stage2, guestPgtable)
            : await this.#iommu.createViommuNestedDomain(viommuId, guestPgtable);
      let answeredFaultGroups: number;
      try {
        answeredFaultGroups = await this.#iommu.replaceDevice(current, target, ref.id);
      } catch (err) {
        if (target !== stage2) {
          await this.#iommu
            .freeDomain(target)
            .catch((undo: unknown) => this.#log.warn({ err: undo, domainId: target }, "could not free the nested domain of a failed replace"));
        }
        throw err;
      }
      const old = entry.nested;
      entry.nested = target === stage2 ? undefined : { domainId: target, guestPgtable, ...(viommuId === 0 ? {} : { viommuId }) };
      await this.#calls.save(c);
      if (old !== undefined) {
        await this.#iommu
          .freeDomain(old.domainId)
          .catch((err: unknown) => this.#log.warn({ err, domainId: old.domainId }, "could not free a replaced nested domain"));
      }
      return { domainId: target, guestPgtable, answeredFaultGroups };
    });
  }

  /** A container (other than `except`) that has an mdev whose parent is `deviceId`. */
  #mdevChildOf(deviceId: string, except: number): number | undefined {
    for (const c of this.#calls.containers.values()) {
      if (c.id === except) continue;
      for (const d of c.devices.values()) if (d.ref.kind === "mdev" && d.parentDeviceId === deviceId) return c.id;
    }
    return undefined;
  }
}
