// Bench section (issue 15 item 3, DESIGN §9): core restart bounded by live state, not by history.
// ~1M IOASID operations with 100k IOASIDs left live, then kill -9 and time spawn → serving again,
// with snapshots (the default settings) and, as the comparison, the same history without them
// (IOASID_CORE_SNAPSHOT_OPS=0, IOASID_CORE_SNAPSHOT_BYTES=0: the whole log replayed, as before).
// Called by bench/run.mjs with --only=restart; every wait is bounded, and what it starts it stops.
import { fileURLToPath } from "node:url";
import { loadavg } from "node:os";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { createClient } from "@ioasid/grpc-kit";
import { core, events } from "@ioasid/proto";
import { startNats, startService } from "@ioasid/testkit";

const entry = fileURLToPath(new URL("../services/ioasid-core/dist/main.js", import.meta.url));
const now = () => Number(process.hrtime.bigint()) / 1e6;

/**
 * Drives the history: `live` IOASIDs allocated in batches and kept, then cycles of a set of 1,000
 * created, filled (BatchAlloc) and freed whole (FreeSet: 1,000 frees), and single Alloc+Free pairs
 * 64 in flight, until about `total` IOASID operations (allocations + frees) were made.
 */
async function drive(c, { live, total, log, fmt }) {
  let ops = 0;
  const { set } = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 1n, quota: live }));
  for (let left = live; left > 0;) {
    const count = Math.min(left, 50_000);
    await c.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: set.setId, count }));
    left -= count;
    ops += count;
  }
  // Single calls: the log's common case (one small OpBatch per group commit).
  const pairs = Math.min(20_000, Math.floor(total / 20));
  const scratch = (await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 2n, quota: 64 }))).set;
  let started = 0;
  await Promise.all(
    Array.from({ length: 64 }, async () => {
      while (started < pairs) {
        started++;
        const a = await c.alloc(core.AllocRequest.fromPartial({ setId: scratch.setId }));
        await c.free(core.FreeRequest.fromPartial({ setId: scratch.setId, ioasid: a.ioasid, generation: a.generation }));
      }
    }),
  );
  ops += 2 * pairs;
  let token = 1000n;
  let next = 200_000;
  while (ops < total) {
    const { set: s } = await c.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: token++, quota: 1000 }));
    await c.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: s.setId, count: 1000 }));
    await c.freeSet(core.FreeSetRequest.fromPartial({ setId: s.setId }));
    ops += 2000;
    if (ops >= next) {
      log(`  … ${fmt(ops)} operations`);
      next += 200_000;
    }
  }
  return ops;
}

/** One run: a fresh nats-server and core, the history, kill -9, restart; the figures. */
async function run({ snapshots, live, total, log, fmt }) {
  const nats = await startNats();
  const env = {
    IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0",
    NATS_URL: nats.url,
    ...(snapshots ? {} : { IOASID_CORE_SNAPSHOT_OPS: "0", IOASID_CORE_SNAPSHOT_BYTES: "0" }),
  };
  let proc;
  let c;
  try {
    proc = await startService({ name: "ioasid-core", entry, env });
    c = createClient(core.CoreServiceService, proc.address, { deadlineMs: 60_000 });
    const t0 = now();
    const ops = await drive(c, { live, total, log, fmt });
    const driveMs = now() - t0;
    const written = proc.logs().match(/snapshot written/g)?.length ?? 0;
    c.close();
    c = undefined;
    proc.kill("SIGKILL");
    await proc.exited;
    const nc = await connect({ servers: nats.url });
    const info = await (await jetstreamManager(nc)).streams.info("IOASID_CORE_OPS");
    await nc.close();
    const t1 = now();
    proc = await startService({ name: "ioasid-core", entry, env, readyTimeoutMs: 120_000 });
    c = createClient(core.CoreServiceService, proc.address, { deadlineMs: 60_000 });
    const stats = await c.getStats({});
    const servingMs = now() - t1;
    const line = proc
      .logs()
      .split("\n")
      .find((l) => l.includes('"msg":"state recovered"'));
    const recovered = line === undefined ? {} : JSON.parse(line);
    return {
      ops,
      driveMs,
      live: stats.inUse,
      snapshotsWritten: written,
      streamMessages: info.state.messages,
      streamBytes: info.state.bytes,
      servingMs,
      replayed: recovered.replayed,
      startupMs: recovered.startupMs,
      recoverMs: recovered.recoverMs,
      snapshotLoadMs: recovered.snapshotLoadMs,
      snapshotBytes: recovered.snapshotBytes,
    };
  } finally {
    c?.close();
    await proc?.stop().catch(() => undefined);
    await nats.stop();
  }
}

