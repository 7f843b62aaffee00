import { existsSync } from "node:fs";
import { dirname } from "node:path";
import { afterEach, describe, expect, it, vi } from "vitest";
import { readNatsInfo as readInfo } from "./read-nats-info.js";
import { NATS_INSTALL_COMMAND, startNats, type NatsServer } from "./start-nats.js";

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

// env: {} keeps a NATS_URL of the developer's shell from replacing the server under test.
const local = { env: {} } as const;

describe("startNats", () => {
  const servers: NatsServer[] = [];

  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.stop()));
  });

  async function start(options: Parameters<typeof startNats>[0] = local): Promise<NatsServer> {
    const server = await startNats(options);
    servers.push(server);
    return server;
  }

  it("starts nats-server on an ephemeral port of 127.0.0.1 with JetStream in a temp dir", async () => {
    const nats = await start();
    expect(nats.port).toBeGreaterThan(0);
    expect(nats.url).toBe(`nats://127.0.0.1:${nats.port}`);
    expect(nats.external).toBe(false);
    const info = await readInfo(nats.port);
    expect(info).toMatchObject({ port: nats.port, host: "127.0.0.1", jetstream: true });
    expect(nats.storeDir !== undefined && existsSync(dirname(nats.storeDir))).toBe(true);
  });

  it("stop() kills it by PID and removes its temp dir, and is idempotent", async () => {
    const nats = await start();
    const pid = nats.pid as number;
    const dir = dirname(nats.storeDir as string);
    expect(alive(pid)).toBe(true);
    await nats.stop();
    await nats.stop();
    expect(alive(pid)).toBe(false);
    expect(existsSync(dir)).toBe(false);
    expect(nats.pid).toBeUndefined();
  });

  it("restart() after a crash comes back on the same port with the same store dir", async () => {
    const nats = await start();
    const { port, storeDir } = nats;
    const firstPid = nats.pid as number;
    await nats.kill("SIGKILL");
    expect(alive(firstPid)).toBe(false);
    expect(existsSync(storeDir as string)).toBe(true);
    await nats.restart();
    expect(nats.port).toBe(port);
    expect(nats.storeDir).toBe(storeDir);
    expect(nats.pid).not.toBe(firstPid);
    expect(await readInfo(port)).toMatchObject({ port, jetstream: true });
  });

  it("fails, naming the install command, when the nats-server binary is missing", async () => {
    await expect(start({ ...local, binary: "/nonexistent/nats-server" })).rejects.toThrow(NATS_INSTALL_COMMAND);
    expect(NATS_INSTALL_COMMAND).toBe("apt-get install -y nats-server");
  });

  it("reports the output when nats-server exits before it is ready", async () => {
    await expect(start({ ...local, extraConfig: "this is not valid config {" })).rejects.toThrow(/exited \(code 1.*last output:/s);
  });

  it("with IOASID_TESTKIT_DOCKER=1 and no Docker engine, fails naming DOCKER_HOST and the way back to the local server", async () => {
    // testcontainers reads DOCKER_HOST from the process's environment.
    vi.stubEnv("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    try {
      await expect(start({ env: { IOASID_TESTKIT_DOCKER: "1", DOCKER_HOST: "unix:///nonexistent/docker.sock" } })).rejects.toThrow(
        /no Docker engine answers \(DOCKER_HOST=unix:\/\/\/nonexistent\/docker\.sock\).*unset IOASID_TESTKIT_DOCKER/s,
      );
    } finally {
      vi.unstubAllEnvs();
    }
  });

  it("uses the server named by NATS_URL and leaves it alone", async () => {
    const nats = await start({ env: { NATS_URL: "nats://127.0.0.1:4999" } });
    expect(nats).toMatchObject({ external: true, url: "nats://127.0.0.1:4999", port: 4999, storeDir: undefined });
    await expect(nats.stop()).resolves.toBeUndefined();
    await expect(nats.kill()).rejects.toThrow(/external/);
  });
});
