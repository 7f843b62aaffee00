// Section `delivery` (DESIGN §9 "ordered delivery"): the real core in this process, four SDK
// subscribers, and the raw NATS floors measured in the same run.
import { bus, events } from "@ioasid/proto";
import { natsConnectOptions } from "@ioasid/security";
import { TokenType } from "@ioasid/ioasid";
import { DeliveryEngine, startSubscriber } from "@ioasid/bus";
import { IoasidCore, OpLog } from "@ioasid/ioasid-core";
import { connect } from "@nats-io/transport-node";
import { envCount, fmt, now, percentile, startProfile } from "./util.mjs";

// ---------------------------------------------------------------------------------------------
// 3. Ordered delivery through the real core (model, operation log in JetStream, delivery engine,
//    in this process) to four SDK subscribers (CPU, DEVICE, IOMMU, LAST) on connections of their
//    own, each holding a reference it releases with its acknowledgement of FREE: one FREE through
//    the four tiers, and FREE of 1,000 IOASIDs at once, each against raw NATS request/reply
//    gathers to responders on the same subscriber connections, in the same run.

// Run four times, A B B A: without authorization (anyone may publish anything, as before issue 14)
// and with a NATS user per role and its permissions (DESIGN §11), each connection as its role. The
// order cancels a drift of the machine's speed over the runs (a busy neighbour starting or ending);
// each configuration's figure is the mean of its two runs, and their ratio is printed (issue 14:
// within 10%).
export async function deliveryBench({ quick, log, results, phase, within, startNats }, secure, run) {
  const rounds = envCount("BENCH_ROUNDS", quick ? 300 : 1500, 0);
  const key = `delivery-${run}`;
  log(
    `\n[delivery${secure ? ", NATS permissions on" : ", no authorization"}, run ${run}] FREE through 4 tiers (CPU, DEVICE, IOMMU, LAST), one SDK subscriber each, releasing references`,
  );
  const nats = await startNats(secure ? { auth: { anonymous: "refuse" } } : { auth: false });
  const as = async (role, instance) => (secure ? natsConnectOptions((await nats.credentials(role, instance)).credential) : {});
  const operator = secure ? { user: nats.operator.user, pass: nats.operator.pass } : {};
  const conns = [];
  try {
    phase(`run ${run}: set-up`);
    const coreNc = await connect({ servers: nats.url, ...(await as("core", "core")) });
    conns.push(coreNc);
    // The floor's raw request/reply runs as the operator (a role may not use other subjects).
    const floorNc = await connect({ servers: nats.url, ...operator });
    conns.push(floorNc);
    const names = ["kvm", "vdcm", "iommu", "vfio"];
    const priorities = [3, 2, 1, 0];
    const opLog = await OpLog.open(coreNc);
    const ioasidCore = new IoasidCore({
      onFatal: (err) => {
        throw err;
      },
    });
    const submittedAt = new Map();
    const doneAt = new Map();
    let timing = true; // per-chain timestamps only in the sequential phase
    const engine = new DeliveryEngine({
      nc: coreNc,
      onAcks: (acks) => ioasidCore.onAcks(acks),
      onMissed: (missed) => ioasidCore.onMissed(missed),
      onChainDone: (seq) => timing && doneAt.set(seq, now()),
    });
    // Instrumentation only: when each chain was handed to the engine.
    const submit = engine.submit.bind(engine);
    engine.submit = (chain) => {
      if (timing) submittedAt.set(chain.seq, now());
      submit(chain);
    };
    await ioasidCore.recover(opLog, engine);
    engine.start();
    for (let i = 0; i < names.length; i++) {
      const name = names[i];
      const nc = await connect({ servers: nats.url, ...(await as(name, "0")) });
      conns.push(nc);
      await startSubscriber({ nc, name, instance: "0", handler: (e) => (e.type === events.EventType.EVENT_TYPE_FREE ? { release: ["ref"] } : undefined) });
      const floorSub = await connect({ servers: nats.url, ...operator });
      conns.push(floorSub);
      floorSub.subscribe(`floor.${name}`, { callback: (_e, m) => m.respond(m.data) });
      await floorSub.flush();
      await ioasidCore.commit({
        kind: "register",
        options: { subscriber: { name, instance: "0" }, priority: priorities[i], scope: { kind: "global" }, events: ["FREE"] },
      });
    }
    await coreNc.flush();
    const set = (await ioasidCore.commit({ kind: "createSet", token: { type: TokenType.MM, value: 1n }, quota: 1024 })).id;
    const hold = (s, ids) =>
      Promise.all(
        ids.flatMap((i) =>
          names.map((name) => ioasidCore.commit({ kind: "get", setId: s, ioasid: i, holder: { role: name, instance: "0", purpose: "ref" }, generation: 0 })),
        ),
      );
    const sample = bus.DeliveryBatch.encode({
      deliveries: [
        {
          registrationId: 1,
          attempt: 1,
          event: {
            seq: 1n,
            type: 2,
            ioasid: 1,
            generation: 1,
            spid: 0,
            setId: 1,
            tokenType: 2,
            token: 1n,
            privateData: Buffer.alloc(0),
            refcount: 4,
            commitTime: new Date(),
          },
        },
      ],
    }).finish();
    const floorOnce = async () => {
      for (const name of names) await floorNc.request(`floor.${name}`, sample, { timeout: 2000 });
    };
    phase(`run ${run}: one FREE at a time`);
    const chainLat = [];
    const floorLat = [];
    for (let r = 0; r < (rounds === 0 ? 0 : rounds + 50); r++) {
      const { ioasid } = await ioasidCore.alloc(set, {});
      await hold(set, [ioasid]);
      const t = now();
      await floorOnce();
      if (r >= 50) floorLat.push(now() - t);
      const seq = ioasidCore.space.stats().lastSeq + 1;
      await ioasidCore.commit({ kind: "free", setId: set, ioasid, generation: 0 });
      await within(engine.idle(), 10_000, `the FREE of IOASID ${ioasid} to pass the 4 tiers`, () => `${r} of ${rounds + 50} sequential FREEs`);
      if (r >= 50) chainLat.push(doneAt.get(seq) - submittedAt.get(seq));
      if (ioasidCore.space.describe(ioasid) !== undefined) throw new Error(`IOASID ${ioasid} not reclaimed after its chain`);
    }
    if (rounds > 0) {
      chainLat.sort((a, b) => a - b);
      floorLat.sort((a, b) => a - b);
      const c50 = percentile(chainLat, 50);
      const f50 = percentile(floorLat, 50);
      log(`  raw 4-tier gather (floor)  p50 ${fmt(f50 * 1000)} µs   p99 ${fmt(percentile(floorLat, 99) * 1000)} µs`);
      log(`  one FREE, 4 tiers, acks    p50 ${fmt(c50 * 1000)} µs   p99 ${fmt(percentile(chainLat, 99) * 1000)} µs   (reclaimed at the last release)`);
      log(`  ratio                      ${fmt(c50 / f50, 2)}×   (target ≤ 1.25×)`);
      results[key] = { floorP50Us: f50 * 1000, chainP50Us: c50 * 1000, ratioP50: c50 / f50 };
    }

    timing = false;
    phase(`run ${run}: 1,000 IOASIDs in flight`);
    // 1,000 IOASIDs in flight: FREE of 1,000 held IOASIDs in one operation (FreeSet).
    const inFlight = 1000;
    const batches = quick ? 5 : 20;
    const bigPayload = Buffer.alloc(sample.length * inFlight, 1);
    let t = now();
    for (let b = 0; b < batches; b++) {
      for (const name of names) await floorNc.request(`floor.${name}`, bigPayload, { timeout: 5000 });
    }
    const floorRate = (batches * inFlight) / ((now() - t) / 1000);
    let elapsed = 0;
    const warmup = 3;
    for (let b = -warmup; b < batches; b++) {
      const s = (await ioasidCore.commit({ kind: "createSet", token: { type: TokenType.MM, value: BigInt(100 + warmup + b) }, quota: inFlight })).id;
      const ids = (await ioasidCore.allocMany(s, inFlight, {})).map((a) => a.ioasid);
      await hold(s, ids);
      t = now();
      await ioasidCore.commit({ kind: "freeSet", setId: s });
      const committed = now();
      await within(engine.idle(), 30_000, `a burst of ${inFlight} FREEs to pass the 4 tiers`, () => `burst ${b + warmup + 1} of ${batches + warmup}`);
      if (b >= 0) elapsed += now() - t;
      if (process.env.BENCH_DEBUG) log(`    commit ${fmt(committed - t, 1)} ms, delivery ${fmt(now() - committed, 1)} ms`);
      if (ioasidCore.space.listSets().some((x) => x.id === s)) throw new Error(`set ${s} not reclaimed`);
    }
    const rate = (batches * inFlight) / (elapsed / 1000);
    log(`  burst: 1,000 freed at once  ${fmt(rate)} FREE events/s through 4 tiers, all reclaimed, over ${batches} bursts after ${warmup} warm-up`);

    // Steady state: sets of 500 freed one after another, keeping at most 1,000 IOASIDs in flight,
    // so the tiers work on different IOASIDs at the same time (pipelining).
    const slice = 500;
    const slices = quick ? 12 : 40;
    const prepared = [];
    for (let k = 0; k < slices; k++) {
      const s = (await ioasidCore.commit({ kind: "createSet", token: { type: TokenType.MM, value: BigInt(10_000 + k) }, quota: slice })).id;
      const ids = (await ioasidCore.allocMany(s, slice, {})).map((a) => a.ioasid);
      await hold(s, ids);
      prepared.push(s);
    }
    const profile = await startProfile("delivery-steady");
    t = now();
    let freed = 0;
    const steadyProgress = () => `${freed} of ${slices} sets of ${slice} freed, ${fmt(freed * slice)} events`;
    for (const s of prepared) {
      await within(engine.runningBelow(inFlight - slice + 1), 30_000, `fewer than ${inFlight - slice + 1} IOASIDs in flight`, steadyProgress);
      await ioasidCore.commit({ kind: "freeSet", setId: s });
      freed++;
    }
    await within(engine.idle(), 30_000, "the last FREEs of the steady state to pass the 4 tiers", steadyProgress);
    const steady = (slices * slice) / ((now() - t) / 1000);
    await profile();
    if (ioasidCore.space.stats().sets !== 1) throw new Error("steady-state sets not all reclaimed");
    log(
      `  ${fmt(inFlight)} IOASIDs in flight       ${fmt(steady)} FREE events/s through 4 tiers, all reclaimed, ${fmt(slices * slice)} events in steady state (target ≥ 50,000)`,
    );
    log(`  floor (4 gathers of 1,000)  ${fmt(floorRate)} events/s   (steady / floor = ${fmt(steady / floorRate, 2)})`);
    log(`  operation log               ${fmt(opLog.messages)} JetStream messages written`);
    results[key] = { ...results[key], secure, burstEventsPerSec: rate, eventsPerSec: steady, floorEventsPerSec: floorRate };
    await engine.stop();
    await opLog.drain();
  } finally {
    for (const nc of conns) await nc.close();
    await nats.stop();
  }
}

