// Section `grpc` (DESIGN §9 "core over gRPC"), and the cost of security on the gRPC path (issue 14).
import { fileURLToPath } from "node:url";
import { createClient } from "@ioasid/grpc-kit";
import { core, events, testing } from "@ioasid/proto";
import { readInstanceCredentials } from "@ioasid/security";
import { connect } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { fmt, now, percentile } from "./util.mjs";

/**
 * Section `grpc`: ioasid-core over gRPC — sequential durable Alloc against a bare gRPC echo call
 * and a JetStream publish ack; Alloc with 64 calls in flight against the echo server with 64 in
 * flight; the batch allocation rate.
 */
export async function grpcBench({ quick, log, results, target, phase, startNats, startService }) {
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
    log(`  ratio Alloc/echo p50 ${fmt(a50 / e50, 2)}×   mean ${fmt(mean(allocLat) / mean(echoLat), 2)}×`);
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
    log(`  ratio Alloc/(echo + JetStream ack) p50 ${fmt(a50 / (e50 + j50), 2)}×   (target ≤ 1.3×: what the core adds over its two floors)`);
    target("grpc.sequential", {
      figure: `${fmt(a50 * 1000)} µs p50`,
      floor: `${fmt((e50 + j50) * 1000)} µs (echo ${fmt(e50 * 1000)} + JS ack ${fmt(j50 * 1000)})`,
      ratio: `${fmt(a50 / (e50 + j50), 2)}× floor`,
      met: a50 / (e50 + j50) <= 1.3,
    });

    // 64 calls in flight: the echo server's throughput is the floor (group commit should let many
    // Allocs share one append). Interleaved rounds, as above.
    phase("64 calls in flight");
    const inFlightCalls = quick ? 4000 : 16_000;
    const rateAt64 = async (call, n) => {
      let left = n;
      const t = now();
      await Promise.all(
        Array.from({ length: 64 }, async () => {
          while (left > 0) {
            left--;
            await call();
          }
        }),
      );
      return n / ((now() - t) / 1000);
    };
    await rateAt64(() => echo.echo(echoReq), 1000);
    await rateAt64(() => c.alloc(allocReq), 1000);
    const echoRates = [];
    const allocRates = [];
    for (let r = 0; r < 2; r++) {
      echoRates.push(await rateAt64(() => echo.echo(echoReq), inFlightCalls / 2));
      allocRates.push(await rateAt64(() => c.alloc(allocReq), inFlightCalls / 2));
    }
    const echo64 = echoRates.reduce((a, b) => a + b) / echoRates.length;
    const alloc64 = allocRates.reduce((a, b) => a + b) / allocRates.length;
    log(`  64 in flight     echo ${fmt(echo64)} calls/s (floor)   durable Alloc ${fmt(alloc64)} calls/s   ratio ${fmt(alloc64 / echo64, 2)}× (target ≥ 0.8×)`);
    target("grpc.inflight", {
      figure: `${fmt(alloc64)} Allocs/s`,
      floor: `${fmt(echo64)} echo calls/s`,
      ratio: `${fmt(alloc64 / echo64, 2)}× floor`,
      met: alloc64 / echo64 >= 0.8,
    });

    phase("BatchAlloc");

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
    target("grpc.batch", { figure: `${fmt(batchRate)} IOASIDs/s`, ratio: `${fmt(batchRate / 1e5, 2)}× target`, met: batchRate >= 1e5 });
    results.grpc = {
      echoAt64PerSec: echo64,
      allocAt64PerSec: alloc64,
      ratioAt64: alloc64 / echo64,
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
export async function grpcSecurityBench({ quick, log, results, startNats, startService }) {
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
