import { iommu } from "@ioasid/proto";
import { createGrpcServer, type GrpcServer, type GrpcServerOptions, type ServiceHandlers } from "@ioasid/grpc-kit";
import {
  fromBond,
  fromDevice,
  fromDomain,
  fromFaultGroup,
  fromFaultReason,
  fromFaultRecord,
  fromFlush,
  fromResponseCode,
  fromResponseSource,
  toResponseCode,
  fromHandle,
  toAccess,
  toBytes,
  toDeviceSpec,
  toDomainType,
  toFailNthOperation,
} from "./convert.js";
import { fromVdevice, fromVeventq, fromVeventqItem, fromViommu, toVeventqType } from "./viommu-convert.js";
import { invalidField } from "../domain/iommu-errors.js";
import type { IommuDriver } from "../domain/iommu-driver.js";

/** Highest page request group index (9 bits). */
const MAX_PRGI = 511;

/**
 * The IommuService handlers: each translates the wire request, calls the driver, and translates
 * the answer. Refusals are the domain's DomainErrors, thrown as they are (grpc-kit maps them).
 */
export function createIommuHandlers(driver: IommuDriver): ServiceHandlers<typeof iommu.IommuServiceService> {
  const handlers = rawHandlers(driver);
  // Every unary call keeps what it changed before it answers (DESIGN §4.6 for the roles: the
  // tables survive kill -9); the fault stream changes nothing.
  const kept = { ...handlers } as Record<string, unknown>;
  for (const [name, handler] of Object.entries(handlers)) {
    if (name === "subscribeFaultGroups") continue;
    const unary = handler as (req: unknown, ctx: unknown) => unknown;
    kept[name] = async (req: unknown, ctx: unknown) => {
      const result = await unary(req, ctx);
      await driver.persist();
      return result;
    };
  }
  return kept as ServiceHandlers<typeof iommu.IommuServiceService>;
}

