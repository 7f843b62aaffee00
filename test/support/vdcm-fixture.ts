import { connect, type NatsConnection } from "@nats-io/transport-node";
import { readHistory, type HistoryRecord } from "@ioasid/bus";
import { Code, DomainError } from "@ioasid/errors";
import { createClient, createGrpcServer, createLogger, type GrpcServer, type PromiseClient, type ServiceHandlers } from "@ioasid/grpc-kit";
import { core, events, iommu, vdcm } from "@ioasid/proto";
import { natsEnv, startService, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry, startCore, type CoreFixture } from "./core-fixture.js";

/** The VdcmService client. */
export type VdcmClient = PromiseClient<typeof vdcm.VdcmServiceService>;

/**
 * A stand-in IOMMU serving only IommuService.Translate from a page set (device, PASID, 4 KiB
 * page): what a descriptor's DMA needs, so VDCM tests do not depend on the IOMMU role. It records
 * every translation request (what reached the IOMMU tagged with which PASID).
 */
export interface IommuStandIn {
  readonly address: string;
  /** Pages that translate: `map(device, pasid, address)`. */
  map(deviceId: string, pasid: number, address: bigint): void;
  readonly requests: iommu.TranslateRequest[];
  close(): Promise<void>;
}

/** Starts the {@link IommuStandIn} on an ephemeral loopback port. */
export async function startIommuStandIn(): Promise<IommuStandIn> {
  const pages = new Set<string>();
  const requests: iommu.TranslateRequest[] = [];
  const server: GrpcServer = createGrpcServer({
    service: "iommu-stand-in",
    reflection: false,
    logger: createLogger("iommu-stand-in", { level: "silent" }),
  });
  const unimplemented = () => {
    throw new DomainError(Code.UNIMPLEMENTED, "UNIMPLEMENTED", "the stand-in IOMMU only translates");
  };
  const handlers = Object.fromEntries(Object.keys(iommu.IommuServiceService).map((k) => [k, unimplemented])) as unknown as ServiceHandlers<
    typeof iommu.IommuServiceService
  >;
  server.addService(iommu.IommuServiceService, {
    ...handlers,
    translate: (req) => {
      requests.push(req);
      const hit = pages.has(`${req.deviceId}/${req.pasid}/${req.address / 4096n}`);
      return iommu.TranslateResponse.fromPartial(
        hit
          ? { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: req.address }
          : { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT, faultReason: iommu.FaultReason.FAULT_REASON_NO_PASID_ENTRY },
      );
    },
  });
  const port = await server.listen("127.0.0.1", 0);
  return {
    address: `127.0.0.1:${port}`,
    map: (deviceId, pasid, address) => void pages.add(`${deviceId}/${pasid}/${address / 4096n}`),
    requests,
    close: () => server.shutdown(1000),
  };
}

/** The core, its NATS, a stand-in IOMMU and a VDCM process, with clients. */
export interface VdcmFixture {
  readonly core: CoreFixture;
  readonly iommu: IommuStandIn;
  /** The current VDCM process (changes after {@link restartVdcm}). */
  proc: ServiceProcess;
  /** Client of the current VDCM process. */
  client: VdcmClient;
  /** A NATS connection for reading the history. */
  readonly nc: NatsConnection;
  readonly instance: string;
  /** Stops everything the fixture started. */
  stop(): Promise<void>;
}

/** Starts nats + core + stand-in IOMMU + the built VDCM service (instance `vdcm0`), with `env` on top of its own. */
export async function startVdcmStack(env: Record<string, string> = {}): Promise<VdcmFixture> {
  const coreFixture = await startCore();
  const stopAll: Array<() => Promise<unknown>> = [() => coreFixture.stop()];
  try {
    const iommuStandIn = await startIommuStandIn();
    stopAll.unshift(() => iommuStandIn.close());
    const nc = await connect({ servers: coreFixture.nats.url });
    stopAll.unshift(() => nc.close());
    const fixture: VdcmFixture = {
      core: coreFixture,
      iommu: iommuStandIn,
      nc,
      instance: "vdcm0",
      proc: undefined as unknown as ServiceProcess,
      client: undefined as unknown as VdcmClient,
      stop: async () => {
        fixture.client?.close();
        await fixture.proc?.stop();
        for (const s of stopAll) await s();
      },
    };
    await startVdcmProcess(fixture, env);
    return fixture;
  } catch (err) {
    for (const s of stopAll) await s().catch(() => undefined);
    throw err;
  }
}

