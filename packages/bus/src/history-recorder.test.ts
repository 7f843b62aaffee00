import type { NatsConnection } from "@nats-io/transport-node";
import { describe, expect, it, vi } from "vitest";
import { decodeHistoryBatch, HistoryRecorder } from "./history.js";
import type { TypedHistoryRecord as HistoryRecord } from "./history-catalogue.js";

// Order without clocks (issue 18): a publisher's records are numbered once per process. The CI's
// chaos suite found 25–38 contradicting links in seeds 2 and 3: the three seeds run in one process,
// each with new recorders of the same publishers (chaos/driver, chaos/nemesis) numbering from 1
// again under the same process incarnation, while the positions the process had passed on from the
// seed before still named the old numbers. A core starting again after a cut start makes a second
// recorder of its publisher the same way.

// Numbering publishes nothing: no connection is used.
const nc = {} as NatsConnection;

/** A connection that takes publishes (through the outbox: with a reply subject) and never answers. */
function capturing(): { capture: NatsConnection; published: Array<{ subject: string; body: Uint8Array }> } {
  const published: Array<{ subject: string; body: Uint8Array }> = [];
  const capture = {
    publish: (subject: string, body: Uint8Array) => void published.push({ subject, body }),
    subscribe: () => ({ unsubscribe: () => undefined }),
    isClosed: () => false,
  } as unknown as NatsConnection;
  return { capture, published };
}

describe("HistoryRecorder numbering", () => {
  it("numbers on across recorders of the same publisher in one process, and apart for another publisher", () => {
    const first = new HistoryRecorder(nc, "ioasid", "core-numbering");
    expect([first.stamp().publisherSeq, first.stamp().publisherSeq]).toEqual([1, 2]);
    // The core starts again after a cut start: a new recorder of the same publisher.
    const again = new HistoryRecorder(nc, "ioasid", "core-numbering");
    expect(again.stamp().publisherSeq).toBe(3);
    expect(first.stamp().publisherSeq).toBe(4);
    expect(again.position()).toMatchObject({ role: "ioasid", instance: "core-numbering", publisherSeq: 4 });
    // Another instance has its own numbering.
    expect(new HistoryRecorder(nc, "ioasid", "core-other").stamp().publisherSeq).toBe(1);
  });
});

