// Section `failover` (issue 18, DESIGN §13 "beyond one machine"): the standby core's takeover —
// kill -9 of the serving core to the standby's first answer through a client given both addresses —
// on one nats-server and on a three-server cluster (every stream with three replicas), and a
// delivery figure on each: guests' IOASIDs bound at the IOMMU (which holds a reference) freed at
// once, until every FREE was delivered, acknowledged and the IOASID reclaimed.
import { fileURLToPath } from "node:url";
import { createClient } from "@ioasid/grpc-kit";
import { core, events, iommu } from "@ioasid/proto";
import { freePort, startNatsCluster } from "@ioasid/testkit";
import { fmt, now } from "./util.mjs";

const LEASE_MS = 1000;
const entry = (s) => fileURLToPath(new URL(`../services/${s}/dist/main.js`, import.meta.url));

/**
 * One run on the NATS at `natsUrl`: a primary core, a standby, the IOMMU given both; `live` IOASIDs
 * allocated, `freed` of them bound and freed (the delivery figure), then the primary killed.
 */
async function run(ctx, label, natsUrl, replicas, live, freed) {
  const { log, phase, startService, waitFor, own } = ctx;
  const [portA, portB] = [await freePort(), await freePort()];
  const coreEnv = (port, standby) => ({
    NATS_URL: natsUrl,
    IOASID_CORE_GRPC_ADDRESS: `127.0.0.1:${port}`,
    IOASID_JS_REPLICAS: String(replicas),
    IOASID_CORE_LEASE: `${LEASE_MS}ms`,
    ...(standby ? { IOASID_CORE_STANDBY: "true" } : {}),
  });
  phase(`${label}: starting the primary core, a standby and the IOMMU`);
  const primary = await startService({ name: "ioasid-core", entry: entry("ioasid-core"), env: coreEnv(portA, false) });
  const standby = startService({ name: "ioasid-core (standby)", entry: entry("ioasid-core"), env: coreEnv(portB, true), readyTimeoutMs: 300_000 });
  standby.catch(() => undefined);
  const both = `127.0.0.1:${portA},127.0.0.1:${portB}`;
  const io = await startService({
    name: "iommu",
    entry: entry("iommu"),
    env: { NATS_URL: natsUrl, IOMMU_GRPC_ADDRESS: "127.0.0.1:0", IOASID_CORE_ADDRESS: both },
  });
  const c = createClient(core.CoreServiceService, `ipv4:${both}`, { deadlineMs: 30_000 });
  const ic = createClient(iommu.IommuServiceService, io.address, { deadlineMs: 30_000 });
  own(`${label} clients`, () => {
    c.close();
    ic.close();
  });
  const { set } = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 0xf00n, quota: 0 }));
  const setId = set.setId;
  const domainId = (await ic.createDomain(iommu.CreateDomainRequest.fromPartial({ type: iommu.DomainType.DOMAIN_TYPE_PAGING }))).domain.domainId;
  await ic.registerDevice(
    iommu.RegisterDeviceRequest.fromPartial({
      deviceId: "0000:f0:00.0",
      maxPasids: 1 << 20,
      priCapable: true,
      function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
      iommuGroup: 1,
    }),
  );
  await ic.attachDomain(iommu.AttachDomainRequest.fromPartial({ domainId, deviceId: "0000:f0:00.0", withoutPasid: true, owner: "vfio/vfio-1" }));

  // Delivery: `freed` IOASIDs bound (the IOMMU's reference), freed at once, until all reclaimed.
  phase(`${label}: binding ${fmt(freed)} IOASIDs`);
  const bound = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < freed) {
        const i = next++;
        const a = await c.alloc(core.AllocRequest.fromPartial({ setId }));
        await ic.bindGpasid(
          iommu.BindGpasidRequest.fromPartial({
            setId,
            hpasid: a.ioasid,
            generation: a.generation,
            gpasid: i + 1,
            deviceId: "0000:f0:00.0",
            guestPgtable: 0x10_0000n + BigInt(i) * 0x1000n,
            owner: "vfio/vfio-1",
          }),
        );
        bound.push(a);
      }
    }),
  );
  phase(`${label}: freeing ${fmt(freed)} bound IOASIDs`);
  const t0 = now();
  await Promise.all(bound.map((a) => c.free(core.FreeRequest.fromPartial({ setId, ioasid: a.ioasid, generation: a.generation }))));
  await waitFor(async () => (await c.getStats({})).inUse === 0, { timeoutMs: 120_000, what: `${label}: every freed IOASID reclaimed` });
  const deliverySeconds = (now() - t0) / 1000;
  const rate = freed / deliverySeconds;
  log(
    `  ${label}: ${fmt(freed)} bound IOASIDs freed at once, all reclaimed (FREE delivered to the IOMMU, acked) in ${fmt(deliverySeconds * 1000)} ms: ${fmt(rate)} IOASIDs/s`,
  );

  // Live state for the standby to replay, then the takeover.
  phase(`${label}: allocating ${fmt(live)} live IOASIDs`);
  let started = 0;
  await Promise.all(
    Array.from({ length: 64 }, async () => {
      while (started < live) {
        started++;
        await c.alloc(core.AllocRequest.fromPartial({ setId }));
      }
    }),
  );
  phase(`${label}: kill -9 of the primary, waiting for the standby`);
  const killedAt = now();
  primary.kill("SIGKILL");
  await standby;
  const listening = now() - killedAt;
  await waitFor(
    async () => {
      try {
        return (await c.getStats({}, { deadlineMs: 500 })).inUse === live;
      } catch {
        return false;
      }
    },
    { timeoutMs: 60_000, intervalMs: 5, what: `${label}: the standby answering with the ${fmt(live)} live IOASIDs` },
  );
  const answered = now() - killedAt;
  log(
    `  ${label}: kill -9 → the standby listening ${fmt(listening)} ms, answering a client given both addresses ${fmt(answered)} ms (lease ${fmt(LEASE_MS)} ms, ${fmt(live)} live IOASIDs replayed)`,
  );
  return { deliverySeconds, rate, listeningMs: listening, takeoverMs: answered };
}

/** Section `failover`. */
export async function failoverBench(ctx) {
  const { quick, log, results, target, startNats, own } = ctx;
  const live = quick ? 2_000 : 20_000;
  const freed = quick ? 200 : 1_000;
  log(`\n[failover] a standby core's takeover after kill -9 of the primary, and FREE delivery, on one nats-server and on a three-server cluster`);
  const nats = await startNats({ auth: false });
  const single = await run(ctx, "one nats-server", nats.url, 1, live, freed);
  const cluster = await startNatsCluster({ size: 3 });
  own("nats cluster", () => cluster.stop());
  const three = await run(ctx, "3-server cluster", cluster.urls, 3, live, freed);
  log(`  cluster / single: delivery ${fmt(three.rate / single.rate, 2)}× the IOASIDs/s, takeover ${fmt(three.takeoverMs / single.takeoverMs, 2)}× the time`);
  const worst = Math.max(single.takeoverMs, three.takeoverMs);
  target("failover.takeover", {
    figure: `${fmt(single.takeoverMs)} ms one server, ${fmt(three.takeoverMs)} ms cluster`,
    floor: `${fmt(LEASE_MS)} ms lease`,
    ratio: `${fmt(worst / LEASE_MS, 2)}× the lease`,
    met: worst <= 2000,
    note: `${fmt(live)} live IOASIDs replayed; delivery ${fmt(single.rate)} vs ${fmt(three.rate)} IOASIDs/s (one server vs cluster)`,
  });
  results.failover = { live, freed, leaseMs: LEASE_MS, single, cluster: three };
}
