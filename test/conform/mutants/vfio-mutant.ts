#!/usr/bin/env node
/**
 * Deliberately broken VFIOs for the conformance kit's mutation test (issue 13, DESIGN §12): our VFIO,
 * composed as services/vfio/src/main.ts composes it, with one wrapper around one of its parts,
 * chosen by IOASID_MUTANT. Test-only: never a mode of the real service. Each mutant must fail the
 * clause it breaks (test/conform/vfio-conform.test.ts says which).
 */
import { HistoryRecorder } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { ConfigError, configOrExit, createClient } from "@ioasid/grpc-kit";
import { iommu, vdcm } from "@ioasid/proto";
import { createCoreClient, createGrpcCorePort, runRole, type CorePort } from "@ioasid/role-kit";
import {
  CloseReason,
  createGuestPagesPort,
  createIommuFaultPort,
  createIommuPort,
  createVdcmPort,
  createVfioServer,
  FaultRelay,
  VfioContainers,
  vfioConfigProblems,
  vfioConfigSchema,
  vfioStateCodec,
  type FaultRelayOptions,
  type HistoryPort,
  type IommuFaultPort,
  type IommuPort,
  type PageResponseCode,
  type VdcmPort,
} from "@ioasid/vfio";

/** The broken variants. */
export const VFIO_MUTANTS = [
  /** FreePasid frees the IOASID in the set it belongs to, whichever container the call names (S3 broken). */
  "frees-other-set",
  /** SendPageResponse answers a fault group relayed to another container (the ownership check skipped). */
  "answers-for-other-container",
  /** A Session stream that ends from the VMM's side (a crashed VMM) closes nothing: the set is never freed. */
  "keeps-set-on-session-end",
  /** Takes a core reference ("vfio" holder) on every IOASID it allocates, and drops it just before freeing. */
  "holds-reference",
  /** Comes back from a kill -9 with no containers: ignores what it kept. */
  "forgets-containers",
  /** UnbindGuestPasid (and the unbinds of UnassignDevice) answer "unbound" without asking the IOMMU. */
  "skips-iommu-unbind",
  /** A closing container hands its mdevs back to VDCM at once, before the set's FREEs went through the tiers. */
  "unassigns-before-reclaim",
  /** Records no bind_gpasid history. */
  "drops-history",
  /** Checks no capability: any VMM that names a container reaches it (DESIGN §3 broken). */
  "skips-capability-check",
  /** MapDma maps any host memory: a VMM maps another VM's memory into its stage 2 (issue 14 item 3 broken). */
  "maps-any-host-memory",
] as const;
export type VfioMutant = (typeof VFIO_MUTANTS)[number];

const mutant = process.env["IOASID_MUTANT"] as VfioMutant | undefined;
if (mutant === undefined || !VFIO_MUTANTS.includes(mutant)) {
  process.stderr.write(`IOASID_MUTANT must be one of ${VFIO_MUTANTS.join(", ")}\n`);
  process.exit(2);
}

const config = configOrExit(vfioConfigSchema, { service: "vfio" });
const problems = vfioConfigProblems(config);
if (problems.length > 0) {
  process.stderr.write(`vfio: ${new ConfigError(problems).message}\n`);
  process.exit(2);
}
const coreClient = createCoreClient(config.coreAddress.address);
const iommuClient = createClient(iommu.IommuServiceService, config.iommuAddress.address);
const vdcmClient = createClient(vdcm.VdcmServiceService, config.vdcmAddress.address);
const owner = `vfio/${config.instance}`;

/** The reference holds-reference takes on what it allocates. */
const MINE = { role: "vfio", instance: config.instance, purpose: "vcmd" } as const;

/** Drops the reference holds-reference took on an IOASID of `setId`, if it holds one (checked against `generation` when given). */
async function dropMine(core: CorePort, setId: number, ioasid: number, generation?: number): Promise<void> {
  const info = await core.describe(ioasid);
  if (info === undefined || info.setId !== setId || !info.holders.some((h) => h.holder.role === MINE.role)) return;
  await core.put(setId, ioasid, MINE, generation).catch((err: unknown) => {
    if (!isDomainError(err, "STALE_GENERATION")) throw err;
  });
}

function mutatedCore(real: CorePort): CorePort {
  switch (mutant) {
    case "frees-other-set":
      // Trusts the PASID, not the container: frees it in its own set.
      return {
        ...real,
        async free(setId, ioasid, generation) {
          const info = await real.describe(ioasid);
          return real.free(info?.setId ?? setId, ioasid, generation);
        },
      };
    case "holds-reference":
      return {
        ...real,
        async alloc(setId, options) {
          const a = await real.alloc(setId, options);
          await real.get(setId, a.ioasid, MINE, a.generation);
          return a;
        },
        async free(setId, ioasid, generation) {
          await dropMine(real, setId, ioasid, generation === 0 ? undefined : generation);
          return real.free(setId, ioasid, generation);
        },
        async freeSet(setId) {
          const ioasids = await real.listIoasids(setId).catch(() => []);
          for (const i of ioasids) await dropMine(real, setId, i.ioasid);
          return real.freeSet(setId);
        },
      };
    default:
      return real;
  }
}

