import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { createClient } from "@ioasid/grpc-kit";
import { core, events, iommu } from "@ioasid/proto";
import { freePort, startNats, startService, waitFor, type NatsServer, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry } from "../support/core-fixture.js";
import { devicesWithStage2 } from "../support/iommu-fixture.js";

// A standby core (issue 18 item 2; DESIGN §13): a second core waits behind the serving core's lease
// and takes over — replaying the op log and sealing it — once the primary is gone; clients given
// both addresses follow it without a restart. Two live cores never both commit: a primary paused
// past its lease (SIGSTOP) comes back to a sealed log, its next commit is refused and it stops.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const LEASE = "1s";

let nats: NatsServer;
const started: ServiceProcess[] = [];

beforeAll(async () => {
  nats = await startNats({ auth: false });
});
afterEach(async () => {
  for (const p of started.splice(0).reverse()) await p.stop("SIGKILL").catch(() => undefined);
});
afterAll(async () => {
  await nats?.stop();
});

/** A core on a port of its own; a standby resolves only once it has taken over (it listens then). */
async function startCore(port: number, stream: string, standby: boolean, prefix: string): Promise<ServiceProcess> {
  const p = await startService({
    name: standby ? "ioasid-core (standby)" : "ioasid-core",
    entry: serviceEntry("ioasid-core"),
    env: {
      NATS_URL: nats.url,
      IOASID_CORE_GRPC_ADDRESS: `127.0.0.1:${port}`,
      IOASID_CORE_STREAM: stream,
      IOASID_BUS_PREFIX: prefix,
      IOASID_CORE_LEASE: LEASE,
      ...(standby ? { IOASID_CORE_STANDBY: "true" } : {}),
    },
    readyTimeoutMs: 120_000,
  });
  started.push(p);
  return p;
}

const coreClient = (target: string) => createClient(core.CoreServiceService, target, { deadlineMs: 5000 });
let token = 0xd100n;
const newSet = async (c: ReturnType<typeof coreClient>) =>
  (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token: token++, quota: 16 }))).set!.setId;

describe("a standby core", () => {
  it("takes over when the primary is killed (kill -9): the log replayed, nothing acknowledged lost, no IOASID handed out twice, and clients with both addresses follow", async () => {
    const [portA, portB] = [await freePort(), await freePort()];
    const stream = "STANDBY_KILL_OPS";
    const primary = await startCore(portA, stream, false, "sb1.v1");
    // The standby waits (it does not listen) while the primary answers its lease.
    let standbyUp: ServiceProcess | undefined;
    const standby = startCore(portB, stream, true, "sb1.v1").then((p) => (standbyUp = p));
    const both = coreClient(`ipv4:127.0.0.1:${portA},127.0.0.1:${portB}`);
    // An IOMMU role given both addresses: it must follow the takeover without a restart.
    const role = await startService({
      name: "iommu",
      entry: serviceEntry("iommu"),
      env: { NATS_URL: nats.url, IOMMU_GRPC_ADDRESS: "127.0.0.1:0", IOASID_CORE_ADDRESS: `127.0.0.1:${portA},127.0.0.1:${portB}`, IOASID_BUS_PREFIX: "sb1.v1" },
    });
    started.push(role);
    const io = createClient(iommu.IommuServiceService, role.address, { deadlineMs: 10_000 });
    try {
      const setId = await newSet(both);
      const before = await Promise.all([1, 2, 3].map(() => both.alloc(P(core.AllocRequest, { setId }))));
      await devicesWithStage2(io, "0000:d1:00.0");
      await io.bindGpasid(
        P(iommu.BindGpasidRequest, {
          setId,
          hpasid: before[0]!.ioasid,
          generation: before[0]!.generation,
          gpasid: 3,
          deviceId: "0000:d1:00.0",
          guestPgtable: 0x7000n,
          owner: "vfio/vfio-1",
        }),
      );
      expect(standbyUp, "the standby waits while the primary answers").toBeUndefined();

      const killedAt = performance.now();
      primary.kill("SIGKILL");
      await standby;
      console.log(`core-standby: the standby served ${Math.round(performance.now() - killedAt)} ms after the primary's kill (lease ${LEASE})`);

      // Replayed: every IOASID acknowledged before the kill is there, with the IOMMU's reference.
      await waitFor(async () => (await both.describe({ ioasid: before[0]!.ioasid }).catch(() => undefined)) !== undefined, {
        timeoutMs: 30_000,
        message: "the client with both addresses reaching the standby",
      });
      for (const a of before) expect((await both.describe({ ioasid: a.ioasid })).info).toMatchObject({ setId, generation: a.generation });
      const holders = (await both.describe({ ioasid: before[0]!.ioasid })).info!.holders.map((h) => `${h.holder!.role}/${h.holder!.purpose}`);
      expect(holders).toContain("iommu/bind");
      // Allocations go on where they left off: nothing live is handed out again.
      const after = await both.alloc(P(core.AllocRequest, { setId }));
      expect(before.map((a) => a.ioasid)).not.toContain(after.ioasid);
      // The role follows: its bind of a new IOASID goes through the core that serves now.
      await io.bindGpasid(
        P(iommu.BindGpasidRequest, {
          setId,
          hpasid: after.ioasid,
          generation: after.generation,
          gpasid: 4,
          deviceId: "0000:d1:00.0",
          guestPgtable: 0x8000n,
          owner: "vfio/vfio-1",
        }),
      );
      // And a FREE goes through the new core's delivery to the role, whose ack reclaims.
      await both.free(P(core.FreeRequest, { setId, ioasid: after.ioasid, generation: after.generation }));
      await waitFor(async () => (await both.describe({ ioasid: after.ioasid }).catch(() => undefined))?.info === undefined, {
        timeoutMs: 30_000,
        message: "the IOASID freed after the takeover reclaimed through the role's ack",
      });
    } finally {
      both.close();
      io.close();
    }
  }, 180_000);

  it("never lets two cores commit: a primary paused past its lease comes back to a sealed log, is refused and stops", async () => {
    const [portA, portB] = [await freePort(), await freePort()];
    const stream = "STANDBY_PAUSE_OPS";
    const primary = await startCore(portA, stream, false, "sb2.v1");
    const a = coreClient(`127.0.0.1:${portA}`);
    const setId = await newSet(a);
    const first = await a.alloc(P(core.AllocRequest, { setId }));
    const standby = startCore(portB, stream, true, "sb2.v1");
    // Paused past its lease: to the standby it is gone.
    primary.kill("SIGSTOP");
    const b = coreClient(`127.0.0.1:${(await standby).port}`);
    try {
      const onB = await b.alloc(P(core.AllocRequest, { setId }));
      expect(onB.ioasid).not.toBe(first.ioasid);
      primary.kill("SIGCONT");
      // The old primary's next commit meets the seal: refused (never acknowledged), and it stops.
      await expect(a.alloc(P(core.AllocRequest, { setId }), { deadlineMs: 20_000 })).rejects.toBeDefined();
      const status = await primary.exited;
      expect(status.code, "the fenced primary fail-stops").toBe(1);
      expect(primary.logs()).toMatch(/operation log (append failed|unwritable)/);
      // What the standby serves: the first allocation and its own, nothing of the fenced attempt.
      const live = (await b.listIoasids(P(core.ListIoasidsRequest, { setId }))).ioasids.map((i) => i.ioasid).sort((x, y) => x - y);
      expect(live).toEqual([first.ioasid, onB.ioasid].sort((x, y) => x - y));
    } finally {
      a.close();
      b.close();
    }
  }, 180_000);
});
