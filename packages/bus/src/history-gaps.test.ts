import { describe, expect, it } from "vitest";
import { publisherGaps } from "./history-gaps.js";
import type { HistoryRecord } from "./history-catalogue.js";

const rec = (role: string, incarnation: string, publisherSeq: number | undefined): HistoryRecord =>
  ({ ts: 1, role, instance: "i", incarnation, ...(publisherSeq === undefined ? {} : { publisherSeq }) }) as HistoryRecord;

describe("publisherGaps", () => {
  it("names the numbers missing inside each publisher run, not before its first or after its last", () => {
    const records = [
      rec("kvm", "a", 7),
      rec("kvm", "a", 5),
      rec("kvm", "a", 9),
      rec("kvm", "a", 4),
      rec("vfio", "a", 2),
      rec("vfio", "a", 3),
      rec("kvm", "b", 1),
      rec("kvm", "b", 3),
    ];
    expect(publisherGaps(records)).toEqual([
      { publisher: "kvm/i/a", after: 5, before: 7 },
      { publisher: "kvm/i/a", after: 7, before: 9 },
      { publisher: "kvm/i/b", after: 1, before: 3 },
    ]);
  });

  it("finds none in a contiguous read, with records that carry no number, or with a number read twice", () => {
    expect(publisherGaps([rec("kvm", "a", 3), rec("kvm", "a", 4), rec("kvm", "a", 4), rec("core", "a", undefined), rec("kvm", "a", 5)])).toEqual([]);
  });
});