describe("HistoryRecorder encoding", () => {
  it("publishes batches that decode to the records made, small and large (one- to three-byte lengths), plain and grouped", () => {
    const { capture, published } = capturing();
    const r = new HistoryRecorder(capture, "chaos", "encoding");
    const notes = ["a", "b".repeat(200), "c".repeat(20_000), "d"];
    for (const [i, note] of notes.entries()) r.record({ $case: "chaosNote", value: { note } }, { ioasid: i + 1 }, 1000 + i);
    for (const [i, note] of notes.entries()) r.recordIn("op:1", { "Ioasid-Op": "1" }, { $case: "chaosNote", value: { note } }, { ioasid: 10 + i }, 2000 + i);
    r.flush();
    expect(published).toHaveLength(2);
    const [plain, grouped] = published.map((p) => decodeHistoryBatch(p.body, p.subject));
    const view = (recs: HistoryRecord[]) => recs.map((x) => [x.ioasid, x.ts, x.action?.$case === "chaosNote" ? x.action.value.note : undefined]);
    expect(view(plain!)).toEqual(notes.map((n, i) => [i + 1, 1000 + i, n]));
    expect(view(grouped!)).toEqual(notes.map((n, i) => [10 + i, 2000 + i, n]));
    // Numbered in the order made, across both.
    expect([...plain!, ...grouped!].map((x) => x.publisherSeq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
  });
});

describe("HistoryRecorder: records built when made, encoded when published (issue 15)", () => {
  it("publishes what was recorded, not what the caller changed afterwards", () => {
    const { capture, published } = capturing();
    const r = new HistoryRecorder(capture, "chaos", "built-when-made");
    const fields = { ioasid: 5, generation: 1 };
    const value = { note: "before" };
    r.record({ $case: "chaosNote", value }, fields, 1000);
    r.recordIn("op:9", { "Ioasid-Op": "9" }, { $case: "chaosNote", value }, fields, 1001);
    // The encoding waits for the publish; the record does not.
    fields.ioasid = 6;
    value.note = "after";
    r.flush();
    const records = published.flatMap((p) => decodeHistoryBatch(p.body, p.subject));
    expect(records.map((x) => [x.ioasid, x.action?.$case === "chaosNote" ? x.action.value.note : undefined])).toEqual([
      [5, "before"],
      [5, "before"],
    ]);
  });

  it("splits one turn's plain records into messages of at most 256 KiB, in order", () => {
    const { capture, published } = capturing();
    const r = new HistoryRecorder(capture, "chaos", "split");
    // 40 records of about 20 KB: about 800 KB, so at least four messages.
    for (let i = 0; i < 40; i++) r.record({ $case: "chaosNote", value: { note: String(i % 10).repeat(20_000) } }, { ioasid: i + 1 }, 1000 + i);
    r.flush();
    expect(published.length).toBeGreaterThanOrEqual(4);
    for (const p of published) expect(p.body.length).toBeLessThanOrEqual(256 * 1024);
    expect(published.flatMap((p) => decodeHistoryBatch(p.body, p.subject)).map((x) => x.ioasid)).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
  });

  it("publishes at once, not at the end of the turn, when 4,096 plain records wait", () => {
    const { capture, published } = capturing();
    const r = new HistoryRecorder(capture, "chaos", "many");
    for (let i = 0; i < 4095; i++) r.record({ $case: "chaosNote", value: { note: "x" } }, { ioasid: i + 1 }, 1000);
    expect(published).toHaveLength(0);
    r.record({ $case: "chaosNote", value: { note: "x" } }, { ioasid: 4096 }, 1000);
    // Published now, in messages of at most 1,000 records, in order.
    expect(published).toHaveLength(5);
    expect(published.flatMap((p) => decodeHistoryBatch(p.body, p.subject)).map((x) => x.ioasid)).toEqual(Array.from({ length: 4096 }, (_, i) => i + 1));
  });
});

describe("HistoryRecorder flushDelayMs (issue 15: the core's sequential calls share a history message)", () => {
  it("publishes records made within the delay as one message when it passes, not at the end of each turn; flush() publishes at once", async () => {
    vi.useFakeTimers();
    try {
      const { capture, published } = capturing();
      const r = new HistoryRecorder(capture, "ioasid", "core-delay", undefined, { flushDelayMs: 5 });
      r.recordIn("op:1", { "Ioasid-Op": "1" }, { $case: "chaosNote", value: { note: "one" } }, { ioasid: 1 }, 1000);
      // The end of the turn (setImmediate) publishes nothing yet.
      await vi.advanceTimersByTimeAsync(1);
      r.recordIn("op:2", { "Ioasid-Op": "2" }, { $case: "chaosNote", value: { note: "two" } }, { ioasid: 2 }, 1001);
      expect(published).toHaveLength(0);
      await vi.advanceTimersByTimeAsync(4);
      // Both groups go out when the delay has passed: one flush, each group its own message.
      expect(published.map((p) => decodeHistoryBatch(p.body, p.subject).map((x) => x.ioasid))).toEqual([[1], [2]]);
      // flush() publishes what waits now, and the delay's timer does not publish it again.
      r.record({ $case: "chaosNote", value: { note: "three" } }, { ioasid: 3 }, 1002);
      r.flush();
      expect(published).toHaveLength(3);
      await vi.advanceTimersByTimeAsync(10);
      expect(published).toHaveLength(3);
    } finally {
      vi.useRealTimers();
    }
  });

  it("publishes a plain record at the end of its turn, and the grouped records waiting with it (plain first)", async () => {
    vi.useFakeTimers();
    try {
      const { capture, published } = capturing();
      const r = new HistoryRecorder(capture, "ioasid", "core-delay-plain", undefined, { flushDelayMs: 5 });
      r.recordIn("op:7", { "Ioasid-Op": "7" }, { $case: "chaosNote", value: { note: "grouped" } }, { ioasid: 7 }, 1000);
      // A plain record (the core's stream-admin audit, which no start publishes again) does not wait.
      r.record({ $case: "chaosNote", value: { note: "plain" } }, { ioasid: 8 }, 1001);
      await vi.advanceTimersByTimeAsync(1);
      expect(published.map((p) => decodeHistoryBatch(p.body, p.subject).map((x) => x.ioasid))).toEqual([[8], [7]]);
      await vi.advanceTimersByTimeAsync(10);
      expect(published).toHaveLength(2);
    } finally {
      vi.useRealTimers();
    }
  });

  it("publishes at the end of the turn without the option", async () => {
    const { capture, published } = capturing();
    const r = new HistoryRecorder(capture, "ioasid", "core-nodelay");
    r.record({ $case: "chaosNote", value: { note: "now" } }, { ioasid: 1 }, 1000);
    expect(published).toHaveLength(0);
    await new Promise((resolve) => setImmediate(resolve));
    expect(published).toHaveLength(1);
  });
});
