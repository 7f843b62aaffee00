import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { createClient } from "@ioasid/grpc-kit";
import { core, events, iommu } from "@ioasid/proto";
import { startNatsCluster, startService, waitFor, type NatsCluster, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry } from "../support/core-fixture.js";
import { devicesWithStage2 } from "../support/iommu-fixture.js";

// Beyond one machine (issue 18 item 1; DESIGN §13): the core and a role on a three-node NATS
// cluster, every stream (op log, history, role state) with three replicas, the services given the
// cluster's URL list. One nats-server at a time is killed (SIGKILL) while guests' IOASIDs are
// allocated, bound and freed: every operation still completes, every FREE is delivered and
// acknowledged, every IOASID reclaimed — the streams lost nothing with one copy gone.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const BIND = "iommu/dmar0/bind";

let cluster: NatsCluster;
let coreProc: ServiceProcess;
let iommuProc: ServiceProcess;
let nc: NatsConnection;
let c: ReturnType<typeof createClient<typeof core.CoreServiceService>>;
let io: ReturnType<typeof createClient<typeof iommu.IommuServiceService>>;

beforeAll(async () => {
  cluster = await startNatsCluster({ size: 3 });
  const env = { NATS_URL: cluster.urls };
  coreProc = await startService({
    name: "ioasid-core",
    entry: serviceEntry("ioasid-core"),
    env: { ...env, IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", IOASID_JS_REPLICAS: "3" },
  });
  iommuProc = await startService({
    name: "iommu",
    entry: serviceEntry("iommu"),
    env: { ...env, IOMMU_GRPC_ADDRESS: "127.0.0.1:0", IOASID_CORE_ADDRESS: coreProc.address },
  });
  c = createClient(core.CoreServiceService, coreProc.address, { deadlineMs: 10_000 });
  io = createClient(iommu.IommuServiceService, iommuProc.address, { deadlineMs: 10_000 });
  nc = await connect({ servers: cluster.urls.split(","), maxReconnectAttempts: -1, reconnectTimeWait: 100 });
}, 90_000);

afterAll(async () => {
  c?.close();
  io?.close();
  await nc?.close();
  const codes = [await iommuProc?.stop(), await coreProc?.stop()];
  if (codes.some((x) => x !== 0)) console.log(coreProc?.logs().split("\n").slice(-12).join("\n"));
  await cluster?.stop();
  expect(codes).toEqual([0, 0]);
});

let token = 0xc100n;
let device = 0;

/** A guest's IOASID bound on a device (the IOMMU holds its bind reference), then freed: the FREE goes to the IOMMU and its ack reclaims. */
async function guestLifeCycle(): Promise<void> {
  const setId = (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token: token++, quota: 8 }))).set!.setId;
  const deviceId = `0000:c1:${(device++).toString(16).padStart(2, "0")}.0`;
  await devicesWithStage2(io, deviceId);
  const { ioasid, generation } = await c.alloc(P(core.AllocRequest, { setId }));
  await io.bindGpasid(P(iommu.BindGpasidRequest, { setId, hpasid: ioasid, generation, gpasid: 7, deviceId, guestPgtable: 0x7000n, owner: "vfio/vfio-1" }));
  const holders = (await c.describe({ ioasid })).info!.holders.map((h) => `${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}`);
  expect(holders).toContain(BIND);
  expect((await c.free(P(core.FreeRequest, { setId, ioasid, generation }))).outcome).toBe(core.FreeOutcome.FREE_OUTCOME_FREE_PENDING);
  // The FREE is delivered to the IOMMU, which tears the entry down and releases with its ack.
  await waitFor(async () => (await c.describe({ ioasid }).catch(() => undefined))?.info === undefined, {
    timeoutMs: 30_000,
    message: `IOASID ${ioasid} reclaimed after its FREE`,
  });
  const entries = (await io.queryState(P(iommu.QueryStateRequest, { deviceIds: [deviceId] }))).devices[0]!.pasidEntries.filter((e) => !e.withoutPasid);
  expect(entries).toEqual([]);
}

