import { isDomainError } from "@ioasid/errors";
import { createClient, type PromiseClient } from "@ioasid/grpc-kit";
import { core, events, kvm } from "@ioasid/proto";
import { natsEnv, startService, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry, startCore, type CoreFixture } from "./core-fixture.js";

/** A KvmService client. */
export type KvmClient = PromiseClient<typeof kvm.KvmServiceService>;
/** A CoreService client. */
export type CoreClient = PromiseClient<typeof core.CoreServiceService>;

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

/** A KVM service process and a client of it. */
export interface KvmProcess {
  readonly proc: ServiceProcess;
  readonly client: KvmClient;
  /** Stops it (SIGTERM unless told otherwise) and closes the client; its exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts the built KVM service against a running core fixture (its core and nats-server). */
export async function startKvmProcess(fixture: CoreFixture, env: Record<string, string> = {}): Promise<KvmProcess> {
  const proc = await startService({
    name: "kvm",
    entry: serviceEntry("kvm"),
    env: { KVM_GRPC_ADDRESS: "127.0.0.1:0", IOASID_CORE_ADDRESS: fixture.proc.address, ...(await natsEnv(fixture.nats, "kvm", env)), ...env },
  });
  const client = createClient(kvm.KvmServiceService, proc.address, { deadlineMs: 5000 });
  return {
    proc,
    client,
    async stop(signal = "SIGTERM") {
      client.close();
      return proc.stop(signal);
    },
  };
}

/** nats-server + ioasid-core + KVM, each a process, torn down together. */
export interface KvmStack {
  readonly core: CoreFixture;
  /** The core's client: the test plays VFIO and the IOMMU driver through it. */
  readonly c: CoreClient;
  kvm: KvmProcess;
  /** Stops KVM (if still running), then the core and nats-server. */
  stop(): Promise<void>;
}

/** Starts nats-server, the core and KVM. */
export async function startKvmStack(env: { core?: Record<string, string>; kvm?: Record<string, string> } = {}): Promise<KvmStack> {
  const fixture = await startCore(env.core ?? {});
  let kvmProc: KvmProcess;
  try {
    kvmProc = await startKvmProcess(fixture, env.kvm ?? {});
  } catch (err) {
    await fixture.stop();
    throw err;
  }
  const stack: KvmStack = {
    core: fixture,
    c: fixture.client,
    kvm: kvmProc,
    async stop() {
      await stack.kvm.stop("SIGKILL").catch(() => undefined);
      await fixture.stop();
    },
  };
  return stack;
}

/** VFIO opening a container: the VM's IOASID set with its MM token. */
export async function createMmSet(c: CoreClient, token: bigint, quota = 64): Promise<number> {
  return (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token, quota }))).set!.setId;
}

/** The guest allocating a PASID (virtual command) and the IOMMU driver binding it (bind_gpasid → BIND). */
export async function allocBound(c: CoreClient, setId: number, spid: number): Promise<{ ioasid: number; generation: number }> {
  const a = await c.alloc(P(core.AllocRequest, { setId }));
  await c.attachSpid(P(core.AttachSpidRequest, { setId, ioasid: a.ioasid, spid, generation: a.generation }));
  return { ioasid: a.ioasid, generation: a.generation };
}

/** The holders of an IOASID as `role/instance/purpose×count`; undefined once it is reclaimed. */
export async function holdersOf(c: CoreClient, ioasid: number): Promise<string[] | undefined> {
  try {
    const info = (await c.describe({ ioasid })).info!;
    return info.holders.map((h) => `${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}×${h.count}`);
  } catch (err) {
    if (isDomainError(err, "IOASID_NOT_FOUND")) return undefined;
    throw err;
  }
}

/** One VM's VMCS PASID translation table as `gpasid->hpasid`. */
export async function tableOf(k: KvmClient, vmId: number): Promise<string[]> {
  const vm = (await k.queryState({ vmId })).vms[0]!;
  return vm.translations.map((t) => `${t.gpasid}->${t.hpasid}`);
}

/** The IA32_PASID value for a guest PASID (bit 31 valid). */
export function ia32Pasid(gpasid: number): number {
  return (0x8000_0000 | gpasid) >>> 0;
}
