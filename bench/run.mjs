#!/usr/bin/env node
// Kept as one script (~880 lines): one section per part (--only=allocator,grpc,delivery,restart,
// crash,faults), each measuring its floor and its figure in the same run; they share the stack
// set-up, the timing helpers and the results file.
// npm run bench: measures the targets of DESIGN §9 that exist so far, each against a floor
// measured in the same run, and prints figures and ratios (no pass/fail: targets are printed
// beside the figures). Results also go to bench/results/latest.json.
//
//   node --expose-gc bench/run.mjs [--quick] [--only=allocator,grpc,delivery,restart,crash,faults]
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { IoasidSpace, IdBitmap, TokenType } from "@ioasid/ioasid";
import { createClient } from "@ioasid/grpc-kit";
import { bus, core, events, iommu, kvm, testing, vdcm, vfio } from "@ioasid/proto";
import { addressesOf, answerFaultGroup, connectStack, readState, stackDown, stackUp } from "@ioasid/cli";
import { startNats, startService } from "@ioasid/testkit";
import { natsConnectOptions, readInstanceCredentials } from "@ioasid/security";
import { DeliveryEngine, readHistory, startSubscriber, stepLabel } from "@ioasid/bus";
import { IoasidCore, OpLog } from "@ioasid/ioasid-core";
import { connect } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { snapshotRestartBench } from "./snapshot-restart.mjs";

const quick = process.argv.includes("--quick");
/** `--only=allocator,delivery` runs a subset: allocator, grpc, delivery, restart, crash, faults. */
const only = new Set((process.argv.find((a) => a.startsWith("--only="))?.slice(7) ?? "allocator,grpc,delivery,restart,crash,faults").split(","));
const results = {};
const log = (line) => process.stdout.write(`${line}\n`);
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms

function gc() {
  if (typeof globalThis.gc === "function") for (let i = 0; i < 3; i++) globalThis.gc();
}
function memory() {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers + m.external;
}
/** Deterministic PRNG (mulberry32), so runs are comparable. */
function prng(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
/**
 * With BENCH_PROFILE=1, records a CPU profile of one phase to bench/results/<name>.cpuprofile
 * (open it in Chrome DevTools); otherwise does nothing. Returns the function that stops it.
 */
async function startProfile(name) {
  if (!process.env.BENCH_PROFILE) return async () => undefined;
  const { Session } = await import("node:inspector/promises");
  const session = new Session();
  session.connect();
  await session.post("Profiler.enable");
  await session.post("Profiler.start");
  return async () => {
    const { profile } = await session.post("Profiler.stop");
    mkdirSync(fileURLToPath(new URL("./results/", import.meta.url)), { recursive: true });
    writeFileSync(fileURLToPath(new URL(`./results/${name}.cpuprofile`, import.meta.url)), JSON.stringify(profile));
    session.disconnect();
  };
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
}
const fmt = (n, d = 0) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d });

// ---------------------------------------------------------------------------------------------
// 1. Allocator in process: alloc+free pairs/s at 50% occupancy of the 2^20 namespace.

function allocatorBench() {
  const capacity = 1 << 20;
  const pairs = quick ? 500_000 : 3_000_000;
  log(`\n[allocator] 2^20 namespace at 50% occupancy, ${fmt(pairs)} alloc+free pairs`);

  // Floor: the bare occupancy bitmap (no sets, refs, generations, events) under the same pattern.
  const floor = (() => {
    const rnd = prng(1);
    const bm = new IdBitmap(capacity);
    bm.take(0);
    const live = [];
    for (let i = 1; i < capacity; i++) bm.take(i);
    for (let i = 1; i < capacity; i++)
      if (rnd() < 0.5) bm.release(i);
      else live.push(i);
    const t0 = now();
    for (let i = 0; i < pairs; i++) {
      const k = Math.floor(rnd() * live.length);
      bm.release(live[k]);
      const id = bm.findFree(1, capacity - 1);
      bm.take(id);
      live[k] = id;
    }
    return pairs / ((now() - t0) / 1000);
  })();

  gc();
  const before = memory();
  let eventCount = 0;
  const space = new IoasidSpace({ capacity, onEvent: () => eventCount++ });
  const set = space.createSet({ token: { type: TokenType.MM, value: 1n }, quota: 0 });
  const rnd = prng(1);
  const live = [];
  for (let done = 0; done < capacity - 1;) {
    const n = Math.min(65_536, capacity - 1 - done);
    for (const a of space.allocMany(set.id, n)) live.push(a.ioasid);
    done += n;
  }
  // Free a random half: the remaining live IDs are spread over the whole namespace.
  const kept = [];
  for (const id of live)
    if (rnd() < 0.5) space.free(set.id, id);
    else kept.push(id);
  gc();
  const liveCount = kept.length;
  const bytesPerIoasid = (memory() - before) / liveCount;

  const t0 = now();
  for (let i = 0; i < pairs; i++) {
    const k = Math.floor(rnd() * kept.length);
    space.free(set.id, kept[k]);
    kept[k] = space.alloc(set.id).ioasid;
  }
  const rate = pairs / ((now() - t0) / 1000);
  log(`  IoasidSpace      ${fmt(rate)} pairs/s   (target ≥ 2,000,000; ${fmt(rate / 2e6, 2)}× the target)`);
  log(`  floor (bitmap)   ${fmt(floor)} pairs/s   (model / floor = ${fmt(rate / floor, 2)})`);
  log(`  memory           ${fmt(bytesPerIoasid, 1)} B per live IOASID with ${fmt(liveCount)} live (target ≤ 200)`);
  log(`  events emitted   ${fmt(eventCount)}`);
  results.allocator = { pairsPerSec: rate, floorPairsPerSec: floor, ratioToFloor: rate / floor, bytesPerIoasid, live: liveCount };
}

