import type { IommuFaultGroup, IommuFaultPort, PageResponseCode } from "../domain/fault-relay.js";
import { Code, DomainError } from "@ioasid/errors";
import type { PromiseClient } from "@ioasid/grpc-kit";
import { iommu, type vdcm } from "@ioasid/proto";
import type { IommuPort, VdcmPort, VeventqItem } from "../domain/vfio-ports.js";

/** A promise client of the IOMMU's gRPC service. */
export type IommuClient = PromiseClient<typeof iommu.IommuServiceService>;
/** A promise client of VDCM's gRPC service. */
export type VdcmClient = PromiseClient<typeof vdcm.VdcmServiceService>;

/**
 * The {@link IommuPort} over the IOMMU's gRPC service. `owner` names VFIO as the owner of the
 * attach handles it creates (the fault-handler owner, e.g. "vfio/vfio-1").
 */
export function createIommuPort(client: IommuClient, owner: string): IommuPort {
  return {
    async createStage2Domain() {
      const r = await client.createDomain(iommu.CreateDomainRequest.fromPartial({ type: iommu.DomainType.DOMAIN_TYPE_PAGING }));
      return r.domain!.domainId;
    },
    async freeDomain(domainId) {
      await client.freeDomain({ domainId });
    },
    async checkDevice(deviceId) {
      // QueryState of the one device: DEVICE_NOT_FOUND when it is not registered; its handles say
      // whether something is attached to its requests without PASID. Reads only.
      const r = await client.queryState({ deviceIds: [deviceId], maxIotlbFlushes: 0, viommusOnly: false });
      const taken = r.attachHandles.find((h) => h.deviceId === deviceId && h.withoutPasid);
      if (taken !== undefined) {
        throw new DomainError(
          Code.FAILED_PRECONDITION,
          "PASID_IN_USE",
          `the requests without PASID of device ${deviceId} already have attach handle ${taken.handleId}`,
        );
      }
    },
    async attachDevice(domainId, deviceId) {
      await client.attachDomain(iommu.AttachDomainRequest.fromPartial({ domainId, deviceId, withoutPasid: true, owner }));
    },
    async detachDevice(domainId, deviceId) {
      await client.detachDomain(iommu.DetachDomainRequest.fromPartial({ domainId, deviceId, withoutPasid: true }));
    },
    async createNestedDomain(parentDomainId, guestPgtable) {
      const r = await client.createDomain(iommu.CreateDomainRequest.fromPartial({ type: iommu.DomainType.DOMAIN_TYPE_NESTED, parentDomainId, guestPgtable }));
      return r.domain!.domainId;
    },
    async replaceDevice(oldDomainId, domainId, deviceId) {
      const r = await client.replaceDomain(iommu.ReplaceDomainRequest.fromPartial({ domainId, oldDomainId, deviceId, withoutPasid: true, owner }));
      return r.answeredFaultGroups;
    },
    async bindGpasid(b) {
      const r = await client.bindGpasid(
        iommu.BindGpasidRequest.fromPartial({
          setId: b.setId,
          hpasid: b.hpasid,
          generation: b.generation,
          gpasid: b.gpasid,
          deviceId: b.deviceId,
          guestPgtable: b.guestPgtable,
          parentDomainId: b.parentDomainId,
          owner,
          ownerData: Buffer.from(b.ownerData),
        }),
      );
      return { handleId: r.handle?.handleId ?? 0n, firstBind: r.firstBind };
    },
    async unbindGpasid(u) {
      const r = await client.unbindGpasid(
        iommu.UnbindGpasidRequest.fromPartial({ setId: u.setId, hpasid: u.hpasid, generation: u.generation, gpasid: u.gpasid, deviceId: u.deviceId }),
      );
      return { unbound: r.unbound, lastUnbind: r.lastUnbind };
    },
    async map(domainId, m) {
      await client.map({ domainId, iova: m.iova, paddr: m.paddr, size: m.size, access: m.access });
    },
    async allocViommu(deviceId, parentDomainId) {
      return (await client.allocViommu({ deviceId, parentDomainId, owner })).viommu!.viommuId;
    },
    async destroyViommu(viommuId) {
      await client.destroyViommu({ viommuId });
    },
    async allocVdevice(viommuId, deviceId, virtId) {
      return (await client.allocVdevice({ viommuId, deviceId, virtId })).vdevice!.vdeviceId;
    },
    async destroyVdevice(vdeviceId) {
      await client.destroyVdevice({ vdeviceId });
    },
    async allocVeventq(viommuId, depth) {
      return (await client.allocVeventq({ viommuId, type: iommu.VeventqType.VEVENTQ_TYPE_DMA_FAULT, depth })).veventq!.veventqId;
    },
    async destroyVeventq(veventqId) {
      await client.destroyVeventq({ veventqId });
    },
    async readVeventq(veventqId, maxItems) {
      const r = await client.readVeventq({ veventqId, maxItems });
      return r.items.flatMap((it): VeventqItem[] => {
        const item = it.item;
        if (item === undefined) return [];
        if (item.$case === "lostEvents") return [{ kind: "lostEvents", firstSequence: item.value.firstSequence, count: item.value.count }];
        const e = item.value;
        return [
          {
            kind: "event",
            sequence: e.sequence,
            virtId: e.virtId,
            pasid: e.pasid,
            withoutPasid: e.withoutPasid,
            address: e.address,
            access: e.access ?? NO_ACCESS,
            reason: iommu.faultReasonToJSON(e.reason),
            at: e.at ?? new Date(0),
          },
        ];
      });
    },
    async viommusOver(parentDomainId) {
      const r = await client.queryState(iommu.QueryStateRequest.fromPartial({ viommusOnly: true }));
      return r.viommus
        .filter((v) => v.parentDomainId === parentDomainId)
        .map((v) => ({
          id: v.viommuId,
          deviceId: v.deviceId,
          vdevices: r.vdevices.filter((d) => d.viommuId === v.viommuId).map((d) => ({ id: d.vdeviceId, deviceId: d.deviceId, virtId: d.virtId })),
          veventqs: r.veventqs.filter((q) => q.viommuId === v.viommuId).map((q) => ({ id: q.veventqId, depth: q.depth })),
        }));
    },
    async createViommuNestedDomain(viommuId, guestPgtable) {
      const r = await client.createDomain(iommu.CreateDomainRequest.fromPartial({ type: iommu.DomainType.DOMAIN_TYPE_NESTED, viommuId, guestPgtable }));
      return r.domain!.domainId;
    },
    async unmap(domainId, iova, size) {
      return (await client.unmap({ domainId, iova, size })).unmappedSize;
    },
  };
}

