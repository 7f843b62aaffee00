import { isDeepStrictEqual } from "node:util";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, DiscardPolicy, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import { DomainError } from "@ioasid/errors";
import { TokenType, Priority } from "@ioasid/ioasid";
import { events } from "@ioasid/proto";
import {
  encodeBatch,
  encodeOperation,
  IoasidCore,
  OP_LOG_FORMAT_HEADER,
  OpLog,
  OpLogFormat,
  type CommittedOperation,
  type OpLogOptions,
  type SnapshotInfo,
  type SnapshotStep,
} from "@ioasid/ioasid-core";
import { startNats, type NatsServer } from "@ioasid/testkit";
import { createPrng } from "@ioasid/chaos"; // mulberry32: a seed replays the same steps

// Snapshots of the core's op log (issue 15, DESIGN §9): a core restarted from a snapshot and the
// log's tail holds exactly the state of a core that applied every operation; the log is trimmed
// behind each snapshot; a crash at any step of writing one loses no acknowledged operation; a store
// written before snapshots replays as before. In process, against a real nats-server: the core's
// model, its op log and JetStream, without the gRPC layer (tested end to end in core-snapshot-process).

const CAPACITY = 4096;

let nats: NatsServer;
const conns: NatsConnection[] = [];
let streamNo = 0;
beforeAll(async () => {
  nats = await startNats();
});
afterEach(async () => {
  for (const nc of conns.splice(0)) if (!nc.isClosed()) await nc.close();
});
afterAll(async () => {
  await nats?.stop();
});

async function newConnection(): Promise<NatsConnection> {
  const nc = await connect({ servers: nats.url });
  conns.push(nc);
  return nc;
}

function newStream(): { stream: string; subject: string } {
  streamNo++;
  return { stream: `SNAP_${streamNo}`, subject: `snap${streamNo}.core.ops` };
}

interface Opened {
  readonly core: IoasidCore;
  readonly opLog: OpLog;
  readonly replayed: number;
  readonly snapshots: SnapshotInfo[];
  readonly fatal: unknown[];
}

/** A core on the stream, recovered (snapshot and tail, or full replay) and sealed, as the service starts one. */
async function openCore(nc: NatsConnection, where: { stream: string; subject: string }, options: Partial<OpLogOptions> = {}): Promise<Opened> {
  const opLog = await OpLog.open(nc, { ...where, ...options });
  const fatal: unknown[] = [];
  const core = new IoasidCore({ capacity: CAPACITY, onFatal: (err) => fatal.push(err) });
  const replayed = await core.recover(opLog, undefined);
  await opLog.seal();
  const snapshots: SnapshotInfo[] = [];
  const logged = opLog.onSnapshot;
  opLog.onSnapshot = (info) => {
    snapshots.push(info);
    logged?.(info);
  };
  return { core, opLog, replayed, snapshots, fatal };
}

/** A core that keeps its state in memory only: what applying every operation gives (the reference). */
async function referenceCore(): Promise<IoasidCore> {
  const core = new IoasidCore({ capacity: CAPACITY });
  await core.recover(undefined, undefined);
  return core;
}

/** Everything replay rebuilds, as one comparable value: the model's whole state and the deliveries. */
function stateOf(core: IoasidCore): unknown {
  return { space: core.space.exportState(), deliveries: core.pendingDeliveries(), allocator: core.externalAllocator };
}

const HOLDERS = [
  { role: "kvm", instance: "vm-1", purpose: "vmcs" },
  { role: "vdcm", instance: "idxd0", purpose: "wq0" },
];
const SUBSCRIBERS = [
  { name: "kvm", instance: "vm-1", priority: Priority.CPU },
  { name: "iommu", instance: "dmar0", priority: Priority.IOMMU },
];

/**
 * One random operation, chosen from the state of `picker` (equal on every core it is run on), as a
 * function that runs it on a core: its result, or the reason the model refused it.
 */
