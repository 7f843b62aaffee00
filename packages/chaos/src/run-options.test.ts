import { describe, expect, it } from "vitest";
import { ChaosUsageError, parseDuration, parseFaultKinds, parseSeeds } from "./run-options.js";

describe("parseFaultKinds", () => {
  it("reads all, none, short names and full kind names, in FaultKind order without repeats", () => {
    expect(parseFaultKinds("all")).toEqual(["kill-restart", "stop-cont", "nats-restart", "latency", "drop", "partition"]);
    expect(parseFaultKinds("none")).toEqual([]);
    expect(parseFaultKinds("partition,kill, latency,kill")).toEqual(["kill-restart", "latency", "partition"]);
    expect(parseFaultKinds("nats-restart,STOP")).toEqual(["stop-cont", "nats-restart"]);
  });

  it("refuses an unknown name or an empty list, naming what it takes", () => {
    expect(() => parseFaultKinds("kill,explode")).toThrow(ChaosUsageError);
    expect(() => parseFaultKinds("kill,explode")).toThrow(/unknown fault "explode".*kill,stop,nats,latency,drop,partition/);
    expect(() => parseFaultKinds(" , ")).toThrow(/needs a list/);
  });
});

describe("parseDuration", () => {
  it("reads ms, s, m and h", () => {
    expect(parseDuration("60s")).toBe(60_000);
    expect(parseDuration("1500ms")).toBe(1500);
    expect(parseDuration("1.5m")).toBe(90_000);
    expect(parseDuration("1h")).toBe(3_600_000);
  });

  it("refuses a bare number (ambiguous) with a hint, other text, and values out of bounds", () => {
    expect(() => parseDuration("60")).toThrow(/with a unit: 60s\?/);
    expect(() => parseDuration("soon")).toThrow(ChaosUsageError);
    expect(() => parseDuration("10ms")).toThrow(/between 1000 ms/);
    expect(() => parseDuration("2h", "--duration", 1000, 3_600_000)).toThrow(/got 7200000 ms/);
  });
});

describe("parseSeeds", () => {
  it("reads one seed, ranges and lists, in the order given", () => {
    expect(parseSeeds("7")).toEqual([7]);
    expect(parseSeeds("1..5")).toEqual([1, 2, 3, 4, 5]);
    expect(parseSeeds("3, 9..10,1")).toEqual([3, 9, 10, 1]);
    expect(parseSeeds("4294967295")).toEqual([4294967295]);
  });

  it("refuses what is not a seed, a range going down, and too many seeds", () => {
    expect(() => parseSeeds("-1")).toThrow(/not a seed/);
    expect(() => parseSeeds("4294967296")).toThrow(/not a seed/);
    expect(() => parseSeeds("5..2")).toThrow(/goes down/);
    expect(() => parseSeeds("1..20000")).toThrow(/more than 10,000/);
    expect(() => parseSeeds("")).toThrow(ChaosUsageError);
  });
});