/**
 * Section `delivery`: four runs, A B B A — without authorization and with NATS permissions (issue
 * 14) — then their means and ratio. The targets are judged on the runs with permissions on, as the
 * stack runs (DESIGN §11).
 */
export async function deliverySection(ctx) {
  const { results, target } = ctx;
  const order = [false, true, true, false];
  for (let i = 0; i < order.length; i++) await deliveryBench(ctx, order[i], i + 1);
  summarizeDelivery(ctx, order.length);
  const on = results.deliverySecure;
  if (on?.chainP50Us !== undefined)
    target("delivery.chain", {
      figure: `${fmt(on.chainP50Us)} µs p50`,
      floor: `${fmt(on.floorP50Us)} µs (raw gather)`,
      ratio: `${fmt(on.chainP50Us / on.floorP50Us, 2)}× floor`,
      met: on.chainP50Us / on.floorP50Us <= 1.25,
      note: "NATS permissions on, mean of 2 runs",
    });
  if (on?.eventsPerSec !== undefined) {
    target("delivery.inflight", {
      figure: `${fmt(on.eventsPerSec)} events/s`,
      floor: `${fmt(on.floorEventsPerSec)} events/s (batched)`,
      ratio: `${fmt(on.eventsPerSec / 50_000, 2)}× target`,
      met: on.eventsPerSec >= 50_000,
    });
    target("delivery.inflightFloor", {
      figure: `${fmt(on.eventsPerSec)} events/s`,
      floor: `${fmt(on.floorEventsPerSec)} events/s (batched)`,
      ratio: `${fmt(on.eventsPerSec / on.floorEventsPerSec, 2)}× floor`,
      met: on.eventsPerSec / on.floorEventsPerSec >= 0.25,
    });
  }
}

