import { createGrpcServer, type GrpcServer, type GrpcServerOptions, type ServiceHandlers } from "@ioasid/grpc-kit";
import { vdcm } from "@ioasid/proto";
import { fromCompletionStatus, fromDevice, fromEntry, fromMdev, toDescriptor, toPasidSpace, toWqSpecs } from "./convert.js";
import type { Vdcm } from "../domain/vdcm.js";

/**
 * The VdcmService handlers: each translates the wire request, calls {@link Vdcm}, and translates
 * the answer. Errors are the domain's, thrown as they are (grpc-kit maps them to status + reason).
 */
export function createVdcmHandlers(v: Vdcm): ServiceHandlers<typeof vdcm.VdcmServiceService> {
  return {
    registerDevice: async (req) => ({
      device: fromDevice(await v.registerDevice({ deviceId: req.deviceId, wqs: toWqSpecs(req.wqs), maxPasidEntries: req.maxPasidEntries })),
    }),
    removeDevice: async (req) => {
      await v.removeDevice(req.deviceId);
      return {};
    },
    createMdev: async (req) => ({ mdev: fromMdev(await v.createMdev(req.parentDeviceId, req.mdevUuid, req.wqIds)) }),
    destroyMdev: async (req) => {
      await v.destroyMdev(req.mdevUuid);
      return {};
    },
    assignMdev: async (req) => {
      const r = await v.assignMdev(req.mdevUuid, req.setId);
      return { mdev: fromMdev(r.mdev), registered: r.registered };
    },
    unassignMdev: async (req) => v.unassignMdev(req.mdevUuid),
    writeWqPasid: async (req) => ({ entry: fromEntry(await v.writeWqPasid(req.mdevUuid, req.virtualWq, req.gpasid)) }),
    clearWqPasid: async (req) => {
      const r = await v.clearWqPasid(req.mdevUuid, req.virtualWq);
      return { cleared: r.cleared, hpasid: r.entry?.hpasid ?? 0, gpasid: r.entry?.gpasid ?? 0, generation: r.entry?.generation ?? 0 };
    },
    submitDescriptor: async (req) => {
      const r = await v.submitDescriptor({
        mdevUuid: req.mdevUuid,
        virtualWq: req.virtualWq,
        pasid: req.pasid,
        pasidSpace: toPasidSpace(req.pasidSpace),
        generation: req.generation,
        descriptor: toDescriptor(req.descriptor),
      });
      return {
        hpasid: r.hpasid,
        generation: r.generation,
        status: fromCompletionStatus(r.status),
        bytesCompleted: r.bytesCompleted,
        faultAddress: r.faultAddress,
        faultGroupId: r.faultGroupId,
      };
    },
    queryState: (req) => {
      const s = v.snapshot(req.deviceIds);
      return { devices: s.devices.map(fromDevice), mdevs: s.mdevs.map(fromMdev), registeredSetIds: [...s.registeredSetIds], takenAt: new Date() };
    },
  };
}

/** Options of {@link createVdcmServer}. */
export interface CreateVdcmServerOptions {
  readonly logger?: GrpcServerOptions["logger"];
  /** The VDCM instance's credentials: VdcmService requires mTLS (DESIGN §11). @default plaintext */
  readonly tls?: GrpcServerOptions["tls"];
}

/** A gRPC server serving VdcmService (plus health and reflection) for `v`; call `listen` on it. */
export function createVdcmServer(v: Vdcm, options: CreateVdcmServerOptions = {}): GrpcServer {
  const server = createGrpcServer({
    service: "vdcm",
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    // VMMs reach only VFIO (DESIGN §11).
    ...(options.tls === undefined ? {} : { tls: options.tls, refuseRoles: ["vmm"] }),
  });
  server.addService(vdcm.VdcmServiceService, createVdcmHandlers(v));
  return server;
}