// ---------------------------------------------------------------------------------------------
// 2. ioasid-core over gRPC: sequential Alloc vs a bare gRPC echo call; batch allocation rate.

async function grpcBench() {
  const calls = quick ? 1000 : 5000;
  log(`\n[grpc] ioasid-core (operation log in JetStream) and a bare echo server as processes on loopback, ${fmt(calls)} sequential calls each`);
  const entry = (p) => fileURLToPath(new URL(p, import.meta.url));
  const nats = await startNats();
  const [coreProc, echoProc] = await Promise.all([
    startService({
      name: "ioasid-core",
      entry: entry("../services/ioasid-core/dist/main.js"),
      env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url },
    }),
    startService({ name: "echo", entry: entry("./echo-server.mjs") }),
  ]);
  const c = createClient(core.CoreServiceService, coreProc.address);
  const echo = createClient(testing.EchoServiceClient, echoProc.address);
  try {
    const { set } = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 1n, quota: 0 }));
    const allocReq = core.AllocRequest.fromPartial({ setId: set.setId });
    const echoReq = { payload: Buffer.alloc(8) };
    // Warm both connections and JITs, then interleave rounds so drift hits both alike.
    for (let i = 0; i < 200; i++) {
      await echo.echo(echoReq);
      await c.alloc(allocReq);
    }
    const echoLat = [];
    const allocLat = [];
    const rounds = 5;
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < calls / rounds; i++) {
        const t = now();
        await echo.echo(echoReq);
        echoLat.push(now() - t);
      }
      for (let i = 0; i < calls / rounds; i++) {
        const t = now();
        await c.alloc(allocReq);
        allocLat.push(now() - t);
      }
    }
    echoLat.sort((a, b) => a - b);
    allocLat.sort((a, b) => a - b);
    const e50 = percentile(echoLat, 50);
    const a50 = percentile(allocLat, 50);
    const mean = (xs) => xs.reduce((s, x) => s + x, 0) / xs.length;
    log(`  echo (floor)     p50 ${fmt(e50 * 1000)} µs   mean ${fmt(mean(echoLat) * 1000)} µs   p99 ${fmt(percentile(echoLat, 99) * 1000)} µs`);
    log(`  Alloc            p50 ${fmt(a50 * 1000)} µs   mean ${fmt(mean(allocLat) * 1000)} µs   p99 ${fmt(percentile(allocLat, 99) * 1000)} µs`);
    log(`  ratio Alloc/echo p50 ${fmt(a50 / e50, 2)}×   mean ${fmt(mean(allocLat) / mean(echoLat), 2)}×   (target ≤ 1.5×)`);
    // A durable Alloc is answered after its JetStream append is acknowledged: the second floor.
    const nc = await connect({ servers: nats.url });
    const js = jetstream(nc);
    await (await jetstreamManager(nc)).streams.add({ name: "BENCH_FLOOR", subjects: ["bench.floor"], storage: "file" });
    for (let i = 0; i < 200; i++) await js.publish("bench.floor", "{}");
    const jsLat = [];
    for (let i = 0; i < calls; i++) {
      const t = now();
      await js.publish("bench.floor", '{"t":"alloc","s":1,"ts":0}');
      jsLat.push(now() - t);
    }
    await nc.close();
    jsLat.sort((a, b) => a - b);
    const j50 = percentile(jsLat, 50);
    log(`  JetStream publish ack (floor) p50 ${fmt(j50 * 1000)} µs`);
    log(`  ratio Alloc/(echo + JetStream ack) p50 ${fmt(a50 / (e50 + j50), 2)}×   (what the core adds over its two floors)`);

    await c.freeSet({ setId: set.setId });
    const { set: batchSet } = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 2n, quota: 0 }));
    const batches = quick ? 4 : 12;
    const t0 = now();
    let n = 0;
    for (let i = 0; i < batches; i++) {
      const r = await c.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: batchSet.setId, count: 65_536 }));
      n += r.allocations.length;
    }
    const batchRate = n / ((now() - t0) / 1000);
    log(`  BatchAlloc       ${fmt(batchRate)} IOASIDs/s over ${fmt(n)} (65,536 per call; target ≥ 100,000)`);
    results.grpc = {
      echoP50Us: e50 * 1000,
      jetstreamAckP50Us: j50 * 1000,
      allocP50Us: a50 * 1000,
      ratioP50: a50 / e50,
      ratioMean: mean(allocLat) / mean(echoLat),
      batchAllocPerSec: batchRate,
    };
  } finally {
    c.close();
    echo.close();
    await Promise.all([coreProc.stop(), echoProc.stop()]);
    await nats.stop();
  }
}

