import { describe, expect, it } from "vitest";
import { ChaosUsageError } from "@ioasid/chaos";
import { chaosCommand, formatProgress, parseChaosOptions } from "./chaos-command.js";

describe("parseChaosOptions", () => {
  it("takes the defaults: seed 1, 4 guests, 30 s, every fault, .ioasid-chaos", () => {
    expect(parseChaosOptions({})).toEqual({
      seeds: [1],
      guests: 4,
      durationMs: 30_000,
      faults: ["kill-restart", "stop-cont", "nats-restart", "latency", "drop", "partition"],
      dir: ".ioasid-chaos",
      html: undefined,
      json: false,
      natsCluster: 1,
    });
  });

  it("reads a seed, a range of seeds, guests, a duration, a fault list, a dir, an HTML file and --json", () => {
    expect(parseChaosOptions({ seed: "7", guests: "2", duration: "1m", faults: "kill,partition", dir: "/tmp/c", html: "r.html", json: true })).toEqual({
      seeds: [7],
      guests: 2,
      durationMs: 60_000,
      faults: ["kill-restart", "partition"],
      dir: "/tmp/c",
      html: "r.html",
      json: true,
      natsCluster: 1,
    });
    expect(parseChaosOptions({ seeds: "1..3" }).seeds).toEqual([1, 2, 3]);
    expect(parseChaosOptions({ "nats-cluster": "3" }).natsCluster).toBe(3);
    expect(parseChaosOptions({ "nats-cluster": "3", netns: true }).netns).toBe(true);
    expect(parseChaosOptions({ "nats-cluster": "3", netns: false })).not.toHaveProperty("netns");
  });

  it("refuses bad values and bad combinations with a usage error", () => {
    for (const v of [
      { seed: "1", seeds: "1..2" },
      { seed: "1..2" },
      { guests: "0" },
      { guests: "x" },
      { duration: "60" },
      { faults: "fire" },
      { seeds: "1..2", html: "r.html" },
      { "nats-cluster": "0" },
      { "nats-cluster": "three" },
      { "nats-cluster": "8" },
      { "nats-cluster": "2" },
      { netns: true },
      { "nats-cluster": "1", netns: true },
    ]) {
      expect(() => parseChaosOptions(v), JSON.stringify(v)).toThrow(ChaosUsageError);
    }
  });
});

describe("formatProgress", () => {
  const p = {
    seed: 3,
    phase: "running" as const,
    elapsedMs: 15_000,
    durationMs: 30_000,
    ops: { ok: 120, fail: 4, info: 9 },
    faultsInjected: 6,
    faultsActive: 1,
    guestsStarted: 12,
    guestsRunning: 4,
  };

  it("draws a bar on a terminal, within its width", () => {
    const line = formatProgress(p, 160);
    expect(line).toMatch(/^seed 3 \[#+-+\] 15\.0\/30\.0 s running/);
    expect(line.length).toBeLessThan(160);
    expect(line).toContain("ops 120 ok 4 fail 9 info");
  });

  it("is a plain line otherwise", () => {
    expect(formatProgress(p)).toBe("chaos seed 3: 15.0/30.0 s running  ops 120 ok 4 fail 9 info  faults 6 (1 active)  guests 4 running, 12 started");
  });
});

describe("ioasidctl chaos", () => {
  it("exits 2 with the usage on bad flags or a missing verb, without starting anything", async () => {
    const err: string[] = [];
    const cmd = chaosCommand({ out: () => undefined, err: (l) => err.push(l), write: () => undefined, vmmCommand: ["node"], ttyColumns: undefined });
    expect(await cmd.run({ faults: "fire" }, ["run"])).toBe(2);
    expect(await cmd.run({}, [])).toBe(2);
    expect(err.join("\n")).toMatch(/unknown fault "fire"[\s\S]*usage: ioasidctl chaos run[\s\S]*the verb is "run"/);
  });
});
