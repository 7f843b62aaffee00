import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { DomainError } from "@ioasid/errors";
import { Priority, TokenType, type EventType } from "./constants.js";
import { IoasidSpace, type CustomAllocator, type IoasidEvent, type SpaceState } from "./ioasid-space.js";
import type { Holder } from "./holder.js";

// Snapshots of the model (issue 15): a space restored from exportState() at any step is the space
// itself — the same answers to every query, the same state exported again, and the same results and
// events for every operation that follows (the core's restart from a snapshot plus the log's tail
// must equal a replay of the whole log).

const CAPACITY = 20;
const HOLDERS: Holder[] = [
  { role: "kvm", instance: "vm", purpose: "vmcs" },
  { role: "vdcm", instance: "idxd0", purpose: "wq0" },
  { role: "iommu", instance: "dmar0", purpose: "bind" },
];
const SUBSCRIBERS = [
  { name: "kvm", instance: "vm-1" },
  { name: "iommu", instance: "dmar0" },
];

type Op =
  | { op: "createSet"; token: number; quota: number }
  | { op: "destroySet" | "freeSet"; set: number }
  | { op: "adjustSet"; set: number; quota: number }
  | { op: "alloc"; set: number; min: number; span: number; data: boolean }
  | { op: "allocMany"; set: number; count: number }
  | { op: "free" | "detachSpid" | "detachData"; set: number; id: number }
  | { op: "get" | "put"; set: number; id: number; holder: number }
  | { op: "attachSpid"; set: number; id: number; spid: number }
  | { op: "attachData"; set: number; id: number }
  | { op: "findBySpid"; set: number; spid: number; holder: number }
  | { op: "register"; who: number; scope: number; token: number; events: boolean }
  | { op: "unregister"; reg: number };

const pick = fc.nat(40);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ op: fc.constant("createSet" as const), token: fc.integer({ min: 1, max: 4 }), quota: fc.integer({ min: 0, max: 10 }) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constantFrom("destroySet" as const, "freeSet" as const), set: pick }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("adjustSet" as const), set: pick, quota: fc.integer({ min: 0, max: 12 }) }) },
  {
    weight: 6,
    arbitrary: fc.record({
      op: fc.constant("alloc" as const),
      set: pick,
      min: fc.integer({ min: 1, max: CAPACITY - 1 }),
      span: fc.integer({ min: 0, max: CAPACITY }),
      data: fc.boolean(),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("allocMany" as const), set: pick, count: fc.integer({ min: 1, max: 4 }) }) },
  { weight: 4, arbitrary: fc.record({ op: fc.constantFrom("free" as const, "detachSpid" as const, "detachData" as const), set: pick, id: pick }) },
  { weight: 5, arbitrary: fc.record({ op: fc.constantFrom("get" as const, "put" as const), set: pick, id: pick, holder: fc.integer({ min: 0, max: 2 }) }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant("attachSpid" as const), set: pick, id: pick, spid: fc.integer({ min: 1, max: 4 }) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("attachData" as const), set: pick, id: pick }) },
  {
    weight: 2,
    arbitrary: fc.record({ op: fc.constant("findBySpid" as const), set: pick, spid: fc.integer({ min: 1, max: 4 }), holder: fc.integer({ min: 0, max: 2 }) }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      op: fc.constant("register" as const),
      who: fc.integer({ min: 0, max: 1 }),
      scope: fc.integer({ min: 0, max: 2 }),
      token: fc.integer({ min: 1, max: 5 }),
      events: fc.boolean(),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("unregister" as const), reg: pick }) },
);

/** Applies one picked operation (picks resolve against the space's own state): its result or refusal. */
function apply(space: IoasidSpace, op: Op): string {
  const sets = space.listSets();
  const set = "set" in op ? (sets.length === 0 ? op.set : sets[op.set % sets.length]!.id) : 0;
  const own = space.listIoasids().filter((i) => i.setId === set);
  const id = "id" in op ? (own.length === 0 ? (op.id % (CAPACITY - 1)) + 1 : own[op.id % own.length]!.ioasid) : 0;
  try {
    switch (op.op) {
      case "createSet":
        return JSON.stringify(space.createSet({ token: { type: TokenType.MM, value: BigInt(op.token) }, quota: op.quota }), bigints);
      case "destroySet":
        return String(space.destroySet(set));
      case "freeSet":
        return JSON.stringify(space.freeSet(set));
      case "adjustSet":
        return JSON.stringify(space.adjustSet(set, op.quota), bigints);
      case "alloc":
        return JSON.stringify(
          space.alloc(set, { min: op.min, max: Math.min(CAPACITY - 1, op.min + op.span), ...(op.data ? { privateData: Uint8Array.of(op.min) } : {}) }),
        );
      case "allocMany":
        return JSON.stringify(space.allocMany(set, op.count));
      case "free":
        return JSON.stringify(space.free(set, id));
      case "detachSpid":
        return JSON.stringify(space.detachSpid(set, id));
      case "detachData":
        return String(space.detachData(set, id));
      case "get":
        return JSON.stringify(space.get(set, id, HOLDERS[op.holder]!));
      case "put":
        return JSON.stringify(space.put(set, id, HOLDERS[op.holder]!));
      case "attachSpid":
        return String(space.attachSpid(set, id, op.spid));
      case "attachData":
        return String(space.attachData(set, id, Uint8Array.of(id, 7)));
      case "findBySpid":
        return JSON.stringify(space.findBySpid(set, op.spid, HOLDERS[op.holder]!));
      case "register": {
        const scope =
          op.scope === 0
            ? ({ kind: "global" } as const)
            : op.scope === 1
              ? ({ kind: "set", setId: set || 1 } as const)
              : ({ kind: "mm", token: BigInt(op.token) } as const);
        const events: EventType[] | undefined = op.events ? (op.scope === 0 ? ["FREE"] : ["FREE", "BIND"]) : undefined;
        const r = space.register({
          subscriber: SUBSCRIBERS[op.who]!,
          priority: op.who === 0 ? Priority.CPU : Priority.IOMMU,
          scope,
          ...(events === undefined ? {} : { events }),
        });
        return JSON.stringify(r, bigints);
      }
      case "unregister": {
        const regs = space.listRegistrations();
        return String(space.unregister(regs.length === 0 ? op.reg : regs[op.reg % regs.length]!.id));
      }
    }
  } catch (err) {
    if (!(err instanceof DomainError)) throw err;
    return `refused ${err.reason}`;
  }
}