function randomOperation(rand: () => number, picker: IoasidCore, bigData = false): (core: IoasidCore) => Promise<string> {
  const pick = <T>(xs: readonly T[]): T | undefined => (xs.length === 0 ? undefined : xs[Math.floor(rand() * xs.length)]);
  const space = picker.space;
  const set = pick(space.listSets());
  const setId = set?.id ?? 1;
  const ioasid = (set === undefined ? undefined : pick(space.listIoasids(setId)))?.ioasid ?? 1 + Math.floor(rand() * 50);
  const r = rand();
  const run = (f: (core: IoasidCore) => Promise<unknown>) => async (core: IoasidCore) => {
    try {
      return JSON.stringify(await f(core), (_, v: unknown) => (typeof v === "bigint" ? String(v) : v));
    } catch (err) {
      if (!(err instanceof DomainError)) throw err;
      return `refused ${err.reason}`;
    }
  };
  if (r < 0.05) {
    // Every random draw is made here, not in the closure: the closure runs once per core.
    const token = BigInt(1 + Math.floor(rand() * 12));
    const quota = 200 + Math.floor(rand() * 300);
    return run((c) => c.commit({ kind: "createSet", token: { type: TokenType.MM, value: token }, quota }));
  }
  if (r < 0.3) {
    const data = bigData ? new Uint8Array(1000).fill(Math.floor(rand() * 256)) : rand() < 0.2 ? Uint8Array.of(7, 1) : undefined;
    return run((c) => c.alloc(setId, data === undefined ? {} : { privateData: data }));
  }
  if (r < 0.35) {
    const count = 1 + Math.floor(rand() * 20);
    return run((c) => c.allocMany(setId, count, {}));
  }
  if (r < 0.5) return run((c) => c.commit({ kind: "free", setId, ioasid, generation: 0 }));
  if (r < 0.6) {
    const holder = pick(HOLDERS)!;
    return run((c) => c.commit({ kind: "get", setId, ioasid, holder, generation: 0 }));
  }
  if (r < 0.7) {
    const holder = pick(HOLDERS)!;
    return run((c) => c.commit({ kind: "put", setId, ioasid, holder, generation: 0 }));
  }
  if (r < 0.76) {
    const spid = 1 + Math.floor(rand() * 30);
    return run((c) => c.commit({ kind: "attachSpid", setId, ioasid, spid, generation: 0 }));
  }
  if (r < 0.8) return run((c) => c.commit({ kind: "detachSpid", setId, ioasid, generation: 0 }));
  if (r < 0.83) {
    const s = pick(SUBSCRIBERS)!;
    const scope = rand() < 0.5 ? ({ kind: "global" } as const) : ({ kind: "mm", token: BigInt(1 + Math.floor(rand() * 12)) } as const);
    return run((c) => c.commit({ kind: "register", options: { subscriber: { name: s.name, instance: s.instance }, priority: s.priority, scope } }));
  }
  if (r < 0.85) {
    const reg = pick(space.listRegistrations())?.id ?? 1;
    return run((c) => c.commit({ kind: "unregister", registrationId: reg }));
  }
  if (r < 0.87) return run((c) => c.commit({ kind: "freeSet", setId }));
  if (r < 0.97) {
    // A delivery acknowledged or missed (the engine's calls), for a registration that may be its target.
    const d = pick(picker.pendingDeliveries());
    const reg = pick(space.listRegistrations());
    const missed = rand() < 0.4;
    return async (core) => {
      if (d === undefined || reg === undefined) return "no delivery";
      const subscriber = reg.subscriber;
      if (missed) core.onMissed([{ seq: d.seq, registrationId: reg.id, subscriber, reason: "deadline" }]);
      else
        core.onAcks([
          { seq: d.seq, registrationId: reg.id, subscriber, event: events.IoasidEvent.fromPartial({}), releases: [], detachSpid: false, late: false },
        ]);
      await core.settled();
      return missed ? "missed" : "acked";
    };
  }
  const quota = 100 + Math.floor(rand() * 400);
  return run((c) => c.commit({ kind: "adjustSet", setId, quota }));
}

/**
 * Runs `n` random operations on `core` and `reference` in the same order, `burst` at a time without
 * waiting (so snapshots are taken while operations are in flight): each answer must be the same.
 */
