import { cpSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { credentials } from "@grpc/grpc-js";
import { createChaosClients, startChaosStack, startVmm, STACK_SERVICES, type ChaosClients, type ChaosStack, type StackService } from "@ioasid/chaos";
import { Code } from "@ioasid/errors";
import { checkHealth, ServingStatus, type CheckHealthOptions } from "@ioasid/grpc-kit";
import type { Role } from "@ioasid/security";
import { connect } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

// Issue 14's acceptance: "the bounded chaos suite ... run with security on". The chaos stack is
// authenticated as `ioasidctl up` is (DESIGN §11) — every link of it, the fault proxies' too — and
// refuses to run when a service came up insecure by accident.

const repoRoot = resolve(fileURLToPath(import.meta.url), "..", "..", "..");
const roleOf = (name: StackService): Role => STACK_SERVICES.find((s) => s.name === name)!.role;

/** What a health check at `address` with these client options came to: SERVING, or the failure's code. */
async function health(address: string, client: NonNullable<CheckHealthOptions["client"]>): Promise<ServingStatus | number | undefined> {
  return checkHealth(address, "", { deadlineMs: 5000, client }).then(
    (s) => s,
    (err: { code?: number }) => err.code,
  );
}

describe("the chaos stack with security on", () => {
  let root: string;
  let stack: ChaosStack | undefined;
  let clients: ChaosClients | undefined;

  beforeAll(async () => {
    root = mkdtempSync(join(tmpdir(), "ioasid-chaos-sec-"));
    stack = await startChaosStack({ dir: join(root, "secure"), seed: 1, repoRoot });
    clients = createChaosClients(stack.addresses, stack.credentials);
  }, 120_000);
  afterAll(async () => {
    clients?.close();
    await stack?.close();
    rmSync(root, { recursive: true, force: true });
  });

  it("refuses a client without a certificate at every service, directly and through every proxied gRPC link", async () => {
    const s = stack!;
    const noCert = {
      credentials: credentials.createSsl(s.credentials.operator.ca, null, null, { checkServerIdentity: () => undefined }),
      channelOptions: { "grpc.ssl_target_name_override": "localhost" },
    };
    const grpcLinks = s.links.filter((l) => l.kind === "grpc");
    // Each role to the core, VFIO to the IOMMU and VDCM, VDCM to the IOMMU.
    expect(grpcLinks.map((l) => l.name).sort()).toEqual(
      ["iommu→ioasid-core", "kvm→ioasid-core", "vdcm→ioasid-core", "vdcm→iommu", "vfio→ioasid-core", "vfio→iommu", "vfio→vdcm"].sort(),
    );
    const targets = [
      ...STACK_SERVICES.map((x) => ({ what: x.name, address: s.addresses[x.name] })),
      ...grpcLinks.map((l) => ({ what: l.name, address: l.proxy.address })),
    ];
    for (const t of targets) {
      expect(await health(t.address, {}), `${t.what}: plaintext`).toBe(Code.UNAVAILABLE);
      expect(await health(t.address, noCert), `${t.what}: TLS without a certificate`).toBe(Code.UNAVAILABLE);
    }
  });

  it("lets a client recognise its server by the role in its certificate through a proxy port, and refuses a server of another role there", async () => {
    const s = stack!;
    for (const l of s.links.filter((x) => x.kind === "grpc")) {
      const to = l.to as StackService;
      const wrong: Role = roleOf(to) === "core" ? "kvm" : "core";
      expect(await health(l.proxy.address, { tls: s.credentials.operator, serverRole: roleOf(to) }), `${l.name} as ${roleOf(to)}`).toBe(ServingStatus.SERVING);
      expect(await health(l.proxy.address, { tls: s.credentials.operator, serverRole: wrong }), `${l.name} taken for ${wrong}`).toBe(Code.UNAVAILABLE);
    }
    // The roles' own calls to the core went through their proxies, with mTLS (the core refuses
    // anything else): the IOMMU registered as itself, and every role→core link carried bytes.
    const regs = await clients!.core.listRegistrations({});
    expect(regs.registrations.map((r) => r.subscriber?.name)).toContain("iommu");
    for (const l of s.links.filter((x) => x.kind === "grpc" && x.to === "ioasid-core" && x.from !== "vfio")) {
      expect(l.proxy.stats().bytesToTarget, l.name).toBeGreaterThan(0);
    }
  });

  it("refuses a NATS client without a credential, directly and through a service's NATS proxy; the operator's user gets in", async () => {
    const s = stack!;
    const natsLink = s.links.find((l) => l.kind === "nats")!;
    for (const url of [s.natsUrl, `nats://${natsLink.proxy.address}`]) {
      await expect(connect({ servers: url, reconnect: false, timeout: 5000 }), url).rejects.toThrow(/authoriz/i);
    }
    const nc = await connect({ servers: s.natsUrl, reconnect: false, timeout: 5000, ...s.credentials.natsAuth });
    await nc.close();
  });

  it("drives guests as the chaos driver does: the operator at the core, a VMM process with the VMM certificate at VFIO", async () => {
    const s = stack!;
    expect((await clients!.core.getStats({})).capacity).toBeGreaterThan(0);
    const vmm = startVmm([process.execPath, join(repoRoot, "packages", "cli", "dist", "main.js"), "vmm-agent"], {
      vfioAddress: s.addresses.vfio,
      mmToken: 0x5ec0n,
      quota: 2,
      name: "sec",
      credentialsDir: s.credentials.vmmDir,
    });
    try {
      const opened = await vmm.opened;
      // The driver's VFIO client is a VMM too: with the container's capability it reaches it.
      clients!.vfio.remember(opened.containerId, opened.capability);
      const a = await clients!.vfio.allocPasid({ containerId: opened.containerId });
      expect(a.hpasid).toBeGreaterThan(0);
    } finally {
      vmm.kill("SIGKILL");
      await vmm.exited;
    }
    // Without a certificate the same VMM process cannot even open a container.
    const bare = startVmm([process.execPath, join(repoRoot, "packages", "cli", "dist", "main.js"), "vmm-agent"], {
      vfioAddress: s.addresses.vfio,
      mmToken: 0x5ec1n,
      quota: 2,
      name: "bare",
    });
    await expect(bare.opened).rejects.toThrow(/exited/);
  });

  it("will not start when a service came up insecure by accident (a NATS-only credentials directory serves plaintext)", async () => {
    const dir = join(root, "insecure");
    await expect(
      startChaosStack({
        dir,
        seed: 1,
        repoRoot,
        adjustEnv: (name, env) => {
          if (name !== "vfio") return { ...env };
          // VFIO's own NATS user, but no certificate: grpc-kit's loadCredentials then serves plaintext.
          const natsOnly = join(dir, "vfio-nats-only");
          mkdirSync(natsOnly, { recursive: true, mode: 0o700 });
          cpSync(join(env["IOASID_CREDENTIALS_DIR"]!, "nats.json"), join(natsOnly, "nats.json"));
          return { ...env, IOASID_CREDENTIALS_DIR: natsOnly };
        },
      }),
    ).rejects.toThrow(/^INSECURE: vfio at 127\.0\.0\.1:\d+ answered a plaintext client/);
  }, 120_000);
});
