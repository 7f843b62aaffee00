import { createGrpcServer, type CallContext, type GrpcServer, type GrpcServerOptions, type ServiceHandlers } from "@ioasid/grpc-kit";
import { vfio } from "@ioasid/proto";
import type { Logger } from "pino";
import type { CloseReason } from "../domain/container.js";
import type { VfioContainers } from "../domain/vfio-containers.js";
import { invalidField } from "../domain/vfio-errors.js";
import type { FaultRelay } from "../domain/fault-relay.js";
import { capabilityOf } from "./capability-metadata.js";
import {
  CLOSE_REASONS,
  fromDeviceRef,
  RESPONSE_CODES,
  RESPONSE_CODES_WIRE,
  toContainer,
  toDeviceRef,
  toFaultGroup,
  toHostRange,
  toVdeviceView,
  toVeventqItem,
  toViommuView,
} from "./convert.js";
import type { GuestPagesPort } from "./grpc-ports.js";

/** Resolves with the lease's close reason, or undefined once `signal` aborts (the VMM went away). */
function closedOrAborted(closed: Promise<CloseReason>, signal: AbortSignal): Promise<CloseReason | undefined> {
  if (signal.aborted) return Promise.resolve(undefined);
  return new Promise((resolve) => {
    const onAbort = (): void => resolve(undefined);
    signal.addEventListener("abort", onAbort, { once: true });
    void closed.then((reason) => {
      signal.removeEventListener("abort", onAbort);
      resolve(reason);
    });
  });
}

/**
 * The VfioService handlers: each translates the wire request, delegates to {@link VfioContainers}
 * and translates the answer. Refusals are the domain's DomainErrors, thrown as they are.
 *
 * Every handler of a call that names a container, but OpenContainer and QueryState, first checks the
 * call's capability ({@link VfioContainers.authorize}, from the `ioasid-vfio-capability` metadata)
 * before it reads anything else of the request (DESIGN §3: a call about another VM's container
 * without that VM's capability is PERMISSION_DENIED with nothing changed).
 */
