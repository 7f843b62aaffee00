#!/usr/bin/env node
/**
 * Deliberately broken VDCMs for the conformance kit's mutation test (issue 13, DESIGN §12): our
 * VDCM, composed as services/vdcm/src/main.ts composes it (buildVdcmRole), with one wrapper around
 * one of its parts — the core port, the event handler, the subscriber, the kept state or the
 * history — chosen by IOASID_MUTANT. Test-only: never a mode of the real service. Each mutant must
 * fail the clause it breaks (test/conform/vdcm-conform.test.ts says which).
 */
import type { EventHandler } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { configOrExit, createClient } from "@ioasid/grpc-kit";
import { Priority } from "@ioasid/ioasid";
import { events, vdcm as vdcmProto } from "@ioasid/proto";
import { createCoreClient, createGrpcCorePort, runRole, type CorePort, type RoleRuntime } from "@ioasid/role-kit";
import { buildVdcmRole, checkInstanceOrExit, createIommuClient, VDCM_ROLE, vdcmConfigSchema, vdcmStateCodec, type VdcmKeptEntry } from "@ioasid/vdcm";

/** The broken variants. */
export const VDCM_MUTANTS = [
  /** Acknowledges a FREE (with its releases) at once and drains and clears the entries 3 s later. */
  "ack-before-clear",
  /** Drains and clears on FREE but acknowledges without releasing the entries' references. */
  "forgets-release",
  /** Remembers no acknowledgement: a re-delivered FREE is handled again from scratch (and answered differently). */
  "reapplies-redelivery",
  /** A FREE also clears, in every other set, the entries programmed from the same guest PASID. */
  "touches-other-set",
  /** WriteWqPasid translates with find-by-SPID without taking a reference. */
  "no-reference",
  /** A guest PASID the mdev's set does not bind is looked up in the other sets too. */
  "crosses-sets",
  /** Registers on its sets at LAST priority instead of DEVICE: it clears after the IOMMU tier. */
  "wrong-priority",
  /** Registers on its sets at CPU priority: it gets the FREE beside KVM's tier, not after it. */
  "cpu-priority",
  /** Records no vdev_clear history. */
  "drops-history",
  /** Comes back from a restart with empty tables: ignores what it kept. */
  "forgets-state",
] as const;
export type VdcmMutant = (typeof VDCM_MUTANTS)[number];

const config = configOrExit(vdcmConfigSchema, { service: "vdcm" });
checkInstanceOrExit(config.instance);

const mutant = process.env["IOASID_MUTANT"] as VdcmMutant | undefined;
if (mutant === undefined || !VDCM_MUTANTS.includes(mutant)) {
  process.stderr.write(`IOASID_MUTANT must be one of ${VDCM_MUTANTS.join(", ")}\n`);
  process.exit(2);
}

const coreClient = createCoreClient(config.coreAddress.address);
/** A client of this very VDCM: the mutants that look at its tables do it through its own service. */
const self = createClient(vdcmProto.VdcmServiceService, config.address.address, { deadlineMs: 5000 });

/** The core port with the mutant's wrapper, if its break is there. */
function mutatedCore(real: CorePort): CorePort {
  switch (mutant) {
    case "no-reference":
      // A dedicated work queue's translation takes no reference (a descriptor's still does).
      return {
        ...real,
        findBySpid: (setId, spid, holder) =>
          holder !== undefined && !holder.purpose.endsWith(".desc") ? real.findBySpid(setId, spid) : real.findBySpid(setId, spid, holder),
      };
    case "crosses-sets":
      return {
        ...real,
        findBySpid: async (setId, spid, holder) => {
          try {
            return await real.findBySpid(setId, spid, holder);
          } catch (err) {
            if (!isDomainError(err, "SPID_NOT_FOUND")) throw err;
            for (const s of await real.listSets()) {
              if (s.id === setId) continue;
              try {
                return await real.findBySpid(s.id, spid, holder);
              } catch {
                // not there either
              }
            }
            throw err;
          }
        },
      };
    case "wrong-priority":
      return { ...real, register: (o) => real.register({ ...o, priority: Priority.LAST }) };
    case "cpu-priority":
      return { ...real, register: (o) => real.register({ ...o, priority: Priority.CPU }) };
    default:
      return real;
  }
}

/** The work queues programmed with the FREE's IOASID in its set, as the purposes of their references. */
async function purposesFor(e: Parameters<EventHandler>[0]): Promise<string[]> {
  const st = await self.queryState({ deviceIds: [] });
  return st.devices.flatMap((d) =>
    d.pasidEntries.filter((x) => x.setId === e.setId && x.hpasid === e.ioasid && x.generation === e.generation).map((x) => `${d.deviceId}.wq${x.wqId}`),
  );
}

/** The subscriber's handler with the mutant's wrapper, if its break is there. */
function mutatedHandler(real: EventHandler): EventHandler {
  const FREE = events.EventType.EVENT_TYPE_FREE;
  switch (mutant) {
    case "ack-before-clear":
      return async (e, ctx) => {
        if (e.type !== FREE) return real(e, ctx);
        const release = await purposesFor(e);
        setTimeout(() => void Promise.resolve(real(e, ctx)).catch(() => undefined), 3000);
        return { release };
      };
    case "forgets-release":
      return async (e, ctx) => {
        await real(e, ctx);
        return {};
      };
    case "touches-other-set":
      // Clears "the guest PASID" in every set it serves, not only in the set the FREE is for.
      return async (e, ctx) => {
        const r = await real(e, ctx);
        if (e.type === FREE && e.spid !== 0) {
          const st = await self.queryState({ deviceIds: [] });
          for (const d of st.devices) {
            for (const x of d.pasidEntries.filter((p) => p.gpasid === e.spid && p.setId !== e.setId)) {
              const m = st.mdevs.find((y) => y.mdevUuid === x.mdevUuid);
              if (m !== undefined) await self.clearWqPasid({ mdevUuid: m.mdevUuid, virtualWq: m.wqIds.indexOf(x.wqId) }).catch(() => undefined);
            }
          }
        }
        return r;
      };
    default:
      return real;
  }
}

await runRole({
  role: VDCM_ROLE,
  instance: config.instance,
  config,
  codec: vdcmStateCodec,
  connectionName: `vdcm-${config.instance}`,
  build: (rt: RoleRuntime<VdcmKeptEntry>) => {
    const runtime: RoleRuntime<VdcmKeptEntry> = {
      ...rt,
      saved: mutant === "forgets-state" ? new Map() : rt.saved,
      history:
        mutant === "drops-history"
          ? (sink) => {
              const gated = rt.history(sink);
              return { record: (action, fields, ts) => (action.$case === "vdevClear" ? undefined : gated.record(action, fields, ts)) };
            }
          : rt.history,
    };
    const parts = buildVdcmRole(runtime, {
      instance: config.instance,
      listen: config.address,
      coreClient,
      iommuClient: createIommuClient(config.iommuAddress.address),
      core: mutatedCore(createGrpcCorePort(coreClient)),
    });
    const subscriber = parts.subscriber!;
    return {
      ...parts,
      subscriber: { ...subscriber, handler: mutatedHandler(subscriber.handler), ...(mutant === "reapplies-redelivery" ? { dedupeWindow: 0 } : {}) },
      stop: async () => {
        self.close();
        await parts.stop?.();
      },
    };
  },
});
