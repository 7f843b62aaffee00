import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";
import { history } from "@ioasid/proto";
import { describe, expect, it } from "vitest";
import { VdevClearCause } from "../domain/ports.js";
import { toHistorySink } from "./convert.js";

// VDCM's model records a clear's cause in its own words (domain code knows no proto); the adapter
// writes the catalogue's enum, one for one, and passes every other action through unchanged.
describe("VDCM's history sink over the bus", () => {
  const recorded: Array<{ action: HistoryActionInput; fields: HistoryFields | undefined }> = [];
  const sink = toHistorySink({ record: (action, fields) => void recorded.push({ action, fields }) });

  it("writes each clear cause as the catalogue's VdevClearCause", () => {
    const expected = {
      [VdevClearCause.MDEV_CLEAR]: history.VdevClearCause.VDEV_CLEAR_CAUSE_MDEV_CLEAR,
      [VdevClearCause.UNASSIGN]: history.VdevClearCause.VDEV_CLEAR_CAUSE_UNASSIGN,
      [VdevClearCause.FREE]: history.VdevClearCause.VDEV_CLEAR_CAUSE_FREE,
      [VdevClearCause.RECONCILE]: history.VdevClearCause.VDEV_CLEAR_CAUSE_RECONCILE,
    };
    for (const [cause, wire] of Object.entries(expected)) {
      recorded.length = 0;
      sink.record({ $case: "vdevClear", value: { device: "dsa0", wq: 1, mdev: "m", cause: cause as VdevClearCause } }, { seq: 7 });
      expect(recorded).toEqual([{ action: { $case: "vdevClear", value: { device: "dsa0", wq: 1, mdev: "m", cause: wire } }, fields: { seq: 7 } }]);
    }
    expect(new Set(Object.values(expected)).size).toBe(Object.keys(VdevClearCause).length);
  });

  it("passes other actions through as they are", () => {
    recorded.length = 0;
    const write: HistoryActionInput = { $case: "vdevWrite", value: { device: "dsa0", wq: 0, mdev: "m", gpasid: 101 } };
    sink.record(write, { refcount: 4 });
    expect(recorded).toEqual([{ action: write, fields: { refcount: 4 } }]);
  });
});
