import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { canConnect } from "./can-connect.js";
import { startService, type ServiceProcess } from "./start-service.js";

/** A stand-in service: listens on 127.0.0.1:0, logs the listening line, exits 0 on SIGTERM. */
const LISTENING_SERVICE = `
import { createServer } from "node:net";
const server = createServer((s) => s.end());
server.listen(0, "127.0.0.1", () => {
  const { port } = server.address();
  console.log("not json, ignored");
  console.log(JSON.stringify({ level: "info", service: process.env.SERVICE_NAME, msg: "listening", address: "127.0.0.1:" + port }));
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
`;

const FAILING_SERVICE = `
console.error('IOASID_CORE_PORT="abc": expected an integer port 0..65535');
process.exit(2);
`;

const SILENT_SERVICE = `
setInterval(() => {}, 1000);
`;

describe("startService", () => {
  let dir: string;
  const services: ServiceProcess[] = [];

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "ioasid-testkit-"));
  });

  afterEach(async () => {
    await Promise.all(services.splice(0).map((s) => s.stop("SIGKILL", 1000)));
    await rm(dir, { recursive: true, force: true });
  });

  async function fixture(name: string, source: string): Promise<string> {
    const path = join(dir, `${name}.mjs`);
    await writeFile(path, source);
    return path;
  }

  it("waits for the listening line and takes the address from it", async () => {
    const entry = await fixture("listening", LISTENING_SERVICE);
    const service = await startService({ name: "fake-core", entry, env: { SERVICE_NAME: "fake-core" } });
    services.push(service);
    expect(service.address).toBe(`127.0.0.1:${service.port}`);
    expect(service.host).toBe("127.0.0.1");
    expect(await canConnect(service.host, service.port)).toBe(true);
    expect(service.logs()).toContain('"service":"fake-core"');
    expect(service.logs()).toContain("not json, ignored");
  });

  it("stops it with SIGTERM and reports its exit code, idempotently", async () => {
    const service = await startService({ name: "fake-core", entry: await fixture("listening", LISTENING_SERVICE) });
    services.push(service);
    expect(await service.stop()).toBe(0);
    expect(await service.stop()).toBe(0);
    expect(await service.exited).toEqual({ code: 0, signal: null });
  });

  it("kill() crashes it: exited reports the signal", async () => {
    const service = await startService({ name: "fake-core", entry: await fixture("listening", LISTENING_SERVICE) });
    services.push(service);
    service.kill();
    expect(await service.exited).toEqual({ code: null, signal: "SIGKILL" });
  });

  it("rejects with its output when it exits before listening", async () => {
    const entry = await fixture("failing", FAILING_SERVICE);
    await expect(startService({ name: "fake-core", entry })).rejects.toThrow(
      /service fake-core exited \(code 2.*IOASID_CORE_PORT="abc": expected an integer port/s,
    );
  });

  it("kills it and rejects when its signal aborts before it listens (a standby that never serves)", async () => {
    const entry = await fixture("silent", SILENT_SERVICE);
    const controller = new AbortController();
    const started = startService({ name: "fake-core", entry, readyTimeoutMs: 60_000, signal: controller.signal });
    controller.abort();
    await expect(started).rejects.toThrow(/service fake-core exited \(.*SIGKILL/s);
  });

  it("kills it and rejects when it does not listen in time", async () => {
    const entry = await fixture("silent", SILENT_SERVICE);
    await expect(startService({ name: "fake-core", entry, readyTimeoutMs: 300 })).rejects.toThrow(
      /timed out after 300 ms waiting for service fake-core to log "listening"; it was killed/,
    );
  });
});
