import { isDomainError } from "@ioasid/errors";
import type { CorePort } from "@ioasid/role-kit";
import { bindTarget } from "./container.js";
import type { ContainerCalls } from "./container-calls.js";
import type { DeviceRef } from "./device-ref.js";
import { invalidField } from "./vfio-errors.js";
import type { HistoryPort, IommuPort } from "./vfio-ports.js";

// The guest's PASIDs (virtual command) and their binds (DESIGN §5 "VFIO"): every call stays inside
// the container's set (S3). Cut out of vfio-containers.ts along its "Guest PASIDs (virtual command)
// and binds" seam; VfioContainers delegates AllocPasid, FreePasid and the (un)binds here.

/** Guest PASIDs (SPIDs) are 20-bit: 1..2^20−1 (README "SPIDs are 20-bit guest PASIDs"). */
export const MAX_GPASID = (1 << 20) - 1;

/** A BindGuestPasid request. */
export interface GuestPasidBind {
  readonly device: DeviceRef | undefined;
  readonly hpasid: number;
  /** 0: unchecked. */
  readonly generation: number;
  readonly gpasid: number;
  readonly guestPgtable: bigint;
}

/** An UnbindGuestPasid request. */
export interface GuestPasidUnbind {
  readonly device: DeviceRef | undefined;
  readonly hpasid: number;
  /** 0: unchecked. */
  readonly generation: number;
  /** 0: do not check it. */
  readonly gpasid: number;
}

/** The guest PASID calls of VfioContainers: virtual-command alloc and free, bind_gpasid and unbind_gpasid. */
export class GuestPasids {
  readonly #calls: ContainerCalls;
  readonly #core: CorePort;
  readonly #iommu: IommuPort;
  readonly #history: HistoryPort;

  constructor(calls: ContainerCalls) {
    this.#calls = calls;
    this.#core = calls.core;
    this.#iommu = calls.iommu;
    this.#history = calls.history;
  }

