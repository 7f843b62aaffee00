import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { DomainError } from "@ioasid/errors";
import { TokenType, type EventType } from "./constants.js";
import { IoasidSpace, type IoasidEvent } from "./ioasid-space.js";
import { toHolderKey, type Holder } from "./holder.js";

// Random operation sequences over a small namespace (so quotas and ranges run out), several sets,
// holders, frees, SPID attach/detach and set frees. After every step the invariants are checked
// from the outside: public queries and the emitted events, against a shadow record of the
// references this test itself took.

const CAPACITY = 24;
const HOLDERS: Holder[] = [
  { role: "kvm", instance: "vm", purpose: "vmcs" },
  { role: "vdcm", instance: "idxd0", purpose: "wq0" },
  { role: "iommu", instance: "dmar0", purpose: "bind" },
];

type Op =
  | { op: "createSet"; token: number; quota: number }
  | { op: "destroySet"; set: number }
  | { op: "freeSet"; set: number }
  | { op: "adjustSet"; set: number; quota: number }
  | { op: "alloc"; set: number; min: number; span: number }
  | { op: "free"; set: number; id: number }
  | { op: "get"; set: number; id: number; holder: number }
  | { op: "put"; set: number; id: number; holder: number }
  | { op: "attachSpid"; set: number; id: number; spid: number }
  | { op: "detachSpid"; set: number; id: number }
  | { op: "findBySpid"; set: number; spid: number; holder: number };

// Sets and IOASIDs are picked among those that exist (a pick ≥ 1000 names one that does not), so
// the sequences reach the interesting states instead of bouncing off NOT_FOUND.
const setArb = fc.oneof({ weight: 9, arbitrary: fc.nat(50) }, { weight: 1, arbitrary: fc.integer({ min: 1000, max: 1010 }) });
const idArb = fc.oneof({ weight: 9, arbitrary: fc.nat(50) }, { weight: 1, arbitrary: fc.integer({ min: 1000, max: 1000 + CAPACITY }) });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ op: fc.constant("createSet" as const), token: fc.integer({ min: 1, max: 4 }), quota: fc.integer({ min: 0, max: 12 }) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("destroySet" as const), set: setArb }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("freeSet" as const), set: setArb }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("adjustSet" as const), set: setArb, quota: fc.integer({ min: 0, max: 14 }) }) },
  {
    weight: 6,
    arbitrary: fc.record({
      op: fc.constant("alloc" as const),
      set: setArb,
      min: fc.integer({ min: 1, max: CAPACITY - 1 }),
      span: fc.integer({ min: 0, max: CAPACITY }),
    }),
  },
  { weight: 4, arbitrary: fc.record({ op: fc.constant("free" as const), set: setArb, id: idArb }) },
  { weight: 5, arbitrary: fc.record({ op: fc.constant("get" as const), set: setArb, id: idArb, holder: fc.integer({ min: 0, max: 2 }) }) },
  { weight: 5, arbitrary: fc.record({ op: fc.constant("put" as const), set: setArb, id: idArb, holder: fc.integer({ min: 0, max: 2 }) }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant("attachSpid" as const), set: setArb, id: idArb, spid: fc.integer({ min: 1, max: 5 }) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant("detachSpid" as const), set: setArb, id: idArb }) },
  {
    weight: 2,
    arbitrary: fc.record({
      op: fc.constant("findBySpid" as const),
      set: setArb,
      spid: fc.integer({ min: 1, max: 5 }),
      holder: fc.integer({ min: -1, max: 2 }),
    }),
  },
);

interface Snap {
  ids: Map<number, { state: string; spid: number; refcount: number; setId: number }>;
  sets: Map<number, { quota: number; inUse: number }>;
}

function snapshot(space: IoasidSpace): Snap {
  const ids = new Map<number, { state: string; spid: number; refcount: number; setId: number }>();
  for (const i of space.listIoasids()) ids.set(i.ioasid, { state: i.state, spid: i.spid, refcount: i.refcount, setId: i.setId });
  const sets = new Map<number, { quota: number; inUse: number }>();
  for (const s of space.listSets()) sets.set(s.id, { quota: s.quota, inUse: s.inUse });
  return { ids, sets };
}

