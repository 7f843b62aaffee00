// Section `allocator` (DESIGN §9): the IOASID allocator in process.
import { IoasidSpace, IdBitmap, TokenType } from "@ioasid/ioasid";
import { fmt, gc, memory, now, prng } from "./util.mjs";

/** Section `allocator`: alloc+free pairs/s at 50% occupancy of 2^20 against the bare bitmap, and bytes per live IOASID. */
export function allocatorBench({ quick, log, results, target }) {
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
  target("allocator.rate", {
    figure: `${fmt(rate)} pairs/s`,
    floor: `${fmt(floor)} pairs/s (bitmap)`,
    ratio: `${fmt(rate / 2e6, 2)}× target, ${fmt(rate / floor, 2)}× floor`,
    met: rate >= 2e6,
  });
  target("allocator.memory", { figure: `${fmt(bytesPerIoasid, 1)} B`, ratio: `${fmt(bytesPerIoasid / 200, 2)}× target`, met: bytesPerIoasid <= 200 });
}
