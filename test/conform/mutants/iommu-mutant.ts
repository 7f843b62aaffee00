#!/usr/bin/env node
/**
 * Deliberately broken IOMMUs for the conformance kit's mutation test (issue 13, DESIGN §12): our
 * IOMMU, composed as services/iommu/src/main.ts composes it, with one wrapper around one of its
 * parts (the bus handler, the core port, a gRPC handler, the kept state, the history, the
 * registration), chosen by IOASID_MUTANT. Test-only: never a mode of the real service. Each mutant
 * must fail the clause it breaks (test/conform/iommu-conform.test.ts says which).
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { HistoryRecorder, type EventHandler, type HandlerResult } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { configOrExit, createGrpcServer, type CallContext } from "@ioasid/grpc-kit";
import { EventType, Priority, TokenType } from "@ioasid/ioasid";
import {
  AttachKind,
  createIommuEventHandler,
  createIommuHandlers,
  IommuDriver,
  IommuHardware,
  iommuConfigSchema,
  iommuHistoryPort,
  iommuStateCodec,
  type IommuKeptEntry,
} from "@ioasid/iommu";
import { events, iommu } from "@ioasid/proto";
import { createCoreClient, createGrpcCorePort, ensureRegistration, runRole, type CorePort } from "@ioasid/role-kit";

/** The broken variants. */
export const IOMMU_MUTANTS = [
  /** Acknowledges FREE (with its release and SPID detach) at once and tears the PASID down 3 s later. */
  "ack-before-teardown",
  /** Tears down on FREE but acknowledges without releasing its bind reference. */
  "forgets-release",
  /** On FREE detaches the SPID with a DetachSpid call of its own (the kernel's UNBIND on a freed PASID), not with the ack. */
  "unbind-on-free",
  /** Detaches the SPID (UNBIND) on every device unbind, not only the last. */
  "unbind-not-last",
  /** BindGpasid checks the IOASID against its own set, not the caller's: another set's IOASID can be bound. */
  "binds-other-set",
  /** BindGpasid takes any set for a VM's: a host process's SVA PASID (a NONE-token set) can be bound by a guest. */
  "binds-host-sva",
  /** A FREE also tears down every other set's bind of the same guest PASID. */
  "touches-other-set",
  /** Remembers no acknowledgement: a re-delivered FREE is handled again. */
  "reapplies-redelivery",
  /** Registers at CPU priority: tears PASIDs down before the DEVICE tier has drained them. */
  "registers-early",
  /** Records none of the FREE teardown's history (teardown_pasid, iotlb_flush, iommu_nb_handler). */
  "drops-history",
  /** Comes back from a restart with empty tables: ignores what it kept. */
  "forgets-state",
  /** Accepts a second answer to a fault group and tells its owner again. */
  "answers-twice",
  /** ReplaceDomain as DetachDomain then AttachDomain: not one step (the old faults answered as for a detach, a window with no entry). */
  "replace-by-detach",
] as const;
export type IommuMutant = (typeof IOMMU_MUTANTS)[number];

const mutant = process.env["IOASID_MUTANT"] as IommuMutant | undefined;
if (mutant === undefined || !IOMMU_MUTANTS.includes(mutant)) {
  process.stderr.write(`IOASID_MUTANT must be one of ${IOMMU_MUTANTS.join(", ")}\n`);
  process.exit(2);
}

const SUBSCRIBER_NAME = "iommu";
const config = configOrExit(iommuConfigSchema, { service: "iommu" });
const coreClient = createCoreClient(config.coreAddress.address);
const realCore = createGrpcCorePort(coreClient);

/** Set while a BindGpasid call runs (binds-other-set breaks that call's ownership check, nothing else's). */
const inBind = new AsyncLocalStorage<true>();

/**
 * binds-other-set: BindGpasid's ownership check made against the set the IOASID is in, whatever set the caller named.
 * binds-host-sva: every set a BindGpasid looks at is told to be a VM's (an MM token).
 */
const core: CorePort =
  mutant === "binds-other-set"
    ? {
        ...realCore,
        find: async (setId, ioasid, generation) =>
          inBind.getStore() === true
            ? realCore.find((await realCore.describe(ioasid))?.setId ?? setId, ioasid, generation)
            : realCore.find(setId, ioasid, generation),
      }
    : mutant === "binds-host-sva"
      ? {
          ...realCore,
          getSet: async (setId) => {
            const set = await realCore.getSet(setId);
            return inBind.getStore() === true ? { ...set, token: { ...set.token, type: TokenType.MM } } : set;
          },
        }
      : realCore;

/** FREE as the bus handler sees it (a proto event). */
const FREE_WIRE = events.EventType.EVENT_TYPE_FREE;

/** The FREE history records drops-history leaves out. */
const DROPPED = new Set(["teardownPasid", "iotlbFlush", "iommuNbHandler"]);

