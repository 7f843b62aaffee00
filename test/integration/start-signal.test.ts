import { spawn, type ChildProcess } from "node:child_process";
import { createServer, type Server } from "node:net";
import { startNats, waitFor, type NatsServer } from "@ioasid/testkit";
import { afterEach, describe, expect, it } from "vitest";
import { serviceEntry, startCore, type CoreFixture } from "../support/core-fixture.js";

// A SIGTERM that reaches a service while it is still starting (a supervisor stopping a stack that
// is coming up, a test that stops a service right after its `listening` line) is held until the
// service can stop gracefully: it then stops with exit 0, instead of dying by the signal or
// ignoring it. Made deterministic here by holding the service at its NATS connection (the server is
// down), sending SIGTERM, then bringing NATS back.

const started: ChildProcess[] = [];
const servers: NatsServer[] = [];
const blockers: Server[] = [];
let core: CoreFixture | undefined;

afterEach(async () => {
  for (const p of started.splice(0)) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  for (const b of blockers.splice(0)) b.close();
  for (const s of servers.splice(0)) await s.stop();
  await core?.stop();
  core = undefined;
});

/** Spawns a built service and collects its stdout. */
function spawnService(
  service: string,
  env: Record<string, string>,
): { proc: ChildProcess; out: () => string; exit: Promise<{ code: number | null; signal: string | null }> } {
  const proc = spawn(process.execPath, [serviceEntry(service)], { env: { ...process.env, LOG_LEVEL: "info", ...env }, stdio: ["ignore", "pipe", "pipe"] });
  started.push(proc);
  let out = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const exit = new Promise<{ code: number | null; signal: string | null }>((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  return { proc, out: () => out, exit };
}

/**
 * A nats-server that is down now and comes back on the same port with `restart()`. Its port stays
 * taken meanwhile by a listener that closes every connection at once (refused, as a dead server's
 * would be): left free, another test's nats-server running beside this one could take it, and the
 * service would connect there instead of waiting (a CI run timed out waiting for "NATS not
 * reachable yet").
 */
async function downNats(): Promise<{ nats: NatsServer; blocker: Server }> {
  const nats = await startNats();
  servers.push(nats);
  await nats.kill("SIGKILL");
  const blocker = createServer((socket) => socket.destroy());
  await new Promise<void>((resolve, reject) => {
    blocker.once("error", reject);
    blocker.listen(nats.port, "127.0.0.1", () => resolve());
  });
  blockers.push(blocker);
  return { nats, blocker };
}

/**
 * Waits until the service is held at its NATS connection, sends SIGTERM, brings NATS back, and
 * expects the service to finish starting, then stop gracefully with exit 0.
 */
async function signalWhileWaitingForNats(svc: ReturnType<typeof spawnService>, down: { nats: NatsServer; blocker: Server }, who: string): Promise<void> {
  await waitFor(() => svc.out().includes("NATS not reachable yet"), { timeoutMs: 30_000, message: `${who} waiting for NATS` }).catch((err: unknown) => {
    throw new Error(`${(err as Error).message}; its output so far:\n${svc.out().split("\n").slice(-12).join("\n")}`, { cause: err });
  });
  svc.proc.kill("SIGTERM");
  await new Promise<void>((resolve) => down.blocker.close(() => resolve()));
  await down.nats.restart();
  const { code, signal } = await svc.exit;
  expect({ code, signal }, `${who}'s last output:\n${svc.out().split("\n").slice(-12).join("\n")}`).toEqual({ code: 0, signal: null });
  expect(svc.out()).toContain('"msg":"listening"');
  expect(svc.out()).toContain("signal received, shutting down");
}

describe("a signal while a service starts", () => {
  it("ioasid-core: held, then a graceful stop with exit 0", async () => {
    const down = await downNats();
    const svc = spawnService("ioasid-core", { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: down.nats.url, IOASID_NATS_CONNECT_TIMEOUT: "30s" });
    await signalWhileWaitingForNats(svc, down, "the core");
  });

  it("a role (vdcm, through runRole): held, then a graceful stop with exit 0", async () => {
    core = await startCore();
    const down = await downNats();
    const svc = spawnService("vdcm", {
      VDCM_GRPC_ADDRESS: "127.0.0.1:0",
      NATS_URL: down.nats.url,
      IOASID_CORE_ADDRESS: core.proc.address,
      IOMMU_ADDRESS: "127.0.0.1:1",
      IOASID_NATS_CONNECT_TIMEOUT: "30s",
    });
    await signalWhileWaitingForNats(svc, down, "VDCM");
  });
});
