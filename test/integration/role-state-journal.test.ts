import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import {
  protoStateCodec,
  ROLE_STATE_JOURNAL_FORMAT,
  ROLE_STATE_UNREADABLE,
  RoleState,
  roleStateJournalSubject,
  RoleStateHeaders,
  roleStateStreamName,
  type RoleStateJournalOptions,
  type StateChange,
  type StateCodec,
} from "@ioasid/bus";
import { DomainError } from "@ioasid/errors";
import { createPrng } from "@ioasid/chaos";
import { bus, vdcmState } from "@ioasid/proto";
import { startNats, type NatsServer } from "@ioasid/testkit";

// Grouped role-state writes (issue 15: "one store write per batch, not per entry"): the writes a
// delivery batch's handlers make together are one journal message; slots are reused in a ring, an
// entry only a reused slot held is first published on its own subject; a reader applies every
// subject's last message in stream order. Checked against a plain Map after every step, with a
// ring small enough to wrap many times, and with the connection cut in the middle of a group.

type Entry = vdcmState.VdcmStateEntry;
const codec: StateCodec<Entry> = protoStateCodec(
  "ioasid.vdcm.v1.VdcmStateEntry",
  vdcmState.VdcmStateEntry,
  (e: Entry) => e,
  (m) => m,
);
const entry = (hpasid: number): Entry => ({
  entry: { $case: "pasidEntry", value: vdcmState.KeptDevicePasidEntry.fromPartial({ deviceId: "0000:6a:01.0", hpasid }) },
});

let nats: NatsServer;
let nc: NatsConnection;
beforeAll(async () => {
  nats = await startNats();
  nc = await connect({ servers: nats.url });
});
afterAll(async () => {
  await nc?.close();
  await nats?.stop();
});

const open = (prefix: string, journal?: RoleStateJournalOptions, conn: NatsConnection = nc) =>
  RoleState.open(conn, { prefix, role: "vdcm", instance: "v0", codec, ...(journal === undefined ? {} : { journal }) });

/** Messages kept under the instance's subjects, and how many subjects hold one. */
async function kept(prefix: string): Promise<{ messages: number; subjects: string[] }> {
  const jsm = await jetstreamManager(nc);
  const info = await jsm.streams.info(roleStateStreamName(prefix), { subjects_filter: `${prefix}.rolestate.vdcm.v0.>` });
  const subjects = Object.keys(info.state.subjects ?? {});
  return { messages: subjects.length, subjects };
}

