import { afterEach, describe, expect, it } from "vitest";
import { core, events } from "@ioasid/proto";
import { startNats, type NatsServer } from "@ioasid/testkit";
import { startCore, type CoreFixture } from "../support/core-fixture.js";

// End to end (issue 15 item 3): the real core process, snapshots every 40 operations, a mix of calls
// through CoreService, kill -9, a restart from the snapshot and the log's tail: every query RPC answers
// as it did before the crash, and the core goes on.

const MM = events.TokenType.TOKEN_TYPE_MM;
const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const HOLDER = { role: "vdcm", instance: "idxd0", purpose: "wq0" };

let nats: NatsServer | undefined;
let cores: CoreFixture[] = [];
afterEach(async () => {
  for (const c of cores) await c.stop().catch(() => undefined);
  await nats?.stop();
  cores = [];
  nats = undefined;
});

/** The answers of every query RPC, as one comparable value. */
async function answers(c: CoreFixture["client"]): Promise<unknown> {
  const sets = (await c.listSets({})).sets;
  const ioasids = (await c.listIoasids(P(core.ListIoasidsRequest, {}))).ioasids;
  const registrations = (await c.listRegistrations({})).registrations;
  const { deliveriesPending, deliveriesMissed, inUse, available, lastSeq, sets: nSets, registrations: nRegs, allocator } = await c.getStats({});
  const described = await Promise.all(ioasids.slice(0, 20).map(async (i) => (await c.describe(P(core.DescribeRequest, { ioasid: i.ioasid }))).info));
  return { sets, ioasids, registrations, stats: { deliveriesPending, deliveriesMissed, inUse, available, lastSeq, nSets, nRegs, allocator }, described };
}

describe("core restart from a snapshot (process, kill -9)", () => {
  it("answers every query as it did before the crash, from a snapshot and the log's tail", async () => {
    nats = await startNats();
    const env = { IOASID_CORE_SNAPSHOT_OPS: "40" };
    const first = await startCore(env, { nats });
    cores.push(first);
    const c = first.client;
    // A registration with nobody behind it: its deliveries stay pending, and are in the snapshot.
    await c.register(
      P(core.RegisterRequest, {
        subscriber: { name: "kvm", instance: "vm-9" },
        priority: events.Priority.PRIORITY_CPU,
        scope: { $case: "mmToken", value: 9n },
      }),
    );
    const a = (await c.createSet(P(core.CreateSetRequest, { tokenType: MM, token: 9n, quota: 500 }))).set!.setId;
    const b = (await c.createSet(P(core.CreateSetRequest, { tokenType: MM, token: 10n, quota: 500 }))).set!.setId;
    const many = (await c.batchAlloc(P(core.BatchAllocRequest, { setId: b, count: 200 }))).allocations;
    for (let i = 0; i < 150; i++) {
      const x = await c.alloc(P(core.AllocRequest, { setId: a, privateData: i % 7 === 0 ? Buffer.from([i]) : Buffer.alloc(0) }));
      if (i % 3 === 0) await c.attachSpid(P(core.AttachSpidRequest, { setId: a, ioasid: x.ioasid, spid: 100 + i, generation: x.generation }));
      if (i % 4 === 0) await c.get(P(core.GetRequest, { setId: a, ioasid: x.ioasid, holder: HOLDER, generation: x.generation }));
      if (i % 2 === 0) await c.free(P(core.FreeRequest, { setId: a, ioasid: x.ioasid, generation: x.generation }));
    }
    for (const m of many.slice(0, 100)) await c.free(P(core.FreeRequest, { setId: b, ioasid: m.ioasid, generation: m.generation }));
    const before = await answers(c);
    expect(first.proc.logs()).toContain("snapshot written");

    first.proc.kill("SIGKILL");
    await first.proc.exited;
    const second = await startCore(env, { nats });
    cores.push(second);
    expect(await answers(second.client)).toEqual(before);
    const line = second.proc
      .logs()
      .split("\n")
      .find((l) => l.includes('"msg":"state recovered"'));
    expect(JSON.parse(line!)).toMatchObject({ snapshotSeq: expect.any(Number) as number });
    // It goes on: a new allocation continues the generations, a stale one is still refused.
    const freed = (before as { ioasids: Array<{ ioasid: number; setId: number; generation: number; state: number }> }).ioasids;
    const next = await second.client.alloc(P(core.AllocRequest, { setId: b }));
    expect(next.generation).toBeGreaterThanOrEqual(1);
    // Referenced, then freed: FREE_PENDING (i % 4 === 0 above), and still refusing new references.
    const pending = freed.find((i) => i.setId === a && i.state === core.IoasidState.IOASID_STATE_FREE_PENDING);
    expect(pending).toBeDefined();
    await expect(
      second.client.get(P(core.GetRequest, { setId: a, ioasid: pending!.ioasid, holder: HOLDER, generation: pending!.generation })),
    ).rejects.toMatchObject({ reason: "IOASID_FREE_PENDING" });
  }, 120_000);
});
