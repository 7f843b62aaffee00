import { startNats, waitFor, type NatsServer } from "@ioasid/testkit";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { startFaultProxy, type FaultProxy } from "./fault-proxy.js";

// A real nats-server behind the proxy, as the chaos runner puts it between a service and NATS.
describe("startFaultProxy between a NATS client and nats-server", () => {
  let nats: NatsServer | undefined;
  let proxy: FaultProxy | undefined;
  let nc: NatsConnection | undefined;
  let statuses: string[];

  beforeEach(async () => {
    // env: {} keeps a NATS_URL of the developer's shell from replacing the server under test.
    nats = await startNats({ env: {}, jetstream: false });
    proxy = await startFaultProxy({ target: `127.0.0.1:${nats.port}` });
    statuses = [];
  });
  afterEach(async () => {
    await nc?.close();
    nc = undefined;
    await proxy?.close();
    await nats?.stop();
  });

  async function connectThroughProxy(extra: { pingInterval?: number; maxPingOut?: number } = {}): Promise<NatsConnection> {
    const c = await connect({
      servers: `nats://${proxy!.address}`,
      reconnectTimeWait: 100,
      reconnectJitter: 0,
      maxReconnectAttempts: -1,
      timeout: 500,
      ...extra,
    });
    void (async () => {
      for await (const s of c.status()) statuses.push(s.type);
    })();
    c.subscribe("chaos.echo", {
      callback: (_err, m) => {
        m.respond(m.data);
      },
    });
    await c.flush();
    return c;
  }

  const ping = async (c: NatsConnection, timeout = 2000) => (await c.request("chaos.echo", "ping", { timeout })).string();

  it("connects through the proxy, is cut off by a partition that resets it, and reconnects once it heals", async () => {
    nc = await connectThroughProxy();
    expect(await ping(nc)).toBe("ping");

    proxy!.partition(true, { existing: "reset" });
    await waitFor(() => statuses.includes("disconnect"), { timeoutMs: 5000, message: "the client to see the disconnect" });
    // While partitioned, its reconnection attempts are held: no reconnect, no reply.
    await expect(ping(nc, 300)).rejects.toThrow();
    await waitFor(() => proxy!.stats().held > 0, { timeoutMs: 5000, message: "a reconnection attempt held by the partition" });
    expect(statuses).not.toContain("reconnect");

    proxy!.partition(false);
    await waitFor(() => statuses.includes("reconnect"), { timeoutMs: 5000, message: "the client to reconnect after the heal" });
    expect(await ping(nc)).toBe("ping");
    expect(proxy!.stats().partitionResets).toBe(1);
  });

  it("stalls an existing connection in a partition: the client's pings find it stale, and it reconnects after the heal", async () => {
    nc = await connectThroughProxy({ pingInterval: 200, maxPingOut: 2 });
    expect(await ping(nc)).toBe("ping");

    proxy!.partition(true);
    await waitFor(() => statuses.includes("disconnect"), { timeoutMs: 5000, message: "the client to find the stalled link stale" });
    proxy!.partition(false);
    await waitFor(() => statuses.includes("reconnect"), { timeoutMs: 5000, message: "the client to reconnect after the heal" });
    expect(await ping(nc)).toBe("ping");
  });

  it("a client reconnects after its connection is dropped", async () => {
    nc = await connectThroughProxy();
    proxy!.setDrop(1);
    await expect(ping(nc, 300)).rejects.toThrow();
    await waitFor(() => statuses.includes("disconnect"), { timeoutMs: 5000, message: "the drop" });
    proxy!.setDrop(0);
    await waitFor(() => statuses.includes("reconnect"), { timeoutMs: 5000, message: "the client to reconnect" });
    expect(await ping(nc)).toBe("ping");
    expect(proxy!.stats().dropped).toBeGreaterThan(0);
  });
});
