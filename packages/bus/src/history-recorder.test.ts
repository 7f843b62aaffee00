import type { NatsConnection } from "@nats-io/transport-node";
import { describe, expect, it } from "vitest";
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
    const published: Array<{ subject: string; body: Uint8Array }> = [];
    // A connection that takes publishes (through the outbox: with a reply subject) and never answers.
    const capture = {
      publish: (subject: string, body: Uint8Array) => void published.push({ subject, body }),
      subscribe: () => ({ unsubscribe: () => undefined }),
      isClosed: () => false,
    } as unknown as NatsConnection;
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