/** The {@link VdcmPort} over VDCM's gRPC service. */
export function createVdcmPort(client: VdcmClient): VdcmPort {
  return {
    async assignMdev(mdevUuid, setId) {
      const r = await client.assignMdev({ mdevUuid, setId });
      return { parentDeviceId: r.mdev?.parentDeviceId ?? "" };
    },
    async unassignMdev(mdevUuid) {
      const r = await client.unassignMdev({ mdevUuid });
      return { clearedEntries: r.clearedEntries };
    },
  };
}

const RESPONSE_CODES = {
  SUCCESS: iommu.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS,
  INVALID: iommu.PageResponseCode.PAGE_RESPONSE_CODE_INVALID,
  FAILURE: iommu.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE,
} as const;

function fromWireCode(c: iommu.PageResponseCode): PageResponseCode | undefined {
  return (Object.keys(RESPONSE_CODES) as PageResponseCode[]).find((k) => RESPONSE_CODES[k] === c);
}

function fromWireGroup(g: iommu.FaultGroup): IommuFaultGroup {
  const code = fromWireCode(g.responseCode);
  return {
    faultGroupId: g.faultGroupId,
    deviceId: g.deviceId,
    pasid: g.pasid,
    prgi: g.prgi,
    requests: g.requests.map((r) => ({ address: r.address, access: r.access ?? NO_ACCESS, lastRequest: r.lastRequest })),
    ownerData: new Uint8Array(g.ownerData),
    gpasid: g.gpasid,
    createdAt: g.createdAt ?? new Date(0),
    deadline: g.deadline ?? new Date(0),
    ...(code === undefined ? {} : { responseCode: code, responseSource: iommu.pageResponseSourceToJSON(g.responseSource) }),
  };
}

const NO_ACCESS = { read: false, write: false, execute: false, privileged: false };

/**
 * The {@link IommuFaultPort} over the IOMMU's gRPC service: VFIO's fault-handler stream (owner
 * `owner`) and its page responses.
 */
export function createIommuFaultPort(client: IommuClient, owner: string): IommuFaultPort {
  return {
    async subscribe(onItem, signal) {
      for await (const msg of client.subscribeFaultGroups({ owner }, { signal })) {
        const item = msg.item;
        if (item === undefined) continue;
        if (item.$case === "group") onItem({ kind: "group", group: fromWireGroup(item.value) });
        else if (item.$case === "answered") onItem({ kind: "answered", group: fromWireGroup(item.value) });
        else {
          const r = item.value;
          onItem({
            kind: "fault",
            record: {
              faultId: r.faultId,
              deviceId: r.deviceId,
              pasid: r.pasid,
              address: r.address,
              access: r.access ?? NO_ACCESS,
              reason: iommu.faultReasonToJSON(r.reason),
              ownerData: new Uint8Array(r.ownerData),
              gpasid: r.gpasid,
              at: r.at ?? new Date(0),
            },
          });
        }
      }
    },
    async respond(faultGroupId, code, noHandler = false) {
      await client.sendPageResponse({ owner, faultGroupId, code: RESPONSE_CODES[code], noHandler });
    },
  };
}

/** MapGuestPages/UnmapGuestPages at the IOMMU (the guest's first-stage page table of a bound PASID). */
export interface GuestPagesPort {
  map(setId: number, hpasid: number, generation: number, iova: bigint, gpa: bigint, size: bigint, access: iommu.DmaAccess): Promise<void>;
  unmap(setId: number, hpasid: number, generation: number, iova: bigint, size: bigint): Promise<bigint>;
}

/** The {@link GuestPagesPort} over the IOMMU's gRPC service. */
export function createGuestPagesPort(client: IommuClient): GuestPagesPort {
  return {
    async map(setId, hpasid, generation, iova, gpa, size, access) {
      await client.mapGuestPages({ setId, hpasid, generation, iova, gpa, size, access });
    },
    async unmap(setId, hpasid, generation, iova, size) {
      return (await client.unmapGuestPages({ setId, hpasid, generation, iova, size })).unmappedSize;
    },
  };
}
