import { startSubscriber, type HandlerResult } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { createGrpcServer, createLogger } from "@ioasid/grpc-kit";
import { bus, core, events } from "@ioasid/proto";
import { ClauseFailure, ClauseSkipped, eventually, expectEqual, expectRefused, expectRefusedUnchanged, expectThat, show, type Clause } from "../clause.js";
import type { Harness, KitTier } from "../harness.js";
import type { RoleSuite } from "../suite.js";
import { eventOf, holdersOf, stateOf } from "./core-steps.js";

/**
 * The IOASID core's contract (DESIGN §3 semantics, §4 delivery, §7 S6/S8): every CoreService RPC
 * with valid and invalid input — each refusal checked to change nothing through GetSet, ListIoasids,
 * ListRegistrations and GetStats (whose last_seq also shows that nothing was emitted) — then the
 * events it commits (WatchEvents) and delivers (the kit registered at several tiers, with the bus
 * SDK), and what survives a kill -9.
 */

/** What the core clauses run with. */
export interface CoreCtx {
  readonly h: Harness;
  /** Size of the target's namespace (GetStats at the start). */
  readonly capacity: number;
  /** Top of the next range of IOASIDs handed to a clause that names IDs itself (counting down from capacity − 1). */
  nextHigh: number;
}

const { EventType, Priority, TokenType } = events;
/** The subscriber (and holder role) name the kit registers and takes references as. */
const KIT = "conform";
/** A set id no core hands out in this run (ids are never reused and count up from 1). */
const NO_SET = 0x7fff_fff0;
/**
 * How long a tier the kit plays holds a delivery before acknowledging it, so that a core which
 * sends to the next tier early is caught while the kit still holds it (well under any deadline:
 * it only widens the window; no clause asserts a time).
 */
const HOLD_MS = 300;

type Holder = core.Holder;

// ---------------------------------------------------------------------------------------------
// Steps

/** Runs `body`, then whatever it deferred (newest first), whether it passed or failed. */
async function scoped<T>(body: (defer: (cleanup: () => Promise<unknown>) => void) => Promise<T>): Promise<T> {
  const cleanups: Array<() => Promise<unknown>> = [];
  try {
    return await body((fn) => cleanups.push(fn));
  } finally {
    for (const fn of cleanups.reverse()) await fn().catch(() => undefined);
  }
}

/** A set with a fresh NONE token (or MM, or the token given). */
async function newSet(c: CoreCtx, opts: { quota?: number; tokenType?: events.TokenType; token?: bigint } = {}): Promise<core.IoasidSet> {
  const req = core.CreateSetRequest.fromPartial({
    tokenType: opts.tokenType ?? TokenType.TOKEN_TYPE_NONE,
    token: opts.token ?? c.h.uniqueToken(),
    quota: opts.quota ?? 8,
  });
  return (await c.h.core.createSet(req)).set!;
}

async function alloc(c: CoreCtx, setId: number, opts: { min?: number; max?: number; privateData?: Buffer } = {}): Promise<core.AllocResponse> {
  return c.h.core.alloc(core.AllocRequest.fromPartial({ setId, ...opts }));
}

async function free(c: CoreCtx, setId: number, ioasid: number, generation = 0): Promise<core.FreeResponse> {
  return c.h.core.free(core.FreeRequest.fromPartial({ setId, ioasid, generation }));
}

async function get(c: CoreCtx, setId: number, ioasid: number, holder: Holder | undefined, generation = 0): Promise<core.GetResponse> {
  return c.h.core.get(core.GetRequest.fromPartial({ setId, ioasid, holder, generation }));
}

async function put(c: CoreCtx, setId: number, ioasid: number, holder: Holder | undefined, generation = 0): Promise<core.PutResponse> {
  return c.h.core.put(core.PutRequest.fromPartial({ setId, ioasid, holder, generation }));
}

async function attachSpid(c: CoreCtx, setId: number, ioasid: number, spid: number, generation = 0): Promise<void> {
  await c.h.core.attachSpid(core.AttachSpidRequest.fromPartial({ setId, ioasid, spid, generation }));
}

async function detachSpid(c: CoreCtx, setId: number, ioasid: number, generation = 0): Promise<core.DetachSpidResponse> {
  return c.h.core.detachSpid(core.DetachSpidRequest.fromPartial({ setId, ioasid, generation }));
}

async function describe(c: CoreCtx, ioasid: number): Promise<core.IoasidInfo> {
  return (await c.h.core.describe({ ioasid })).info!;
}

async function stats(c: CoreCtx): Promise<core.GetStatsResponse> {
  return c.h.core.getStats({});
}

/** A holder the kit names for a reference it takes itself. */
function kitHolder(c: CoreCtx, purpose: string, instance = c.h.uniqueName("ref")): Holder {
  return { role: KIT, instance, purpose };
}

/** `role/instance/purpose×count` of a holder count (as holdersOf gives them). */
function holderLine(h: Holder, count = 1): string {
  return `${h.role}/${h.instance}/${h.purpose}×${count}`;
}

/**
 * `n` consecutive IOASIDs near the top of the namespace that no allocation in this run has
 * reached (the default allocator takes the lowest free ID; these are far above them).
 */
async function highIds(c: CoreCtx, n: number): Promise<number[]> {
  for (let tries = 0; tries < 64; tries++) {
    const hi = c.nextHigh;
    const lo = hi - n + 1;
    c.nextHigh = lo - 2;
    if (lo < 2) break;
    const ids = Array.from({ length: n }, (_, i) => lo + i);
    if ((await Promise.all(ids.map((id) => stateOf(c.h, id)))).every((s) => s === undefined)) return ids;
  }
  throw new ClauseFailure(`${n} unallocated IOASIDs near the top of the namespace`, "none left");
}

/**
 * What a refused call must leave as it was: the named sets and their IOASIDs, the registrations,
 * and the namespace's counters — last_seq included, so a refusal that emitted an event shows.
 */
async function snapshot(c: CoreCtx, setIds: readonly number[]): Promise<unknown> {
  const s = await stats(c);
  const orError = <T>(p: Promise<T>): Promise<T | string> => p.catch((err: unknown) => show(err));
  return {
    sets: await Promise.all(setIds.map((setId) => orError(c.h.core.getSet(core.GetSetRequest.fromPartial({ setId })).then((r) => r.set)))),
    ioasids: await Promise.all(setIds.map((setId) => orError(c.h.core.listIoasids({ setId }).then((r) => r.ioasids)))),
    registrations: (await c.h.core.listRegistrations({})).registrations,
    stats: {
      available: s.available,
      quotaTotal: s.quotaTotal,
      inUse: s.inUse,
      sets: s.sets,
      registrations: s.registrations,
      lastSeq: s.lastSeq,
      allocator: s.allocator,
    },
  };
}

/** `call` is refused with `code`/`reason` and changes nothing in `setIds` nor in the counters. */
async function refused(c: CoreCtx, setIds: readonly number[], call: () => Promise<unknown>, code: Code, reason: string, what: string): Promise<void> {
  await expectRefusedUnchanged(() => snapshot(c, setIds), call, code, reason, what);
}

/** A WatchEvents stream read in the background. */
interface Watch {
  readonly seen: events.IoasidEvent[];
  /** Waits until the events seen satisfy `accept`. */
  until(accept: (seen: readonly events.IoasidEvent[]) => boolean, expected: string): Promise<readonly events.IoasidEvent[]>;
  close(): Promise<void>;
}

function watch(c: CoreCtx, fromSeq: bigint): Watch {
  const controller = new AbortController();
  const seen: events.IoasidEvent[] = [];
  let failed: unknown;
  const reading = (async () => {
    try {
      for await (const r of c.h.core.watchEvents({ fromSeq, types: [] }, { signal: controller.signal })) seen.push(r.event!);
    } catch (err) {
      if (!controller.signal.aborted) failed = err;
    }
  })();
  return {
    seen,
    until: (accept, expected) =>
      eventually(
        async () => {
          if (failed !== undefined) throw failed;
          return seen;
        },
        accept,
        expected,
      ),
    close: async () => {
      controller.abort();
      await reading;
    },
  };
}

/** Events of a set, as `TYPE ioasid` (set events without the IOASID). */
function eventLines(seen: readonly events.IoasidEvent[], setId: number): string[] {
  return seen.filter((e) => e.setId === setId).map((e) => (e.ioasid === 0xffff_ffff ? name(e.type) : `${name(e.type)} ${e.ioasid}`));
}

function name(t: events.EventType): string {
  return events.eventTypeToJSON(t).replace("EVENT_TYPE_", "");
}

/** A subscriber the kit runs with the bus SDK (startSubscriber) and registers on a set. */
interface KitSubscriber {
  readonly instance: string;
  readonly registrationId: number;
  /** Events its handler ran for, in order (redeliveries the SDK answers from memory are not here). */
  readonly handled: events.IoasidEvent[];
  /** A holder as this subscriber: its acknowledgements release references named so. */
  holder(purpose: string): Holder;
  /** Stops receiving: the core finds no responder and records its deliveries as missed. */
  stop(): Promise<void>;
  /** Receives again: the SDK says hello on `<prefix>.core.hello`, and the core sends what it missed. */
  resume(): Promise<void>;
  close(): Promise<void>;
}

async function kitSubscriber(
  c: CoreCtx,
  priority: events.Priority,
  setId: number,
  opts: { instance?: string; handler?: (e: events.IoasidEvent) => Promise<HandlerResult | void> | HandlerResult | void; listening?: boolean } = {},
): Promise<KitSubscriber> {
  const instance = opts.instance ?? c.h.uniqueName("sub");
  const handled: events.IoasidEvent[] = [];
  const start = () =>
    startSubscriber({
      nc: c.h.nc,
      name: KIT,
      instance,
      prefix: c.h.prefix,
      handler: async (e) => {
        handled.push(e);
        return opts.handler?.(e);
      },
    });
  let sub = opts.listening === false ? undefined : await start();
  let registrationId: number;
  try {
    const req = core.RegisterRequest.fromPartial({ subscriber: { name: KIT, instance }, priority, scope: { $case: "setId", value: setId } });
    registrationId = (await c.h.core.register(req)).registration!.registrationId;
  } catch (err) {
    await sub?.stop();
    throw err;
  }
  return {
    instance,
    registrationId,
    handled,
    holder: (purpose) => ({ role: KIT, instance, purpose }),
    stop: async () => {
      await sub?.stop();
      sub = undefined;
    },
    resume: async () => {
      sub ??= await start();
    },
    close: async () => {
      await c.h.core.unregister({ registrationId }).catch(() => undefined);
      await sub?.stop();
      sub = undefined;
    },
  };
}