// The cost of security on the gRPC path (issue 14: within 10%): sequential durable Allocs against
// two cores at once, one insecure (plaintext, NATS without authorization) and one secure (mTLS with
// the core authorizing each call by the caller's certificate, NATS users and permissions), in
// alternating rounds so that drift hits both alike.
async function grpcSecurityBench() {
  const calls = quick ? 1000 : 4000;
  log(`\n[grpc, mTLS + NATS permissions vs none] durable Alloc, ${fmt(calls)} sequential calls each, in alternating rounds`);
  const entry = (p) => fileURLToPath(new URL(p, import.meta.url));
  const [plainNats, secureNats] = await Promise.all([startNats({ auth: false }), startNats({ tls: true, auth: { anonymous: "refuse" } })]);
  const procs = [];
  const clients = [];
  try {
    const coreCreds = await secureNats.credentials("core", "core");
    const vfioCreds = await secureNats.credentials("vfio", "vfio-1");
    const [plainCore, secureCore, plainEcho, secureEcho] = await Promise.all([
      startService({
        name: "ioasid-core",
        entry: entry("../services/ioasid-core/dist/main.js"),
        env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: plainNats.url },
      }),
      startService({
        name: "ioasid-core",
        entry: entry("../services/ioasid-core/dist/main.js"),
        env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: secureNats.url, ...coreCreds.env },
      }),
      startService({ name: "echo", entry: entry("./echo-server.mjs") }),
      // The echo server with the core's certificate: the floor of one mTLS call.
      startService({ name: "echo", entry: entry("./echo-server.mjs"), env: coreCreds.env }),
    ]);
    procs.push(plainCore, secureCore, plainEcho, secureEcho);
    if (!secureCore.logs().includes('"tls":"mtls"')) throw new Error("the secure core does not serve mTLS");
    const vfioTls = readInstanceCredentials(vfioCreds.env.IOASID_CREDENTIALS_DIR);
    const plain = createClient(core.CoreServiceService, plainCore.address);
    const secure = createClient(core.CoreServiceService, secureCore.address, { tls: vfioTls, serverRole: "core" });
    const echoPlain = createClient(testing.EchoServiceClient, plainEcho.address);
    const echoSecure = createClient(testing.EchoServiceClient, secureEcho.address, { tls: vfioTls, serverRole: "core" });
    clients.push(plain, secure, echoPlain, echoSecure);
    const setOf = async (c) =>
      (await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 1n, quota: 0 }))).set.setId;
    const allocOf = async (c) => {
      const req = core.AllocRequest.fromPartial({ setId: await setOf(c) });
      return () => c.alloc(req);
    };
    const echoOf = (c) => {
      const req = { payload: Buffer.alloc(8) };
      return () => c.echo(req);
    };
    // Each configuration's calls: its echo (the floor), then its Alloc.
    const target = [
      { name: "none", calls: [echoOf(echoPlain), await allocOf(plain)], lat: [[], []] },
      { name: "mTLS + permissions", calls: [echoOf(echoSecure), await allocOf(secure)], lat: [[], []] },
    ];
    for (let i = 0; i < 200; i++) for (const t of target) for (const call of t.calls) await call();
    const rounds = 8;
    for (let r = 0; r < rounds; r++) {
      // A B B A B A A B …: each gets the first slot of a pair half the time.
      const pair = r % 2 === 0 ? target : [...target].reverse();
      for (const t of pair) {
        for (let k = 0; k < t.calls.length; k++) {
          for (let i = 0; i < calls / rounds; i++) {
            const t0 = now();
            await t.calls[k]();
            t.lat[k].push(now() - t0);
          }
        }
      }
    }
    const p50 = (xs) =>
      percentile(
        [...xs].sort((a, b) => a - b),
        50,
      ) * 1000;
    const p99 = (xs) =>
      percentile(
        [...xs].sort((a, b) => a - b),
        99,
      ) * 1000;
    for (const t of target) {
      log(`  ${t.name.padEnd(20)} echo p50 ${fmt(p50(t.lat[0]))} µs   Alloc p50 ${fmt(p50(t.lat[1]))} µs   p99 ${fmt(p99(t.lat[1]))} µs`);
    }
    const [offEcho, onEcho] = target.map((t) => p50(t.lat[0]));
    const [off, on] = target.map((t) => p50(t.lat[1]));
    const pct = (x) => `${x >= 1 ? "+" : ""}${fmt((x - 1) * 100, 1)}%`;
    log(`  Alloc secure / insecure  ${fmt(on / off, 2)}× (${pct(on / off)})   (target: within 10%)`);
    log(`  of which TLS itself      echo ${fmt(onEcho)} vs ${fmt(offEcho)} µs: +${fmt(onEcho - offEcho)} µs per call; Alloc +${fmt(on - off)} µs`);
    results.grpcSecurity = { plainEchoP50Us: offEcho, secureEchoP50Us: onEcho, plainAllocP50Us: off, secureAllocP50Us: on, ratioP50: on / off };
  } finally {
    for (const c of clients) c.close();
    await Promise.all(procs.map((p) => p.stop()));
    await Promise.all([plainNats.stop(), secureNats.stop()]);
  }
}

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
async function deliveryBench(secure, run) {
  const rounds = process.env.BENCH_ROUNDS === undefined ? (quick ? 300 : 1500) : Number(process.env.BENCH_ROUNDS);
  const key = `delivery-${run}`;
  log(
    `\n[delivery${secure ? ", NATS permissions on" : ", no authorization"}, run ${run}] FREE through 4 tiers (CPU, DEVICE, IOMMU, LAST), one SDK subscriber each, releasing references`,
  );
  const nats = await startNats(secure ? { auth: { anonymous: "refuse" } } : { auth: false });
  const as = async (role, instance) => (secure ? natsConnectOptions((await nats.credentials(role, instance)).credential) : {});
  const operator = secure ? { user: nats.operator.user, pass: nats.operator.pass } : {};
  const conns = [];
  try {
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
      await engine.idle();
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
      log(`  ratio                      ${fmt(c50 / f50, 2)}×   (target ≤ 1.5×)`);
      results[key] = { floorP50Us: f50 * 1000, chainP50Us: c50 * 1000, ratioP50: c50 / f50 };
    }

    timing = false;
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
      await engine.idle();
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
    for (const s of prepared) {
      await engine.runningBelow(inFlight - slice + 1);
      await ioasidCore.commit({ kind: "freeSet", setId: s });
    }
    await engine.idle();
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

// ---------------------------------------------------------------------------------------------
// 4. Core restart with many live IOASIDs: kill -9, restart, time until it serves again.

async function restartBench() {
  const live = quick ? 20_000 : 100_000;
  log(`\n[restart] ioasid-core with ${fmt(live)} live IOASIDs allocated one Alloc at a time (64 in flight), then SIGKILL and restart`);
  const nats = await startNats();
  const entry = fileURLToPath(new URL("../services/ioasid-core/dist/main.js", import.meta.url));
  const env = { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url };
  try {
    let proc = await startService({ name: "ioasid-core", entry, env });
    let c = createClient(core.CoreServiceService, proc.address);
    const { set } = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 9n, quota: 0 }));
    const req = core.AllocRequest.fromPartial({ setId: set.setId });
    let started = 0;
    let finished = 0;
    const t0 = now();
    await Promise.all(
      Array.from({ length: 64 }, async () => {
        while (started < live) {
          started++;
          await c.alloc(req);
          if (++finished % 20_000 === 0) process.stdout.write(`  … ${fmt(finished)} allocated\n`);
        }
      }),
    );
    const allocRate = live / ((now() - t0) / 1000);
    log(`  durable Alloc, 64 in flight: ${fmt(allocRate)} calls/s`);
    c.close();
    proc.kill("SIGKILL");
    await proc.exited;
    const t1 = now();
    proc = await startService({ name: "ioasid-core", entry, env, readyTimeoutMs: 60_000 });
    c = createClient(core.CoreServiceService, proc.address);
    const stats = await c.getStats({});
    const serving = now() - t1;
    const recovered = /"replayed":(\d+),"startupMs":(\d+)/.exec(proc.logs());
    log(
      `  serving again after ${fmt(serving)} ms (spawn to first answer; replay of ${recovered?.[1] ?? "?"} operations took ${recovered?.[2] ?? "?"} ms inside) with ${fmt(stats.inUse)} live IOASIDs (target ≤ 2,000 ms)`,
    );
    results.restart = { live: stats.inUse, servingMs: serving, replayed: Number(recovered?.[1]), replayMs: Number(recovered?.[2]), allocRate };
    c.close();
    await proc.stop();
  } finally {
    await nats.stop();
  }
}

