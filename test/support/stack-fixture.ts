import { startNats, natsEnv, startService, type NatsServer, type ServiceProcess, type StartNatsOptions } from "@ioasid/testkit";
import { connectStack, type StackAddresses, type StackClients } from "@ioasid/cli";
import { readInstanceCredentials, type InstanceCredentials } from "@ioasid/security";
import { serviceEntry } from "./core-fixture.js";

/** The whole stack as processes on ephemeral ports: nats-server, the core and the four roles. */
export interface StackFixture {
  readonly nats: NatsServer;
  readonly procs: Record<"core" | "iommu" | "kvm" | "vdcm" | "vfio", ServiceProcess>;
  readonly addresses: StackAddresses;
  readonly clients: StackClients;
  /** A VMM's certificate (with mTLS; else undefined): what a test's own VMM client presents to VFIO. */
  readonly vmmTls: InstanceCredentials | undefined;
  stop(): Promise<void>;
}

/**
 * Starts the stack in dependency order (the roles need the core's address, VFIO needs the IOMMU's
 * and VDCM's) and connects clients of every service. Secured as `ioasidctl up` is (DESIGN §11): each
 * service with its own NATS user and certificate (mTLS, the core authorizing by role); the clients
 * are the operator's.
 */
export async function startStack(env: Record<string, string> = {}, natsOptions: StartNatsOptions = {}): Promise<StackFixture> {
  const nats = await startNats({ tls: true, ...natsOptions });
  const started: ServiceProcess[] = [];
  const start = async (name: "ioasid-core" | "iommu" | "kvm" | "vdcm" | "vfio", addressVar: string, extra: Record<string, string>) => {
    const role = name === "ioasid-core" ? "core" : name;
    const p = await startService({
      name,
      entry: serviceEntry(name),
      env: { [addressVar]: "127.0.0.1:0", ...(await natsEnv(nats, role, { ...env, ...extra })), ...env, ...extra },
    });
    started.push(p);
    return p;
  };
  try {
    const core = await start("ioasid-core", "IOASID_CORE_GRPC_ADDRESS", {});
    const roleEnv = { IOASID_CORE_ADDRESS: core.address };
    // VDCM's work queues issue DMA through the IOMMU: it needs the IOMMU's address.
    const iommu = await start("iommu", "IOMMU_GRPC_ADDRESS", roleEnv);
    const [kvm, vdcm] = await Promise.all([
      start("kvm", "KVM_GRPC_ADDRESS", roleEnv),
      start("vdcm", "VDCM_GRPC_ADDRESS", { ...roleEnv, IOMMU_ADDRESS: iommu.address }),
    ]);
    const vfio = await start("vfio", "VFIO_GRPC_ADDRESS", { ...roleEnv, IOMMU_ADDRESS: iommu.address, VDCM_ADDRESS: vdcm!.address, KVM_ADDRESS: kvm!.address });
    const tls = await nats.operatorTls();
    const vmmDir = await nats.certificateDir({ role: "vmm", instance: "test-vmm" });
    const vmmTls = vmmDir === undefined ? undefined : readInstanceCredentials(vmmDir);
    const addresses: StackAddresses = {
      natsUrl: nats.url,
      ...(nats.operator === undefined ? {} : { natsAuth: nats.operator }),
      ...(tls === undefined ? {} : { tls }),
      core: core.address,
      iommu: iommu.address,
      kvm: kvm!.address,
      vdcm: vdcm!.address,
      vfio: vfio.address,
    };
    const clients = await connectStack(addresses);
    return {
      nats,
      procs: { core, iommu, kvm: kvm!, vdcm: vdcm!, vfio },
      addresses,
      clients,
      vmmTls,
      async stop() {
        await clients.close();
        for (const p of [...started].reverse()) await p.stop().catch(() => undefined);
        await nats.stop();
      },
    };
  } catch (err) {
    for (const p of [...started].reverse()) await p.stop().catch(() => undefined);
    await nats.stop();
    throw err;
  }
}