/**
 * The section: prints the figure (spawn → serving after kill -9), its target (≤ 1,000 ms), the split
 * between loading the snapshot and replaying the tail, and the same restart without snapshots.
 */
export async function snapshotRestartBench({ quick, log, fmt, results, target }) {
  const live = quick ? 20_000 : 100_000;
  const total = quick ? 200_000 : 1_000_000;
  log(
    `\n[restart-snapshot] ~${fmt(total)} IOASID operations (${fmt(live)} left live; sets of 1,000 filled and freed whole, single Alloc+Free pairs), then SIGKILL and restart`,
  );
  const withSnapshots = await run({ snapshots: true, live, total, log, fmt });
  const split = (r) =>
    r.snapshotLoadMs === undefined
      ? `full replay of ${fmt(r.replayed ?? 0)} logged operations: ${fmt(r.recoverMs ?? 0)} ms`
      : `snapshot of ${fmt((r.snapshotBytes ?? 0) / 1024)} KiB loaded in ${fmt(r.snapshotLoadMs)} ms + tail of ${fmt(r.replayed ?? 0)} logged operations replayed in ${fmt((r.recoverMs ?? 0) - r.snapshotLoadMs)} ms`;
  log(
    `  history: ${fmt(withSnapshots.ops)} operations in ${fmt(withSnapshots.driveMs / 1000, 1)} s; ${withSnapshots.snapshotsWritten} snapshots written; stream left with ${fmt(withSnapshots.streamMessages)} messages (${fmt(withSnapshots.streamBytes / 1024)} KiB)`,
  );
  log(
    `  serving again after ${fmt(withSnapshots.servingMs)} ms (spawn to first answer) with ${fmt(withSnapshots.live)} live IOASIDs   (target ≤ 1,000 ms: ${withSnapshots.servingMs <= 1000 ? "met" : "not met"})`,
  );
  log(`    inside: ${split(withSnapshots)}; startup ${fmt(withSnapshots.startupMs ?? 0)} ms in all`);
  const without = await run({ snapshots: false, live, total, log: () => undefined, fmt });
  log(
    `  the same history without snapshots: serving after ${fmt(without.servingMs)} ms; stream of ${fmt(without.streamMessages)} messages (${fmt(without.streamBytes / 1024)} KiB); ${split(without)}`,
  );
  log(
    `  ratio with/without snapshots: ${fmt(withSnapshots.servingMs / without.servingMs, 2)}×   load average ${loadavg()
      .map((x) => x.toFixed(2))
      .join(" ")}`,
  );
  results.snapshotRestart = { withSnapshots, withoutSnapshots: without, targetMs: 1000, loadavg: loadavg() };
  target("restart.snapshot", {
    figure: `${fmt(withSnapshots.servingMs)} ms`,
    floor: `${fmt(without.servingMs)} ms without snapshots`,
    ratio: `${fmt(withSnapshots.servingMs / 1000, 2)}× target`,
    met: withSnapshots.servingMs <= 1000,
    note: `${fmt(withSnapshots.ops)} ops, ${fmt(withSnapshots.live)} live${quick ? " (quick)" : ""}`,
  });
}
