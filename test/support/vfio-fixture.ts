import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  createClient,
  createVfioSession,
  decodeVfioCapability,
  encodeVfioCapability,
  type AnyServiceDefinition,
  type PromiseClient,
  type VfioSession,
} from "@ioasid/grpc-kit";
import { iommu, vdcm, vfio, type core } from "@ioasid/proto";
import { natsEnv, startService, waitFor, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry, type CoreFixture } from "./core-fixture.js";

/**
 * A vfio process on an ephemeral port, against a core fixture, and a client of it: one VMM's
 * session (its capability store holds what the containers it opened answered). A second VMM is
 * `createVfioSession(createClient(…))` of its own.
 */
export interface VfioFixture {
  readonly proc: ServiceProcess;
  readonly client: VfioSession;
  /** Stops vfio (SIGTERM); its exit code. */
  stop(): Promise<number | null>;
}

/**
 * An address nothing listens on: IOMMU_ADDRESS / VDCM_ADDRESS of a vfio started without those
 * services (calls that need them fail UNAVAILABLE at once).
 */
export const NOBODY = "127.0.0.1:1";

/** Starts the built vfio service against the core fixture (its NATS and core address). */
export async function startVfio(coreFixture: CoreFixture, env: Record<string, string> = {}): Promise<VfioFixture> {
  const proc = await startService({
    name: "vfio",
    entry: serviceEntry("vfio"),
    env: {
      VFIO_GRPC_ADDRESS: "127.0.0.1:0",
      IOASID_CORE_ADDRESS: coreFixture.proc.address,
      ...(await natsEnv(coreFixture.nats, "vfio", env)),
      IOMMU_ADDRESS: NOBODY,
      VDCM_ADDRESS: NOBODY,
      ...env,
    },
  });
  const client = createVfioSession(createClient(vfio.VfioServiceService, proc.address, { deadlineMs: 5000 }));
  return {
    proc,
    client,
    async stop() {
      client.close();
      return proc.stop();
    },
  };
}

/** The ready line of a VMM child: the container it holds the session of, its set and PASIDs. */
export interface VmmReady {
  readonly containerId: number;
  readonly setId: number;
  readonly pasids: readonly { hpasid: number; generation: number }[];
  /** The container's capability (the VMM's own when it opened it, or the one it was given). */
  readonly capability: Uint8Array;
}

/** A VMM child process (test/support/vfio-vmm.ts) holding a container's Session stream. */
export interface VmmProcess extends VmmReady {
  readonly proc: ServiceProcess;
  /** The JSON lines it logged after attaching (session_closed, session_end). */
  events(): Record<string, unknown>[];
}

// The VMM runs as node runs a service: built (tsc -b puts it in test/dist/support/).
const here = fileURLToPath(import.meta.url);
const vmmEntry = here.includes("/test/dist/") ? join(dirname(here), "vfio-vmm.js") : fileURLToPath(new URL("../dist/support/vfio-vmm.js", import.meta.url));

/**
 * Starts a VMM child that opens the container for `mmToken` (or attaches to `containerId`, whose
 * `capability` it is given), allocates `pasids` guest PASIDs, and holds the Session stream open;
 * resolves once attached.
 */
export async function startVmm(
  vfioAddress: string,
  options: { mmToken?: bigint; containerId?: number; capability?: Uint8Array; quota?: number; pasids?: number },
): Promise<VmmProcess> {
  const proc = await startService({
    name: "vmm",
    entry: vmmEntry,
    env: {
      VFIO_ADDRESS: vfioAddress,
      VMM_MM_TOKEN: String(options.mmToken ?? 0n),
      VMM_CONTAINER_ID: String(options.containerId ?? 0),
      VMM_QUOTA: String(options.quota ?? 16),
      VMM_PASIDS: String(options.pasids ?? 0),
      ...(options.capability === undefined ? {} : { VMM_CAPABILITY: encodeVfioCapability(options.capability) }),
    },
  });
  const lines = (): Record<string, unknown>[] =>
    proc
      .logs()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  const ready = lines().find((l) => l["msg"] === "listening") as unknown as Omit<VmmReady, "capability"> & { capability: string };
  return {
    proc,
    containerId: ready.containerId,
    setId: ready.setId,
    pasids: ready.pasids,
    capability: decodeVfioCapability(ready.capability) ?? new Uint8Array(0),
    events: () => lines().filter((l) => l["msg"] !== "listening"),
  };
}

/** Waits until the core has destroyed the set (every IOASID reclaimed). */
export async function waitSetGone(c: CoreFixture["client"], setId: number, timeoutMs = 10_000): Promise<void> {
  await waitFor(
    async () => {
      const { sets } = await c.listSets({});
      return !sets.some((s) => s.setId === setId);
    },
    { timeoutMs, message: `set ${setId} destroyed` },
  );
}

/** The set as the core has it, or undefined once destroyed. */
export async function coreSet(c: CoreFixture["client"], setId: number): Promise<core.IoasidSet | undefined> {
  return (await c.listSets({})).sets.find((s) => s.setId === setId);
}

/** Waits until vfio no longer has the container. */
export async function waitContainerGone(client: VfioFixture["client"], containerId: number, timeoutMs = 10_000): Promise<void> {
  await waitFor(
    async () => {
      const { containers } = await client.queryState({ containerId: 0 });
      return !containers.some((c) => c.containerId === containerId);
    },
    { timeoutMs, message: `container ${containerId} gone` },
  );
}

/** A role process (iommu, vdcm) started for the VFIO tests, with a client of it. */
export interface RoleFixture<D> {
  readonly proc: ServiceProcess;
  readonly client: PromiseClient<D>;
  stop(): Promise<number | null>;
}

async function startRole<D extends AnyServiceDefinition>(name: string, definition: D, env: Record<string, string>): Promise<RoleFixture<D>> {
  const proc = await startService({ name, entry: serviceEntry(name), env });
  const client = createClient(definition, proc.address, { deadlineMs: 5000 });
  return {
    proc,
    client,
    async stop() {
      client.close();
      return proc.stop();
    },
  };
}

/** Starts the built iommu service against the core fixture. */
export async function startIommu(coreFixture: CoreFixture): Promise<RoleFixture<typeof iommu.IommuServiceService>> {
  return startRole("iommu", iommu.IommuServiceService, {
    IOMMU_GRPC_ADDRESS: "127.0.0.1:0",
    IOASID_CORE_ADDRESS: coreFixture.proc.address,
    ...(await natsEnv(coreFixture.nats, "iommu")),
  });
}

/** Starts the built vdcm service against the core fixture and an iommu. */
export async function startVdcm(coreFixture: CoreFixture, iommuAddress: string): Promise<RoleFixture<typeof vdcm.VdcmServiceService>> {
  return startRole("vdcm", vdcm.VdcmServiceService, {
    VDCM_GRPC_ADDRESS: "127.0.0.1:0",
    VDCM_IOMMU_ADDRESS: iommuAddress,
    IOASID_CORE_ADDRESS: coreFixture.proc.address,
    ...(await natsEnv(coreFixture.nats, "vdcm")),
  });
}

/** The error and fatal lines a service logged (its JSON log): a clean run has none. */
export function errorLines(proc: ServiceProcess): string[] {
  return proc
    .logs()
    .split("\n")
    .filter((l) => /"level":(?:"error"|"fatal"|50|60)[,}]/.test(l));
}