function rawHandlers(driver: IommuDriver): ServiceHandlers<typeof iommu.IommuServiceService> {
  return {
    registerDevice: (req) => ({ device: fromDevice(driver.registerDevice(toDeviceSpec(req))) }),
    removeDevice: async (req) => {
      const r = await driver.removeDevice(req.deviceId);
      return { detachedHandles: r.handles, answeredFaultGroups: r.answeredFaultGroups };
    },
    createDomain: (req) => {
      const d = driver.createDomain(
        { type: toDomainType(req.type), parentDomainId: req.parentDomainId, guestPgtable: req.guestPgtable, mmToken: req.mmToken },
        req.viommuId,
      );
      return { domain: fromDomain({ ...d, viommuId: driver.viommus.domainViommu(d.domainId) }) };
    },
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
    replaceDomain: async (req) => {
      const r = await driver.replaceDomain({
        domainId: req.domainId,
        deviceId: req.deviceId,
        pasid: req.pasid,
        withoutPasid: req.withoutPasid,
        generation: req.generation,
        owner: req.owner,
        ownerData: toBytes(req.ownerData),
        oldDomainId: req.oldDomainId,
      });
      return {
        handle: fromHandle(r.handle),
        replacedHandleId: r.replaced?.handleId ?? 0n,
        replacedDomainId: r.replaced?.domainId ?? 0,
        answeredFaultGroups: r.answeredFaultGroups,
      };
    },
    injectFailure: (req) => {
      driver.injectFailure(toFailNthOperation(req.operation), req.nth);
      return {};
    },
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
      return { unbound: r.unbound, lastUnbind: r.lastUnbind, answeredFaultGroups: r.answeredFaultGroups };
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
    mapGuestPages: async (req) => {
      await driver.mapGuest(req.setId, req.hpasid, req.generation, { iova: req.iova, paddr: req.gpa, size: req.size, access: toAccess(req.access) });
      return {};
    },
    unmapGuestPages: async (req) => ({ unmappedSize: await driver.unmapGuest(req.setId, req.hpasid, req.generation, req.iova, req.size) }),
    translate: (req) => {
      if (req.pageRequestGroup !== undefined && req.pageRequestGroup.prgi > MAX_PRGI) {
        throw invalidField("page_request_group", `prgi must be 0..${MAX_PRGI}`);
      }
      const r = driver.translate(
        { deviceId: req.deviceId, pasid: req.pasid, withoutPasid: req.withoutPasid, address: req.address, access: toAccess(req.access) },
        req.pageRequestGroup,
      );
      const none = { outputAddress: 0n, faultGroupId: 0n, groupComplete: false, faultReason: iommu.FaultReason.FAULT_REASON_UNSPECIFIED };
      switch (r.outcome) {
        case "TRANSLATED":
          return { ...none, outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: r.outputAddress, handleId: r.handleId };
        case "PAGE_REQUEST":
          return {
            ...none,
            outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST,
            handleId: r.handleId,
            faultGroupId: r.faultGroupId,
            groupComplete: r.groupComplete,
          };
        case "FAULT":
          return {
            ...none,
            outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT,
            handleId: r.handleId,
            faultGroupId: r.faultGroupId,
            faultReason: fromFaultReason(r.reason),
          };
      }
    },
    subscribeFaultGroups: (req, ctx, send) =>
      driver.subscribeFaults(req.owner, ctx.signal, (item) => {
        switch (item.kind) {
          case "group":
            return send({ item: { $case: "group", value: fromFaultGroup(item.group) } });
          case "answered":
            return send({ item: { $case: "answered", value: fromFaultGroup(item.group) } });
          case "fault":
            return send({ item: { $case: "fault", value: fromFaultRecord(item.record) } });
        }
      }),
    sendPageResponse: (req) => {
      const code = toResponseCode(req.code);
      if (req.noHandler && code !== "FAILURE") throw invalidField("no_handler", "no_handler goes with code FAILURE");
      driver.sendPageResponse(req.owner, req.faultGroupId, code, req.noHandler);
      return {};
    },
    awaitPageResponse: async (req, ctx) => {
      const g = await driver.awaitPageResponse(req.deviceId, req.faultGroupId, ctx.signal);
      return { code: fromResponseCode(g.responseCode), source: fromResponseSource(g.responseSource) };
    },
    queryState: (req) => {
      const v = driver.viommus.snapshot();
      if (req.viommusOnly) {
        // VFIO's question at each container's teardown: nothing that grows with the PASIDs held.
        return iommu.QueryStateResponse.fromPartial({
          takenAt: new Date(),
          viommus: v.viommus.map(fromViommu),
          vdevices: v.vdevices.map(fromVdevice),
          veventqs: v.veventqs.map(fromVeventq),
        });
      }
      const s = driver.snapshot(req.deviceIds, req.maxIotlbFlushes);
      const groups = driver.prq.outstanding({ deviceIds: new Set(s.devices.map((d) => d.deviceId)) });
      return {
        devices: s.devices.map((d) => fromDevice(d, driver.prq.outstandingRequests(d.deviceId))),
        domains: s.domains.map((d) => fromDomain({ ...d, viommuId: driver.viommus.domainViommu(d.domainId) })),
        attachHandles: s.handles.map((h) => fromHandle(h, driver.prq.countForHandle(h.handleId))),
        svaBonds: s.bonds.map(fromBond),
        faultGroups: groups.map(fromFaultGroup),
        iotlbFlushes: s.flushes.map(fromFlush),
        takenAt: new Date(),
        viommus: v.viommus.map(fromViommu),
        vdevices: v.vdevices.map(fromVdevice),
        veventqs: v.veventqs.map(fromVeventq),
      };
    },
    // vIOMMU objects (iommufd model, DESIGN §5; issue 16 item 3).
    allocViommu: (req) => ({ viommu: fromViommu(driver.allocViommu({ deviceId: req.deviceId, parentDomainId: req.parentDomainId, owner: req.owner })) }),
    destroyViommu: (req) => {
      driver.destroyViommu(req.viommuId);
      return {};
    },
    allocVdevice: (req) => ({ vdevice: fromVdevice(driver.allocVdevice({ viommuId: req.viommuId, deviceId: req.deviceId, virtId: req.virtId })) }),
    destroyVdevice: (req) => {
      driver.destroyVdevice(req.vdeviceId);
      return {};
    },
    allocVeventq: (req) => ({ veventq: fromVeventq(driver.allocVeventq({ viommuId: req.viommuId, type: toVeventqType(req.type), depth: req.depth })) }),
    destroyVeventq: (req) => {
      driver.destroyVeventq(req.veventqId);
      return {};
    },
    readVeventq: (req) => ({ items: driver.readVeventq(req.veventqId, req.maxItems).map(fromVeventqItem) }),
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
  const server = createIommuServer(options.driver, options);
  await server.listen(options.host, options.port);
  return server;
}

/** A gRPC server serving IommuService (plus health and reflection) for `driver`; call `listen` on it. */
export function createIommuServer(driver: IommuDriver, options: Pick<IommuServerOptions, "logger"> & Pick<GrpcServerOptions, "tls"> = {}): GrpcServer {
  const server = createGrpcServer({
    service: "iommu",
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    // VMMs reach only VFIO (DESIGN §11).
    ...(options.tls === undefined ? {} : { tls: options.tls, refuseRoles: ["vmm"] }),
  });
  server.addService(iommu.IommuServiceService, createIommuHandlers(driver));
  return server;
}