describe("RoleState journal", () => {
  it("keeps the writes a batch's handlers make together as one message, and loads them back", async () => {
    const store = await open("journal-group");
    await store.load();
    // 64 handlers, one key each, in the same turn (a delivery batch of 64 FREEs).
    await Promise.all(Array.from({ length: 64 }, (_, i) => store.write([{ key: `entry/${i}`, value: entry(100 + i) }])));
    expect(await kept("journal-group")).toEqual({ messages: 1, subjects: [roleStateJournalSubject("journal-group", "vdcm", "v0", 0)] });
    // Two keys or fewer: one message per key, as before journals.
    await store.write([{ key: "dev/a", value: entry(1) }]);
    expect((await kept("journal-group")).messages).toBe(2);
    const again = await (await open("journal-group")).load();
    expect(again).toEqual(new Map([...Array.from({ length: 64 }, (_, i): [string, Entry] => [`entry/${i}`, entry(100 + i)]), ["dev/a", entry(1)]]));
  });

  for (const seed of [1, 2, 3]) {
    it(`equals a Map after every step of random writes, the ring wrapping many times (seed ${seed})`, async () => {
      const prefix = `journal-model-${seed}`;
      const journal = { slots: 3, minKeys: 3, maxBytes: 1024 };
      const random = createPrng(seed).next; // the chaos runner's mulberry32: a failing seed replays
      const model = new Map<string, Entry>();
      let store = await open(prefix, journal);
      await store.load();
      for (let step = 0; step < 60; step++) {
        // A few concurrent writes (one group), each of 1–30 changes over 40 keys: sets and deletes.
        const writes: StateChange<Entry>[][] = [];
        for (let w = 0, n = 1 + Math.floor(random() * 4); w < n; w++) {
          const changes: StateChange<Entry>[] = [];
          for (let c = 0, m = 1 + Math.floor(random() * 30); c < m; c++) {
            const key = `k/${Math.floor(random() * 40)}`;
            changes.push({ key, value: random() < 0.3 ? undefined : entry(step * 1000 + c) });
          }
          writes.push(changes);
        }
        await Promise.all(writes.map((changes) => store.write(changes)));
        for (const changes of writes) {
          for (const c of changes) {
            if (c.value === undefined) model.delete(c.key);
            else model.set(c.key, c.value);
          }
        }
        // A restart now and then: a fresh reader sees the model; the writer goes on from what it read.
        if (step % 7 === 6) {
          store = await open(prefix, journal);
          expect(await store.load()).toEqual(model);
        } else {
          expect(await (await open(prefix, journal)).load()).toEqual(model);
        }
      }
      // The ring is bounded: its slots, plus one subject per key that ever had to leave a slot.
      const { subjects } = await kept(prefix);
      expect(subjects.filter((s) => s.includes(".~j.")).length).toBeLessThanOrEqual(journal.slots);
      expect(subjects.length).toBeLessThanOrEqual(journal.slots + 40);
    }, 60_000);
  }

  it("leaves no message for a key that lived and died inside journals, when its slot is reused", async () => {
    const prefix = "journal-tombstones";
    const store = await open(prefix, { slots: 2 });
    await store.load();
    await store.write(Array.from({ length: 50 }, (_, i) => ({ key: `entry/${i}`, value: entry(i) })));
    await store.write(Array.from({ length: 50 }, (_, i) => ({ key: `entry/${i}`, value: undefined })));
    // Slot 0 (the sets) is reused: its entries are all deleted since, and never had a subject.
    await store.write(Array.from({ length: 3 }, (_, i) => ({ key: `dev/${i}`, value: entry(i) })));
    expect((await kept(prefix)).subjects.sort()).toEqual([roleStateJournalSubject(prefix, "vdcm", "v0", 0), roleStateJournalSubject(prefix, "vdcm", "v0", 1)]);
    expect(await (await open(prefix)).load()).toEqual(new Map(Array.from({ length: 3 }, (_, i): [string, Entry] => [`dev/${i}`, entry(i)])));
  });

  it("a writer that did not load first reads the ring before reusing a slot (nothing another process kept is overwritten)", async () => {
    const prefix = "journal-unloaded";
    const first = await open(prefix, { slots: 2 });
    await first.write(Array.from({ length: 5 }, (_, i) => ({ key: `a/${i}`, value: entry(i) })));
    // A second writer (a restarted role that clears nothing and loads nothing) writes two groups.
    const second = await open(prefix, { slots: 2 });
    await second.write(Array.from({ length: 5 }, (_, i) => ({ key: `b/${i}`, value: entry(10 + i) })));
    await second.write(Array.from({ length: 5 }, (_, i) => ({ key: `c/${i}`, value: entry(20 + i) })));
    const all = await (await open(prefix)).load();
    expect([...all.keys()].sort()).toEqual([...["a", "b", "c"].flatMap((p) => Array.from({ length: 5 }, (_, i) => `${p}/${i}`))].sort());
  });

  it("a connection cut in the middle of a group leaves every key at its previous or its new value", async () => {
    const prefix = "journal-cut";
    const journal = { slots: 4, maxBytes: 1024 };
    const before = new Map<string, Entry>(Array.from({ length: 200 }, (_, i): [string, Entry] => [`k/${i}`, entry(i)]));
    const setup = await open(prefix, journal);
    await setup.load();
    for (let i = 0; i < 200; i += 50) await setup.write([...before].slice(i, i + 50).map(([key, value]) => ({ key, value })));
    // A group of many journal messages (and evictions), its connection closed while it is published.
    const nc2 = await connect({ servers: nats.url, reconnect: false });
    const writer = await RoleState.open(nc2, { prefix, role: "vdcm", instance: "v0", codec, journal, retry: { attemptTimeoutMs: 300, retryMs: 1000 } });
    await writer.load();
    const after = new Map<string, Entry | undefined>(
      Array.from({ length: 200 }, (_, i): [string, Entry | undefined] => [`k/${i}`, i % 3 === 0 ? undefined : entry(5000 + i)]),
    );
    const write = writer.write([...after].map(([key, value]) => ({ key, value }))).catch((err: unknown) => err);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    await nc2.close();
    await write;
    const loaded = await (await open(prefix, journal)).load();
    for (const [key, old] of before) {
      const now = loaded.get(key);
      const next = after.get(key);
      expect([old, next]).toContainEqual(now);
    }
    expect([...loaded.keys()].every((k) => before.has(k))).toBe(true);
  });

  it("refuses a journal of another role's entries instead of misreading it", async () => {
    const prefix = "journal-foreign";
    const h = headers();
    h.set(RoleStateHeaders.FORMAT, ROLE_STATE_JOURNAL_FORMAT);
    h.set(RoleStateHeaders.ENTRY_FORMAT, "ioasid.kvm.v1.KvmStateEntry");
    const store = await open(prefix);
    await store.load(); // creates nothing, but the stream exists after open
    await jetstream(nc).publish(
      roleStateJournalSubject(prefix, "vdcm", "v0", 0),
      bus.RoleStateJournal.encode({ entries: [{ key: "x", entry: Buffer.from([8, 1]) }] }).finish(),
      {
        headers: h,
      },
    );
    const err = await (await open(prefix)).load().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DomainError);
    expect((err as DomainError).reason).toBe(ROLE_STATE_UNREADABLE);
    expect((err as DomainError).message).toMatch(/ioasid\.kvm\.v1\.KvmStateEntry/);
  });
});