/** The events a step must have emitted, derived from the state before and after it. */
function expectedEvents(before: Snap, after: Snap): string[] {
  const out: string[] = [];
  for (const [id] of after.sets) if (!before.sets.has(id)) out.push(`SET_ALLOC:set${id}`);
  for (const [id] of before.sets) if (!after.sets.has(id)) out.push(`SET_FREE:set${id}`);
  for (const [id, a] of after.ids) {
    const b = before.ids.get(id);
    if (b === undefined) {
      out.push(`ALLOC:${id}`);
      if (a.spid !== 0) out.push(`BIND:${id}`);
      continue;
    }
    if (b.state === "ACTIVE" && a.state === "FREE_PENDING") out.push(`FREE:${id}`);
    if (a.state === "ACTIVE" && b.spid === 0 && a.spid !== 0) out.push(`BIND:${id}`);
    if (a.state === "ACTIVE" && b.spid !== 0 && a.spid === 0) out.push(`UNBIND:${id}`);
  }
  for (const [id] of before.ids) if (!after.ids.has(id)) out.push(`RECLAIM:${id}`);
  return out.sort();
}

function label(e: IoasidEvent): string {
  return e.type === "SET_ALLOC" || e.type === "SET_FREE" ? `${e.type}:set${e.setId}` : `${e.type}:${e.ioasid}`;
}

function apply(space: IoasidSpace, picked: Op, shadow: Map<number, Map<string, number>>): void {
  const op = resolvePicks(space, picked);
  const take = (id: number, h: Holder) => {
    const m = shadow.get(id) ?? new Map<string, number>();
    m.set(toHolderKey(h), (m.get(toHolderKey(h)) ?? 0) + 1);
    shadow.set(id, m);
  };
  switch (op.op) {
    case "createSet":
      space.createSet({ token: { type: TokenType.MM, value: BigInt(op.token) }, quota: op.quota });
      return;
    case "destroySet":
      space.destroySet(op.set);
      return;
    case "freeSet":
      space.freeSet(op.set);
      return;
    case "adjustSet":
      space.adjustSet(op.set, op.quota);
      return;
    case "alloc":
      space.alloc(op.set, { min: op.min, max: Math.min(CAPACITY - 1, op.min + op.span) });
      return;
    case "free":
      space.free(op.set, op.id);
      return;
    case "get":
      space.get(op.set, op.id, HOLDERS[op.holder]!);
      take(op.id, HOLDERS[op.holder]!);
      return;
    case "put": {
      const h = HOLDERS[op.holder]!;
      space.put(op.set, op.id, h);
      const m = shadow.get(op.id)!;
      m.set(toHolderKey(h), m.get(toHolderKey(h))! - 1);
      return;
    }
    case "attachSpid":
      space.attachSpid(op.set, op.id, op.spid);
      return;
    case "detachSpid":
      space.detachSpid(op.set, op.id);
      return;
    case "findBySpid": {
      const h = op.holder < 0 ? undefined : HOLDERS[op.holder]!;
      const r = space.findBySpid(op.set, op.spid, h);
      if (h !== undefined) take(r.ioasid, h);
      return;
    }
  }
}

/** Turns picks into real set ids and IOASIDs: most name existing ones, some name others' or none. */
function resolvePicks(space: IoasidSpace, op: Op): Op {
  if (!("set" in op)) return op;
  const sets = space.listSets();
  const set = op.set >= 1000 || sets.length === 0 ? op.set - 1000 : sets[op.set % sets.length]!.id;
  if (!("id" in op)) return { ...op, set };
  // Usually an IOASID of the named set; sometimes any allocated one (another set's), or a raw ID.
  const own = space.listIoasids().filter((i) => i.setId === set);
  const all = space.listIoasids();
  let id: number;
  if (op.id >= 1000) id = op.id - 1000;
  else if (op.id % 5 === 4 && all.length > 0) id = all[op.id % all.length]!.ioasid;
  else id = own.length > 0 ? own[op.id % own.length]!.ioasid : op.id % CAPACITY;
  return { ...op, set, id };
}

