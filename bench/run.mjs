#!/usr/bin/env node
// npm run bench: measures the targets of DESIGN §9 that exist so far, each against a floor
// measured in the same run, and prints figures and ratios (no pass/fail: targets are printed
// beside the figures). Results also go to bench/results/latest.json.
//
//   node --expose-gc bench/run.mjs [--quick]
import { mkdirSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { IoasidSpace, IdBitmap, TokenType } from "@ioasid/ioasid";
import { createClient } from "@ioasid/grpc-kit";
import { core, events, testing } from "@ioasid/proto";
import { startService } from "@ioasid/testkit";

const quick = process.argv.includes("--quick");
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
    for (let i = 1; i < capacity; i++) if (rnd() < 0.5) bm.release(i);
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
  for (let done = 0; done < capacity - 1; ) {
    const n = Math.min(65_536, capacity - 1 - done);
    for (const a of space.allocMany(set.id, n)) live.push(a.ioasid);
    done += n;
  }
  // Free a random half: the remaining live IDs are spread over the whole namespace.
  const kept = [];
  for (const id of live) if (rnd() < 0.5) space.free(set.id, id);
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
  log(`\n[grpc] ioasid-core and a bare echo server as processes on loopback, ${fmt(calls)} sequential calls each`);
  const entry = (p) => fileURLToPath(new URL(p, import.meta.url));
  const [coreProc, echoProc] = await Promise.all([
    startService({ name: "ioasid-core", entry: entry("../services/ioasid-core/dist/main.js"), env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", LOG_LEVEL: "info" } }),
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
      allocP50Us: a50 * 1000,
      ratioP50: a50 / e50,
      ratioMean: mean(allocLat) / mean(echoLat),
      batchAllocPerSec: batchRate,
    };
  } finally {
    c.close();
    echo.close();
    await Promise.all([coreProc.stop(), echoProc.stop()]);
  }
}

log(`ioasid-fabric benchmarks (${quick ? "quick" : "full"}), node ${process.version}, ${new Date().toISOString()}`);
if (typeof globalThis.gc !== "function") log("  (run with --expose-gc for exact memory figures)");
allocatorBench();
await grpcBench();
mkdirSync(fileURLToPath(new URL("./results/", import.meta.url)), { recursive: true });
writeFileSync(fileURLToPath(new URL("./results/latest.json", import.meta.url)), JSON.stringify(results, null, 2) + "\n");
log("\nresults written to bench/results/latest.json");
