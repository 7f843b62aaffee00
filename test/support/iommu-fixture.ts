import { createClient, type PromiseClient } from "@ioasid/grpc-kit";
import { core, events, iommu } from "@ioasid/proto";
import { natsEnv, startService, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry, startCore, type CoreFixture } from "./core-fixture.js";

/** An IommuService client. */
export type IommuClient = PromiseClient<typeof iommu.IommuServiceService>;
/** A CoreService client. */
export type CoreClient = PromiseClient<typeof core.CoreServiceService>;

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

/** The holder of the IOMMU's reference on a guest-bound IOASID. */
export const IOMMU_BIND_HOLDER = { role: "iommu", instance: "dmar0", purpose: "bind" };

/** nats-server + ioasid-core + the IOMMU, each a process, and clients of both services. */
export interface IommuStack {
  readonly core: CoreFixture;
  /** The core's client: the test plays VFIO (sets, alloc, free) and KVM/VDCM (references) through it. */
  readonly c: CoreClient;
  readonly proc: ServiceProcess;
  readonly iommu: IommuClient;
  /** Stops the IOMMU (SIGTERM), then the core and nats-server; the IOMMU's exit code. */
  stop(): Promise<number | null>;
}

/** Starts the built IOMMU service against a running core fixture (it registers before it listens). */
export async function startIommuProcess(fixture: CoreFixture, env: Record<string, string> = {}): Promise<ServiceProcess> {
  return startService({
    name: "iommu",
    entry: serviceEntry("iommu"),
    env: { IOMMU_GRPC_ADDRESS: "127.0.0.1:0", IOASID_CORE_ADDRESS: fixture.proc.address, ...(await natsEnv(fixture.nats, "iommu", env)), ...env },
  });
}

/** Starts nats-server, the core and the built IOMMU service (registered with the core once it listens). */
export async function startIommuStack(env: { core?: Record<string, string>; iommu?: Record<string, string> } = {}): Promise<IommuStack> {
  const fixture = await startCore(env.core ?? {});
  let proc: ServiceProcess;
  try {
    proc = await startIommuProcess(fixture, env.iommu);
  } catch (err) {
    await fixture.stop();
    throw err;
  }
  const client = createClient(iommu.IommuServiceService, proc.address, { deadlineMs: 5000 });
  return {
    core: fixture,
    c: fixture.client,
    proc,
    iommu: client,
    async stop() {
      client.close();
      const code = await proc.stop();
      await fixture.stop();
      return code;
    },
  };
}

/** VFIO opening a container: the VM's IOASID set (token type MM). */
export async function createVmSet(c: CoreClient, token: bigint, quota = 64): Promise<number> {
  return (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token, quota }))).set!.setId;
}

/** A PF with PASID and PRI capability. */
export function pf(deviceId: string, maxPasids = 1 << 20): iommu.RegisterDeviceRequest {
  return P(iommu.RegisterDeviceRequest, { deviceId, maxPasids, priCapable: true, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF, iommuGroup: 1 });
}

/** Registers devices, and a PAGING domain (the VM's stage 2) attached to each without PASID. */
export async function devicesWithStage2(client: IommuClient, ...deviceIds: string[]): Promise<number> {
  const domainId = (await client.createDomain(P(iommu.CreateDomainRequest, { type: iommu.DomainType.DOMAIN_TYPE_PAGING }))).domain!.domainId;
  for (const deviceId of deviceIds) {
    await client.registerDevice(pf(deviceId));
    await client.attachDomain(P(iommu.AttachDomainRequest, { domainId, deviceId, withoutPasid: true, owner: "vfio/vfio-1" }));
  }
  return domainId;
}

/** The next event sequence number the core will commit. */
export async function nextSeq(c: CoreClient): Promise<bigint> {
  return (await c.getStats({})).lastSeq + 1n;
}

/** The committed events of one IOASID from `fromSeq` up to the newest, as "TYPE" names. */
export async function eventsOf(c: CoreClient, fromSeq: bigint, ioasid: number): Promise<string[]> {
  const last = (await c.getStats({})).lastSeq;
  const out: string[] = [];
  if (last < fromSeq) return out;
  const ac = new AbortController();
  try {
    for await (const m of c.watchEvents({ fromSeq, types: [] }, { signal: ac.signal, deadlineMs: 5000 })) {
      if (m.event!.ioasid === ioasid) out.push(events.eventTypeToJSON(m.event!.type).replace("EVENT_TYPE_", ""));
      if (m.event!.seq >= last) break;
    }
  } finally {
    ac.abort();
  }
  return out;
}

/** The holders of an IOASID as "role/instance/purpose" → count, or undefined once it is reclaimed. */
export async function holdersOf(c: CoreClient, ioasid: number): Promise<Record<string, number> | undefined> {
  try {
    const info = (await c.describe({ ioasid })).info!;
    return Object.fromEntries(info.holders.map((h) => [`${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}`, h.count]));
  } catch (err) {
    if ((err as { reason?: string }).reason === "IOASID_NOT_FOUND") return undefined;
    throw err;
  }
}
