// Section `scale` (DESIGN §9 "cost flat in live state"; issue 15 item 2): the VMM path — Alloc
// (VFIO → core), Bind (VFIO → IOMMU; KVM from the BIND event), Program (VDCM WriteWqPasid) — at
// growing numbers of live PASIDs on one stack, in one run: the live state grows between the points
// by preparing guests of 64 bound and programmed PASIDs (as the crash section does).
import { fileURLToPath } from "node:url";
import { createClient } from "@ioasid/grpc-kit";
import { testing, vfio } from "@ioasid/proto";
import { describeRetries, guestFactory, wholeStack } from "./guests.mjs";
import { fmt, median, now, percentile } from "./util.mjs";

/** The live-PASID points of the curve: BENCH_SCALE_POINTS, else 1k, 16k, 64k (quick: 1k, 4k). */
function points(quick) {
  const given = process.env.BENCH_SCALE_POINTS;
  if (given !== undefined) return given.split(",").map((x) => Number(x.trim()));
  return quick ? [1024, 4096] : [1024, 16_384, 65_536];
}

/** Section `scale`: Alloc+Bind+Program p50 at each point, the curve, and last / first. */
export async function scaleBench(ctx) {
  const { quick, log, results, target, phase } = ctx;
  const at = points(quick);
  const samples = quick ? 100 : 300;
  const perGuest = 64;
  log(
    `\n[scale] the whole stack as processes; Alloc+Bind+Program (VFIO AllocPasid, BindGuestPasid, VDCM WriteWqPasid) p50 over ${samples} sequential PASIDs at ${at.map((n) => fmt(n)).join(", ")} live PASIDs`,
  );
  const { c } = await wholeStack(ctx, "scale");
  // A bare gRPC echo call timed beside each sample: the machine's speed at each point (it is shared,
  // and the load drifts over a run this long), so that growth with live state can be told from drift.
  const echoProc = await ctx.startService({ name: "echo", entry: fileURLToPath(new URL("./echo-server.mjs", import.meta.url)) });
  const echo = createClient(testing.EchoServiceClient, echoProc.address);
  ctx.own("echo client", () => echo.close());
  const echoReq = { payload: Buffer.alloc(8) };
  const guests = guestFactory(ctx, c);
  let filled = 0;
  const curve = [];
  for (const point of at) {
    const need = Math.ceil((point - filled) / perGuest);
    if (need > 0) {
      const grown = await guests.prepareMany(need, perGuest, { log, every: 250, label: ` (growing to ${fmt(point)} live)` });
      filled += need * perGuest;
      log(
        `  grew to ${fmt(filled)} live PASIDs in ${fmt(grown.seconds, 1)} s (${fmt((need * perGuest) / grown.seconds)} PASIDs/s); preparation calls retried so far: ${describeRetries(guests.stats)}`,
      );
    }
    const live = (await c.core.getStats({})).inUse;
    // A probe guest of its own at each point: its PASIDs, bound and programmed one after another.
    const lat = [];
    phase(`Alloc+Bind+Program at ${fmt(point)} live`, () => `${lat.length} of ${samples} samples`);
    const probe = await guests.empty(samples + 8, samples);
    const device = { ref: { $case: "mdevUuid", value: probe.mdev } };
    const parts = { alloc: [], bind: [], program: [] };
    const echoLat = [];
    for (let i = 0; i < samples; i++) {
      const e = now();
      await echo.echo(echoReq);
      echoLat.push(now() - e);
      const t = now();
      const a = await c.vfio.allocPasid({ containerId: probe.containerId });
      const t1 = now();
      await c.vfio.bindGuestPasid(
        vfio.BindGuestPasidRequest.fromPartial({
          containerId: probe.containerId,
          device,
          hpasid: a.hpasid,
          generation: a.generation,
          gpasid: i + 1,
          guestPgtable: 0x1000n,
        }),
      );
      const t2 = now();
      await c.vdcm.writeWqPasid({ mdevUuid: probe.mdev, virtualWq: i, gpasid: i + 1 });
      const t3 = now();
      lat.push(t3 - t);
      parts.alloc.push(t1 - t);
      parts.bind.push(t2 - t1);
      parts.program.push(t3 - t2);
    }
    lat.sort((a, b) => a - b);
    const p50 = percentile(lat, 50);
    const partsP50Ms = { alloc: median(parts.alloc), bind: median(parts.bind), program: median(parts.program) };
    const echoP50Ms = median(echoLat);
    curve.push({ livePasids: point, liveIoasids: live, p50Ms: p50, p90Ms: percentile(lat, 90), p99Ms: percentile(lat, 99), partsP50Ms, echoP50Ms });
    log(
      `  ${fmt(point).padStart(7)} live PASIDs (${fmt(live)} IOASIDs in use)   p50 ${fmt(p50 * 1000)} µs   p90 ${fmt(percentile(lat, 90) * 1000)} µs   p99 ${fmt(percentile(lat, 99) * 1000)} µs   (p50 of each: AllocPasid ${fmt(partsP50Ms.alloc * 1000)}, BindGuestPasid ${fmt(partsP50Ms.bind * 1000)}, WriteWqPasid ${fmt(partsP50Ms.program * 1000)} µs; echo ${fmt(echoP50Ms * 1000)} µs, ${fmt(p50 / echoP50Ms, 1)} echo calls' worth)`,
    );
  }
  const first = curve[0];
  const last = curve.at(-1);
  const ratio = last.p50Ms / first.p50Ms;
  log(`  curve ${curve.map((p) => `${fmt(p.livePasids / 1024)}k: ${fmt(p.p50Ms * 1000)} µs`).join(" → ")}`);
  const drift = last.echoP50Ms / first.echoP50Ms;
  log(
    `  ratio ${fmt(last.livePasids / 1024)}k / ${fmt(first.livePasids / 1024)}k live: ${fmt(ratio, 2)}×   (target ≤ 1.2× from 1k to 64k); the echo floor moved ${fmt(drift, 2)}× meanwhile, so in echo calls' worth ${fmt(ratio / drift, 2)}×`,
  );
  const full = first.livePasids <= 1024 && last.livePasids >= 65_536;
  target("scale.flat", {
    figure: `${fmt(last.p50Ms * 1000)} µs p50 at ${fmt(last.livePasids / 1024)}k`,
    floor: `${fmt(first.p50Ms * 1000)} µs p50 at ${fmt(first.livePasids / 1024)}k`,
    ratio: `${fmt(ratio, 2)}× floor`,
    met: full && ratio <= 1.2,
    note: `${full ? "" : `measured only up to ${fmt(last.livePasids)} live (quick or BENCH_SCALE_POINTS): not the target's 64k; `}echo floor drift ${fmt(drift, 2)}×, in echo calls' worth ${fmt(ratio / drift, 2)}×`,
  });
  results.scale = { samples, curve, ratio, echoDrift: drift, ratioInEchoCalls: ratio / drift, preparationRetries: guests.stats.retries };
}