async function drive(core: IoasidCore, reference: IoasidCore, n: number, seed: number, burst = 8, bigData = false): Promise<void> {
  const rand = createPrng(seed).next;
  for (let done = 0; done < n; done += burst) {
    const ops = Array.from({ length: Math.min(burst, n - done) }, () => randomOperation(rand, reference, bigData));
    // Same order on both: each op is applied synchronously when called (the model is synchronous).
    const expected = ops.map((op) => op(reference));
    const got = ops.map((op) => op(core));
    expect(await Promise.all(got)).toEqual(await Promise.all(expected));
  }
}

describe("core snapshots", () => {
  it("a restart from snapshot + tail holds exactly the state of every operation applied (random mix, many snapshots)", async () => {
    const where = newStream();
    const a = await openCore(await newConnection(), where, { snapshotEveryOps: 150 });
    const reference = await referenceCore();
    await drive(a.core, reference, 3000, 1);
    await a.opLog.drain();
    expect(a.fatal).toEqual([]);
    expect(a.snapshots.length).toBeGreaterThan(5);
    // Operations were written while some snapshot's chunks were: the marker carried them.
    expect(a.snapshots.some((s) => s.tailOperations > 0)).toBe(true);
    expect(stateOf(a.core)).toEqual(stateOf(reference));

    const b = await openCore(await newConnection(), where, { snapshotEveryOps: 150 });
    expect(b.opLog.lastReplay).toBeDefined();
    expect(b.replayed).toBeLessThan(3000);
    expect(stateOf(b.core)).toEqual(stateOf(reference));
    // And it goes on as the reference does (generations, ids, event sequence numbers).
    await drive(b.core, reference, 500, 2);
    await b.opLog.drain();
    const c = await openCore(await newConnection(), where);
    expect(stateOf(c.core)).toEqual(stateOf(reference));
  }, 120_000);

  it("trims the log: the stream holds about one snapshot interval of messages, whatever was written before", async () => {
    const where = newStream();
    const a = await openCore(await newConnection(), where, { snapshotEveryOps: 200 });
    const reference = await referenceCore();
    await drive(a.core, reference, 4000, 3, 1); // one message per operation
    await a.opLog.drain();
    const info = await (await jetstreamManager(a.opLog["nc"] as NatsConnection)).streams.info(where.stream, { subjects_filter: ">" });
    expect(info.state.last_seq).toBeGreaterThan(1500);
    // At most one interval of operation messages (plus the marker), and the chunks of two snapshots.
    expect(info.state.subjects?.[where.subject] ?? 0).toBeLessThanOrEqual(200 + 2);
    expect(info.state.messages).toBeLessThanOrEqual(200 + 2 + 2 * 2);
    const b = await openCore(await newConnection(), where);
    expect(b.replayed).toBeLessThanOrEqual(200);
    expect(stateOf(b.core)).toEqual(stateOf(reference));
  }, 120_000);

  const crashPoints: Array<{ name: string; at: (s: SnapshotStep) => boolean }> = [
    { name: "right after the state is taken", at: (s) => s.kind === "captured" },
    { name: "after the first chunk", at: (s) => s.kind === "chunk" && s.index === 0 && s.of > 1 },
    { name: "after the last chunk", at: (s) => s.kind === "chunk" && s.index === s.of - 1 },
    { name: "right before the marker", at: (s) => s.kind === "before-marker" },
    { name: "right after the marker", at: (s) => s.kind === "committed" },
  ];
  it.each(crashPoints)(
    "a crash $name loses no acknowledged operation, and the next snapshot writes over the orphans",
    async ({ at }) => {
      const where = newStream();
      const nc = await newConnection();
      let crashed = false;
      let armed = false;
      let crash!: () => void;
      const gone = new Promise<string>((resolve) => (crash = () => resolve("lost")));
      const a = await openCore(nc, where, {
        snapshotEveryOps: 0,
        snapshotEveryBytes: 0,
        snapshotChunkBytes: 4096, // several chunks
        onSnapshotStep: async (s) => {
          // The first snapshot is written whole (so a committed one exists); the crash is in the second.
          if (!armed || crashed || !at(s)) return;
          crashed = true;
          await nc.close(); // the process is gone: nothing more reaches JetStream
          crash();
          throw new Error("crash injected");
        },
      });
      const reference = await referenceCore();
      await drive(a.core, reference, 600, 10, 8, true);
      expect(await a.opLog.snapshot()).toBeDefined();
      await drive(a.core, reference, 300, 11, 8, true);
      armed = true;
      // Acknowledged: everything so far. Then the snapshot, with operations going on until the crash.
      const acked = stateOf(reference);
      const snapshot = a.opLog.snapshot().catch(() => undefined);
      const rand = createPrng(12).next;
      const states = [acked];
      let ackedStates = 1;
      for (let i = 0; i < 200 && !crashed; i++) {
        const op = randomOperation(rand, reference, true);
        const expected = op(reference);
        // An operation in flight at the crash gets no answer (the process would be gone).
        const answer = await Promise.race([op(a.core).catch(() => "lost"), gone]);
        states.push(stateOf(reference));
        await expected;
        if (answer === "lost" || crashed) break;
        ackedStates = states.length;
      }
      await snapshot;
      expect(crashed).toBe(true);
      expect(a.fatal.length).toBeGreaterThan(0);

      // The restart holds every acknowledged operation: its state is the reference's after all of
      // them, or after one more (written, unacknowledged when the crash came).
      const b = await openCore(await newConnection(), where);
      const restored = stateOf(b.core);
      const k = states.findIndex((s, i) => i >= ackedStates - 1 && isDeepStrictEqual(s, restored));
      expect(k, "the restored state is the state after every acknowledged operation (or one more)").toBeGreaterThanOrEqual(ackedStates - 1);
      expect(k).toBeLessThanOrEqual(ackedStates);
      // The next snapshot rolls the failed one's chunks up; a restart from it is whole again.
      expect(await b.opLog.snapshot()).toBeDefined();
      const c = await openCore(await newConnection(), where);
      expect(stateOf(c.core)).toEqual(restored);
      const info = await (await jetstreamManager(nc.isClosed() ? await newConnection() : nc)).streams.info(where.stream, { subjects_filter: ">" });
      const chunkSubjects = Object.keys(info.state.subjects ?? {}).filter((s) => s.includes(".snapshot."));
      expect(chunkSubjects.length).toBeLessThanOrEqual(2);
    },
    120_000,
  );

  it("replays a store written before snapshots as before, then takes it over: snapshots from then on", async () => {
    const where = newStream();
    const nc = await newConnection();
    // The stream as a core before snapshots made it: the op-log subject alone, no rollups.
    await (
      await jetstreamManager(nc)
    ).streams.add({
      name: where.stream,
      subjects: [where.subject],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      discard: DiscardPolicy.New,
      max_msgs: -1,
      max_bytes: -1,
    });
    // Its operations: those of a core that logged a random mix (elsewhere), copied as that core wrote them.
    const source = newStream();
    const logging = await openCore(nc, source, { snapshotEveryOps: 0, snapshotEveryBytes: 0 });
    const reference = await referenceCore();
    await drive(logging.core, reference, 300, 20);
    await logging.opLog.drain();
    const recorded: CommittedOperation[] = [];
    await (await OpLog.open(nc, source)).replay((op) => recorded.push(op));
    const js = jetstream(nc);
    for (let i = 0; i < recorded.length; i += 7) {
      const h = headers();
      h.set(OP_LOG_FORMAT_HEADER, OpLogFormat.BATCH);
      await js.publish(where.subject, encodeBatch(recorded.slice(i, i + 7).map(encodeOperation)), { headers: h });
    }
    const b = await openCore(nc, where, { snapshotEveryOps: 0, snapshotEveryBytes: 0 });
    expect(b.opLog.lastReplay).toBeUndefined();
    expect(b.replayed).toBe(recorded.length);
    expect(b.opLog.snapshotsDisabled).toBeUndefined();
    expect(stateOf(b.core)).toEqual(stateOf(reference));
    const config = (await (await jetstreamManager(nc)).streams.info(where.stream)).config;
    expect(config.allow_rollup_hdrs).toBe(true);
    expect(config.subjects).toContain(`${where.subject.slice(0, -4)}.snapshot.*`);
    expect(await b.opLog.snapshot()).toBeDefined();
    const c = await openCore(nc, where);
    expect(c.replayed).toBe(0);
    expect(stateOf(c.core)).toEqual(stateOf(reference));
  }, 120_000);
});