function mutateHandler(real: EventHandler, driver: IommuDriver): EventHandler {
  switch (mutant) {
    case "ack-before-teardown":
      return (event, ctx) => {
        if (event.type !== FREE_WIRE || !driver.hw.hasIoasidState(event.ioasid, event.generation)) return real(event, ctx);
        const b = driver.hw.binding(event.ioasid);
        const mine = b !== undefined && b.generation === event.generation;
        const result: HandlerResult = { release: mine && b.refHeld ? ["bind"] : [], detachSpid: mine && b.spidAttached };
        setTimeout(() => void Promise.resolve(real(event, ctx)).catch(() => undefined), 3000);
        return result;
      };
    case "forgets-release":
      return async (event, ctx) => {
        const r = await real(event, ctx);
        return event.type === FREE_WIRE && r !== undefined ? { ...r, release: [] } : r;
      };
    case "unbind-on-free":
      return async (event, ctx) => {
        const r = await real(event, ctx);
        if (event.type !== FREE_WIRE || r === undefined || r.detachSpid !== true) return r;
        await realCore.detachSpid(event.setId, event.ioasid, event.generation);
        return { ...r, detachSpid: false };
      };
    case "touches-other-set":
      return async (event, ctx) => {
        const r = await real(event, ctx);
        if (event.type === FREE_WIRE && event.spid !== 0) {
          for (const h of driver.snapshot([], 0).handles) {
            if (h.kind === AttachKind.GPASID_BIND && h.gpasid === event.spid && h.setId !== event.setId) driver.hw.teardownIoasid(h.pasid, h.generation);
          }
          await driver.persist();
        }
        return r;
      };
    default:
      return real;
  }
}

await runRole({
  role: SUBSCRIBER_NAME,
  instance: config.instance,
  config,
  codec: iommuStateCodec,
  build: ({ logger, nc, saved: kept, store, history }) => {
    const saved: ReadonlyMap<string, IommuKeptEntry> = mutant === "forgets-state" ? new Map<string, IommuKeptEntry>() : kept;
    const hardware = IommuHardware.restore(saved);
    const sink = history(new HistoryRecorder(nc, SUBSCRIBER_NAME, config.instance, config.prefix));
    const driver = new IommuDriver({
      store,
      saved,
      hardware,
      core,
      history: iommuHistoryPort(
        mutant === "drops-history" ? { record: (action, fields) => (DROPPED.has(action.$case) ? undefined : sink.record(action, fields)) } : sink,
      ),
      log: logger,
      instance: config.instance,
      faultTimeoutMs: config.faultTimeoutMs,
    });
    const handlers = createIommuHandlers(driver);
    const server = createGrpcServer({ service: "iommu", logger });
    server.addService(iommu.IommuServiceService, {
      ...handlers,
      ...(mutant === "binds-other-set" || mutant === "binds-host-sva"
        ? { bindGpasid: (req: iommu.BindGpasidRequest, ctx: CallContext) => inBind.run(true, () => handlers.bindGpasid(req, ctx)) }
        : {}),
      ...(mutant === "unbind-not-last"
        ? {
            unbindGpasid: async (req: iommu.UnbindGpasidRequest, ctx: CallContext) => {
              const r = await handlers.unbindGpasid(req, ctx);
              // UNBIND on a device unbind that leaves others bound: the SPID detached while still in use.
              if (r.unbound && !r.lastUnbind) await realCore.detachSpid(req.setId, req.hpasid, req.generation);
              return r;
            },
          }
        : {}),
      ...(mutant === "replace-by-detach"
        ? {
            replaceDomain: async (req: iommu.ReplaceDomainRequest) => {
              const old = driver.hw.handleAt(req.deviceId, req.pasid, req.withoutPasid);
              if (old === undefined) return handlers.replaceDomain(req, undefined as never);
              const target = { deviceId: req.deviceId, pasid: req.pasid, withoutPasid: req.withoutPasid };
              const answered = await driver.detachDomain({ ...target, domainId: old.domainId, generation: 0 });
              const handle = await driver.attachDomain({
                ...target,
                domainId: req.domainId,
                generation: old.generation,
                owner: req.owner,
                ownerData: req.ownerData,
              });
              return iommu.ReplaceDomainResponse.fromPartial({
                handle: { handleId: handle.handleId, domainId: handle.domainId, generation: handle.generation },
                replacedHandleId: old.handleId,
                replacedDomainId: old.domainId,
                answeredFaultGroups: answered,
              });
            },
          }
        : {}),
      ...(mutant === "answers-twice"
        ? {
            sendPageResponse: async (req: iommu.SendPageResponseRequest, ctx: CallContext) => {
              try {
                return await handlers.sendPageResponse(req, ctx);
              } catch (err) {
                const g = driver.prq.get(req.faultGroupId);
                if (!isDomainError(err, "FAULT_GROUP_ALREADY_RESPONDED") || g === undefined) throw err;
                driver.faults.push(g.owner, { kind: "answered", group: g });
                return {};
              }
            },
          }
        : {}),
    });
    return {
      server,
      listen: config.address,
      quiet: () => !hardware.hasChanges() && !driver.prq.hasChanges(),
      reconcile: { run: () => driver.reconcile(), when: "before-serving" },
      subscriber: {
        instance: config.instance,
        handler: mutateHandler(createIommuEventHandler(driver), driver),
        ...(mutant === "reapplies-redelivery" ? { dedupeWindow: 0 } : {}),
      },
      register: () =>
        ensureRegistration(core, {
          subscriber: { name: SUBSCRIBER_NAME, instance: config.instance },
          priority: mutant === "registers-early" ? Priority.CPU : Priority.IOMMU,
          scope: { kind: "global" },
          events: [EventType.FREE],
        }),
      onSignal: () => driver.stop(),
      stop: () => coreClient.close(),
    };
  },
});
