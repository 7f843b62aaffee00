import { afterEach, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { DEFAULT_PREFIX, eventOf, historySubject, HistoryRecorder, readHistory, stepLabel, type HistoryRecord } from "@ioasid/bus";
import { orderHistory } from "@ioasid/checker";
import { OpLog } from "@ioasid/ioasid-core";
import { core, events } from "@ioasid/proto";
import { startNats, waitFor, type NatsServer } from "@ioasid/testkit";
import { startCore, type CoreFixture } from "../support/core-fixture.js";

// The recorded history the timeline is drawn from: the core's events and every reference change,
// with the count after it, stored in JetStream.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
let fixture: CoreFixture | undefined;
let nats: NatsServer | undefined;
let nc: NatsConnection | undefined;
afterEach(async () => {
  await fixture?.stop();
  await nc?.close();
  await nats?.stop();
  fixture = undefined;
  nc = undefined;
  nats = undefined;
});

/** The stored history of one IOASID, as action:refcount (plus "*" for a recovered record), once it has `n` records. */
async function stepsOf(conn: NatsConnection, ioasid: number, since: number, n: number): Promise<{ steps: string[]; records: HistoryRecord[] }> {
  let records: HistoryRecord[] = [];
  await waitFor(
    async () => {
      records = (await readHistory(conn, { sinceMs: since })).filter((r) => r.role === "ioasid" && r.ioasid === ioasid);
      return records.length >= n;
    },
    { timeoutMs: 5000, message: `${n} history records of IOASID ${ioasid}` },
  );
  return { records, steps: records.map((r) => `${stepLabel(r)}:${r.refcount}${r.recovered === true ? "*" : ""}`) };
}

describe("history", () => {
  it("records the core's events and reference changes with their counts, in order", async () => {
    fixture = await startCore();
    const c = fixture.client;
    const since = Date.now();
    const set = (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token: 5n, quota: 4 }))).set!.setId;
    const { ioasid } = await c.alloc(P(core.AllocRequest, { setId: set }));
    const kvm = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
    await c.get(P(core.GetRequest, { setId: set, ioasid, holder: kvm }));
    await c.free(P(core.FreeRequest, { setId: set, ioasid }));
    await c.put(P(core.PutRequest, { setId: set, ioasid, holder: kvm }));
    const nc = await connect({ servers: fixture.nats.url });
    try {
      let steps: string[] = [];
      await waitFor(
        async () => {
          const h = await readHistory(nc, { sinceMs: since });
          steps = h.filter((r) => r.ioasid === ioasid).map((r) => `${stepLabel(r)}:${r.refcount}`);
          return steps.length >= 5;
        },
        { timeoutMs: 5000, message: "five history records" },
      );
      expect(steps).toEqual(["event:ALLOC:1", "ioasid_get:2", "event:FREE:1", "ioasid_put:0", "event:RECLAIM:0"]);
    } finally {
      await nc.close();
    }
  });

  it("a restarted core publishes, once, the history of logged operations its predecessor never recorded", async () => {
    nats = await startNats();
    fixture = await startCore({}, { nats });
    let c = fixture.client;
    const since = Date.now();
    const set = (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token: 6n, quota: 4 }))).set!.setId;
    const { ioasid, generation } = await c.alloc(P(core.AllocRequest, { setId: set }));
    const kvm = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
    await c.get(P(core.GetRequest, { setId: set, ioasid, holder: kvm }));
    await c.free(P(core.FreeRequest, { setId: set, ioasid }));
    nc = await connect({ servers: nats.url });
    expect((await stepsOf(nc, ioasid, since, 3)).steps).toEqual(["event:ALLOC:1", "ioasid_get:2", "event:FREE:1"]);
    await fixture.stop();

    // What a core leaves behind when its append's acknowledgement is lost (nats-server restarted
    // with it in flight) and it fail-stops: the operation is in the log, its history never went out.
    const log = await OpLog.open(nc);
    await log.replay(() => undefined);
    const putAt = Date.now();
    await log.append({ kind: "put", setId: set, ioasid, holder: kvm, generation, commitTimeMs: putAt });

    fixture = await startCore({}, { nats });
    c = fixture.client;
    const { records, steps } = await stepsOf(nc, ioasid, since, 5);
    expect(steps).toEqual(["event:ALLOC:1", "ioasid_get:2", "event:FREE:1", "ioasid_put:0*", "event:RECLAIM:0*"]);
    // Stamped with when the operation was applied, not when the record was published.
    expect(records.slice(3).map((r) => r.ts)).toEqual([putAt, putAt]);
    // Order without clocks (issue 18): numbered by the core that published them, and naming the
    // op-log message of their operation, which orders them after their predecessor's records.
    expect(records.slice(3).map((r) => r.opSeq)).toEqual([log.head, log.head]);
    expect(records[3]!.incarnation).not.toBe(records[2]!.incarnation);
    expect(records[2]!.opSeq).toBeLessThan(log.head);
    expect(orderHistory(records).happenedBefore(2, 3)).toBe(true);

    expect(fixture.proc.logs()).toContain(`"after":${log.head - 1},"records":2,"msg":"published the history of logged operations found unrecorded"`);

    // The next start finds those records stored and publishes nothing again; what it does is live.
    await fixture.stop();
    fixture = await startCore({}, { nats });
    c = fixture.client;
    expect(fixture.proc.logs()).not.toContain("found unrecorded");
    const again = await c.alloc(P(core.AllocRequest, { setId: set }));
    expect(again.ioasid).toBe(ioasid);
    const after = await stepsOf(nc, ioasid, since, 6);
    expect(after.steps).toEqual([...steps, "event:ALLOC:1"]);
  });

  it("publishes the records of the last operations when it stops gracefully, however long they would wait for company", async () => {
    // IOASID_CORE_HISTORY_FLUSH: an operation's records wait for company before they are published.
    // Ten minutes here, so only the graceful stop can publish them — before its connection closes,
    // which would drop them unsaid.
    nats = await startNats();
    fixture = await startCore({ IOASID_CORE_HISTORY_FLUSH: "10m" }, { nats });
    const c = fixture.client;
    const since = Date.now();
    const set = (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token: 9n, quota: 4 }))).set!.setId;
    const { ioasid } = await c.alloc(P(core.AllocRequest, { setId: set }));
    const f = fixture;
    fixture = undefined;
    expect(await f.stop()).toBe(0);
    nc = await connect({ servers: nats.url });
    const conn = nc;
    let mine: HistoryRecord[] = [];
    await waitFor(
      async () => {
        mine = (await readHistory(conn, { sinceMs: since })).filter((r) => r.role === "ioasid" && r.setId === set);
        return mine.some((r) => r.ioasid === ioasid);
      },
      // Bounded, not timed: generous for a busy machine; without the stop's flush nothing ever comes.
      { timeoutMs: 15_000, message: `the history of set ${set}'s allocation of IOASID ${ioasid}, published at the stop` },
    );
    expect(mine.every((r) => r.recovered !== true)).toBe(true);
  });

  it("stores a group of records published twice once (a replay racing its predecessor's late publish)", async () => {
    nats = await startNats();
    fixture = await startCore({}, { nats }); // creates the history stream
    nc = await connect({ servers: nats.url });
    const since = Date.now();
    const recorder = new HistoryRecorder(nc, "ioasid", "core");
    for (let round = 0; round < 2; round++) {
      for (let i = 0; i < 600; i++)
        recorder.recordIn(
          "ioasid-core:test:7",
          { "Ioasid-Op-Seq": "7" },
          { $case: "ioasidNotify", value: { type: events.EventType.EVENT_TYPE_ALLOC } },
          { ioasid: 9000 + i, refcount: 1 },
          since + i,
        );
      recorder.flush();
    }
    recorder.record({ $case: "chaosNote", value: { note: "marker" } }, { ioasid: 1 }, since + 1000);
    recorder.flush();
    let stored: HistoryRecord[] = [];
    await waitFor(
      async () => {
        stored = await readHistory(nc!, { sinceMs: since });
        return stored.some((r) => r.action?.$case === "chaosNote" && r.action.value.note === "marker");
      },
      { timeoutMs: 5000, message: "the marker record" },
    );
    const ids = stored.filter((r) => eventOf(r) === "ALLOC" && r.ioasid! >= 9000).map((r) => r.ioasid);
    expect(ids).toHaveLength(600);
    expect(new Set(ids).size).toBe(600);
  });

  it("refuses a history message of the old JSON format with what to do, never skipping it", async () => {
    nats = await startNats();
    fixture = await startCore({}, { nats }); // creates the history stream
    nc = await connect({ servers: nats.url });
    const since = Date.now();
    // What a version before the typed catalogue published: a JSON array of records with action strings.
    nc.publish(
      historySubject(DEFAULT_PREFIX, "kvm", "vm-1"),
      JSON.stringify([{ ts: since + 1, role: "kvm", instance: "vm-1", action: "vmcs_update", ioasid: 201, detail: "install gpasid 101 → hpasid 201" }]),
    );
    const recorder = new HistoryRecorder(nc, "kvm", "vm-1");
    recorder.record({ $case: "chaosNote", value: { note: "after" } }, {}, since + 2);
    recorder.flush();
    await nc.flush();
    await expect(readHistory(nc, { sinceMs: since })).rejects.toThrow(/history message of the old JSON format .*start from an empty store/);
    await expect(readHistory(nc, { sinceMs: since })).rejects.toMatchObject({ reason: "HISTORY_FORMAT_UNSUPPORTED" });
  });
});
