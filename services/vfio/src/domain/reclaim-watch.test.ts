import { describe, expect, it } from "vitest";
import type { CorePort } from "@ioasid/role-kit";
import { ReclaimWatch } from "./reclaim-watch.js";
import { ManualScheduler, settle } from "./vfio-containers.fixture.js";

type SetInfo = Awaited<ReturnType<CorePort["listSets"]>>[number];

/** A core whose sets are `live`, counting ListSets calls; `failing` makes them refused. */
function fakeCore(live: Set<number>) {
  const core = {
    calls: 0,
    failing: false,
    listSets: async (): Promise<SetInfo[]> => {
      core.calls++;
      if (core.failing) throw new Error("core unreachable");
      return [...live].map((id) => ({ id }) as SetInfo);
    },
  };
  return core;
}

const quiet = { info: () => {}, warn: () => {}, error: () => {} };

describe("ReclaimWatch (issue 15: one core call per round for every closing container)", () => {
  it("answers every waiting set with one ListSets per round, not one call per container", async () => {
    const live = new Set(Array.from({ length: 100 }, (_, i) => i + 1));
    const core = fakeCore(live);
    const scheduler = new ManualScheduler();
    const watch = new ReclaimWatch(core, scheduler, quiet);
    const outcomes = new Map<number, boolean>();
    for (const setId of live) void watch.reclaimed(setId, 10_000).then((r) => outcomes.set(setId, r));
    await settle();
    expect(core.calls).toBe(1); // the first look, at once, for all 100
    await scheduler.advance(10);
    expect(core.calls).toBe(2);
    // Half the sets are destroyed: they are answered at the next round, the others still wait.
    for (let id = 1; id <= 50; id++) live.delete(id);
    await scheduler.advance(20);
    expect(core.calls).toBe(3);
    expect(outcomes.size).toBe(50);
    expect([...outcomes.values()].every((r) => r)).toBe(true);
    expect(watch.waiting).toBe(50);
    for (let id = 51; id <= 100; id++) live.delete(id);
    await scheduler.advance(40);
    expect(core.calls).toBe(4);
    expect(outcomes.size).toBe(100);
    // Nothing waits: no more rounds.
    await scheduler.advance(5_000);
    expect(core.calls).toBe(4);
    expect(scheduler.pending).toBe(0);
  });

  it("waits longer between rounds, up to 500 ms, and gives up on a set at its deadline", async () => {
    const core = fakeCore(new Set([7]));
    const scheduler = new ManualScheduler();
    const watch = new ReclaimWatch(core, scheduler, quiet);
    let outcome: boolean | undefined;
    void watch.reclaimed(7, 3_000).then((r) => (outcome = r));
    await scheduler.advance(2_999);
    expect(outcome).toBeUndefined();
    // 0, 10, 30, 70, 150, 310, 630, 1130, 1630, 2130, 2630: eleven looks in the first 2,999 ms.
    expect(core.calls).toBe(11);
    await scheduler.advance(1);
    expect(outcome).toBe(false);
    expect(watch.waiting).toBe(0);
    await scheduler.advance(5_000);
    expect(core.calls).toBe(12);
  });

  it("keeps looking while the core cannot be asked, and logs once per round, not per container", async () => {
    const live = new Set([1, 2, 3]);
    const core = fakeCore(live);
    core.failing = true;
    const warnings: unknown[] = [];
    const scheduler = new ManualScheduler();
    const watch = new ReclaimWatch(core, scheduler, { ...quiet, warn: (obj) => void warnings.push(obj) });
    const done = Promise.all([1, 2, 3].map((id) => watch.reclaimed(id, 10_000)));
    await scheduler.advance(30);
    expect(core.calls).toBe(3);
    expect(warnings).toHaveLength(3);
    core.failing = false;
    live.clear();
    await scheduler.advance(40);
    await expect(done).resolves.toEqual([true, true, true]);
  });

  it("does not take a list asked for before a set started waiting as its answer (it may predate the set)", async () => {
    const scheduler = new ManualScheduler();
    let answer: (sets: SetInfo[]) => void = () => {};
    let calls = 0;
    const core = {
      listSets: (): Promise<SetInfo[]> => {
        calls++;
        return new Promise((resolve) => (answer = resolve));
      },
    };
    const watch = new ReclaimWatch(core, scheduler, quiet);
    void watch.reclaimed(1, 60_000);
    await settle();
    expect(calls).toBe(1); // in flight
    // Set 2 starts waiting now; the list in flight was asked for before, and does not name it.
    let second: boolean | undefined;
    void watch.reclaimed(2, 60_000).then((r) => (second = r));
    answer([{ id: 1 } as SetInfo]);
    await settle();
    expect(second).toBeUndefined();
    expect(watch.waiting).toBe(2);
    // The next round, asked for after it waited, answers it.
    await scheduler.advance(10);
    expect(calls).toBe(2);
    answer([{ id: 1 } as SetInfo]);
    await settle();
    expect(second).toBe(true);
  });

  it("makes the rounds short again when a set starts waiting while others do", async () => {
    const live = new Set([1, 2]);
    const core = fakeCore(live);
    const scheduler = new ManualScheduler();
    const watch = new ReclaimWatch(core, scheduler, quiet);
    void watch.reclaimed(1, 60_000);
    await scheduler.advance(3_000); // the rounds are 500 ms apart by now
    const before = core.calls;
    let second: boolean | undefined;
    void watch.reclaimed(2, 60_000).then((r) => (second = r));
    live.delete(2);
    // Looked at in the round already scheduled (at 3,130 ms), then 10 ms apart again: rounds at
    // 3,130, 3,140, 3,160, 3,200, 3,280 and 3,440 ms (without the reset: 3,130 only).
    await scheduler.advance(500);
    expect(second).toBe(true);
    expect(core.calls - before).toBe(6);
  });
});