export function createVfioHandlers(
  containers: VfioContainers,
  faults: FaultRelay,
  guestPages: GuestPagesPort,
): ServiceHandlers<typeof vfio.VfioServiceService> {
  /** The authorization seam: the call's capability must be the named container's. */
  const authorize = (containerId: number, ctx: CallContext): void => containers.authorize(containerId, capabilityOf(ctx.metadata));
  return {
    openContainer: async (req) => {
      const r = await containers.openContainer({
        mmToken: req.mmToken,
        quota: req.quota,
        vmName: req.vmName,
        sessionGraceMs: req.sessionGraceMs,
        guestMemorySize: req.guestMemorySize,
      });
      return {
        containerId: r.containerId,
        setId: r.setId,
        quota: r.quota,
        sessionDeadline: new Date(r.sessionDeadline),
        capability: Buffer.from(r.capability),
        guestMemory: r.guestMemory.map(toHostRange),
      };
    },
    session: async (req, ctx, send) => {
      authorize(req.containerId, ctx);
      const lease = containers.attachSession(req.containerId);
      try {
        await send({ event: { $case: "attached", value: { containerId: lease.containerId, setId: lease.setId } } });
        // The stream stays open for as long as the VMM lives: the VMM's cancel, exit, kill -9 or
        // lost connection aborts the signal (grpc-js reports the HTTP/2 stream's end as cancelled).
        const reason = await closedOrAborted(lease.closed, ctx.signal);
        if (reason !== undefined) await send({ event: { $case: "closed", value: { reason: CLOSE_REASONS[reason] } } });
      } finally {
        // From the VMM's side: the crashed-guest path (no-op when the server closed the container).
        lease.end();
      }
    },
    closeContainer: async (req, ctx) => {
      authorize(req.containerId, ctx);
      const r = await containers.closeContainer(req.containerId);
      return { freedPasids: r.freed, unassignedDevices: r.unassignedDevices };
    },
    assignDevice: async (req, ctx) => {
      authorize(req.containerId, ctx);
      const a = await containers.assignDevice(req.containerId, fromDeviceRef(req.device));
      return {
        assigned: {
          device: toDeviceRef(a.device),
          parentDeviceId: a.parentDeviceId,
          assignedAt: new Date(a.assignedAt),
          nestedDomainId: 0,
          guestPgtable: 0n,
          viommuId: 0,
        },
      };
    },
    unassignDevice: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return containers.unassignDevice(req.containerId, fromDeviceRef(req.device));
    },
    replaceDeviceDomain: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return containers.replaceDeviceDomain(req.containerId, fromDeviceRef(req.device), req.guestPgtable, req.viommuId);
    },
    allocViommu: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return { viommu: toViommuView(await containers.allocViommu(req.containerId, fromDeviceRef(req.device))) };
    },
    destroyViommu: async (req, ctx) => {
      authorize(req.containerId, ctx);
      await containers.destroyViommu(req.containerId, req.viommuId);
      return {};
    },
    allocVdevice: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return { vdevice: toVdeviceView(await containers.allocVdevice(req.containerId, req.viommuId, fromDeviceRef(req.device), req.virtId)) };
    },
    destroyVdevice: async (req, ctx) => {
      authorize(req.containerId, ctx);
      await containers.destroyVdevice(req.containerId, req.vdeviceId);
      return {};
    },
    allocVeventq: async (req, ctx) => {
      authorize(req.containerId, ctx);
      const q = await containers.allocVeventq(req.containerId, req.viommuId, req.depth);
      return { veventq: { veventqId: q.id, depth: q.depth } };
    },
    destroyVeventq: async (req, ctx) => {
      authorize(req.containerId, ctx);
      await containers.destroyVeventq(req.containerId, req.veventqId);
      return {};
    },
    readVeventq: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return { items: (await containers.readVeventq(req.containerId, req.veventqId, req.maxItems)).map(toVeventqItem) };
    },
    allocPasid: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return containers.allocPasid(req.containerId);
    },
    freePasid: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return containers.freePasid(req.containerId, req.hpasid, req.generation);
    },
    bindGuestPasid: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return containers.bindGuestPasid(req.containerId, {
        device: fromDeviceRef(req.device),
        hpasid: req.hpasid,
        generation: req.generation,
        gpasid: req.gpasid,
        guestPgtable: req.guestPgtable,
      });
    },
    unbindGuestPasid: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return containers.unbindGuestPasid(req.containerId, {
        device: fromDeviceRef(req.device),
        hpasid: req.hpasid,
        generation: req.generation,
        gpasid: req.gpasid,
      });
    },
    watchFaults: async (req, ctx, send) => {
      authorize(req.containerId, ctx);
      containers.usableSetId(req.containerId);
      await faults.watch(req.containerId, ctx.signal, (item) => {
        switch (item.kind) {
          case "group":
            return send({ item: { $case: "group", value: toFaultGroup(item.group) } });
          case "answered":
            return send({
              item: { $case: "answered", value: { faultGroupId: item.faultGroupId, code: RESPONSE_CODES_WIRE.get(item.code)!, source: item.source } },
            });
          case "fault":
            return send({
              item: {
                $case: "fault",
                value: {
                  faultId: item.faultId,
                  device: toDeviceRef(item.device),
                  hpasid: item.hpasid,
                  gpasid: item.gpasid,
                  address: item.address,
                  access: item.access,
                  reason: item.reason,
                  at: item.at,
                },
              },
            });
        }
      });
    },
    sendPageResponse: async (req, ctx) => {
      authorize(req.containerId, ctx);
      const code = RESPONSE_CODES.get(req.code);
      if (code === undefined) throw invalidField("code", "code is required: SUCCESS or INVALID");
      containers.usableSetId(req.containerId);
      await faults.respond(req.containerId, req.faultGroupId, code);
      return {};
    },
    mapDma: async (req, ctx) => {
      authorize(req.containerId, ctx);
      await containers.mapDma(req.containerId, {
        iova: req.iova,
        paddr: req.paddr,
        size: req.size,
        access: req.access ?? { read: false, write: false, execute: false, privileged: false },
      });
      return {};
    },
    unmapDma: async (req, ctx) => {
      authorize(req.containerId, ctx);
      return { unmappedSize: await containers.unmapDma(req.containerId, req.iova, req.size) };
    },
    mapGuestPages: async (req, ctx) => {
      authorize(req.containerId, ctx);
      const setId = containers.usableSetId(req.containerId);
      if (req.hpasid === 0) throw invalidField("hpasid", "hpasid is required");
      const access = req.access ?? { read: false, write: false, execute: false, privileged: false };
      await guestPages.map(setId, req.hpasid, req.generation, req.iova, req.gpa, req.size, access);
      return {};
    },
    unmapGuestPages: async (req, ctx) => {
      authorize(req.containerId, ctx);
      const setId = containers.usableSetId(req.containerId);
      if (req.hpasid === 0) throw invalidField("hpasid", "hpasid is required");
      return { unmappedSize: await guestPages.unmap(setId, req.hpasid, req.generation, req.iova, req.size) };
    },
    // No capability: the operator's inspection, which never shows one (vfio.proto QueryState).
    queryState: async (req) => ({ containers: (await containers.queryState(req.containerId)).map((c) => toContainer(c, faults)), takenAt: new Date() }),
  };
}

/** Options of {@link startVfioServer}. */
export interface StartVfioServerOptions {
  readonly host: string;
  readonly port: number;
  readonly containers: VfioContainers;
  readonly faults: FaultRelay;
  readonly guestPages: GuestPagesPort;
  readonly logger: Logger;
  /** VFIO's credentials: VfioService requires mTLS, VMMs included (DESIGN §11). @default plaintext */
  readonly tls?: GrpcServerOptions["tls"];
}

/**
 * HTTP/2 keepalive of the server: a VMM whose host vanished without closing its connection (power
 * loss, partition) is detected within about 15 s and its Session ends like a crash.
 */
export const SESSION_KEEPALIVE = { timeMs: 10_000, timeoutMs: 5_000 } as const;

/** Creates VFIO's gRPC server (VfioService, health, reflection) and starts listening. */
export async function startVfioServer(options: StartVfioServerOptions): Promise<GrpcServer> {
  const server = createVfioServer(options);
  await server.listen(options.host, options.port);
  return server;
}

/** A gRPC server serving VfioService (plus health and reflection), with the Session keepalive; call `listen` on it. */
export function createVfioServer(options: Omit<StartVfioServerOptions, "host" | "port">): GrpcServer {
  return createGrpcServer({
    service: "vfio",
    logger: options.logger,
    ...(options.tls === undefined ? {} : { tls: options.tls }),
    channelOptions: {
      "grpc.keepalive_time_ms": SESSION_KEEPALIVE.timeMs,
      "grpc.keepalive_timeout_ms": SESSION_KEEPALIVE.timeoutMs,
    },
  }).addService(vfio.VfioServiceService, createVfioHandlers(options.containers, options.faults, options.guestPages));
}
