import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { attachStack, composeTarget } from "./attach.js";

describe("composeTarget", () => {
  it("is the ports docker-compose.yml publishes on 127.0.0.1 by default", () => {
    expect(composeTarget({})).toEqual({
      natsUrl: "nats://127.0.0.1:4222",
      addresses: { "ioasid-core": "127.0.0.1:50051", iommu: "127.0.0.1:50052", vfio: "127.0.0.1:50053", kvm: "127.0.0.1:50054", vdcm: "127.0.0.1:50055" },
    });
  });

  it("takes each port from the IOASID_PORT_* variable the compose files read", () => {
    const t = composeTarget({ IOASID_PORT_NATS: "24222", IOASID_PORT_CORE: "25051", IOASID_PORT_VDCM: "25055" });
    expect(t.natsUrl).toBe("nats://127.0.0.1:24222");
    expect(t.addresses).toMatchObject({ "ioasid-core": "127.0.0.1:25051", iommu: "127.0.0.1:50052", vdcm: "127.0.0.1:25055" });
  });

  it("refuses a variable that is not a port", () => {
    expect(() => composeTarget({ IOASID_PORT_KVM: "http" })).toThrow("IOASID_PORT_KVM=http is not a port");
  });
});

describe("attachStack", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });
  const tempDir = (): string => {
    const d = mkdtempSync(join(tmpdir(), "ioasid-attach-"));
    dirs.push(d);
    return d;
  };
  // Port 1 of 127.0.0.1: nothing listens there, connections are refused at once.
  const nowhere = {
    natsUrl: "nats://127.0.0.1:1",
    addresses: { "ioasid-core": "127.0.0.1:1", iommu: "127.0.0.1:1", vfio: "127.0.0.1:1", kvm: "127.0.0.1:1", vdcm: "127.0.0.1:1" },
  };

  it("names everything that did not answer, and writes no state", async () => {
    const dir = tempDir();
    const err = await attachStack(nowhere, { dir, timeoutMs: 0 }).then(
      () => undefined,
      (e: unknown) => e as Error,
    );
    for (const name of ["nats", "ioasid-core", "iommu", "vfio", "kvm", "vdcm"]) expect(err?.message).toContain(`  ${name} (`);
    expect(err?.message).toContain("docker compose ps");
    expect(existsSync(join(dir, "stack.json"))).toBe(false);
  });

  it("refuses a directory from which a stack started by `ioasidctl up` is running", async () => {
    const dir = tempDir();
    writeFileSync(join(dir, "stack.json"), JSON.stringify({ nats: { pid: process.pid }, services: {} }));
    await expect(attachStack(nowhere, { dir, timeoutMs: 0 })).rejects.toThrow(/started by `ioasidctl up` is running/);
  });
});