function summarizeDelivery({ log, results }, runs) {
  const all = Array.from({ length: runs }, (_, i) => results[`delivery-${i + 1}`]).filter((r) => r !== undefined);
  const meanOf = (secure) => {
    const rs = all.filter((r) => r.secure === secure);
    const out = {};
    for (const k of Object.keys(rs[0] ?? {})) if (typeof rs[0][k] === "number") out[k] = rs.reduce((a, r) => a + r[k], 0) / rs.length;
    return out;
  };
  results.delivery = meanOf(false);
  results.deliverySecure = meanOf(true);
  const off = results.delivery;
  const on = results.deliverySecure;
  if (off.eventsPerSec === undefined || on.eventsPerSec === undefined) return;
  const pct = (x) => `${x >= 1 ? "+" : ""}${fmt((x - 1) * 100, 1)}%`;
  log(`\n[delivery] NATS permissions on vs off, mean of runs ${all.map((r, i) => `${i + 1}:${r.secure ? "on" : "off"}`).join(" ")}`);
  // BENCH_ROUNDS=0 skips the one-at-a-time FREEs: no sequential figures to compare then.
  const sequential = on.chainP50Us !== undefined && off.chainP50Us !== undefined;
  if (sequential) {
    log(`  one FREE, 4 tiers, p50   ${fmt(on.chainP50Us)} vs ${fmt(off.chainP50Us)} µs (${pct(on.chainP50Us / off.chainP50Us)})   (target: within 10%)`);
    log(
      `  its floor (no permissions on either: the operator's raw gather) ${fmt(on.floorP50Us)} vs ${fmt(off.floorP50Us)} µs (${pct(on.floorP50Us / off.floorP50Us)}: the machine's drift)`,
    );
  }
  log(
    `  steady, 1,000 in flight  ${fmt(on.eventsPerSec)} vs ${fmt(off.eventsPerSec)} events/s (${pct(on.eventsPerSec / off.eventsPerSec)})   (target: within 10%)`,
  );
  results.deliveryPermissionsRatio = { ...(sequential ? { chainP50: on.chainP50Us / off.chainP50Us } : {}), eventsPerSec: on.eventsPerSec / off.eventsPerSec };
  results.deliveryRuns = all;
  for (let i = 1; i <= runs; i++) delete results[`delivery-${i}`];
}