// ---------------------------------------------------------------------------------------------
// 5. Crashed guests: every IOASID of a VM bound (IOMMU, KVM) and programmed (VDCM) when its VMM
//    goes away; time from the session's end to the set's destruction (its last IOASID reclaimed),
//    taken from the core's own event stream (SET_FREE commit time).

async function crashBench() {
  const runs = quick ? 3 : 10;
  const perGuest = 64;
  const crowd = process.env.BENCH_CROWD === undefined ? (quick ? 100 : 1000) : Number(process.env.BENCH_CROWD);
  log(`\n[crash] the whole stack as processes; ${perGuest} PASIDs per guest, each bound (IOMMU, KVM) and programmed (VDCM)`);
  const dir = mkdtempSync(join(tmpdir(), "ioasid-bench-"));
  const basePort = 30_000 + Math.floor(Math.random() * 20_000);
  // BENCH_SERVICE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles every service.
  const nodeArgs = (process.env.BENCH_SERVICE_NODE_ARGS ?? "").split(" ").filter(Boolean);
  await stackUp({ dir, basePort, natsPort: basePort + 10, readyTimeoutMs: 30_000, nodeArgs });
  const c = await connectStack(addressesOf(readState(dir)));
  try {
    const devices = Math.ceil(((crowd + runs) * perGuest) / 1024);
    for (let d = 0; d < devices; d++) {
      const wqs = Array.from({ length: 1024 }, (_, wqId) => ({ wqId, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 1 }));
      await c.vdcm.registerDevice(vdcm.RegisterDeviceRequest.fromPartial({ deviceId: `dsa${d}`, maxPasidEntries: 1024, wqs }));
      await c.iommu.registerDevice(
        iommu.RegisterDeviceRequest.fromPartial({
          deviceId: `dsa${d}`,
          maxPasids: 1 << 20,
          priCapable: true,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
          iommuGroup: d + 1,
        }),
      );
    }
    let nextWq = 0;
    let token = 1n;
    /** A guest with `perGuest` PASIDs bound and programmed, and its VMM session open. */
    const guest = async () => {
      const slot = nextWq;
      nextWq += perGuest;
      const device = `dsa${Math.floor(slot / 1024)}`;
      const wq0 = slot % 1024;
      const mm = token++;
      const name = `g${mm}`;
      const vm = (await c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: mm, vcpuCount: 1, vmName: name }))).vm;
      // 1 MiB of host memory each (they map none): a thousand guests fit VFIO's default 64 GiB pool.
      const opened = await c.vfio.openContainer(
        vfio.OpenContainerRequest.fromPartial({ mmToken: mm, quota: perGuest, vmName: name, guestMemorySize: 0x10_0000n }),
      );
      const session = new AbortController();
      const attached = new Promise((resolve) => {
        void (async () => {
          try {
            for await (const m of c.vfio.session({ containerId: opened.containerId }, { signal: session.signal })) if (m.event?.$case === "attached") resolve();
          } catch {
            // ended by the benchmark
          }
        })();
      });
      await attached;
      const mdev = `mdev-${name}`;
      await c.vdcm.createMdev(
        vdcm.CreateMdevRequest.fromPartial({ parentDeviceId: device, mdevUuid: mdev, wqIds: Array.from({ length: perGuest }, (_, i) => wq0 + i) }),
      );
      await c.vfio.assignDevice(vfio.AssignDeviceRequest.fromPartial({ containerId: opened.containerId, device: { ref: { $case: "mdevUuid", value: mdev } } }));
      await Promise.all(
        Array.from({ length: perGuest }, async (_, i) => {
          const a = await c.vfio.allocPasid({ containerId: opened.containerId });
          await c.vfio.bindGuestPasid(
            vfio.BindGuestPasidRequest.fromPartial({
              containerId: opened.containerId,
              device: { ref: { $case: "mdevUuid", value: mdev } },
              hpasid: a.hpasid,
              generation: a.generation,
              gpasid: i + 1,
              guestPgtable: 0x1000n,
            }),
          );
        }),
      );
      // KVM's table is filled by the BIND events; wait for it before the guest programs its WQs.
      for (;;) {
        const t = (await c.kvm.queryState({ vmId: vm.vmId })).vms[0]?.translations.length ?? 0;
        if (t === perGuest) break;
        await new Promise((r) => setTimeout(r, 5));
      }
      await Promise.all(Array.from({ length: perGuest }, (_, i) => c.vdcm.writeWqPasid({ mdevUuid: mdev, virtualWq: i, gpasid: i + 1 })));
      return { setId: opened.setId, session, vmId: vm.vmId, mdev };
    };
    /**
     * Starts watching the core's events from now on (the position is taken before returning, so
     * nothing committed after the call is missed), and resolves with the commit times of SET_FREE
     * for the given sets.
     */
    const setFrees = async (sets) => {
      const pending = new Set(sets);
      const times = new Map();
      const from = (await c.core.getStats({})).lastSeq + 1n;
      const ac = new AbortController();
      // Wrapped in an object: an async function returning the promise itself would wait for it.
      return {
        done: (async () => {
          for await (const m of c.core.watchEvents({ fromSeq: from }, { signal: ac.signal, deadlineMs: 600_000 })) {
            const e = m.event;
            if (e.type === events.EventType.EVENT_TYPE_SET_FREE && pending.delete(e.setId)) times.set(e.setId, e.commitTime.getTime());
            if (pending.size === 0) break;
          }
          ac.abort();
          return times;
        })(),
      };
    };

    const single = [];
    for (let r = 0; r < runs; r++) {
      const g = await guest();
      const watching = await setFrees([g.setId]);
      const t0 = Date.now();
      g.session.abort();
      const times = await watching.done;
      single.push(times.get(g.setId) - t0);
      await c.kvm.destroyVm({ vmId: g.vmId }).catch(() => undefined);
    }
    single.sort((a, b) => a - b);
    log(
      `  one crashed guest, ${perGuest} PASIDs: all reclaimed in p50 ${fmt(percentile(single, 50))} ms (min ${fmt(single[0])}, max ${fmt(single.at(-1))}, ${runs} runs; target ≤ 10 ms p50)`,
    );

    log(`  preparing ${fmt(crowd)} guests × ${perGuest} PASIDs …`);
    const t = now();
    const guests = [];
    for (let i = 0; i < crowd; i += 10) {
      guests.push(...(await Promise.all(Array.from({ length: Math.min(10, crowd - i) }, () => guest()))));
      if ((i + 10) % 100 === 0) process.stdout.write(`  … ${fmt(i + 10)} guests ready (${fmt((now() - t) / 1000, 1)} s)\n`);
    }
    const watching = await setFrees(guests.map((g) => g.setId));
    const t0 = Date.now();
    for (const g of guests) g.session.abort();
    const times = await watching.done;
    const all = Math.max(...times.values()) - t0;
    if (process.env.BENCH_DEBUG) {
      // Where the time went: first and last record of each step, ms after the sessions ended.
      const h = await readHistory(c.nc, { sinceMs: t0 - 5 });
      const groups = new Map();
      for (const r of h) {
        const k = `${r.role}:${stepLabel(r)}${r.action.$case === "ioasidPut" ? `:${r.action.value.holder?.role}` : ""}`;
        const g = groups.get(k) ?? { n: 0, first: Infinity, last: 0 };
        g.n++;
        g.first = Math.min(g.first, r.ts - t0);
        g.last = Math.max(g.last, r.ts - t0);
        groups.set(k, g);
      }
      for (const [k, g] of [...groups].sort((a, b) => a[1].first - b[1].first))
        log(`    ${k.padEnd(36)} ${String(g.n).padStart(6)} ${fmt(g.first).padStart(7)} ${fmt(g.last).padStart(7)} ms`);
    }
    log(
      `  ${fmt(crowd)} guests × ${perGuest} PASIDs (${fmt(crowd * perGuest)} IOASIDs) crashing together: all reclaimed in ${fmt(all)} ms (target ≤ 3,000 ms for 1,000 guests)`,
    );
    results.crash = { perGuest, singleP50Ms: percentile(single, 50), single, crowd, crowdAllReclaimedMs: all };
  } finally {
    await c.close();
    await stackDown({ dir });
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// 6. IO page faults through the whole stack (processes): the fault round trip — a DMA miss
//    (Translate → PAGE_REQUEST), the guest (a WatchFaults stream at VFIO, in this process)
//    installing the page with MapGuestPages and answering SUCCESS, the device's AwaitPageResponse
//    returning, the retry translating — against a bare gRPC unary call and a gRPC stream round trip
//    to the echo service (a process too), measured in the same run; and sustained page requests/s
//    across many devices, each request a group by itself, every group answered exactly once.

async function faultsBench() {
  const rounds = quick ? 200 : 1000;
  const devices = 8;
  const inFlightPerDevice = 8; // below the IOMMU's default 32 page-request credits per device
  const perDevice = quick ? 250 : 1000;
  log(
    `\n[faults] the whole stack as processes; one VM, ${devices} PRI-capable devices assigned, a guest PASID bound on each, the guest answering on WatchFaults`,
  );
  const dir = mkdtempSync(join(tmpdir(), "ioasid-bench-"));
  const basePort = 30_000 + Math.floor(Math.random() * 20_000);
  const nodeArgs = (process.env.BENCH_SERVICE_NODE_ARGS ?? "").split(" ").filter(Boolean);
  await stackUp({ dir, basePort, natsPort: basePort + 10, readyTimeoutMs: 30_000, nodeArgs });
  const echoProc = await startService({ name: "echo", entry: fileURLToPath(new URL("./echo-server.mjs", import.meta.url)) });
  const echo = createClient(testing.EchoServiceClient, echoProc.address);
  const c = await connectStack(addressesOf(readState(dir)));
  const stop = new AbortController();
  try {
    const opened = await c.vfio.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 0xfa17n, quota: 64, vmName: "bench-faults" }));
    await new Promise((resolve) => {
      void (async () => {
        try {
          for await (const m of c.vfio.session({ containerId: opened.containerId }, { signal: stop.signal })) if (m.event?.$case === "attached") resolve();
        } catch {
          // ended by the benchmark
        }
      })();
    });
    const containerId = opened.containerId;
    const bound = [];
    for (let d = 0; d < devices; d++) {
      const deviceId = `pri${d}`;
      await c.iommu.registerDevice(
        iommu.RegisterDeviceRequest.fromPartial({
          deviceId,
          maxPasids: 1 << 20,
          priCapable: true,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
          iommuGroup: 100 + d,
        }),
      );
      const device = { ref: { $case: "deviceId", value: deviceId } };
      // Right after the stack starts, VFIO's channel to the IOMMU may still be in grpc-js's
      // reconnect backoff (VFIO opened its fault stream before the IOMMU listened): its calls to
      // the IOMMU fail UNAVAILABLE for up to a second. A refused assignment changes nothing: retry.
      for (let attempt = 0; ; attempt++) {
        try {
          await c.vfio.assignDevice(vfio.AssignDeviceRequest.fromPartial({ containerId, device }));
          break;
        } catch (err) {
          if (err.reason !== "UNAVAILABLE" || attempt >= 50) throw err;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const a = await c.vfio.allocPasid({ containerId });
      await c.vfio.bindGuestPasid(
        vfio.BindGuestPasidRequest.fromPartial({ containerId, device, hpasid: a.hpasid, generation: a.generation, gpasid: d + 1, guestPgtable: 0x1000n }),
      );
      bound.push({ deviceId, pasid: a.hpasid });
    }
    // Guest RAM: GPA [0, 1 GiB) → the 1 GiB of host memory VFIO gave the VM (MapDma maps nothing
    // else), in the VM's stage 2; the guest maps GVA = GPA.
    const hpaBase = opened.guestMemory[0].paddr;
    await c.vfio.mapDma({ containerId, iova: 0n, paddr: hpaBase, size: 0x4000_0000n, access: { read: true, write: true, execute: false, privileged: false } });
    /** Device d's pages: a 64 MiB window of its own (the round trips use device 0's from page 0, the sustained run from page 8192). */
    const gva = (d, page) => 0x1000_0000n + BigInt(d) * 0x400_0000n + BigInt(page) * 0x1000n;

    // The guest: every relayed group gets its pages installed and SUCCESS; every answer is counted.
    const relayed = new Map();
    const answers = new Map();
    const refused = [];
    void (async () => {
      for await (const m of c.vfio.watchFaults({ containerId }, { signal: stop.signal })) {
        if (m.item?.$case === "group") {
          const g = m.item.value;
          relayed.set(g.faultGroupId, (relayed.get(g.faultGroupId) ?? 0) + 1);
          void answerFaultGroup(c.vfio, containerId, g, "success").then((a) => a.sent || refused.push(`${a.faultGroupId}: ${a.problem}`));
        } else if (m.item?.$case === "answered") {
          const a = m.item.value;
          answers.set(a.faultGroupId, [...(answers.get(a.faultGroupId) ?? []), `${vfio.pageResponseCodeToJSON(a.code)} ${a.source}`]);
        }
      }
    })().catch(() => undefined);
    for (let i = 0; ; i++) {
      if ((await c.vfio.queryState({ containerId })).containers[0]?.faultWatcherAttached) break;
      if (i > 200) throw new Error("the benchmark's WatchFaults did not attach");
      await new Promise((r) => setTimeout(r, 10));
    }

    const rw = { read: true, write: true };
    const { TRANSLATE_OUTCOME_TRANSLATED: TRANSLATED, TRANSLATE_OUTCOME_PAGE_REQUEST: PAGE_REQUEST } = iommu.TranslateOutcome;
    /** One DMA to a page the guest has not installed yet: page request, response, retry. @returns the group id */
    const roundTrip = async ({ deviceId, pasid }, address) => {
      const req = iommu.TranslateRequest.fromPartial({ deviceId, pasid, address, access: rw });
      const miss = await c.iommu.translate(req);
      if (miss.outcome !== PAGE_REQUEST)
        throw new Error(`expected a page request at 0x${address.toString(16)}, got ${iommu.translateOutcomeToJSON(miss.outcome)}`);
      const r = await c.iommu.awaitPageResponse({ deviceId, faultGroupId: miss.faultGroupId }, { deadlineMs: 10_000 });
      if (r.code !== iommu.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS)
        throw new Error(`group ${miss.faultGroupId} answered ${iommu.pageResponseCodeToJSON(r.code)}`);
      const hit = await c.iommu.translate(req);
      if (hit.outcome !== TRANSLATED || hit.outputAddress !== hpaBase + address)
        throw new Error(`retry of 0x${address.toString(16)}: ${iommu.translateOutcomeToJSON(hit.outcome)}`);
      return miss.faultGroupId;
    };

    // Round trips, sequential, on distinct pages; the floors interleaved with them so drift hits all alike.
    const payload = { payload: Buffer.alloc(8) };
    const bidi = echo.echoStream();
    const streamReplies = bidi.responses[Symbol.asyncIterator]();
    const raised = [];
    let page = 0;
    for (let i = 0; i < 100; i++) {
      await echo.echo(payload);
      await bidi.send(payload);
      await streamReplies.next();
      raised.push(await roundTrip(bound[0], gva(0, page++)));
    }
    const unaryLat = [];
    const streamLat = [];
    const tripLat = [];
    for (let r = 0; r < 5; r++) {
      for (let i = 0; i < rounds / 5; i++) {
        const t = now();
        await echo.echo(payload);
        unaryLat.push(now() - t);
      }
      for (let i = 0; i < rounds / 5; i++) {
        const t = now();
        await bidi.send(payload);
        await streamReplies.next();
        streamLat.push(now() - t);
      }
      for (let i = 0; i < rounds / 5; i++) {
        const t = now();
        raised.push(await roundTrip(bound[0], gva(0, page++)));
        tripLat.push(now() - t);
      }
    }
    bidi.end();
    // The IOMMU keeps its fault groups and guest page tables in JetStream (crash-safe roles): the
    // third floor, a bare JetStream publish ack on the stack's own nats-server.
    const jsLat = [];
    {
      const nc = await connect({ servers: readState(dir).natsUrl });
      const js = jetstream(nc);
      await (await jetstreamManager(nc)).streams.add({ name: "BENCH_FAULTS_FLOOR", subjects: ["bench.faults.floor"], storage: "file" });
      for (let i = 0; i < 100; i++) await js.publish("bench.faults.floor", "{}");
      for (let i = 0; i < rounds; i++) {
        const t = now();
        await js.publish("bench.faults.floor", '{"key":"fg/1","value":{}}');
        jsLat.push(now() - t);
      }
      await nc.close();
    }
    for (const xs of [unaryLat, streamLat, tripLat, jsLat]) xs.sort((a, b) => a - b);
    const u50 = percentile(unaryLat, 50);
    const s50 = percentile(streamLat, 50);
    const j50 = percentile(jsLat, 50);
    const t50 = percentile(tripLat, 50);
    const t90 = percentile(tripLat, 90);
    // The round trip's critical path: Translate, MapGuestPages (VMM → VFIO → IOMMU) and
    // SendPageResponse (VMM → VFIO → IOMMU, whose answer releases the device's AwaitPageResponse),
    // the retry — 6 unary calls — the group's two one-way stream pushes (IOMMU → VFIO → VMM), about
    // one stream round trip, and three JetStream acks: the IOMMU keeps the new group (Translate),
    // the guest's page (MapGuestPages) and the answer (SendPageResponse) before it replies.
    const floor = 6 * u50 + s50 + 3 * j50;
    log(`  gRPC unary echo (floor)        p50 ${fmt(u50 * 1000)} µs`);
    log(`  gRPC stream round trip (floor) p50 ${fmt(s50 * 1000)} µs`);
    log(`  JetStream publish ack (floor)  p50 ${fmt(j50 * 1000)} µs`);
    log(
      `  fault round trip               p50 ${fmt(t50 * 1000)} µs   p90 ${fmt(t90 * 1000)} µs   (${fmt(rounds)} sequential, distinct pages: miss → guest maps + SUCCESS → retry TRANSLATED)`,
    );
    log(
      `  ratio to its critical path     ${fmt(t50 / floor, 2)}×   (6 unary + 1 stream round trip + 3 JetStream acks = ${fmt(floor * 1000)} µs; ${fmt(t50 / u50, 1)} unary calls' worth)`,
    );
    results.faults = {
      unaryP50Us: u50 * 1000,
      streamP50Us: s50 * 1000,
      jetstreamAckP50Us: j50 * 1000,
      roundTripP50Us: t50 * 1000,
      roundTripP90Us: t90 * 1000,
      criticalPathFloorUs: floor * 1000,
      ratioToFloor: t50 / floor,
    };

    // Sustained: every device with several requests in flight, each a group by itself.
    const codes = new Map();
    const t0 = now();
    await Promise.all(
      bound.flatMap((dev, d) => {
        let next = 0;
        return Array.from({ length: inFlightPerDevice }, async () => {
          while (next < perDevice) {
            const address = gva(d, 8192 + next++);
            const miss = await c.iommu.translate(iommu.TranslateRequest.fromPartial({ deviceId: dev.deviceId, pasid: dev.pasid, address, access: rw }));
            if (miss.outcome !== PAGE_REQUEST)
              throw new Error(`expected a page request, got ${iommu.translateOutcomeToJSON(miss.outcome)} ${iommu.faultReasonToJSON(miss.faultReason)}`);
            raised.push(miss.faultGroupId);
            const r = await c.iommu.awaitPageResponse({ deviceId: dev.deviceId, faultGroupId: miss.faultGroupId }, { deadlineMs: 15_000 });
            const k = iommu.pageResponseCodeToJSON(r.code);
            codes.set(k, (codes.get(k) ?? 0) + 1);
          }
        });
      }),
    );
    const elapsed = now() - t0;
    const requests = devices * perDevice;
    // Every group: relayed once, answered once (the answered items trail the devices' answers a little).
    for (let i = 0; i < 500 && answers.size < raised.length; i++) await new Promise((r) => setTimeout(r, 10));
    const wrong = raised.filter(
      (id) => relayed.get(id) !== 1 || answers.get(id)?.length !== 1 || answers.get(id)[0] !== "PAGE_RESPONSE_CODE_SUCCESS PAGE_RESPONSE_SOURCE_HANDLER",
    );
    const raisedSet = new Set(raised);
    const extra = [...answers.keys()].filter((id) => !raisedSet.has(id)).length;
    const left = (await c.iommu.queryState(iommu.QueryStateRequest.fromPartial({}))).faultGroups.length;
    // The pages are really there: a sample of the sustained run's pages translates.
    let hits = 0;
    for (let d = 0; d < devices; d++) {
      for (let i = 0; i < 8; i++) {
        const address = gva(d, 8192 + Math.floor((i * perDevice) / 8));
        const r = await c.iommu.translate(iommu.TranslateRequest.fromPartial({ deviceId: bound[d].deviceId, pasid: bound[d].pasid, address, access: rw }));
        if (r.outcome === TRANSLATED && r.outputAddress === hpaBase + address) hits++;
      }
    }
    log(
      `  sustained                      ${fmt(requests / (elapsed / 1000))} page requests/s answered (${fmt(requests)} over ${devices} devices × ${inFlightPerDevice} in flight, each a group answered SUCCESS after MapGuestPages; ${fmt(elapsed)} ms)`,
    );
    log(
      `  exactly one response           ${fmt(raised.length - wrong.length)} of ${fmt(raised.length)} groups relayed once and answered once (SUCCESS by the handler); ${extra} unknown answers, ${left} groups left outstanding, ${refused.length} answers refused; devices saw ${[...codes].map(([k, n]) => `${n} ${k.replace("PAGE_RESPONSE_CODE_", "")}`).join(", ")}; ${hits}/${devices * 8} sampled pages translate`,
    );
    if (wrong.length > 0 || extra > 0 || left > 0 || refused.length > 0)
      log(
        `  ! not exactly one response: ${wrong
          .slice(0, 5)
          .map((id) => `${id}: relayed ${relayed.get(id) ?? 0}, answers ${JSON.stringify(answers.get(id) ?? [])}`)
          .join("; ")} ${refused.slice(0, 3).join("; ")}`,
      );
    results.faults = {
      ...results.faults,
      sustainedRequestsPerSec: requests / (elapsed / 1000),
      devices,
      inFlightPerDevice,
      groups: raised.length,
      groupsAnsweredOnce: raised.length - wrong.length,
      unknownAnswers: extra,
      outstandingAtEnd: left,
      refused: refused.length,
    };
  } finally {
    stop.abort();
    echo.close();
    await c.close();
    await echoProc.stop();
    await stackDown({ dir });
    rmSync(dir, { recursive: true, force: true });
  }
}