function mutatedIommu(real: IommuPort): IommuPort {
  if (mutant !== "skips-iommu-unbind") return real;
  return { ...real, unbindGpasid: async () => ({ unbound: true, lastUnbind: true }) };
}

function mutatedHistory(real: HistoryPort): HistoryPort {
  if (mutant !== "drops-history") return real;
  return { record: (action, fields) => (action.$case === "bindGpasid" ? undefined : real.record(action, fields)) };
}

/** answers-for-other-container: a group another container's call names is answered anyway. */
class AnswersForOthers extends FaultRelay {
  readonly #port: IommuFaultPort;
  constructor(options: FaultRelayOptions, port: IommuFaultPort) {
    super(options);
    this.#port = port;
  }
  override async respond(containerId: number, faultGroupId: bigint, code: PageResponseCode): Promise<void> {
    try {
      await super.respond(containerId, faultGroupId, code);
    } catch (err) {
      if (!isDomainError(err, "FAULT_GROUP_NOT_GIVEN")) throw err;
      // Never given to this container may mean unknown to everyone: the IOMMU's refusal of such a
      // group is not the break, so the container's own refusal stands then.
      await this.#port.respond(faultGroupId, code).catch(() => {
        throw err;
      });
    }
  }
}

await runRole({
  role: "vfio",
  instance: config.instance,
  config,
  codec: vfioStateCodec,
  build: ({ logger, nc, saved, store, history: gated }) => {
    const history = mutatedHistory(gated(new HistoryRecorder(nc, "vfio", config.instance, config.prefix)));
    const late: { faults?: FaultRelay; containers?: VfioContainers } = {};
    const vdcmPort: VdcmPort = createVdcmPort(vdcmClient);
    const onClosing = async (containerId: number): Promise<unknown> => {
      await (late.faults?.containerClosing(containerId) ?? Promise.resolve());
      if (mutant === "unassigns-before-reclaim") {
        const [c] = (await late.containers?.queryState(containerId)) ?? [];
        for (const d of c?.devices ?? []) if (d.device.kind === "mdev") await vdcmPort.unassignMdev(d.device.id).catch(() => undefined);
      }
      return undefined;
    };
    const containers = new VfioContainers({
      core: mutatedCore(createGrpcCorePort(coreClient)),
      iommu: mutatedIommu(createIommuPort(iommuClient, owner)),
      vdcm: vdcmPort,
      history,
      sessionGraceMs: config.sessionGraceMs,
      hostMemory: { base: config.hostMemoryBase, size: config.hostMemorySize },
      guestMemorySize: config.guestMemorySize,
      log: logger,
      onClosing,
      store,
      saved: mutant === "forgets-containers" ? new Map() : saved,
    });
    late.containers = containers;
    if (mutant === "skips-capability-check") containers.authorize = () => undefined;
    if (mutant === "maps-any-host-memory") containers.assertHostMemoryGiven = () => undefined;
    if (mutant === "keeps-set-on-session-end") {
      const attach = containers.attachSession.bind(containers);
      containers.attachSession = (containerId) => {
        const lease = attach(containerId);
        return { containerId: lease.containerId, setId: lease.setId, closed: lease.closed, end: () => undefined };
      };
    }
    const faultPort = createIommuFaultPort(iommuClient, owner);
    const relayOptions: FaultRelayOptions = { iommu: faultPort, history, log: logger, isOpen: (containerId) => containers.isOpen(containerId) };
    const faultRelay = mutant === "answers-for-other-container" ? new AnswersForOthers(relayOptions, faultPort) : new FaultRelay(relayOptions);
    late.faults = faultRelay;
    faultRelay.start();
    let closingAll: Promise<void> | undefined;
    const closeAll = (): Promise<void> => (closingAll ??= containers.closeAll(CloseReason.SERVICE_STOPPED));
    return {
      server: createVfioServer({ containers, faults: faultRelay, guestPages: createGuestPagesPort(iommuClient), logger }),
      listen: config.address,
      onSignal: () => void closeAll(),
      serving: () => {
        logger.info({ mutant }, "vfio mutant serving");
        void containers.closeRestored().catch((err: unknown) => logger.error({ err: String(err) }, "closing the containers left by a crash failed"));
      },
      stop: async () => {
        await closeAll();
        faultRelay.stop();
        coreClient.close();
        iommuClient.close();
        vdcmClient.close();
      },
    };
  },
});