/** Starts (another) VDCM process for the fixture, same instance, and points the client at it; `env` on top of its own. */
export async function startVdcmProcess(f: VdcmFixture, env: Record<string, string> = {}): Promise<void> {
  f.proc = await startService({
    name: "vdcm",
    entry: serviceEntry("vdcm"),
    env: {
      VDCM_GRPC_ADDRESS: "127.0.0.1:0",
      VDCM_INSTANCE: f.instance,
      IOMMU_ADDRESS: f.iommu.address,
      IOASID_CORE_ADDRESS: f.core.proc.address,
      ...(await natsEnv(f.core.nats, "vdcm", { VDCM_INSTANCE: f.instance })),
      ...env,
    },
  });
  f.client = createClient(vdcm.VdcmServiceService, f.proc.address, { deadlineMs: 5000 });
}

/** Kills the VDCM process (SIGKILL: a crash) and starts a new one on the same instance. */
export async function restartVdcm(f: VdcmFixture): Promise<void> {
  f.client.close();
  f.proc.kill("SIGKILL");
  await f.proc.exited;
  await startVdcmProcess(f);
}

/** A VM's IOASID set (MM token), as VFIO creates it when the VMM opens its container. */
export async function createVmSet(c: CoreFixture["client"], token: bigint): Promise<number> {
  const r = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token, quota: 16 }));
  return r.set!.setId;
}

/**
 * A guest PASID bound to a host IOASID the way VFIO, the IOMMU and KVM leave it (life-cycle steps
 * 2–7): alloc (refcount 1), SPID attached (BIND), the IOMMU's and KVM's references (refcount 3).
 * With `holders: false`, only the allocation reference.
 */
export async function bindGuestPasid(
  c: CoreFixture["client"],
  setId: number,
  gpasid: number,
  options: { holders?: boolean } = {},
): Promise<{ ioasid: number; generation: number }> {
  const { ioasid, generation } = await c.alloc(core.AllocRequest.fromPartial({ setId }));
  await c.attachSpid(core.AttachSpidRequest.fromPartial({ setId, ioasid, spid: gpasid }));
  if (options.holders !== false) {
    await c.get(core.GetRequest.fromPartial({ setId, ioasid, holder: IOMMU_HOLDER }));
    await c.get(core.GetRequest.fromPartial({ setId, ioasid, holder: KVM_HOLDER }));
  }
  return { ioasid, generation };
}

/** The reference the IOMMU takes at bind_gpasid (played by the test). */
export const IOMMU_HOLDER = { role: "iommu", instance: "iommu0", purpose: "bind" } as const;
/** The reference KVM takes on BIND (played by the test). */
export const KVM_HOLDER = { role: "kvm", instance: "vm", purpose: "vmcs" } as const;

/** An IOASID's holders as `role/instance/purpose` → count, or undefined when it is not allocated. */
export async function holdersOf(c: CoreFixture["client"], ioasid: number): Promise<Record<string, number> | undefined> {
  try {
    const { info } = await c.describe({ ioasid });
    return Object.fromEntries(info!.holders.map((h) => [`${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}`, h.count]));
  } catch (err) {
    if (err instanceof DomainError && err.reason === "IOASID_NOT_FOUND") return undefined;
    throw err;
  }
}

/** The history records of one role since `sinceMs`. */
export async function historyOf(nc: NatsConnection, sinceMs: number, role?: string): Promise<HistoryRecord[]> {
  const all = await readHistory(nc, { sinceMs });
  return role === undefined ? all : all.filter((r) => r.role === role);
}
