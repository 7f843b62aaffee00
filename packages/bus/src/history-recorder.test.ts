import type { NatsConnection } from "@nats-io/transport-node";
import { describe, expect, it } from "vitest";
import { HistoryRecorder } from "./history.js";

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