/** Waits until `done` or `ms` pass — a hold, not a check (see {@link HOLD_MS}). */
async function hold(done: () => boolean, ms: number): Promise<void> {
  const until = Date.now() + ms;
  while (!done() && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
}

/** The core's history records (role "ioasid") since `sinceMs`. */
function coreHistory(c: CoreCtx, sinceMs: number) {
  return c.h.history(sinceMs - 1, "ioasid");
}

/** An AllocatorService the kit serves: it answers what the clause sets, and records releases. */
interface KitAllocator {
  readonly address: string;
  /** What Allocate answers next: an IOASID, 0 (none), or "fail" (an error status). */
  answer: number | "fail";
  readonly released: number[];
  close(): Promise<void>;
}

async function startKitAllocator(): Promise<KitAllocator> {
  const server = createGrpcServer({ service: "conform-allocator", logger: createLogger("conform-allocator", { level: "silent" }), reflection: false });
  const kit: KitAllocator = {
    address: "",
    answer: 0,
    released: [],
    close: () => server.shutdown(0),
  };
  server.addService(core.AllocatorServiceService, {
    allocate: (req) => {
      const a = kit.answer;
      if (a === "fail") throw new Error("the kit's allocator fails this call");
      return { ioasid: a !== 0 && a >= req.min && a <= req.max ? a : 0 };
    },
    release: (req) => {
      kit.released.push(req.ioasid);
      return {};
    },
  });
  const port = await server.listen("127.0.0.1", 0);
  return Object.assign(kit, { address: `127.0.0.1:${port}` });
}

const FREE = EventType.EVENT_TYPE_FREE;

// ---------------------------------------------------------------------------------------------
// Clauses

const clauses: Clause<CoreCtx>[] = [
  {
    id: "core.allocator.custom",
    statement:
      "RegisterAllocator makes an external allocator take precedence (its choice is allocated, its 0 is RANGE_EXHAUSTED, its failure ALLOCATOR_FAILED, reclaims are released to it); switching needs no outstanding IOASIDs",
    source: "DESIGN §3 custom allocators; core.proto RegisterAllocator, UnregisterAllocator, Alloc, AllocatorService",
    async run(c) {
      const before = await stats(c);
      const name = c.h.uniqueName("alloc");
      if (before.inUse > 0) {
        // Switching needs no outstanding IOASIDs: a core already in use can only show the refusal.
        await refused(
          c,
          [],
          () => c.h.core.registerAllocator({ name, address: "127.0.0.1:1" }),
          Code.FAILED_PRECONDITION,
          "ALLOCATOR_BUSY",
          "RegisterAllocator with IOASIDs outstanding",
        );
        throw new ClauseSkipped(
          `the core has ${before.inUse} outstanding IOASIDs: only ALLOCATOR_BUSY was checked (run the kit against a fresh core for the rest)`,
        );
      }
      await scoped(async (defer) => {
        const kit = await startKitAllocator();
        defer(() => kit.close());
        for (const [what, req] of [
          ["the name default", { name: "default", address: kit.address }],
          ["an empty name", { name: "", address: kit.address }],
          ["an address that is not host:port", { name, address: "not an address" }],
        ] as const) {
          await refused(c, [], () => c.h.core.registerAllocator(req), Code.INVALID_ARGUMENT, "ALLOCATOR_INVALID", `RegisterAllocator with ${what}`);
        }
        await c.h.core.registerAllocator({ name, address: kit.address });
        defer(() => c.h.core.unregisterAllocator({ name }));
        expectEqual((await stats(c)).allocator, name, "GetStats.allocator after RegisterAllocator");
        await refused(
          c,
          [],
          () => c.h.core.registerAllocator({ name: `${name}-2`, address: kit.address }),
          Code.ALREADY_EXISTS,
          "ALLOCATOR_EXISTS",
          "a second RegisterAllocator",
        );
        const set = await newSet(c);
        const [x] = await highIds(c, 1);
        kit.answer = x!;
        const a = await alloc(c, set.setId);
        expectEqual(a.ioasid, x, "the IOASID Alloc returns under the kit's allocator (its choice)");
        expectEqual((await describe(c, x!)).setId, set.setId, "the set of the allocator's IOASID");
        kit.answer = 0;
        await refused(
          c,
          [set.setId],
          () => alloc(c, set.setId),
          Code.RESOURCE_EXHAUSTED,
          "IOASID_RANGE_EXHAUSTED",
          "Alloc when the allocator has none (answers 0)",
        );
        kit.answer = "fail";
        await refused(c, [set.setId], () => alloc(c, set.setId), Code.UNAVAILABLE, "ALLOCATOR_FAILED", "Alloc when the allocator fails");
        await refused(
          c,
          [set.setId],
          () => c.h.core.unregisterAllocator({ name }),
          Code.FAILED_PRECONDITION,
          "ALLOCATOR_BUSY",
          "UnregisterAllocator with its IOASID outstanding",
        );
        expectEqual((await free(c, set.setId, a.ioasid, a.generation)).outcome, core.FreeOutcome.FREE_OUTCOME_RECLAIMED, "Free of the allocator's IOASID");
        await eventually(
          async () => kit.released,
          (r) => r.includes(x!),
          `the allocator told (Release) that ${x} was reclaimed`,
        );
        await c.h.core.unregisterAllocator({ name });
        expectEqual((await stats(c)).allocator, "default", "GetStats.allocator after UnregisterAllocator");
        await refused(
          c,
          [],
          () => c.h.core.unregisterAllocator({ name }),
          Code.NOT_FOUND,
          "ALLOCATOR_NOT_FOUND",
          "UnregisterAllocator of an allocator not registered",
        );
        const y = await alloc(c, set.setId);
        await refused(
          c,
          [set.setId],
          () => c.h.core.registerAllocator({ name, address: kit.address }),
          Code.FAILED_PRECONDITION,
          "ALLOCATOR_BUSY",
          "RegisterAllocator while the default allocator has an IOASID out",
        );
        await free(c, set.setId, y.ioasid, y.generation);
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.stats.conservation",
    statement:
      "GetStats agrees with the lists: allocatable = capacity − 1 = available + Σ quotas, sets, registrations and in_use counted, last_seq moving with events (S6)",
    source: "DESIGN §7 S6; core.proto GetStats, ListSets, ListRegistrations, ListIoasids",
    async run(c) {
      const check = async (what: string) => {
        const s = await stats(c);
        const sets = (await c.h.core.listSets({})).sets;
        const regs = (await c.h.core.listRegistrations({})).registrations;
        const ioasids = (await c.h.core.listIoasids({ setId: 0 })).ioasids;
        expectEqual(
          {
            allocatable: s.allocatable,
            conserved: s.available + s.quotaTotal,
            quotaTotal: s.quotaTotal,
            sets: s.sets,
            registrations: s.registrations,
            inUse: s.inUse,
          },
          {
            allocatable: s.capacity - 1,
            conserved: s.capacity - 1,
            quotaTotal: sets.reduce((n, x) => n + x.quota, 0),
            sets: sets.length,
            registrations: regs.length,
            inUse: ioasids.length,
          },
          `GetStats against the lists (${what})`,
        );
        return s;
      };
      const s0 = await check("at the start");
      expectEqual(s0.capacity, c.capacity, "capacity");
      const set = await newSet(c, { quota: 5 });
      const a = await alloc(c, set.setId);
      await alloc(c, set.setId);
      const s1 = await check("after CreateSet and two Allocs");
      expectEqual(
        { available: s1.available, sets: s1.sets, inUse: s1.inUse },
        { available: s0.available - 5, sets: s0.sets + 1, inUse: s0.inUse + 2 },
        "the counters moved by CreateSet(quota 5) and two Allocs",
      );
      expectThat(s1.lastSeq > s0.lastSeq, `last_seq past ${s0.lastSeq}`, `${s1.lastSeq}`, "last_seq after three events");
      await free(c, set.setId, a.ioasid);
      await c.h.core.freeSet({ setId: set.setId });
      const s2 = await check("after FreeSet");
      expectEqual(
        { available: s2.available, sets: s2.sets, inUse: s2.inUse },
        { available: s0.available, sets: s0.sets, inUse: s0.inUse },
        "the counters once the set is freed whole",
      );
    },
  },
  {
    id: "core.rpc.create-set",
    statement: "CreateSet takes its quota from the pool and answers the set (GetSet by id and token agree); a token is unique only within its type",
    source: "DESIGN §3 sets; core.proto CreateSet, GetSet",
    async run(c) {
      const s0 = await stats(c);
      const token = c.h.uniqueToken();
      const set = await newSet(c, { quota: 8, token });
      expectEqual(
        { tokenType: set.tokenType, token: set.token, quota: set.quota, inUse: set.inUse, freeing: set.freeing },
        { tokenType: TokenType.TOKEN_TYPE_NONE, token, quota: 8, inUse: 0, freeing: false },
        "CreateSet's answer",
      );
      expectThat(set.setId !== 0, "a non-zero set id", set.setId);
      expectEqual((await c.h.core.getSet(core.GetSetRequest.fromPartial({ setId: set.setId }))).set, set, "GetSet by id");
      const byToken = await c.h.core.getSet(core.GetSetRequest.fromPartial({ tokenType: TokenType.TOKEN_TYPE_NONE, token }));
      expectEqual(byToken.set, set, "GetSet by token");
      expectEqual((await stats(c)).available, s0.available - 8, "GetStats.available after CreateSet(quota 8)");
      // The same value as an MM token is another set (unique within its type).
      const mm = await newSet(c, { quota: 1, token, tokenType: TokenType.TOKEN_TYPE_MM });
      expectThat(mm.setId !== set.setId, "another set for the same value as an MM token", mm);
      expectEqual((await c.h.core.listSets({})).sets.filter((x) => x.token === token).length, 2, "ListSets: both sets with that token value");
      await c.h.core.destroySet({ setId: mm.setId });
      await c.h.core.destroySet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.create-set.refused",
    statement:
      "CreateSet refuses a token in use (ALREADY_EXISTS TOKEN_IN_USE), no token, no token type, a quota past capacity, and a quota the pool cannot give (RESOURCE_EXHAUSTED CAPACITY_EXHAUSTED); none changes anything",
    source: "DESIGN §3 sets (Σ quotas ≤ capacity); core.proto CreateSet",
    async run(c) {
      const token = c.h.uniqueToken();
      const set = await newSet(c, { quota: 4, token });
      const create = (tokenType: events.TokenType, tok: bigint, quota: number) => () =>
        c.h.core.createSet(core.CreateSetRequest.fromPartial({ tokenType, token: tok, quota }));
      const ids = [set.setId];
      await refused(c, ids, create(TokenType.TOKEN_TYPE_NONE, token, 1), Code.ALREADY_EXISTS, "TOKEN_IN_USE", "CreateSet with a token in use");
      await refused(c, ids, create(TokenType.TOKEN_TYPE_NONE, 0n, 1), Code.INVALID_ARGUMENT, "TOKEN_EMPTY", "CreateSet with token 0");
      await refused(
        c,
        ids,
        create(TokenType.TOKEN_TYPE_UNSPECIFIED, c.h.uniqueToken(), 1),
        Code.INVALID_ARGUMENT,
        "TOKEN_TYPE_INVALID",
        "CreateSet with no token type",
      );
      await refused(
        c,
        ids,
        create(TokenType.TOKEN_TYPE_NONE, c.h.uniqueToken(), c.capacity),
        Code.INVALID_ARGUMENT,
        "QUOTA_INVALID",
        "CreateSet with quota = capacity",
      );
      const available = (await stats(c)).available;
      await refused(
        c,
        ids,
        create(TokenType.TOKEN_TYPE_NONE, c.h.uniqueToken(), available + 1),
        Code.RESOURCE_EXHAUSTED,
        "CAPACITY_EXHAUSTED",
        "CreateSet with one more than is available",
      );
      // Quota 0 takes all that is available: then nothing is left for another set.
      const all = await newSet(c, { quota: 0 });
      try {
        expectEqual(
          { quota: all.quota, available: (await stats(c)).available },
          { quota: available, available: 0 },
          "a set created with quota 0 (all available)",
        );
        await refused(
          c,
          [set.setId, all.setId],
          create(TokenType.TOKEN_TYPE_NONE, c.h.uniqueToken(), 0),
          Code.RESOURCE_EXHAUSTED,
          "CAPACITY_EXHAUSTED",
          "CreateSet(quota 0) with nothing available",
        );
      } finally {
        await c.h.core.destroySet({ setId: all.setId });
      }
      expectEqual((await stats(c)).available, available, "GetStats.available once the quota-0 set is destroyed (its quota returned)");
      await c.h.core.destroySet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.get-set",
    statement:
      "GetSet finds a set by id or token; an unknown one is NOT_FOUND SET_NOT_FOUND, a lookup without token or type INVALID_ARGUMENT; ListSets lists it",
    source: "core.proto GetSet, ListSets",
    async run(c) {
      const set = await newSet(c, { tokenType: TokenType.TOKEN_TYPE_MM });
      expectThat(
        (await c.h.core.listSets({})).sets.some((s) => s.setId === set.setId && s.tokenType === TokenType.TOKEN_TYPE_MM),
        `ListSets to hold set ${set.setId}`,
        "it does not",
      );
      const byToken = (await c.h.core.getSet(core.GetSetRequest.fromPartial({ tokenType: TokenType.TOKEN_TYPE_MM, token: set.token }))).set;
      expectEqual(byToken?.setId, set.setId, "GetSet by MM token");
      const ids = [set.setId];
      const getSet = (p: Partial<core.GetSetRequest>) => () => c.h.core.getSet(core.GetSetRequest.fromPartial(p));
      await refused(c, ids, getSet({ setId: NO_SET }), Code.NOT_FOUND, "SET_NOT_FOUND", "GetSet of an unknown id");
      await refused(
        c,
        ids,
        getSet({ tokenType: TokenType.TOKEN_TYPE_NONE, token: set.token }),
        Code.NOT_FOUND,
        "SET_NOT_FOUND",
        "GetSet by the MM token as NONE",
      );
      await refused(
        c,
        ids,
        getSet({ tokenType: TokenType.TOKEN_TYPE_NONE, token: 0n }),
        Code.INVALID_ARGUMENT,
        "TOKEN_EMPTY",
        "GetSet with neither id nor token",
      );
      await refused(
        c,
        ids,
        getSet({ tokenType: TokenType.TOKEN_TYPE_UNSPECIFIED, token: set.token }),
        Code.INVALID_ARGUMENT,
        "TOKEN_TYPE_INVALID",
        "GetSet by token without its type",
      );
      await c.h.core.destroySet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.adjust-set",
    statement:
      "AdjustSet raises and lowers a quota (0 adds all available); below usage is INVALID_ARGUMENT QUOTA_BELOW_USAGE, past the pool CAPACITY_EXHAUSTED, an unknown set SET_UNKNOWN; none changes anything",
    source: "DESIGN §3 sets; core.proto AdjustSet",
    async run(c) {
      const set = await newSet(c, { quota: 4 });
      // Another set's quota keeps "one past the pool" within the namespace (else it is QUOTA_INVALID).
      const other = await newSet(c, { quota: 2 });
      const adjust = (setId: number, quota: number) => () => c.h.core.adjustSet({ setId, quota });
      expectEqual((await adjust(set.setId, 6)()).set?.quota, 6, "AdjustSet to 6");
      expectEqual((await adjust(set.setId, 3)()).set?.quota, 3, "AdjustSet to 3");
      const available = (await stats(c)).available;
      expectEqual((await adjust(set.setId, 0)()).set?.quota, 3 + available, "AdjustSet(0): all available added");
      expectEqual((await stats(c)).available, 0, "GetStats.available after AdjustSet(0)");
      await adjust(set.setId, 3)();
      expectEqual((await stats(c)).available, available, "GetStats.available once lowered back");
      await alloc(c, set.setId);
      await alloc(c, set.setId);
      const ids = [set.setId];
      await refused(c, ids, adjust(set.setId, 1), Code.INVALID_ARGUMENT, "QUOTA_BELOW_USAGE", "AdjustSet below the 2 in use");
      await refused(c, ids, adjust(set.setId, 3 + available + 1), Code.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED", "AdjustSet one past the pool");
      await refused(c, ids, adjust(set.setId, c.capacity), Code.INVALID_ARGUMENT, "QUOTA_INVALID", "AdjustSet to capacity");
      await refused(c, ids, adjust(NO_SET, 2), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "AdjustSet of an unknown set");
      await c.h.core.freeSet({ setId: set.setId });
      await c.h.core.destroySet({ setId: other.setId });
    },
  },
  {
    id: "core.rpc.destroy-set",
    statement:
      "DestroySet destroys an empty set and returns its quota; a set with IOASIDs is FAILED_PRECONDITION SET_NOT_EMPTY, an unknown one SET_UNKNOWN; neither changes anything",
    source: "DESIGN §3 sets (destroyed only once empty); core.proto DestroySet",
    async run(c) {
      const set = await newSet(c, { quota: 6 });
      const a = await alloc(c, set.setId);
      await refused(
        c,
        [set.setId],
        () => c.h.core.destroySet({ setId: set.setId }),
        Code.FAILED_PRECONDITION,
        "SET_NOT_EMPTY",
        "DestroySet of a set with an IOASID",
      );
      await refused(c, [set.setId], () => c.h.core.destroySet({ setId: NO_SET }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "DestroySet of an unknown set");
      await free(c, set.setId, a.ioasid);
      const available = (await stats(c)).available;
      await c.h.core.destroySet({ setId: set.setId });
      expectEqual((await stats(c)).available, available + 6, "GetStats.available after DestroySet (quota returned)");
      await expectRefused(
        c.h.core.getSet(core.GetSetRequest.fromPartial({ setId: set.setId })),
        Code.NOT_FOUND,
        "SET_NOT_FOUND",
        "GetSet of the destroyed set",
      );
      await refused(c, [], () => c.h.core.destroySet({ setId: set.setId }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "DestroySet of a destroyed set");
    },
  },
  {
    id: "core.rpc.free-set",
    statement:
      "FreeSet frees every IOASID, takes no allocation meanwhile (SET_FREEING), is idempotent, and destroys the set when its last IOASID is reclaimed; an unknown set is SET_UNKNOWN",
    source: "DESIGN §3 sets (freeing a non-empty set); core.proto FreeSet",
    async run(c) {
      const set = await newSet(c, { quota: 4 });
      const pin = kitHolder(c, "pin");
      await alloc(c, set.setId);
      const b = await alloc(c, set.setId);
      await alloc(c, set.setId);
      await get(c, set.setId, b.ioasid, pin);
      expectEqual(await c.h.core.freeSet({ setId: set.setId }), { freed: 3, destroyed: false }, "FreeSet of a set with 3 IOASIDs, one referenced");
      const after = (await c.h.core.getSet(core.GetSetRequest.fromPartial({ setId: set.setId }))).set;
      expectEqual({ freeing: after?.freeing, inUse: after?.inUse }, { freeing: true, inUse: 1 }, "the set while its referenced IOASID is FREE_PENDING");
      expectEqual(
        (await c.h.core.listIoasids({ setId: set.setId })).ioasids.map((i) => ({ ioasid: i.ioasid, state: i.state })),
        [{ ioasid: b.ioasid, state: core.IoasidState.IOASID_STATE_FREE_PENDING }],
        "ListIoasids of the set being freed",
      );
      await refused(c, [set.setId], () => alloc(c, set.setId), Code.FAILED_PRECONDITION, "SET_FREEING", "Alloc in a set being freed");
      expectEqual(await c.h.core.freeSet({ setId: set.setId }), { freed: 0, destroyed: false }, "FreeSet again (idempotent)");
      expectEqual(await put(c, set.setId, b.ioasid, pin), { refcount: 0, reclaimed: true }, "Put of the last reference");
      await expectRefused(
        c.h.core.getSet(core.GetSetRequest.fromPartial({ setId: set.setId })),
        Code.NOT_FOUND,
        "SET_NOT_FOUND",
        "GetSet once its last IOASID is reclaimed",
      );
      const other = await newSet(c, { quota: 2 });
      await alloc(c, other.setId);
      expectEqual(await c.h.core.freeSet({ setId: other.setId }), { freed: 1, destroyed: true }, "FreeSet of a set whose IOASIDs nobody else holds");
      await refused(c, [], () => c.h.core.freeSet({ setId: other.setId }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "FreeSet of a destroyed set");
    },
  },
  {
    id: "core.rpc.alloc",
    statement:
      "Alloc gives the lowest free IOASID in [min, max], ACTIVE with the allocation reference and a generation; bad bounds, data too large, an unknown set, a full quota or range are refused and change nothing",
    source: "DESIGN §3 alloc; core.proto Alloc",
    async run(c) {
      const set = await newSet(c, { quota: 3 });
      const [lo, mid, hi] = await highIds(c, 3);
      const data = Buffer.from("conform");
      const a = await alloc(c, set.setId, { min: lo!, max: hi!, privateData: data });
      expectEqual(a.ioasid, lo, `Alloc in [${lo}, ${hi}]`);
      expectThat(a.generation !== 0, "a non-zero generation", a.generation);
      const info = await describe(c, a.ioasid);
      expectEqual(
        {
          setId: info.setId,
          state: info.state,
          refcount: info.refcount,
          holders: info.holders.map((x) => x.holder?.role),
          data: Buffer.from(info.privateData).toString(),
        },
        { setId: set.setId, state: core.IoasidState.IOASID_STATE_ACTIVE, refcount: 1, holders: ["set-owner"], data: "conform" },
        "the new IOASID (Describe)",
      );
      expectEqual((await alloc(c, set.setId, { min: lo!, max: hi! })).ioasid, mid, "the next Alloc in the range (lowest free)");
      const ids = [set.setId];
      await refused(
        c,
        ids,
        () => alloc(c, set.setId, { min: lo!, max: mid! }),
        Code.RESOURCE_EXHAUSTED,
        "IOASID_RANGE_EXHAUSTED",
        `Alloc in [${lo}, ${mid}], all taken`,
      );
      await refused(c, ids, () => alloc(c, set.setId, { min: hi!, max: mid! }), Code.INVALID_ARGUMENT, "INVALID_RANGE", "Alloc with min > max");
      await refused(c, ids, () => alloc(c, set.setId, { max: c.capacity }), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE", "Alloc with max = capacity");
      await refused(
        c,
        ids,
        () => alloc(c, set.setId, { privateData: Buffer.alloc(1025) }),
        Code.INVALID_ARGUMENT,
        "PRIVATE_DATA_TOO_LARGE",
        "Alloc with 1025 bytes of data",
      );
      await refused(c, ids, () => alloc(c, NO_SET), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "Alloc in an unknown set");
      await alloc(c, set.setId);
      await refused(c, ids, () => alloc(c, set.setId), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED", "Alloc past the set's quota of 3");
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.batch-alloc",
    statement:
      "BatchAlloc gives `count` IOASIDs in ascending order, all or nothing: a bad count (COUNT_INVALID), quota or range short are refused with none allocated",
    source: "core.proto BatchAlloc",
    async run(c) {
      const set = await newSet(c, { quota: 5 });
      const range = await highIds(c, 4);
      const batch = (a: Partial<core.BatchAllocRequest>) => () => c.h.core.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: set.setId, ...a }));
      const got = (await batch({ count: 3, min: range[0]!, max: range[3]! })()).allocations;
      expectEqual(
        got.map((x) => x.ioasid),
        range.slice(0, 3),
        "BatchAlloc of 3 in the range",
      );
      expectThat(
        got.every((x) => x.generation !== 0),
        "a generation each",
        got,
      );
      const ids = [set.setId];
      await refused(c, ids, batch({ count: 0 }), Code.INVALID_ARGUMENT, "COUNT_INVALID", "BatchAlloc of 0");
      await refused(c, ids, batch({ count: 65_537 }), Code.INVALID_ARGUMENT, "COUNT_INVALID", "BatchAlloc of 65537");
      await refused(
        c,
        ids,
        batch({ count: 2, min: range[0]!, max: range[3]! }),
        Code.RESOURCE_EXHAUSTED,
        "IOASID_RANGE_EXHAUSTED",
        "BatchAlloc of 2 with 1 free in the range",
      );
      await refused(c, ids, batch({ count: 3 }), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED", "BatchAlloc of 3 with 2 left of the quota");
      await refused(c, ids, batch({ count: 1, setId: NO_SET }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "BatchAlloc in an unknown set");
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.generations.stale",
    statement:
      "a reused IOASID has a newer generation; every call naming the old one is FAILED_PRECONDITION STALE_GENERATION and changes nothing (0 is unchecked)",
    source: "DESIGN §3 alloc (generations); core.proto conventions",
    async run(c) {
      const set = await newSet(c);
      const [x] = await highIds(c, 1);
      const first = await alloc(c, set.setId, { min: x!, max: x! });
      await free(c, set.setId, x!, first.generation);
      const now = await alloc(c, set.setId, { min: x!, max: x! });
      expectEqual(now.ioasid, x, "the same IOASID allocated again");
      expectThat(now.generation > first.generation, `a generation newer than ${first.generation}`, now.generation, "the reused IOASID's generation");
      const old = first.generation;
      const ids = [set.setId];
      const h = kitHolder(c, "gen");
      const stale = (what: string, call: () => Promise<unknown>) =>
        refused(c, ids, call, Code.FAILED_PRECONDITION, "STALE_GENERATION", `${what} naming the old generation`);
      await stale("Free", () => free(c, set.setId, x!, old));
      await stale("Get", () => get(c, set.setId, x!, h, old));
      await stale("Find", () => c.h.core.find({ setId: set.setId, ioasid: x!, generation: old }));
      await stale("AttachSpid", () => attachSpid(c, set.setId, x!, 5, old));
      await stale("AttachData", () =>
        c.h.core.attachData(core.AttachDataRequest.fromPartial({ setId: set.setId, ioasid: x!, data: Buffer.from("d"), generation: old })),
      );
      // With the current generation (and unchecked, 0) the same calls are accepted.
      await attachSpid(c, set.setId, x!, 5, now.generation);
      await c.h.core.attachData(core.AttachDataRequest.fromPartial({ setId: set.setId, ioasid: x!, data: Buffer.from("d"), generation: 0 }));
      await get(c, set.setId, x!, h, now.generation);
      await stale("Put", () => put(c, set.setId, x!, h, old));
      await stale("DetachSpid", () => detachSpid(c, set.setId, x!, old));
      await stale("DetachData", () => c.h.core.detachData({ setId: set.setId, ioasid: x!, generation: old }));
      expectEqual(
        (await c.h.core.find({ setId: set.setId, ioasid: x!, generation: 0 })).info?.generation,
        now.generation,
        "Find with generation 0 (unchecked)",
      );
      await put(c, set.setId, x!, h, now.generation);
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.ownership.other-set",
    statement:
      "every call naming another set's IOASID is PERMISSION_DENIED IOASID_NOT_IN_SET and changes nothing in either set; another set's SPID is not found",
    source: "DESIGN §3 ownership, §7 S3; core.proto conventions",
    async run(c) {
      const mine = await newSet(c);
      const theirs = await newSet(c);
      const a = await alloc(c, mine.setId, { privateData: Buffer.from("mine") });
      await attachSpid(c, mine.setId, a.ioasid, 77);
      const h = kitHolder(c, "own");
      await get(c, mine.setId, a.ioasid, h);
      const bare = await alloc(c, mine.setId);
      const ids = [mine.setId, theirs.setId];
      const y = theirs.setId;
      const denied = (what: string, call: () => Promise<unknown>) =>
        refused(c, ids, call, Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET", `${what} naming another set`);
      await denied("Free", () => free(c, y, a.ioasid));
      await denied("Get", () => get(c, y, a.ioasid, kitHolder(c, "steal")));
      await denied("Put", () => put(c, y, a.ioasid, h));
      await denied("Find", () => c.h.core.find({ setId: y, ioasid: a.ioasid, generation: 0 }));
      await denied("AttachSpid", () => attachSpid(c, y, bare.ioasid, 78));
      await denied("DetachSpid", () => detachSpid(c, y, a.ioasid));
      await denied("AttachData", () => c.h.core.attachData(core.AttachDataRequest.fromPartial({ setId: y, ioasid: bare.ioasid, data: Buffer.from("x") })));
      await denied("DetachData", () => c.h.core.detachData({ setId: y, ioasid: a.ioasid, generation: 0 }));
      await refused(
        c,
        ids,
        () => c.h.core.findBySpid(core.FindBySpidRequest.fromPartial({ setId: y, spid: 77 })),
        Code.NOT_FOUND,
        "SPID_NOT_FOUND",
        "FindBySpid of another set's SPID",
      );
      await put(c, mine.setId, a.ioasid, h);
      await c.h.core.freeSet({ setId: mine.setId });
      await c.h.core.destroySet({ setId: theirs.setId });
    },
  },
  {
    id: "core.rpc.get-put",
    statement:
      "Get and Put count references per named holder; a Put by a holder that holds none is FAILED_PRECONDITION NO_REFERENCE_HELD, a bad or reserved holder HOLDER_INVALID; neither changes anything",
    source: "DESIGN §3 references; core.proto Get, Put, Holder",
    async run(c) {
      const set = await newSet(c);
      const a = await alloc(c, set.setId);
      const inst = c.h.uniqueName("refs");
      const A = kitHolder(c, "a", inst);
      const B = kitHolder(c, "b", inst);
      expectEqual((await get(c, set.setId, a.ioasid, A)).refcount, 2, "refcount after Get A");
      expectEqual((await get(c, set.setId, a.ioasid, A)).refcount, 3, "refcount after Get A again");
      expectEqual((await get(c, set.setId, a.ioasid, B, a.generation)).refcount, 4, "refcount after Get B");
      const holders = (await holdersOf(c.h, a.ioasid)) ?? [];
      expectEqual(
        { first: holders[0]?.split("/")[0], rest: holders.slice(1).sort() },
        { first: "set-owner", rest: [holderLine(A, 2), holderLine(B, 1)] },
        "Describe's holders (the allocation reference first)",
      );
      expectEqual(await put(c, set.setId, a.ioasid, A), { refcount: 3, reclaimed: false }, "Put A");
      const ids = [set.setId];
      await refused(
        c,
        ids,
        () => put(c, set.setId, a.ioasid, kitHolder(c, "c", inst)),
        Code.FAILED_PRECONDITION,
        "NO_REFERENCE_HELD",
        "Put by a holder that holds none",
      );
      await put(c, set.setId, a.ioasid, A);
      await refused(
        c,
        ids,
        () => put(c, set.setId, a.ioasid, A),
        Code.FAILED_PRECONDITION,
        "NO_REFERENCE_HELD",
        "Put by a holder whose references are all put",
      );
      for (const [what, h] of [
        ["no holder", undefined],
        ["an empty role", { role: "", instance: inst, purpose: "x" }],
        ["the reserved role set-owner", { role: "set-owner", instance: inst, purpose: "x" }],
        ["a purpose with a space", { role: KIT, instance: inst, purpose: "a b" }],
      ] as const) {
        await refused(c, ids, () => get(c, set.setId, a.ioasid, h), Code.INVALID_ARGUMENT, "HOLDER_INVALID", `Get with ${what}`);
        await refused(c, ids, () => put(c, set.setId, a.ioasid, h), Code.INVALID_ARGUMENT, "HOLDER_INVALID", `Put with ${what}`);
      }
      await refused(c, ids, () => get(c, NO_SET, a.ioasid, B), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "Get in an unknown set");
      await put(c, set.setId, a.ioasid, B);
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.free",
    statement:
      "Free reclaims at once when only the allocation reference is held (RECLAIMED), else is FREE_PENDING; a second Free is ALREADY_FREE_PENDING and changes nothing; bad, unknown or unallocated IOASIDs are refused",
    source: "DESIGN §3 free; core.proto Free, FreeOutcome",
    async run(c) {
      const set = await newSet(c);
      const [x, unallocated] = await highIds(c, 2);
      const lone = await alloc(c, set.setId, { min: x!, max: x! });
      expectEqual(
        await free(c, set.setId, lone.ioasid, lone.generation),
        { outcome: core.FreeOutcome.FREE_OUTCOME_RECLAIMED, refcount: 0 },
        "Free with only the allocation reference",
      );
      expectEqual(await stateOf(c.h, lone.ioasid), undefined, "the IOASID after a RECLAIMED free (Describe)");
      const held = await alloc(c, set.setId);
      const h = kitHolder(c, "hold");
      await get(c, set.setId, held.ioasid, h);
      expectEqual(
        await free(c, set.setId, held.ioasid),
        { outcome: core.FreeOutcome.FREE_OUTCOME_FREE_PENDING, refcount: 1 },
        "Free with a holder's reference",
      );
      const info = await describe(c, held.ioasid);
      expectEqual(
        { state: info.state, refcount: info.refcount, holders: info.holders.map((x) => holderLine(x.holder!, x.count)) },
        { state: core.IoasidState.IOASID_STATE_FREE_PENDING, refcount: 1, holders: [holderLine(h)] },
        "the IOASID after Free (the allocation reference dropped)",
      );
      const ids = [set.setId];
      const before = await snapshot(c, ids);
      expectEqual(await free(c, set.setId, held.ioasid), { outcome: core.FreeOutcome.FREE_OUTCOME_ALREADY_FREE_PENDING, refcount: 1 }, "a second Free");
      expectEqual(await snapshot(c, ids), before, "the state after a second Free (nothing changed, nothing emitted)");
      await refused(c, ids, () => free(c, set.setId, 0), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE", "Free of IOASID 0");
      await refused(c, ids, () => free(c, set.setId, c.capacity), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE", "Free of IOASID = capacity");
      await refused(c, ids, () => free(c, set.setId, unallocated!), Code.NOT_FOUND, "IOASID_NOT_FOUND", "Free of an IOASID not allocated");
      await refused(c, ids, () => free(c, NO_SET, held.ioasid), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "Free in an unknown set");
      await put(c, set.setId, held.ioasid, h);
      await c.h.core.destroySet({ setId: set.setId });
    },
  },
  {
    id: "core.free.no-new-reference",
    statement:
      "no reference is taken in FREE_PENDING: Get, Find, FindBySpid (with or without holder), AttachSpid and AttachData are NOT_FOUND IOASID_FREE_PENDING and change nothing (S2)",
    source: "DESIGN §3 free, §7 S2; core.proto Get, Find, FindBySpid, AttachSpid, AttachData",
    async run(c) {
      const set = await newSet(c);
      const h = kitHolder(c, "pending");
      const bound = await alloc(c, set.setId);
      await attachSpid(c, set.setId, bound.ioasid, 31);
      await get(c, set.setId, bound.ioasid, h);
      const bare = await alloc(c, set.setId);
      await get(c, set.setId, bare.ioasid, h);
      await free(c, set.setId, bound.ioasid);
      await free(c, set.setId, bare.ioasid);
      const ids = [set.setId];
      const pending = (what: string, call: () => Promise<unknown>) =>
        refused(c, ids, call, Code.NOT_FOUND, "IOASID_FREE_PENDING", `${what} of a FREE_PENDING IOASID`);
      await pending("Get", () => get(c, set.setId, bound.ioasid, kitHolder(c, "late")));
      await pending("Get by a holder that holds one", () => get(c, set.setId, bound.ioasid, h));
      await pending("Find", () => c.h.core.find({ setId: set.setId, ioasid: bound.ioasid, generation: 0 }));
      await pending("FindBySpid", () => c.h.core.findBySpid(core.FindBySpidRequest.fromPartial({ setId: set.setId, spid: 31 })));
      await pending("FindBySpid with a holder", () =>
        c.h.core.findBySpid(core.FindBySpidRequest.fromPartial({ setId: set.setId, spid: 31, holder: kitHolder(c, "late") })),
      );
      await pending("AttachSpid", () => attachSpid(c, set.setId, bare.ioasid, 32));
      await pending("AttachData", () =>
        c.h.core.attachData(core.AttachDataRequest.fromPartial({ setId: set.setId, ioasid: bare.ioasid, data: Buffer.from("late") })),
      );
      await put(c, set.setId, bound.ioasid, h);
      await put(c, set.setId, bare.ioasid, h);
      await c.h.core.destroySet({ setId: set.setId });
    },
  },
  {
    id: "core.free.reclaim-at-zero",
    statement:
      "a FREE_PENDING IOASID is not allocated again while any holder has a reference; the last Put reclaims it, and it comes back with a newer generation (S1)",
    source: "DESIGN §3 free (reclaimed at the last put), §7 S1; core.proto Put",
    async run(c) {
      const set = await newSet(c);
      const [x] = await highIds(c, 1);
      const only = { min: x!, max: x! };
      const first = await alloc(c, set.setId, only);
      const h1 = kitHolder(c, "one");
      const h2 = kitHolder(c, "two");
      await get(c, set.setId, x!, h1);
      await get(c, set.setId, x!, h2);
      expectEqual((await free(c, set.setId, x!)).outcome, core.FreeOutcome.FREE_OUTCOME_FREE_PENDING, "Free with two holders");
      const ids = [set.setId];
      await refused(c, ids, () => alloc(c, set.setId, only), Code.RESOURCE_EXHAUSTED, "IOASID_RANGE_EXHAUSTED", `Alloc of ${x} while two holders reference it`);
      expectEqual(await put(c, set.setId, x!, h1), { refcount: 1, reclaimed: false }, "the first Put");
      await refused(c, ids, () => alloc(c, set.setId, only), Code.RESOURCE_EXHAUSTED, "IOASID_RANGE_EXHAUSTED", `Alloc of ${x} while one holder references it`);
      expectEqual(await put(c, set.setId, x!, h2), { refcount: 0, reclaimed: true }, "the last Put");
      expectEqual(await stateOf(c.h, x!), undefined, "the IOASID once reclaimed (Describe)");
      const again = await alloc(c, set.setId, only);
      expectThat(
        again.ioasid === x && again.generation > first.generation,
        `${x} again with a generation newer than ${first.generation}`,
        again,
        "Alloc after the reclaim",
      );
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.find",
    statement:
      "Find answers an IOASID of the set without taking a reference; one not allocated is NOT_FOUND IOASID_NOT_FOUND, IOASID 0 out of range, an unknown set SET_UNKNOWN",
    source: "core.proto Find",
    async run(c) {
      const set = await newSet(c);
      const a = await alloc(c, set.setId);
      await attachSpid(c, set.setId, a.ioasid, 12);
      const found = (await c.h.core.find({ setId: set.setId, ioasid: a.ioasid, generation: a.generation })).info;
      expectEqual(found, await describe(c, a.ioasid), "Find's answer (as Describe's)");
      expectEqual(found?.refcount, 1, "refcount after Find (no reference taken)");
      const [unallocated] = await highIds(c, 1);
      const ids = [set.setId];
      await refused(
        c,
        ids,
        () => c.h.core.find({ setId: set.setId, ioasid: unallocated!, generation: 0 }),
        Code.NOT_FOUND,
        "IOASID_NOT_FOUND",
        "Find of an IOASID not allocated",
      );
      await refused(
        c,
        ids,
        () => c.h.core.find({ setId: set.setId, ioasid: 0, generation: 0 }),
        Code.INVALID_ARGUMENT,
        "IOASID_OUT_OF_RANGE",
        "Find of IOASID 0",
      );
      await refused(
        c,
        ids,
        () => c.h.core.find({ setId: NO_SET, ioasid: a.ioasid, generation: 0 }),
        Code.INVALID_ARGUMENT,
        "SET_UNKNOWN",
        "Find in an unknown set",
      );
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.find-by-spid",
    statement:
      "FindBySpid translates an SPID, taking a reference only for a holder; SPID 0 or past 20 bits is SPID_OUT_OF_RANGE, an unknown one SPID_NOT_FOUND; refusals change nothing",
    source: "DESIGN §3 SPID; core.proto FindBySpid",
    async run(c) {
      const set = await newSet(c);
      const a = await alloc(c, set.setId);
      await attachSpid(c, set.setId, a.ioasid, 42);
      const find = (p: Partial<core.FindBySpidRequest>) => () => c.h.core.findBySpid(core.FindBySpidRequest.fromPartial({ setId: set.setId, ...p }));
      expectEqual(await find({ spid: 42 })(), { ioasid: a.ioasid, generation: a.generation, refcount: 1 }, "FindBySpid without a holder");
      const h = kitHolder(c, "spid");
      expectEqual(await find({ spid: 42, holder: h })(), { ioasid: a.ioasid, generation: a.generation, refcount: 2 }, "FindBySpid with a holder");
      expectThat(((await holdersOf(c.h, a.ioasid)) ?? []).includes(holderLine(h)), `${holderLine(h)} among the holders`, await holdersOf(c.h, a.ioasid));
      const ids = [set.setId];
      await refused(c, ids, find({ spid: 0 }), Code.INVALID_ARGUMENT, "SPID_OUT_OF_RANGE", "FindBySpid of SPID 0");
      await refused(c, ids, find({ spid: 0x10_0000 }), Code.INVALID_ARGUMENT, "SPID_OUT_OF_RANGE", "FindBySpid of SPID 2^20");
      await refused(c, ids, find({ spid: 43 }), Code.NOT_FOUND, "SPID_NOT_FOUND", "FindBySpid of an SPID not attached");
      await refused(
        c,
        ids,
        find({ spid: 42, holder: { role: "", instance: "x", purpose: "y" } }),
        Code.INVALID_ARGUMENT,
        "HOLDER_INVALID",
        "FindBySpid with an invalid holder",
      );
      await refused(c, ids, find({ spid: 42, setId: NO_SET }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "FindBySpid in an unknown set");
      await put(c, set.setId, a.ioasid, h);
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.spid",
    statement:
      "AttachSpid attaches one SPID per IOASID, unique within its set but not across sets; DetachSpid detaches it (unbind_emitted); a duplicate, second, out-of-range or missing SPID is refused and changes nothing (S4)",
    source: "DESIGN §3 SPID, §7 S4; core.proto AttachSpid, DetachSpid",
    async run(c) {
      const x = await newSet(c);
      const y = await newSet(c);
      const a = await alloc(c, x.setId);
      const b = await alloc(c, x.setId);
      const other = await alloc(c, y.setId);
      await attachSpid(c, x.setId, a.ioasid, 101, a.generation);
      await attachSpid(c, y.setId, other.ioasid, 101);
      expectEqual([(await describe(c, a.ioasid)).spid, (await describe(c, other.ioasid)).spid], [101, 101], "the same SPID in two sets");
      const ids = [x.setId, y.setId];
      await refused(c, ids, () => attachSpid(c, x.setId, b.ioasid, 101), Code.INVALID_ARGUMENT, "SPID_IN_USE", "AttachSpid of an SPID in use in the set");
      await refused(
        c,
        ids,
        () => attachSpid(c, x.setId, a.ioasid, 102),
        Code.FAILED_PRECONDITION,
        "SPID_ALREADY_ATTACHED",
        "a second AttachSpid on one IOASID",
      );
      await refused(c, ids, () => attachSpid(c, x.setId, b.ioasid, 0), Code.INVALID_ARGUMENT, "SPID_OUT_OF_RANGE", "AttachSpid of SPID 0");
      await refused(c, ids, () => attachSpid(c, x.setId, b.ioasid, 0x10_0000), Code.INVALID_ARGUMENT, "SPID_OUT_OF_RANGE", "AttachSpid of SPID 2^20");
      expectEqual(await detachSpid(c, x.setId, a.ioasid, a.generation), { spid: 101, unbindEmitted: true }, "DetachSpid");
      expectEqual((await describe(c, a.ioasid)).spid, 0, "the SPID after DetachSpid");
      await refused(c, ids, () => detachSpid(c, x.setId, a.ioasid), Code.FAILED_PRECONDITION, "SPID_NOT_ATTACHED", "DetachSpid with no SPID attached");
      await attachSpid(c, x.setId, b.ioasid, 101);
      expectEqual(
        (await c.h.core.findBySpid(core.FindBySpidRequest.fromPartial({ setId: x.setId, spid: 101 }))).ioasid,
        b.ioasid,
        "the SPID, detached, attached to another IOASID",
      );
      await c.h.core.freeSet({ setId: x.setId });
      await c.h.core.freeSet({ setId: y.setId });
    },
  },
  {
    id: "core.rpc.private-data",
    statement:
      "private data attaches once (again: FAILED_PRECONDITION PRIVATE_DATA_ATTACHED) until DetachData returns it; more than 1024 bytes is PRIVATE_DATA_TOO_LARGE; refusals change nothing",
    source: "DESIGN §3 private data; core.proto AttachData, DetachData",
    async run(c) {
      const set = await newSet(c);
      const a = await alloc(c, set.setId);
      const attach = (data: Buffer) => () => c.h.core.attachData(core.AttachDataRequest.fromPartial({ setId: set.setId, ioasid: a.ioasid, data }));
      const detach = () => c.h.core.detachData({ setId: set.setId, ioasid: a.ioasid, generation: a.generation });
      await attach(Buffer.from("first"))();
      expectEqual(Buffer.from((await describe(c, a.ioasid)).privateData).toString(), "first", "Describe's private data");
      const ids = [set.setId];
      await refused(c, ids, attach(Buffer.from("second")), Code.FAILED_PRECONDITION, "PRIVATE_DATA_ATTACHED", "a second AttachData");
      expectEqual(Buffer.from((await detach()).data).toString(), "first", "DetachData's answer");
      expectEqual((await describe(c, a.ioasid)).privateData.length, 0, "the private data after DetachData");
      await refused(c, ids, detach, Code.FAILED_PRECONDITION, "PRIVATE_DATA_NOT_ATTACHED", "DetachData with none attached");
      await refused(c, ids, attach(Buffer.alloc(1025)), Code.INVALID_ARGUMENT, "PRIVATE_DATA_TOO_LARGE", "AttachData of 1025 bytes");
      await attach(Buffer.alloc(1024, 7))();
      expectEqual((await describe(c, a.ioasid)).privateData.length, 1024, "private data of 1024 bytes, once detached and attached again");
      await c.h.core.freeSet({ setId: set.setId });
    },
  },
  {
    id: "core.rpc.describe-list",
    statement:
      "Describe answers any IOASID whatever its set; ListIoasids lists a set's (or every set's) IOASIDs ascending; out-of-range, unallocated and unknown-set queries are refused",
    source: "core.proto Describe, ListIoasids",
    async run(c) {
      const x = await newSet(c);
      const y = await newSet(c);
      const xs = (await c.h.core.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: x.setId, count: 3 }))).allocations.map((a) => a.ioasid);
      const ys = [(await alloc(c, y.setId)).ioasid];
      expectEqual((await describe(c, ys[0]!)).setId, y.setId, "Describe of another set's IOASID (no ownership check)");
      const listed = (await c.h.core.listIoasids({ setId: x.setId })).ioasids.map((i) => i.ioasid);
      expectEqual(
        listed,
        [...xs].sort((p, q) => p - q),
        "ListIoasids of the set",
      );
      const all = (await c.h.core.listIoasids({ setId: 0 })).ioasids.map((i) => i.ioasid);
      expectThat(
        [...xs, ...ys].every((id) => all.includes(id)) && all.every((id, i) => i === 0 || all[i - 1]! < id),
        `ListIoasids(0) ascending, with ${show([...xs, ...ys])}`,
        all,
      );
      const [unallocated] = await highIds(c, 1);
      const ids = [x.setId, y.setId];
      for (const id of [0, c.capacity, 0xffff_ffff]) {
        await refused(c, ids, () => c.h.core.describe({ ioasid: id }), Code.INVALID_ARGUMENT, "IOASID_OUT_OF_RANGE", `Describe of ${id}`);
      }
      await refused(c, ids, () => c.h.core.describe({ ioasid: unallocated! }), Code.NOT_FOUND, "IOASID_NOT_FOUND", "Describe of an IOASID not allocated");
      await refused(c, ids, () => c.h.core.listIoasids({ setId: NO_SET }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "ListIoasids of an unknown set");
      await c.h.core.freeSet({ setId: x.setId });
      await c.h.core.freeSet({ setId: y.setId });
    },
  },
  {
    id: "core.rpc.register",
    statement:
      "Register by set or globally is active at once; by MM token it is pending until the set is created (then delivered to) and pending again once it is destroyed (L4); ListRegistrations shows each",
    source: "DESIGN §3 notifier registration, §7 L4; core.proto Register, ListRegistrations, Registration",
    async run(c) {
      await scoped(async (defer) => {
        const regOf = async (id: number) => (await c.h.core.listRegistrations({})).registrations.find((r) => r.registrationId === id);
        const token = c.h.uniqueToken();
        const pending = await c.h.playTier(Priority.PRIORITY_DEVICE, { mmToken: token });
        defer(() => pending.close());
        const p0 = await regOf(pending.registrationId);
        expectEqual(
          { active: p0?.active, setId: p0?.activeSetId, priority: p0?.priority },
          { active: false, setId: 0, priority: Priority.PRIORITY_DEVICE },
          "a registration by MM token before its set exists",
        );
        const set = await newSet(c, { tokenType: TokenType.TOKEN_TYPE_MM, token });
        const p1 = await regOf(pending.registrationId);
        expectEqual({ active: p1?.active, setId: p1?.activeSetId }, { active: true, setId: set.setId }, "the MM registration once its set is created");
        const delivered = pending.onDelivery(
          (e) => e.type === EventType.EVENT_TYPE_ALLOC && e.setId === set.setId,
          async (e) => e.ioasid,
        );
        const a = await alloc(c, set.setId);
        expectEqual(await delivered, a.ioasid, "the ALLOC delivered to the activated registration");
        await free(c, set.setId, a.ioasid);
        await c.h.core.destroySet({ setId: set.setId });
        const p2 = await regOf(pending.registrationId);
        expectEqual({ active: p2?.active, setId: p2?.activeSetId }, { active: false, setId: 0 }, "the MM registration once its set is destroyed");
        const other = await newSet(c);
        const bySet = await c.h.core.register(
          core.RegisterRequest.fromPartial({
            subscriber: { name: KIT, instance: c.h.uniqueName("set") },
            priority: Priority.PRIORITY_IOMMU,
            scope: { $case: "setId", value: other.setId },
          }),
        );
        defer(() => c.h.core.unregister({ registrationId: bySet.registration!.registrationId }));
        expectEqual(
          { active: bySet.registration?.active, setId: bySet.registration?.activeSetId, events: [...(bySet.registration?.events ?? [])].sort() },
          {
            active: true,
            setId: other.setId,
            events: [EventType.EVENT_TYPE_ALLOC, EventType.EVENT_TYPE_FREE, EventType.EVENT_TYPE_BIND, EventType.EVENT_TYPE_UNBIND].sort(),
          },
          "a registration on a set (every set-scope event type)",
        );
        const global = await c.h.core.register(
          core.RegisterRequest.fromPartial({
            subscriber: { name: KIT, instance: c.h.uniqueName("global") },
            priority: Priority.PRIORITY_LAST,
            scope: { $case: "global", value: true },
          }),
        );
        defer(() => c.h.core.unregister({ registrationId: global.registration!.registrationId }));
        expectEqual(
          { active: global.registration?.active, events: [...(global.registration?.events ?? [])].sort() },
          { active: true, events: [EventType.EVENT_TYPE_FREE, EventType.EVENT_TYPE_SET_ALLOC, EventType.EVENT_TYPE_SET_FREE].sort() },
          "a global registration (FREE, SET_ALLOC, SET_FREE)",
        );
        const ids = (await c.h.core.listRegistrations({})).registrations.map((r) => r.registrationId);
        expectThat(
          [pending.registrationId, bySet.registration!.registrationId, global.registration!.registrationId].every((id) => ids.includes(id)),
          "ListRegistrations to hold all three",
          ids,
        );
        await c.h.core.unregister({ registrationId: bySet.registration!.registrationId });
        await c.h.core.destroySet({ setId: other.setId });
      });
    },
  },
  {
    id: "core.rpc.register.refused",
    statement:
      "Register on a set with IOASIDs is FAILED_PRECONDITION SET_NOT_EMPTY (no replay); the same subscriber and scope twice ALREADY_EXISTS; a bad subscriber, priority, scope, event type, token or set INVALID_ARGUMENT; none changes anything",
    source: "DESIGN §3 notifier registration; core.proto Register",
    async run(c) {
      await scoped(async (defer) => {
        const set = await newSet(c);
        const token = c.h.uniqueToken();
        const tier = await c.h.playTier(Priority.PRIORITY_CPU, { mmToken: token });
        defer(() => tier.close());
        const instance = c.h.uniqueName("reg");
        const reg = (p: Partial<core.RegisterRequest>) => () =>
          c.h.core.register(
            core.RegisterRequest.fromPartial({
              subscriber: { name: KIT, instance },
              priority: Priority.PRIORITY_DEVICE,
              scope: { $case: "setId", value: set.setId },
              ...p,
            }),
          );
        await alloc(c, set.setId);
        const ids = [set.setId];
        await refused(c, ids, reg({}), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY", "Register on a set with an IOASID");
        const tierSub = (await c.h.core.listRegistrations({})).registrations.find((r) => r.registrationId === tier.registrationId)!.subscriber!;
        await refused(
          c,
          ids,
          reg({ subscriber: tierSub, scope: { $case: "mmToken", value: token } }),
          Code.ALREADY_EXISTS,
          "REGISTRATION_EXISTS",
          "the same subscriber on the same MM token twice",
        );
        await refused(c, ids, reg({ subscriber: { name: "", instance } }), Code.INVALID_ARGUMENT, "SUBSCRIBER_INVALID", "Register with no subscriber name");
        await refused(c, ids, reg({ priority: Priority.PRIORITY_UNSPECIFIED }), Code.INVALID_ARGUMENT, "PRIORITY_INVALID", "Register with no priority");
        await refused(
          c,
          ids,
          () => c.h.core.register(core.RegisterRequest.fromPartial({ subscriber: { name: KIT, instance }, priority: Priority.PRIORITY_DEVICE })),
          Code.INVALID_ARGUMENT,
          "SCOPE_INVALID",
          "Register with no scope",
        );
        await refused(
          c,
          ids,
          reg({ scope: { $case: "global", value: true }, events: [EventType.EVENT_TYPE_ALLOC] }),
          Code.INVALID_ARGUMENT,
          "EVENT_TYPE_INVALID",
          "a global Register for ALLOC (a set-scope event)",
        );
        await refused(c, ids, reg({ scope: { $case: "mmToken", value: 0n } }), Code.INVALID_ARGUMENT, "TOKEN_EMPTY", "Register by MM token 0");
        await refused(c, ids, reg({ scope: { $case: "setId", value: NO_SET } }), Code.INVALID_ARGUMENT, "SET_UNKNOWN", "Register on an unknown set");
        await c.h.core.freeSet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.rpc.unregister",
    statement: "Unregister removes a registration (no more deliveries to it); an unknown one is NOT_FOUND REGISTRATION_NOT_FOUND and changes nothing",
    source: "core.proto Unregister, ListRegistrations",
    async run(c) {
      await scoped(async (defer) => {
        const set = await newSet(c);
        const tier = await c.h.playTier(Priority.PRIORITY_IOMMU, { setId: set.setId });
        defer(() => tier.close());
        const count = (await stats(c)).registrations;
        await c.h.core.unregister({ registrationId: tier.registrationId });
        const regs = (await c.h.core.listRegistrations({})).registrations;
        expectThat(!regs.some((r) => r.registrationId === tier.registrationId), `registration ${tier.registrationId} gone`, "still listed");
        expectEqual((await stats(c)).registrations, count - 1, "GetStats.registrations after Unregister");
        await refused(
          c,
          [set.setId],
          () => c.h.core.unregister({ registrationId: tier.registrationId }),
          Code.NOT_FOUND,
          "REGISTRATION_NOT_FOUND",
          "Unregister of a removed registration",
        );
        // A FREE reaches a LAST tier only after every higher tier had it (§4.1): once the kit's
        // global LAST tier has it, the removed IOMMU registration would have had ALLOC and FREE.
        const after = await c.h.playTier(Priority.PRIORITY_LAST, { global: true });
        defer(() => after.close());
        const a = await alloc(c, set.setId);
        const pin = kitHolder(c, "unreg");
        await get(c, set.setId, a.ioasid, pin);
        const freed = after.onDelivery(eventOf(FREE, a.ioasid), async () => undefined);
        await free(c, set.setId, a.ioasid);
        await freed;
        expectEqual(
          tier.received.filter((d) => d.event.setId === set.setId).map((d) => name(d.event.type)),
          [],
          "deliveries to the removed registration",
        );
        await put(c, set.setId, a.ioasid, pin);
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.rpc.watch-events",
    statement: "WatchEvents from 0 streams only new events; from a sequence number it replays from there in sequence order, then follows new commits",
    source: "core.proto WatchEvents",
    async run(c) {
      await scoped(async (defer) => {
        const set = await newSet(c);
        const last = (await stats(c)).lastSeq;
        const live = watch(c, 0n);
        defer(() => live.close());
        // The stream's start is not observable: commit markers until the first one shows.
        for (let i = 0; i < 40 && live.seen.length === 0; i++) {
          const m = await alloc(c, set.setId);
          await free(c, set.setId, m.ioasid);
          await new Promise((r) => setTimeout(r, 50));
        }
        await live.until((s) => s.length > 0, "an event on a stream opened from 0");
        expectThat(live.seen[0]!.seq > last, `the first event of a stream from 0 after seq ${last}`, `seq ${live.seen[0]!.seq}`);
        const first = (await stats(c)).lastSeq + 1n;
        const a = await alloc(c, set.setId);
        await attachSpid(c, set.setId, a.ioasid, 9);
        const replay = watch(c, first);
        defer(() => replay.close());
        const got = await replay.until((s) => s.length >= 2, "the replayed events");
        expectEqual(
          got.slice(0, 2).map((e) => ({ seq: e.seq, line: `${name(e.type)} ${e.ioasid}` })),
          [
            { seq: first, line: `ALLOC ${a.ioasid}` },
            { seq: first + 1n, line: `BIND ${a.ioasid}` },
          ],
          `WatchEvents from seq ${first}`,
        );
        await detachSpid(c, set.setId, a.ioasid);
        const followed = await replay.until(
          (s) => s.some((e) => e.type === EventType.EVENT_TYPE_UNBIND && e.ioasid === a.ioasid),
          "the UNBIND committed after the replay",
        );
        const seqs = followed.map((e) => e.seq);
        expectThat(
          seqs.every((s, i) => i === 0 || seqs[i - 1]! < s),
          "sequence numbers ascending",
          seqs.map(String),
        );
        await c.h.core.freeSet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.events.one-per-transition",
    statement:
      "exactly one event per state transition, committed (WatchEvents) and delivered (a kit tier): no FREE when free reclaims at once, nothing for a second Free or a Get, a RECLAIM at the last Put (S8)",
    source: "DESIGN §3 events (level-sensitive), §7 S8; core.proto Free, Put, EventType",
    async run(c) {
      await scoped(async (defer) => {
        const from = (await stats(c)).lastSeq + 1n;
        const w = watch(c, from);
        defer(() => w.close());
        const set = await newSet(c);
        const tier = await c.h.playTier(Priority.PRIORITY_DEVICE, { setId: set.setId });
        defer(() => tier.close());
        const pin = kitHolder(c, "s8");
        const a = await alloc(c, set.setId);
        await attachSpid(c, set.setId, a.ioasid, 5);
        await detachSpid(c, set.setId, a.ioasid);
        await attachSpid(c, set.setId, a.ioasid, 5);
        await get(c, set.setId, a.ioasid, pin);
        await free(c, set.setId, a.ioasid);
        await free(c, set.setId, a.ioasid);
        await put(c, set.setId, a.ioasid, pin);
        const b = await alloc(c, set.setId);
        await free(c, set.setId, b.ioasid);
        await c.h.core.destroySet({ setId: set.setId });
        const want = [
          "SET_ALLOC",
          `ALLOC ${a.ioasid}`,
          `BIND ${a.ioasid}`,
          `UNBIND ${a.ioasid}`,
          `BIND ${a.ioasid}`,
          `FREE ${a.ioasid}`,
          `RECLAIM ${a.ioasid}`,
          `ALLOC ${b.ioasid}`,
          `RECLAIM ${b.ioasid}`,
          "SET_FREE",
        ];
        const seen = await w.until((s) => s.some((e) => e.setId === set.setId && e.type === EventType.EVENT_TYPE_SET_FREE), "the SET_FREE of the clause's set");
        expectEqual(eventLines(seen, set.setId), want, "the events committed for the set (WatchEvents)");
        await eventually(
          async () => tier.received,
          (r) => r.some((d) => d.event.type === EventType.EVENT_TYPE_ALLOC && d.event.ioasid === b.ioasid),
          "the second ALLOC delivered to the kit's tier",
        );
        expectEqual(
          tier.received.map((d) => `${name(d.event.type)} ${d.event.ioasid}`),
          want.filter((l) => !l.startsWith("SET_") && !l.startsWith("RECLAIM")),
          "the events delivered to a set-scope registration",
        );
      });
    },
  },
  {
    id: "core.events.no-unbind-on-free-pending",
    statement: "DetachSpid of a FREE_PENDING IOASID releases the SPID with no UNBIND (unbind_emitted false; its FREE covers it)",
    source: "DESIGN §3 SPID (no UNBIND if already FREE); core.proto DetachSpid",
    async run(c) {
      await scoped(async (defer) => {
        const from = (await stats(c)).lastSeq + 1n;
        const w = watch(c, from);
        defer(() => w.close());
        const set = await newSet(c);
        const pin = kitHolder(c, "unbind");
        const a = await alloc(c, set.setId);
        await attachSpid(c, set.setId, a.ioasid, 8);
        await get(c, set.setId, a.ioasid, pin);
        await free(c, set.setId, a.ioasid);
        expectEqual(await detachSpid(c, set.setId, a.ioasid), { spid: 8, unbindEmitted: false }, "DetachSpid of a FREE_PENDING IOASID");
        const info = await describe(c, a.ioasid);
        expectEqual({ spid: info.spid, state: info.state }, { spid: 0, state: core.IoasidState.IOASID_STATE_FREE_PENDING }, "the IOASID after DetachSpid");
        // The last Put's RECLAIM comes after anything the detach emitted, in sequence order.
        await put(c, set.setId, a.ioasid, pin);
        const seen = await w.until((s) => s.some((e) => e.type === EventType.EVENT_TYPE_RECLAIM && e.ioasid === a.ioasid), "the RECLAIM at the last Put");
        expectEqual(
          eventLines(seen, set.setId).filter((l) => l !== "SET_ALLOC"),
          [`ALLOC ${a.ioasid}`, `BIND ${a.ioasid}`, `FREE ${a.ioasid}`, `RECLAIM ${a.ioasid}`],
          "the events committed for the IOASID (WatchEvents)",
        );
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.delivery.tier-order",
    statement: "a FREE reaches each tier (CPU → DEVICE → IOMMU → LAST, all played by the kit) only once every higher tier has acknowledged it",
    source: "DESIGN §3 priority order, §4.1 tier order",
    async run(c) {
      await scoped(async (defer) => {
        const set = await newSet(c);
        const order = [Priority.PRIORITY_CPU, Priority.PRIORITY_DEVICE, Priority.PRIORITY_IOMMU, Priority.PRIORITY_LAST];
        const tiers: KitTier[] = [];
        for (const p of order) {
          const t = await c.h.playTier(p, { setId: set.setId });
          defer(() => t.close());
          tiers.push(t);
        }
        const pin = kitHolder(c, "order");
        const a = await alloc(c, set.setId);
        await get(c, set.setId, a.ioasid, pin);
        const isFree = eventOf(FREE, a.ioasid);
        const acked = order.map(() => false);
        const seen = tiers.map((tier, i) =>
          tier.onDelivery(isFree, async () => {
            const higher = order.slice(0, i).map((p, j) => `${events.priorityToJSON(p)} ${acked[j] ? "acked" : "not acked"}`);
            // Held a while (or until the next tier has it), so that an early delivery is seen now.
            const next = tiers[i + 1];
            if (next !== undefined) await hold(() => next.received.some((d) => isFree(d.event)), HOLD_MS);
            acked[i] = true;
            return higher;
          }),
        );
        await free(c, set.setId, a.ioasid);
        const got = await Promise.all(seen);
        expectEqual(
          got,
          order.map((_, i) => order.slice(0, i).map((p) => `${events.priorityToJSON(p)} acked`)),
          "the higher tiers' acknowledgements when the FREE reached each tier",
        );
        await put(c, set.setId, a.ioasid, pin);
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.delivery.per-ioasid-order",
    statement: "each subscriber handles the events of one IOASID in sequence order, while many IOASIDs are in flight",
    source: "DESIGN §4.2 per-IOASID order",
    async run(c) {
      await scoped(async (defer) => {
        const set = await newSet(c);
        const tier = await c.h.playTier(Priority.PRIORITY_DEVICE, { setId: set.setId });
        defer(() => tier.close());
        const all = (await c.h.core.batchAlloc(core.BatchAllocRequest.fromPartial({ setId: set.setId, count: 6 }))).allocations;
        // The first IOASID's BIND is held, so its later events queue behind it while the others flow.
        const held = tier.onDelivery(eventOf(EventType.EVENT_TYPE_BIND, all[0]!.ioasid), () => hold(() => false, HOLD_MS));
        const pins = all.map(() => kitHolder(c, "seq"));
        await Promise.all(
          all.map(async (a, i) => {
            await attachSpid(c, set.setId, a.ioasid, 300 + i);
            await detachSpid(c, set.setId, a.ioasid);
            await attachSpid(c, set.setId, a.ioasid, 300 + i);
            await get(c, set.setId, a.ioasid, pins[i]);
            await free(c, set.setId, a.ioasid);
          }),
        );
        await held;
        await eventually(
          async () => tier.received,
          (r) => all.every((a) => r.some((d) => isFreeOf(d.event, a.ioasid))),
          "every FREE delivered",
        );
        for (const a of all) {
          const mine = tier.received.filter((d) => d.event.ioasid === a.ioasid).map((d) => d.event);
          expectEqual(
            mine.map((e) => name(e.type)),
            ["ALLOC", "BIND", "UNBIND", "BIND", "FREE"],
            `the events of IOASID ${a.ioasid} as the tier handled them`,
          );
          expectThat(
            mine.every((e, i) => i === 0 || mine[i - 1]!.seq < e.seq),
            `IOASID ${a.ioasid}'s events in sequence order`,
            mine.map((e) => String(e.seq)),
          );
        }
        await Promise.all(all.map((a, i) => put(c, set.setId, a.ioasid, pins[i])));
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.delivery.releases-with-ack",
    statement: "a release in a subscriber's acknowledgement drops that subscriber's named reference (and only that one)",
    source: "DESIGN §4.3 (an ack may release the reference in the same message); bus.proto Ack.releases",
    async run(c) {
      await scoped(async (defer) => {
        const set = await newSet(c);
        const sub = await kitSubscriber(c, Priority.PRIORITY_DEVICE, set.setId, { handler: (e) => (e.type === FREE ? { release: ["dma"] } : undefined) });
        defer(() => sub.close());
        const a = await alloc(c, set.setId);
        await get(c, set.setId, a.ioasid, sub.holder("dma"));
        await get(c, set.setId, a.ioasid, sub.holder("keep"));
        await free(c, set.setId, a.ioasid);
        await eventually(
          async () => (await holdersOf(c.h, a.ioasid)) ?? [],
          (h) => h.length === 1 && h[0] === holderLine(sub.holder("keep")),
          `only ${holderLine(sub.holder("keep"))} left once the FREE is acknowledged with release "dma"`,
        );
        expectEqual(await put(c, set.setId, a.ioasid, sub.holder("keep")), { refcount: 0, reclaimed: true }, "the last Put after the release");
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.delivery.missed-moves-on",
    statement:
      "a tier that misses its deadline is recorded as missed (delivery_missed), the chain moves on to the next tier with its reference still held, and the missed delivery is retried until acknowledged",
    source: "DESIGN §4.4 deadlines, §4.5 durability; history.proto DeliveryMissed",
    async run(c) {
      await scoped(async (defer) => {
        const since = Date.now();
        const set = await newSet(c);
        const cpuInstance = c.h.uniqueName("late");
        const missedBefore = (await stats(c)).deliveriesMissed;
        // The CPU tier answers its FREE only once the core counts a missed delivery (its deadline passed).
        const cpu = await kitSubscriber(c, Priority.PRIORITY_CPU, set.setId, {
          instance: cpuInstance,
          handler: async (e) => {
            if (e.type !== FREE) return;
            const until = Date.now() + 30_000;
            while (Date.now() < until && (await stats(c)).deliveriesMissed <= missedBefore) await new Promise((r) => setTimeout(r, 50));
          },
        });
        defer(() => cpu.close());
        const tap = c.h.tap(KIT, cpuInstance);
        defer(async () => tap.close());
        const device = await c.h.playTier(Priority.PRIORITY_DEVICE, { setId: set.setId });
        defer(() => device.close());
        const a = await alloc(c, set.setId);
        const pin = cpu.holder("pin");
        await get(c, set.setId, a.ioasid, pin);
        const atDevice = device.onDelivery(eventOf(FREE, a.ioasid), async () => ({
          state: (await stateOf(c.h, a.ioasid))?.state,
          holders: await holdersOf(c.h, a.ioasid),
        }));
        expectEqual(
          (await free(c, set.setId, a.ioasid)).outcome,
          core.FreeOutcome.FREE_OUTCOME_FREE_PENDING,
          "Free with a CPU tier that will miss its deadline",
        );
        expectEqual(
          await atDevice,
          { state: core.IoasidState.IOASID_STATE_FREE_PENDING, holders: [holderLine(pin)] },
          "the IOASID when the FREE reached the DEVICE tier past the missing CPU tier (its reference still held)",
        );
        await eventually(
          () => coreHistory(c, since),
          (recs) =>
            recs.some(
              (r) =>
                r.action.$case === "deliveryMissed" &&
                r.action.value.subscriber === KIT &&
                r.action.value.instance === cpuInstance &&
                r.action.value.type === FREE &&
                r.ioasid === a.ioasid,
            ),
          `a delivery_missed record for ${KIT}/${cpuInstance} (FREE of ${a.ioasid})`,
        );
        await eventually(
          async () => tap.seen.filter((t) => t.batch.deliveries.some((d) => isFreeOf(d.event, a.ioasid))),
          (ts) =>
            ts.some(
              (t) =>
                t.batch.deliveries.some((d) => isFreeOf(d.event, a.ioasid) && d.attempt >= 2) &&
                t.ack?.acks.some((k) => k.status === bus.AckStatus.ACK_STATUS_SETTLED) === true,
            ),
          "the missed FREE delivered again (attempt ≥ 2) and acknowledged",
        );
        await put(c, set.setId, a.ioasid, pin);
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.delivery.backlog-on-hello",
    statement: "a subscriber that was away (no responder) receives what it missed, in order, once it says hello again; its reference stays held meanwhile",
    source: "DESIGN §4.4–4.5 (a subscriber that returns receives what it missed); bus.proto Hello",
    async run(c) {
      await scoped(async (defer) => {
        const since = Date.now();
        const set = await newSet(c);
        const sub = await kitSubscriber(c, Priority.PRIORITY_IOMMU, set.setId, { listening: false });
        defer(() => sub.close());
        const a = await alloc(c, set.setId);
        const pin = sub.holder("pin");
        await get(c, set.setId, a.ioasid, pin);
        await attachSpid(c, set.setId, a.ioasid, 21);
        expectEqual((await free(c, set.setId, a.ioasid)).outcome, core.FreeOutcome.FREE_OUTCOME_FREE_PENDING, "Free while the subscriber is away");
        // Its deliveries must have been missed before it returns (else it would only receive them live).
        await eventually(
          () => coreHistory(c, since),
          (recs) => recs.filter((r) => r.action.$case === "deliveryMissed" && r.action.value.instance === sub.instance).length >= 3,
          `ALLOC, BIND and FREE recorded as missed by ${KIT}/${sub.instance}`,
        );
        expectEqual(await holdersOf(c.h, a.ioasid), [holderLine(pin)], "the holders while the subscriber is away");
        await sub.resume();
        await eventually(
          async () => sub.handled.filter((e) => e.ioasid === a.ioasid).map((e) => name(e.type)),
          (t) => t.length >= 3,
          "the three missed events delivered after hello",
        );
        expectEqual(
          sub.handled.map((e) => `${name(e.type)} ${e.ioasid}`),
          [`ALLOC ${a.ioasid}`, `BIND ${a.ioasid}`, `FREE ${a.ioasid}`],
          "what the returning subscriber received, in order",
        );
        await put(c, set.setId, a.ioasid, pin);
        await c.h.core.destroySet({ setId: set.setId });
      });
    },
  },
  {
    id: "core.history.records",
    statement:
      "the core records what it commits with the catalogue's actions: ioasid_notify per event, ioasid_get and ioasid_put with the holder and the count",
    source: "DESIGN §7 (checked from recorded history); history.proto IoasidNotify, ReferenceChange",
    async run(c) {
      const since = Date.now();
      const set = await newSet(c);
      const h = kitHolder(c, "hist");
      const a = await alloc(c, set.setId);
      await get(c, set.setId, a.ioasid, h);
      await free(c, set.setId, a.ioasid);
      await put(c, set.setId, a.ioasid, h);
      const holder = `${h.role}/${h.instance}/${h.purpose}`;
      const want = [
        "ioasid_notify ALLOC refcount 1",
        `ioasid_get ${holder} refcount 2`,
        "ioasid_notify FREE refcount 1",
        `ioasid_put ${holder} refcount 0`,
        "ioasid_notify RECLAIM refcount 0",
      ];
      await eventually(
        async () =>
          (await coreHistory(c, since))
            .filter((r) => r.ioasid === a.ioasid && r.generation === a.generation && r.setId === set.setId)
            .map((r) => {
              const act = r.action;
              if (act.$case === "ioasidNotify") return `ioasid_notify ${name(act.value.type)} refcount ${r.refcount}`;
              if (act.$case === "ioasidGet" || act.$case === "ioasidPut") {
                const x = act.value.holder;
                return `${act.$case === "ioasidGet" ? "ioasid_get" : "ioasid_put"} ${x?.role}/${x?.instance}/${x?.purpose} refcount ${r.refcount}`;
              }
              return `${act.$case}`;
            }),
        (got) => JSON.stringify(got) === JSON.stringify(want),
        `the core's records for IOASID ${a.ioasid}: ${show(want)}`,
      );
      await c.h.core.destroySet({ setId: set.setId });
    },
  },
  {
    id: "core.restart.durable",
    statement:
      "killed -9 with a FREE unacknowledged and restarted, the core keeps every acknowledged operation (sets, IOASIDs, references, SPIDs, data, registrations pending or active), hands out no IOASID twice, delivers the FREE again, moves its chain on, and delivers what is committed after",
    source: "DESIGN §4.5 (an event is never lost), §4.7 (no acknowledged operation lost, no IOASID handed out twice)",
    needs: ["restart"],
    async run(c) {
      // One restart for the whole clause: a core's start is most of what this clause costs.
      await scoped(async (defer) => {
        const set = await newSet(c, { quota: 8 });
        let releaseCpu: () => void = () => undefined;
        const cpuReleased = new Promise<void>((r) => (releaseCpu = r));
        defer(async () => releaseCpu());
        let holding = false;
        const cpuInstance = c.h.uniqueName("crash");
        // The CPU tier holds its FREE (no release) until the core has been killed.
        const cpu = await kitSubscriber(c, Priority.PRIORITY_CPU, set.setId, {
          instance: cpuInstance,
          handler: async (e) => {
            if (e.type !== FREE) return;
            holding = true;
            await cpuReleased;
          },
        });
        defer(() => cpu.close());
        const tap = c.h.tap(KIT, cpuInstance);
        defer(async () => tap.close());
        const device = await c.h.playTier(Priority.PRIORITY_DEVICE, { setId: set.setId });
        defer(() => device.close());
        const pendingToken = c.h.uniqueToken();
        const pending = await c.h.playTier(Priority.PRIORITY_CPU, { mmToken: pendingToken });
        defer(() => pending.close());
        const [x, y] = await highIds(c, 2);
        const h = kitHolder(c, "kept");
        const active = await alloc(c, set.setId, { privateData: Buffer.from("kept") });
        await attachSpid(c, set.setId, active.ioasid, 61);
        await get(c, set.setId, active.ioasid, h);
        await alloc(c, set.setId, { min: x!, max: x! });
        await get(c, set.setId, x!, h);
        await free(c, set.setId, x!);
        const reclaimed = await alloc(c, set.setId, { min: y!, max: y! });
        await free(c, set.setId, y!);
        const inFlight = await alloc(c, set.setId);
        const pin = cpu.holder("pin");
        await get(c, set.setId, inFlight.ioasid, pin);
        await free(c, set.setId, inFlight.ioasid);
        await eventually(
          async () => holding,
          (held) => held,
          "the FREE held at the CPU tier",
        );
        const orError = <T>(p: Promise<T>): Promise<T | string> => p.catch((err: unknown) => show(err));
        const mine = async () => ({
          set: await orError(c.h.core.getSet(core.GetSetRequest.fromPartial({ setId: set.setId })).then((r) => r.set)),
          ioasids: await orError(c.h.core.listIoasids({ setId: set.setId }).then((r) => r.ioasids)),
          registrations: (await c.h.core.listRegistrations({})).registrations.filter((r) =>
            [cpu, device, pending].some((t) => t.registrationId === r.registrationId),
          ),
        });
        const before = await mine();
        const seqBefore = (await stats(c)).lastSeq;
        await c.h.killTarget();
        releaseCpu();
        const seen = tap.seen.length;
        await c.h.startTarget();
        expectEqual(await mine(), before, "the set, its IOASIDs and the registrations after the restart");
        const seqAfter = (await stats(c)).lastSeq;
        expectThat(seqAfter >= seqBefore, `last_seq at least ${seqBefore} (no committed event lost)`, `${seqAfter}`);
        const fresh = await alloc(c, set.setId);
        expectThat(
          ![active.ioasid, x, inFlight.ioasid].includes(fresh.ioasid),
          `an IOASID other than the live ${show([active.ioasid, x, inFlight.ioasid])}`,
          fresh.ioasid,
          "Alloc after the restart",
        );
        await refused(
          c,
          [set.setId],
          () => alloc(c, set.setId, { min: x!, max: x! }),
          Code.RESOURCE_EXHAUSTED,
          "IOASID_RANGE_EXHAUSTED",
          `Alloc of the still-referenced ${x} after the restart`,
        );
        const again = await alloc(c, set.setId, { min: y!, max: y! });
        expectThat(
          again.generation > reclaimed.generation,
          `a generation newer than ${reclaimed.generation}`,
          again.generation,
          `the generation of ${y}, reclaimed before the restart`,
        );
        await eventually(
          async () => tap.seen.slice(seen),
          (ts) => ts.some((t) => t.batch.deliveries.some((d) => isFreeOf(d.event, inFlight.ioasid))),
          "the unacknowledged FREE delivered again to the CPU tier after the restart",
        );
        await eventually(
          async () => device.received,
          (r) => r.some((d) => isFreeOf(d.event, inFlight.ioasid)),
          "the FREE at the DEVICE tier after the restart",
        );
        const b = await alloc(c, set.setId);
        await eventually(
          async () => [
            cpu.handled.some((e) => e.type === EventType.EVENT_TYPE_ALLOC && e.ioasid === b.ioasid),
            device.received.some((d) => d.event.type === EventType.EVENT_TYPE_ALLOC && d.event.ioasid === b.ioasid),
          ],
          (got) => got[0] === true && got[1] === true,
          "an ALLOC committed after the restart delivered to both tiers",
        );
        expectEqual(await put(c, set.setId, x!, h), { refcount: 0, reclaimed: true }, `Put of the reference kept on ${x}`);
        await put(c, set.setId, active.ioasid, h);
        await put(c, set.setId, inFlight.ioasid, pin);
        const mm = await newSet(c, { tokenType: TokenType.TOKEN_TYPE_MM, token: pendingToken });
        defer(() => c.h.core.freeSet({ setId: mm.setId }));
        const activated = (await c.h.core.listRegistrations({})).registrations.find((r) => r.registrationId === pending.registrationId);
        expectEqual(activated?.active, true, "the kept pending registration once its set is created");
        await c.h.core.freeSet({ setId: set.setId });
      });
    },
  },
];

function isFreeOf(e: events.IoasidEvent | undefined, ioasid: number): boolean {
  return e?.type === FREE && e.ioasid === ioasid;
}

/** The IOASID core's contract (DESIGN §3, §4, §7). */
export const coreSuite: RoleSuite<CoreCtx> = {
  role: "core",
  summary: "the IOASID core: sets, quotas, IOASIDs, generations, named references, SPIDs, registrations, and ordered, acknowledged, durable delivery",
  target:
    "ioasid.core.v1.CoreService and grpc.health.v1 at --target (IOASID_CORE_GRPC_ADDRESS); NATS at NATS_URL for delivery (subjects of packages/bus) and history",
  prepare: async (h) => {
    const capacity = (await h.core.getStats({})).capacity;
    return { h, capacity, nextHigh: capacity - 1 };
  },
  clauses,
};
