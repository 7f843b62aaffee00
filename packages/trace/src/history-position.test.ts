import { describe, expect, it } from "vitest";
import {
  decodePositions,
  encodePositions,
  MAX_CALL_POSITIONS,
  noteReceived,
  processPositions,
  registerPosition,
  takeReceived,
  touchPosition,
  type HistoryLink,
} from "./history-position.js";

// Order without clocks (issue 18): the positions a message carries between components, and what a
// recorder's next record names of them.

const at = (role: string, publisherSeq: number, instance = "i/1 x"): HistoryLink => ({ role, instance, incarnation: "run", publisherSeq });

describe("history positions", () => {
  it("round-trips through a header value, names with separators included, and drops what does not parse", () => {
    const links = [at("kvm", 3), at("ioasid", 9_007_199_254_740_991, "core")];
    expect(decodePositions(encodePositions(links))).toEqual(links);
    expect(decodePositions(`${encodePositions([at("kvm", 1)])} garbage a/b/c/0`)).toEqual([at("kvm", 1)]);
    expect(decodePositions(undefined)).toEqual([]);
  });

  it("gives each recorder the newest position of each publisher received since its previous record, once", () => {
    const a = new Map<string, number>();
    const b = new Map<string, number>();
    noteReceived([at("core-x", 4)]);
    noteReceived([at("core-x", 2)]); // older: kept at 4
    expect(takeReceived(a)).toContainEqual(at("core-x", 4));
    expect(takeReceived(a).filter((l) => l.role === "core-x")).toEqual([]);
    expect(takeReceived(b)).toContainEqual(at("core-x", 4)); // another recorder still gets it
    noteReceived([at("core-x", 5)]);
    expect(takeReceived(a).filter((l) => l.role === "core-x")).toEqual([at("core-x", 5)]);
  });

  it("sends the positions of the recorders that numbered a record last, at most a few", () => {
    for (let i = 0; i < MAX_CALL_POSITIONS + 4; i++) registerPosition("vm", `vm-${i}`, () => at("vm", 1, `vm-${i}`));
    touchPosition("vm", "vm-0");
    const sent = processPositions();
    expect(sent).toHaveLength(MAX_CALL_POSITIONS);
    expect(sent[0]).toEqual(at("vm", 1, "vm-0"));
    expect(sent.map((l) => l.instance)).not.toContain("vm-1");
  });
});
