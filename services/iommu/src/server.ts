import { iommu } from "@ioasid/proto";
import { createGrpcServer, type GrpcServer, type GrpcServerOptions, type ServiceHandlers } from "@ioasid/grpc-kit";
import {
  fromBond,
  fromDevice,
  fromDomain,
  fromFaultReason,
  fromFlush,
  fromHandle,
  toAccess,
  toBytes,
  toDeviceSpec,
  toDomainType,
} from "./convert.js";
import { invalidField } from "./iommu-errors.js";
import type { IommuDriver } from "./iommu-driver.js";

/** Highest page request group index (9 bits). */
const MAX_PRGI = 511;

/**
 * The IommuService handlers: each translates the wire request, calls the driver, and translates
 * the answer. Refusals are the domain's DomainErrors, thrown as they are (grpc-kit maps them).
 */
export function createIommuHandlers(driver: IommuDriver): ServiceHandlers<typeof iommu.IommuServiceService> {
  return {
    registerDevice: (req) => ({ device: fromDevice(driver.registerDevice(toDeviceSpec(req))) }),
    removeDevice: async (req) => ({ detachedHandles: await driver.removeDevice(req.deviceId), answeredFaultGroups: 0 }),
    createDomain: (req) => ({
      domain: fromDomain(
        driver.createDomain({ type: toDomainType(req.type), parentDomainId: req.parentDomainId, guestPgtable: req.guestPgtable, mmToken: req.mmToken }),
      ),
    }),
    freeDomain: (req) => {
      driver.freeDomain(req.domainId);
      return {};
    },
    attachDomain: async (req) => ({
      handle: fromHandle(
        await driver.attachDomain({
          domainId: req.domainId,
          deviceId: req.deviceId,
          pasid: req.pasid,
          withoutPasid: req.withoutPasid,
          generation: req.generation,
          owner: req.owner,
          ownerData: toBytes(req.ownerData),
        }),
      ),
    }),
    detachDomain: async (req) => ({
      answeredFaultGroups: await driver.detachDomain({
        domainId: req.domainId,
        deviceId: req.deviceId,
        pasid: req.pasid,
        withoutPasid: req.withoutPasid,
        generation: req.generation,
      }),
    }),
    bindGpasid: async (req) => {
      const r = await driver.bindGpasid({
        setId: req.setId,
        hpasid: req.hpasid,
        generation: req.generation,
        gpasid: req.gpasid,
        deviceId: req.deviceId,
        guestPgtable: req.guestPgtable,
        parentDomainId: req.parentDomainId,
        owner: req.owner,
        ownerData: toBytes(req.ownerData),
      });
      return { handle: fromHandle(r.handle), firstBind: r.firstBind };
    },
    unbindGpasid: async (req) => {
      const r = await driver.unbindGpasid({
        setId: req.setId,
        hpasid: req.hpasid,
        generation: req.generation,
        gpasid: req.gpasid,
        deviceId: req.deviceId,
      });
      return { unbound: r.unbound, lastUnbind: r.lastUnbind, answeredFaultGroups: 0 };
    },
    svaBind: async (req) => {
      const r = await driver.svaBind({ deviceId: req.deviceId, mmToken: req.mmToken, owner: req.owner, ownerData: toBytes(req.ownerData) });
      return { bond: fromBond(r.bond), pasidAllocated: r.pasidAllocated };
    },
    svaUnbind: async (req) => ({ remainingUsers: await driver.svaUnbind(req.deviceId, req.mmToken) }),
    releaseMm: async (req) => driver.releaseMm(req.mmToken),
    map: (req) => {
      driver.map(req.domainId, { iova: req.iova, paddr: req.paddr, size: req.size, access: toAccess(req.access) });
      return {};
    },
    unmap: (req) => ({ unmappedSize: driver.unmap(req.domainId, req.iova, req.size) }),
    translate: (req) => {
      if (req.pageRequestGroup !== undefined && req.pageRequestGroup.prgi > MAX_PRGI) {
        throw invalidField("page_request_group", `prgi must be 0..${MAX_PRGI}`);
      }
      const r = driver.translate({
        deviceId: req.deviceId,
        pasid: req.pasid,
        withoutPasid: req.withoutPasid,
        address: req.address,
        access: toAccess(req.access),
      });
      return r.outcome === "TRANSLATED"
        ? {
            outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED,
            outputAddress: r.outputAddress,
            handleId: r.handleId,
            faultGroupId: 0n,
            groupComplete: false,
            faultReason: iommu.FaultReason.FAULT_REASON_UNSPECIFIED,
          }
        : {
            outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT,
            outputAddress: 0n,
            handleId: r.handleId,
            faultGroupId: 0n,
            groupComplete: false,
            faultReason: fromFaultReason(r.reason),
          };
    },
    subscribeFaultGroups: (req, ctx) => driver.faults.subscribe(req.owner, ctx.signal),
    sendPageResponse: (req) => {
      if (req.code === iommu.PageResponseCode.PAGE_RESPONSE_CODE_UNSPECIFIED || iommu.pageResponseCodeToJSON(req.code) === "UNRECOGNIZED") {
        throw invalidField("code", "code is required: SUCCESS, INVALID or FAILURE");
      }
      return driver.faults.respond(req.owner, req.faultGroupId);
    },
    awaitPageResponse: (req) => driver.awaitPageResponse(req.deviceId, req.faultGroupId),
    queryState: (req) => {
      const s = driver.snapshot(req.deviceIds, req.maxIotlbFlushes);
      return {
        devices: s.devices.map(fromDevice),
        domains: s.domains.map(fromDomain),
        attachHandles: s.handles.map(fromHandle),
        svaBonds: s.bonds.map(fromBond),
        faultGroups: [],
        iotlbFlushes: s.flushes.map(fromFlush),
        takenAt: new Date(),
      };
    },
  };
}

/** Options of {@link startIommuServer}. */
export interface IommuServerOptions {
  readonly driver: IommuDriver;
  readonly host: string;
  /** 0 picks an ephemeral port. */
  readonly port: number;
  readonly logger?: GrpcServerOptions["logger"];
}

/** Serves IommuService (+ health and reflection) on `host:port` and logs the listening line. */
export async function startIommuServer(options: IommuServerOptions): Promise<GrpcServer> {
  const server = createGrpcServer({ service: "iommu", ...(options.logger === undefined ? {} : { logger: options.logger }) });
  server.addService(iommu.IommuServiceService, createIommuHandlers(options.driver));
  await server.listen(options.host, options.port);
  return server;
}