function bigints(_: string, v: unknown): unknown {
  return typeof v === "bigint" ? `${v}n` : v;
}

/** Everything a caller can ask the space, as one comparable value. */
function observe(space: IoasidSpace): unknown {
  const describe = Array.from({ length: CAPACITY }, (_, i) => space.describe(i));
  const recipients = (["ALLOC", "FREE", "BIND", "UNBIND", "SET_ALLOC", "SET_FREE"] as EventType[]).flatMap((type) =>
    space.listSets().map((s) => space.recipients({ type, setId: s.id }).map((r) => r.id)),
  );
  return JSON.parse(
    JSON.stringify(
      { sets: space.listSets(), ioasids: space.listIoasids(), regs: space.listRegistrations(), stats: space.stats(), describe, recipients },
      bigints,
    ),
  );
}

function label(e: IoasidEvent): string {
  return JSON.stringify(e, bigints);
}

/** A custom allocator for the restored space: takes over the name of the original's. */
const customNamed = (name: string): CustomAllocator => ({ name, alloc: () => undefined, free: () => undefined });

describe("IoasidSpace snapshots", () => {
  it("a space restored from exportState() at any step answers and evolves as the original does", () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 5, maxLength: 120 }), fc.nat(), (ops, at) => {
        const cut = at % (ops.length + 1);
        const eventsA: string[] = [];
        const a = new IoasidSpace({ capacity: CAPACITY, onEvent: (e) => eventsA.push(label(e)) });
        for (const op of ops.slice(0, cut)) apply(a, op);
        const state: SpaceState = a.exportState();
        const eventsB: string[] = [];
        const b = new IoasidSpace({ capacity: CAPACITY, onEvent: (e) => eventsB.push(label(e)) });
        b.restore(state, state.allocator === undefined ? undefined : customNamed(state.allocator));
        expect(observe(b)).toEqual(observe(a));
        expect(b.exportState()).toEqual(state);
        eventsA.length = 0;
        for (const op of ops.slice(cut)) {
          expect(apply(b, op)).toBe(apply(a, op));
          expect(eventsB).toEqual(eventsA);
        }
        expect(observe(b)).toEqual(observe(a));
        expect(b.exportState()).toEqual(a.exportState());
      }),
      { numRuns: 300 },
    );
  }, 60_000);

  it("keeps the generations of IOASIDs reclaimed before the snapshot: the next allocation continues them", () => {
    const a = new IoasidSpace({ capacity: CAPACITY });
    const set = a.createSet({ token: { type: TokenType.NONE, value: 1n }, quota: 0 });
    for (let i = 0; i < 3; i++) a.free(set.id, a.alloc(set.id).ioasid);
    const b = new IoasidSpace({ capacity: CAPACITY });
    b.restore(a.exportState());
    expect(b.alloc(set.id)).toEqual({ ioasid: 1, generation: 4 });
  });

  it("refuses a state that no call sequence could make, and a space that is not new", () => {
    const a = new IoasidSpace({ capacity: CAPACITY });
    const set = a.createSet({ token: { type: TokenType.NONE, value: 1n }, quota: 4 });
    a.get(set.id, a.alloc(set.id).ioasid, HOLDERS[0]!);
    const good = a.exportState();
    const refcounts = Uint32Array.from(good.ioasids.refcounts, (r) => r + 1);
    expect(() => new IoasidSpace({ capacity: CAPACITY }).restore({ ...good, ioasids: { ...good.ioasids, refcounts } })).toThrow(/reference count/);
    expect(() => new IoasidSpace({ capacity: CAPACITY + 1 }).restore(good)).toThrow(/capacity/);
    expect(() => new IoasidSpace({ capacity: CAPACITY }).restore({ ...good, sets: [] })).toThrow(/names no set/);
    expect(() => a.restore(good)).toThrow(/not new/);
    expect(() => new IoasidSpace({ capacity: CAPACITY }).restore(good, customNamed("vcmd"))).toThrow(/allocator/);
  });
});
