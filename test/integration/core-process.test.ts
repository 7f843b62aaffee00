import { spawnSync } from "node:child_process";
import { afterEach, describe, expect, it } from "vitest";
import { checkHealth, listServices } from "@ioasid/grpc-kit";
import { serviceEntry, startCore, type CoreFixture } from "../support/core-fixture.js";

// ioasid-core as an operator runs it: configuration, health, reflection, shutdown.

let fixture: CoreFixture | undefined;
afterEach(async () => {
  await fixture?.stop();
  fixture = undefined;
});

describe("ioasid-core process", () => {
  it("reports SERVING on the health service and lists its services through reflection", async () => {
    fixture = await startCore();
    const { address } = fixture.proc;
    expect(await checkHealth(address)).toBe("SERVING");
    expect(await checkHealth(address, "ioasid.core.v1.CoreService")).toBe("SERVING");
    expect(await listServices(address)).toEqual(["grpc.health.v1.Health", "ioasid.core.v1.CoreService"]);
  });

  it("shuts down gracefully on SIGTERM with exit code 0", async () => {
    fixture = await startCore();
    const { proc } = fixture;
    expect(await proc.stop("SIGTERM")).toBe(0);
    expect(proc.logs()).toContain('"msg":"stopped"');
  });

  it("refuses bad configuration with every problem named and exit code 2, before listening", () => {
    const r = spawnSync(process.execPath, [serviceEntry("ioasid-core")], {
      env: { ...process.env, IOASID_CORE_GRPC_ADDRESS: "nowhere", IOASID_CAPACITY: "1" },
      encoding: "utf8",
      timeout: 10_000,
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('IOASID_CORE_GRPC_ADDRESS="nowhere"');
    expect(r.stderr).toContain('IOASID_CAPACITY="1"');
    expect(r.stdout).not.toContain("listening");
  });

  it("exits 1 with a clear message when NATS cannot be reached", () => {
    const r = spawnSync(process.execPath, [serviceEntry("ioasid-core")], {
      env: { ...process.env, IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: "nats://127.0.0.1:1", IOASID_NATS_CONNECT_TIMEOUT: "300ms" },
      encoding: "utf8",
      timeout: 15_000,
    });
    expect(r.status).toBe(1);
    expect(r.stdout).toContain("cannot reach NATS");
    expect(r.stdout).not.toContain('"msg":"listening"');
  });

  it("documents its configuration with --help", () => {
    const r = spawnSync(process.execPath, [serviceEntry("ioasid-core"), "--help"], { encoding: "utf8", timeout: 10_000 });
    expect(r.status).toBe(0);
    for (const v of [
      "IOASID_CORE_GRPC_ADDRESS",
      "IOASID_CAPACITY",
      "IOASID_CORE_EVENT_LOG_RETAIN",
      "NATS_URL",
      "IOASID_JS_REPLICAS",
      "IOASID_DELIVERY_DEADLINE",
      "LOG_LEVEL",
    ])
      expect(r.stdout).toContain(v);
  });
});
