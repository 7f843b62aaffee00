import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import { core, events } from "@ioasid/proto";
import { natsConnectOptions } from "@ioasid/security";
import { readNatsInfo, startNats, waitFor, type NatsServer } from "@ioasid/testkit";
import { connect } from "@nats-io/transport-node";
import { startCore, type CoreFixture } from "../support/core-fixture.js";

// The testkit's other way to NATS: nats-server in a container through testcontainers (the image
// docker-compose.yml builds), chosen with IOASID_TESTKIT_DOCKER=1 — so every test that calls
// startNats() can run against the container instead of the local binary.

const run = promisify(execFile);
const env = { ...process.env, IOASID_TESTKIT_DOCKER: "1", NATS_URL: undefined };
const log = (line: string): void => console.log(`containers: ${line}`);

async function containerState(id: string): Promise<string> {
  try {
    return (await run("docker", ["inspect", "-f", "{{.State.Status}} {{.Config.Image}} {{.HostConfig.NetworkMode}}", id])).stdout.trim();
  } catch {
    return "gone";
  }
}

describe("startNats with IOASID_TESTKIT_DOCKER=1 (testcontainers)", () => {
  const servers: NatsServer[] = [];
  const cores: CoreFixture[] = [];
  afterEach(async () => {
    for (const c of cores.splice(0)) await c.stop();
    await Promise.all(servers.splice(0).map((s) => s.stop()));
  });

  async function start(): Promise<NatsServer> {
    const nats = await startNats({ env });
    servers.push(nats);
    return nats;
  }

  it("runs nats-server with JetStream in a container on the host network, and removes the container on stop", async () => {
    const started = Date.now();
    const nats = await start();
    const id = nats.container!;
    expect(id).toMatch(/^[0-9a-f]{64}$/);
    expect(nats).toMatchObject({ url: `nats://127.0.0.1:${nats.port}`, pid: undefined, storeDir: undefined, external: false });
    expect(await containerState(id)).toBe("running ioasid-fabric-nats:dev host");
    expect(await readNatsInfo(nats.port)).toMatchObject({ port: nats.port, host: "127.0.0.1", jetstream: true });
    log(`testkit: NATS container ${id.slice(0, 12)} (ioasid-fabric-nats:dev, host network) ready at ${nats.url} in ${Date.now() - started} ms`);
    await nats.stop();
    await nats.stop();
    expect(await containerState(id)).toBe("gone");
  });

  it("admits only its users in the container, a user per role instance added by reloading it, each held to its permissions (DESIGN §11)", async () => {
    const nats = await startNats({ env, auth: { anonymous: "refuse" }, tls: true });
    servers.push(nats);
    // Nobody without a credential; the operator with its own.
    await expect(connect({ servers: nats.url, reconnect: false, timeout: 3000 })).rejects.toThrow();
    const operator = await connect({ servers: nats.url, user: nats.operator!.user, pass: nats.operator!.pass });
    await operator.close();
    // A role's user, made after the start: the configuration goes into the container again and
    // nats-server reloads it (SIGHUP); its credentials directory (here, with a certificate) is on this machine.
    const kvm = (await nats.credentials("kvm", "kvm0"))!;
    expect((await nats.operatorTls())?.identity).toEqual({ role: "operator", instance: "test" });
    const nc = await connect({ servers: nats.url, ...natsConnectOptions(kvm.credential) });
    try {
      // KVM may not forge the core's deliveries to the IOMMU: refused by the server, and logged.
      nc.publish("ioasid.v1.deliver.iommu.dmar0", new Uint8Array([1]));
      await nc.flush().catch(() => undefined);
      await waitFor(() => /Publish Violation.*ioasid\.v1\.deliver\.iommu\.dmar0/.test(nats.logs()), {
        timeoutMs: 20_000,
        message: "nats-server in the container to log the publish violation",
      });
    } finally {
      await nc.close().catch(() => undefined);
    }
    log(`testkit: NATS container ${nats.container!.slice(0, 12)} with authorization: anonymous refused, kvm/kvm0 added by reload, its forged delivery refused`);
  });

  it("serves the core's operation log: a core started again after NATS was killed and restarted replays its IOASIDs", async () => {
    const nats = await start();
    const first = await startCore({}, { nats });
    cores.push(first);
    const setId = (await first.client.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 7007n, quota: 4 }))).set!
      .setId;
    const a = await first.client.alloc(core.AllocRequest.fromPartial({ setId }));
    await first.stop();
    cores.splice(0);

    await nats.kill("SIGKILL");
    expect((await containerState(nats.container!)).startsWith("exited")).toBe(true);
    await nats.restart();
    expect((await containerState(nats.container!)).startsWith("running")).toBe(true);

    const second = await startCore({}, { nats });
    cores.push(second);
    const info = (await second.client.describe({ ioasid: a.ioasid })).info!;
    expect(info).toMatchObject({ ioasid: a.ioasid, setId: setId, generation: a.generation });
    log(`testkit: core replayed IOASID ${a.ioasid} (set ${setId}) from JetStream in the NATS container after docker kill and restart`);
  });
});