describe("IoasidSpace invariants under random operation sequences", () => {
  it("holds S1, S2, S4, S6, S8 and refusals change nothing, after every step", () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 10, maxLength: 150, size: "max" }), (ops) => {
        const events: IoasidEvent[] = [];
        const space = new IoasidSpace({ capacity: CAPACITY, onEvent: (e) => events.push(e) });
        const shadow = new Map<number, Map<string, number>>(); // references this test took, per IOASID
        for (const op of ops) {
          const before = snapshot(space);
          const firstEvent = events.length;
          let failed = false;
          try {
            apply(space, op, shadow);
          } catch (err) {
            if (!(err instanceof DomainError)) throw err;
            failed = true;
          }
          const after = snapshot(space);
          const emitted = events.slice(firstEvent);

          // A refused call changes nothing and emits nothing.
          if (failed) {
            expect(emitted).toEqual([]);
            expect(after).toEqual(before);
          }

          // S8: exactly one event per transition, none without one.
          expect(emitted.map(label).sort()).toEqual(expectedEvents(before, after));
          for (let i = 1; i < events.length; i++) expect(events[i]!.seq).toBe(events[i - 1]!.seq + 1);

          // S1: nothing is reclaimed while referenced.
          for (const e of emitted) {
            if (e.type !== "RECLAIM") continue;
            const held = [...(shadow.get(e.ioasid)?.values() ?? [])].reduce((a, b) => a + b, 0);
            expect(held, `IOASID ${e.ioasid} reclaimed with ${held} references held`).toBe(0);
            shadow.delete(e.ioasid);
          }
          for (const [id, m] of shadow) {
            const held = [...m.values()].reduce((a, b) => a + b, 0);
            const info = after.ids.get(id);
            if (held > 0) expect(info, `IOASID ${id} gone with ${held} references held`).toBeDefined();
            if (info !== undefined) expect(info.refcount).toBe(held + (info.state === "ACTIVE" ? 1 : 0));
          }

          // S2: nothing gains a reference in FREE_PENDING.
          for (const [id, b] of before.ids) {
            const a = after.ids.get(id);
            if (b.state === "FREE_PENDING" && a !== undefined) expect(a.refcount).toBeLessThanOrEqual(b.refcount);
            if (b.state === "FREE_PENDING" && a !== undefined) expect(a.state).toBe("FREE_PENDING");
          }

          // S4: an SPID maps to at most one IOASID per set.
          const spids = new Set<string>();
          for (const [, i] of after.ids) {
            if (i.spid === 0) continue;
            const key = `${i.setId}:${i.spid}`;
            expect(spids.has(key), `SPID ${key} maps twice`).toBe(false);
            spids.add(key);
          }

          // The per-set SPID index agrees with each IOASID's SPID.
          for (const [setId] of after.sets) {
            for (let spid = 1; spid <= 5; spid++) {
              const owner = [...after.ids].find(([, i]) => i.setId === setId && i.spid === spid);
              let found: number | string;
              try {
                found = space.findBySpid(setId, spid).ioasid;
              } catch (err) {
                found = (err as DomainError).reason;
              }
              if (owner === undefined) expect(found).toBe("SPID_NOT_FOUND");
              else expect(found).toBe(owner[1].state === "ACTIVE" ? owner[0] : "IOASID_FREE_PENDING");
            }
          }

          // S6: available + Σ quotas = allocatable, in-use ≤ quota.
          const stats = space.stats();
          let quotas = 0;
          let inUse = 0;
          for (const [, s] of after.sets) {
            quotas += s.quota;
            inUse += s.inUse;
            expect(s.inUse).toBeLessThanOrEqual(s.quota);
          }
          expect(stats.available + quotas).toBe(CAPACITY - 1);
          expect(stats.inUse).toBe(inUse);
          expect(after.ids.size).toBe(inUse);
          expect(after.ids.has(0)).toBe(false);
        }
      }),
      { numRuns: 250 },
    );
  }, 60_000);

  it("checks the property test can fail: a double FREE would be caught", () => {
    // Guard against a vacuous oracle: feed expectedEvents a FREE_PENDING→FREE_PENDING step.
    const snap = (state: string): Snap => ({
      ids: new Map([[3, { state, spid: 0, refcount: 2, setId: 1 }]]),
      sets: new Map([[1, { quota: 4, inUse: 1 }]]),
    });
    expect(expectedEvents(snap("FREE_PENDING"), snap("FREE_PENDING"))).toEqual([]);
    expect(expectedEvents(snap("ACTIVE"), snap("FREE_PENDING"))).toEqual(["FREE:3"]);
    const types: EventType[] = ["FREE", "FREE"];
    expect(types.map((t) => `${t}:3`).sort()).not.toEqual(expectedEvents(snap("ACTIVE"), snap("FREE_PENDING")));
  });
});