log(`ioasid-fabric benchmarks (${quick ? "quick" : "full"}), node ${process.version}, ${new Date().toISOString()}`);
if (typeof globalThis.gc !== "function") log("  (run with --expose-gc for exact memory figures)");
/**
 * The delivery figures of each configuration (the mean of its runs) as `results.delivery` (no
 * authorization) and `results.deliverySecure` (permissions on), and their ratio (issue 14: within 10%).
 */
function summarizeDelivery(runs) {
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
  log(
    `  one FREE, 4 tiers, p50   ${fmt(on.chainP50Us ?? 0)} vs ${fmt(off.chainP50Us ?? 0)} µs (${pct((on.chainP50Us ?? 0) / (off.chainP50Us ?? 1))})   (target: within 10%)`,
  );
  log(
    `  its floor (no permissions on either: the operator's raw gather) ${fmt(on.floorP50Us ?? 0)} vs ${fmt(off.floorP50Us ?? 0)} µs (${pct((on.floorP50Us ?? 0) / (off.floorP50Us ?? 1))}: the machine's drift)`,
  );
  log(
    `  steady, 1,000 in flight  ${fmt(on.eventsPerSec)} vs ${fmt(off.eventsPerSec)} events/s (${pct(on.eventsPerSec / off.eventsPerSec)})   (target: within 10%)`,
  );
  results.deliveryPermissionsRatio = { chainP50: (on.chainP50Us ?? 0) / (off.chainP50Us ?? 1), eventsPerSec: on.eventsPerSec / off.eventsPerSec };
  results.deliveryRuns = all;
  for (let i = 1; i <= runs; i++) delete results[`delivery-${i}`];
}

if (only.has("allocator")) allocatorBench();
if (only.has("grpc")) {
  await grpcBench();
  await grpcSecurityBench();
}
if (only.has("delivery")) {
  const order = [false, true, true, false];
  for (let i = 0; i < order.length; i++) await deliveryBench(order[i], i + 1);
  summarizeDelivery(order.length);
}
if (only.has("restart")) await restartBench();
if (only.has("restart")) await snapshotRestartBench({ quick, log, fmt, results });
if (only.has("crash")) await crashBench();
if (only.has("faults")) await faultsBench();
mkdirSync(fileURLToPath(new URL("./results/", import.meta.url)), { recursive: true });
writeFileSync(fileURLToPath(new URL("./results/latest.json", import.meta.url)), JSON.stringify(results, null, 2) + "\n");
log("\nresults written to bench/results/latest.json");
