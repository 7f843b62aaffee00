// Section `restart` (DESIGN §9 "core restart bounded by live state").
import { fileURLToPath } from "node:url";
import { createClient } from "@ioasid/grpc-kit";
import { core, events } from "@ioasid/proto";
import { fmt, now } from "./util.mjs";

/**
 * Section `restart` (first part): ioasid-core with many live IOASIDs, SIGKILL, restart, time until
 * it serves again.
 */
export async function restartBench({ quick, log, results, target, phase, startNats, startService }) {
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
    phase(`allocating ${fmt(live)} IOASIDs`, () => `${fmt(finished)} allocated`);
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
    phase("SIGKILL and restart");
    proc.kill("SIGKILL");
    await proc.exited;
    const t1 = now();
    proc = await startService({ name: "ioasid-core", entry, env, readyTimeoutMs: 60_000 });
    c = createClient(core.CoreServiceService, proc.address);
    const stats = await c.getStats({});
    const serving = now() - t1;
    const recovered = /"replayed":(\d+),"startupMs":(\d+)/.exec(proc.logs());
    log(
      `  serving again after ${fmt(serving)} ms (spawn to first answer; replay of ${recovered?.[1] ?? "?"} operations took ${recovered?.[2] ?? "?"} ms inside) with ${fmt(stats.inUse)} live IOASIDs (target ≤ 1,000 ms)`,
    );
    target("restart.live", {
      figure: `${fmt(serving)} ms`,
      ratio: `${fmt(serving / 1000, 2)}× target`,
      met: serving <= 1000,
      note: `${fmt(stats.inUse)} live after ${recovered?.[1] ?? "?"} operations (the 1M-operation figure is restart.snapshot's)`,
    });
    results.restart = { live: stats.inUse, servingMs: serving, replayed: Number(recovered?.[1]), replayMs: Number(recovered?.[2]), allocRate };
    c.close();
    await proc.stop();
  } finally {
    await nats.stop();
  }
}