describe("a NATS cluster of three, every stream replicated", () => {
  it("creates the op log, the history and the role state with three replicas", async () => {
    const jsm = await jetstreamManager(nc);
    const streams: Record<string, number> = {};
    for await (const s of jsm.streams.list()) streams[s.config.name] = s.config.num_replicas;
    expect(Object.keys(streams).length).toBeGreaterThanOrEqual(3);
    for (const [name, replicas] of Object.entries(streams)) expect({ name, replicas }).toEqual({ name, replicas: 3 });
  });

  it("keeps serving while any one nats-server is killed: operations complete, FREEs are delivered and acknowledged, IOASIDs reclaimed", async () => {
    await guestLifeCycle();
    for (const node of cluster.nodes) {
      await node.kill();
      // Two of three: JetStream keeps its quorum; the services' connections move to a live server.
      await guestLifeCycle();
      await guestLifeCycle();
      await node.restart();
      // The restarted server catches its stream copies up before the next one goes down.
      await waitFor(
        async () => {
          const jsm = await jetstreamManager(nc);
          for await (const s of jsm.streams.list()) {
            const replicas = [s.cluster?.leader, ...(s.cluster?.replicas ?? []).filter((r) => r.current && !r.offline).map((r) => r.name)];
            if (!replicas.includes(node.name)) return false;
          }
          return true;
        },
        { timeoutMs: 30_000, message: `${node.name}'s stream copies current again` },
      );
    }
    await guestLifeCycle();
  }, 240_000);

  it("lets a role started while JetStream has no quorum wait for it (within IOASID_STATE_WRITE_RETRY) instead of exiting", async () => {
    // Two of three servers down: the cluster's JetStream cannot answer for the role's stream (no
    // leader) until one is back. A role restarted then — by a supervisor, by the chaos runner —
    // exited 1 on the first timeout and stayed down. It now waits, says so, and serves once a
    // server is back. Nothing else runs meanwhile, so the core writes nothing.
    await guestLifeCycle();
    expect(await iommuProc.stop()).toBe(0);
    const [, n1, n2] = cluster.nodes;
    await Promise.all([n1!.kill(), n2!.kill()]);
    let restarting: Promise<unknown> | undefined;
    try {
      let output = "";
      const starting = startService({
        name: "iommu",
        entry: serviceEntry("iommu"),
        env: { NATS_URL: cluster.urls, IOMMU_GRPC_ADDRESS: "127.0.0.1:0", IOASID_CORE_ADDRESS: coreProc.address, IOASID_STATE_WRITE_RETRY: "90s" },
        readyTimeoutMs: 120_000,
        onLine: (line) => void (output += `${line}\n`),
      });
      // A role that exits instead (what it did before) ends the wait at once, with its output.
      const exited = new AbortController();
      starting.catch((err: unknown) => exited.abort(err));
      // Not a sleep: the role's own line that its state's first open failed and is retried.
      await waitFor(() => output.includes("JetStream not answering while the kept state opens"), {
        timeoutMs: 60_000,
        message: "the IOMMU role to say it waits for JetStream",
        signal: exited.signal,
      });
      restarting = Promise.all([n1!.restart(), n2!.restart()]);
      await restarting;
      iommuProc = await starting;
    } finally {
      // Whatever happened, the servers come back for the other tests' sake.
      await (restarting ?? Promise.all([n1!.restart(), n2!.restart()])).catch(() => undefined);
    }
    expect(iommuProc.logs()).not.toContain("cannot open the iommu state");
    io.close();
    io = createClient(iommu.IommuServiceService, iommuProc.address, { deadlineMs: 10_000 });
    await cluster.untilStreamsCurrent(60_000);
    await guestLifeCycle();
  }, 300_000);
});