  /**
   * The guest's virtual-command PASID allocation: core.Alloc in the container's set.
   * @throws DomainError the core's RESOURCE_EXHAUSTED `SET_QUOTA_EXCEEDED`, `IOASID_RANGE_EXHAUSTED`;
   *   and the container errors.
   */
  async allocPasid(containerId: number): Promise<{ hpasid: number; generation: number }> {
    return this.#calls.op(containerId, async (c) => {
      const a = await this.#core.alloc(c.setId);
      this.#history.record({ $case: "vcmdAlloc", value: { container: c.id } }, { ioasid: a.ioasid, generation: a.generation, setId: c.setId });
      return { hpasid: a.ioasid, generation: a.generation };
    });
  }

  /**
   * The guest's virtual-command PASID free: core.Free in the container's set. Always succeeds for
   * an IOASID of the set, even before unbind (ioasid.rst "Exception cases": the misbehaving guest
   * only hurts itself; the FREE event makes the IOMMU tear its binds down). Another VM's IOASID is
   * refused by the core (IOASID_NOT_IN_SET) and nothing changes.
   * @throws DomainError PERMISSION_DENIED `IOASID_NOT_IN_SET`; NOT_FOUND `IOASID_NOT_FOUND`;
   *   FAILED_PRECONDITION `STALE_GENERATION`; INVALID_ARGUMENT `INVALID_FIELD` (hpasid 0).
   */
  async freePasid(containerId: number, hpasid: number, generation: number): Promise<{ reclaimed: boolean; alreadyFreePending: boolean }> {
    if (hpasid === 0) throw invalidField("hpasid", "hpasid is required (PASID 0 is RID_PASID, never allocated)");
    return this.#calls.op(containerId, async (c) => {
      const { outcome } = await this.#core.free(c.setId, hpasid, generation);
      // The FREE teardown removes every bind of the IOASID at the IOMMU: forget ours.
      for (const [key, bind] of c.binds) if (bind.hpasid === hpasid) c.binds.delete(key);
      this.#history.record(
        { $case: "vcmdFree", value: { container: c.id, outcome } },
        { ioasid: hpasid, ...(generation === 0 ? {} : { generation }), setId: c.setId },
      );
      return { reclaimed: outcome === "RECLAIMED", alreadyFreePending: outcome === "ALREADY_FREE_PENDING" };
    });
  }

  /**
   * bind_gpasid on an assigned device: the hpasid must be an ACTIVE IOASID of the container's set
   * (core.Find — another VM's PASID is PERMISSION_DENIED and nothing changes), then the IOMMU binds
   * it with the set id, the generation the core just confirmed (so a free and re-allocation in
   * between cannot bind the new owner's IOASID) and the VM's stage-2 domain as parent. For an mdev
   * the bind is made on its parent device.
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`; the core's and the IOMMU's
   *   refusals (IOASID_NOT_IN_SET, IOASID_NOT_FOUND, IOASID_FREE_PENDING, STALE_GENERATION,
   *   SPID_MISMATCH, SPID_IN_USE, PASID_IN_USE, PASID_OUT_OF_RANGE); INVALID_ARGUMENT
   *   `INVALID_FIELD` (hpasid 0, gpasid outside 1..2^20−1, no device).
   */
  async bindGuestPasid(containerId: number, bind: GuestPasidBind): Promise<{ handleId: bigint; firstBind: boolean }> {
    const ref = this.#calls.requireDevice(bind.device);
    if (bind.hpasid === 0) throw invalidField("hpasid", "hpasid is required (PASID 0 is RID_PASID, never allocated)");
    if (bind.gpasid === 0 || bind.gpasid > MAX_GPASID) throw invalidField("gpasid", `gpasid ${bind.gpasid} is outside 1..${MAX_GPASID}`);
    return this.#calls.op(containerId, async (c) => {
      const entry = this.#calls.assigned(c, ref);
      const info = await this.#core.find(c.setId, bind.hpasid, bind.generation);
      const parentDomainId = await this.#calls.stage2(c);
      const r = await this.#iommu.bindGpasid({
        setId: c.setId,
        hpasid: bind.hpasid,
        generation: info.generation,
        gpasid: bind.gpasid,
        deviceId: bindTarget(entry),
        guestPgtable: bind.guestPgtable,
        parentDomainId,
        ownerData: new TextEncoder().encode(JSON.stringify({ containerId: c.id, device: { kind: ref.kind, id: ref.id } })),
      });
      c.binds.set(`${bind.hpasid}/${entry.key}`, {
        hpasid: bind.hpasid,
        generation: info.generation,
        gpasid: bind.gpasid,
        deviceKey: entry.key,
        handleId: r.handleId,
      });
      this.#history.record(
        { $case: "bindGpasid", value: { container: c.id, deviceKind: ref.kind, device: ref.id, handle: r.handleId, first: r.firstBind } },
        { ioasid: bind.hpasid, generation: info.generation, setId: c.setId, spid: bind.gpasid },
      );
      return { handleId: r.handleId, firstBind: r.firstBind };
    });
  }

  /**
   * unbind_gpasid on an assigned device. The hpasid must not belong to another set (core.Find:
   * IOASID_NOT_IN_SET refuses, nothing changes); one that is FREE_PENDING or already reclaimed goes
   * on to the IOMMU, whose FREE teardown has removed (or is removing) the bind: a late unbind after
   * free fails harmlessly with `unbound` false (ioasid.rst, free before unbind, step 30).
   * @throws DomainError FAILED_PRECONDITION `DEVICE_NOT_ASSIGNED`, `STALE_GENERATION`;
   *   PERMISSION_DENIED `IOASID_NOT_IN_SET`; INVALID_ARGUMENT `INVALID_FIELD`; the container errors.
   */
  async unbindGuestPasid(containerId: number, unbind: GuestPasidUnbind): Promise<{ unbound: boolean; lastUnbind: boolean }> {
    const ref = this.#calls.requireDevice(unbind.device);
    if (unbind.hpasid === 0) throw invalidField("hpasid", "hpasid is required (PASID 0 is RID_PASID, never allocated)");
    if (unbind.gpasid > MAX_GPASID) throw invalidField("gpasid", `gpasid ${unbind.gpasid} is outside 0..${MAX_GPASID}`);
    return this.#calls.op(containerId, async (c) => {
      const entry = this.#calls.assigned(c, ref);
      let generation = unbind.generation;
      try {
        generation = (await this.#core.find(c.setId, unbind.hpasid, unbind.generation)).generation;
      } catch (err) {
        if (!isDomainError(err, "IOASID_FREE_PENDING") && !isDomainError(err, "IOASID_NOT_FOUND")) throw err;
      }
      const r = await this.#iommu.unbindGpasid({
        setId: c.setId,
        hpasid: unbind.hpasid,
        generation,
        gpasid: unbind.gpasid,
        deviceId: bindTarget(entry),
      });
      c.binds.delete(`${unbind.hpasid}/${entry.key}`);
      if (r.unbound) {
        this.#history.record(
          { $case: "unbindGpasid", value: { container: c.id, deviceKind: ref.kind, device: ref.id, last: r.lastUnbind } },
          { ioasid: unbind.hpasid, ...(generation === 0 ? {} : { generation }), setId: c.setId, ...(unbind.gpasid === 0 ? {} : { spid: unbind.gpasid }) },
        );
      }
      return { unbound: r.unbound, lastUnbind: r.lastUnbind };
    });
  }
}
