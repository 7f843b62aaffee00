import { describe, expect, it } from "vitest";
import { parseChaosRecord, createChaosRecord, FaultKind, HostFaultKind, SERVICE_TARGETS } from "@ioasid/checker";
import { schedule, toFaultMarker, withHostPartitions, type FaultInjection, type ScheduleOptions } from "./schedule.js";

const RUN: ScheduleOptions = { durationMs: 60_000 };

describe("schedule", () => {
  it("is reproducible: the same seed and options give the same injections", () => {
    expect(schedule(42, RUN)).toEqual(schedule(42, RUN));
    expect(schedule(42, RUN).length).toBeGreaterThan(5);
    expect(schedule(42, RUN)).not.toEqual(schedule(43, RUN));
  });

  it("keeps every fault inside the run, in start order, numbered from 1", () => {
    for (let seed = 1; seed <= 50; seed++) {
      const s = schedule(seed, { ...RUN, quietTailMs: 5000 });
      s.forEach((f, i) => {
        expect(f.faultId).toBe(i + 1);
        expect(f.atMs).toBeGreaterThanOrEqual(0);
        expect(f.durationMs).toBeGreaterThan(0);
        expect(f.atMs + f.durationMs).toBeLessThanOrEqual(55_000);
        if (i > 0) expect(f.atMs).toBeGreaterThanOrEqual(s[i - 1]!.atMs);
      });
    }
  });

  it("draws every kind and target, with the parameters each kind needs", () => {
    const all = Array.from({ length: 20 }, (_, seed) => schedule(seed, RUN)).flat();
    expect(new Set(all.map((f) => f.kind))).toEqual(new Set(Object.values(FaultKind)));
    expect(new Set(all.map((f) => f.target))).toEqual(new Set([...SERVICE_TARGETS, "nats"]));
    for (const f of all) {
      expect(f.target === "nats").toBe(f.kind === "nats-restart");
      expect(f.link !== undefined).toBe(["latency", "drop", "partition"].includes(f.kind));
      if (f.kind === "latency") expect(f.latencyMs! >= 5 && f.latencyMs! <= 200 && f.jitterMs! <= f.latencyMs! / 2).toBe(true);
      else expect(f.latencyMs).toBeUndefined();
      if (f.kind === "drop") expect(f.probability! >= 0.01 && f.probability! <= 0.2).toBe(true);
      else expect(f.probability).toBeUndefined();
    }
  });

  it("never puts two faults on one target at once, nor more than maxConcurrent", () => {
    for (let seed = 1; seed <= 30; seed++) {
      const s = schedule(seed, { ...RUN, meanIntervalMs: 300, maxConcurrent: 3 });
      for (const f of s) {
        const active = s.filter((g) => g.atMs <= f.atMs && g.atMs + g.durationMs > f.atMs);
        expect(active.length).toBeLessThanOrEqual(3);
        expect(active.filter((g) => g.target === f.target)).toHaveLength(1);
      }
    }
  });

  it("draws only the kinds and targets asked for", () => {
    const s = schedule(5, { ...RUN, kinds: ["kill-restart", "stop-cont"], targets: ["vdcm"], meanIntervalMs: 500 });
    expect(s.length).toBeGreaterThan(0);
    expect(s.every((f) => (f.kind === "kill-restart" || f.kind === "stop-cont") && f.target === "vdcm")).toBe(true);
  });

  it("refuses options that allow no schedule", () => {
    expect(() => schedule(1, { durationMs: 0 })).toThrow(RangeError);
    expect(() => schedule(1, { durationMs: 1000, quietTailMs: 1000 })).toThrow(RangeError);
    expect(() => schedule(1, { ...RUN, kinds: [] })).toThrow(RangeError);
    expect(() => schedule(1, { ...RUN, faultMs: [500, 100] })).toThrow(RangeError);
    expect(() => schedule(1, { ...RUN, dropProbability: [0, 2] })).toThrow(RangeError);
  });

  it("gives the fault marker the runner records, which the checker reads back", () => {
    const f = schedule(42, { ...RUN, kinds: ["latency"] })[0]!;
    const marker = toFaultMarker(f);
    expect(marker).toEqual({ fault: "latency", target: f.target, faultId: 1, link: f.link, latencyMs: f.latencyMs, jitterMs: f.jitterMs });
    expect(parseChaosRecord(createChaosRecord("info", marker))).toEqual({ kind: "fault", marker });
  });

  it("on a NATS cluster, kills one server drawn from the seed; on one server draws no node (its schedules unchanged)", () => {
    const kinds = [FaultKind.NATS_RESTART, FaultKind.KILL_RESTART];
    const cluster = Array.from({ length: 20 }, (_, seed) => schedule(seed, { ...RUN, kinds, natsNodes: 3 })).flat();
    const restarts = cluster.filter((f) => f.kind === FaultKind.NATS_RESTART);
    expect(restarts.length).toBeGreaterThan(10);
    expect(new Set(restarts.map((f) => f.node))).toEqual(new Set(["n0", "n1", "n2"]));
    expect(cluster.filter((f) => f.kind !== FaultKind.NATS_RESTART).every((f) => f.node === undefined)).toBe(true);
    for (let seed = 0; seed < 20; seed++) {
      expect(schedule(seed, { ...RUN, kinds, natsNodes: 3 })).toEqual(schedule(seed, { ...RUN, kinds, natsNodes: 3 }));
      expect(schedule(seed, { ...RUN, kinds, natsNodes: 1 })).toEqual(schedule(seed, { ...RUN, kinds }));
      expect(schedule(seed, { ...RUN, kinds }).every((f) => f.node === undefined)).toBe(true);
    }
    const marker = toFaultMarker(restarts[0]!);
    expect(marker.node).toBe(restarts[0]!.node);
    expect(parseChaosRecord(createChaosRecord("info", marker))).toEqual({ kind: "fault", marker });
  });
});

describe("withHostPartitions", () => {
  const hosts = ["n0", "n1", "n2"];
  const options = { durationMs: 60_000, quietTailMs: 5000, hosts };

  it("keeps the seed's schedule as it is and adds host partitions, one at a time, never during a nats-restart", () => {
    for (let seed = 1; seed <= 30; seed++) {
      const base = schedule(seed, { ...RUN, quietTailMs: 5000, natsNodes: 3 });
      const merged = withHostPartitions(seed, base, options);
      expect(merged).toEqual(withHostPartitions(seed, base, options));
      const strip = ({ faultId: _, ...f }: FaultInjection) => f;
      expect(merged.filter((f) => f.kind !== HostFaultKind.HOST_PARTITION).map(strip)).toEqual(base.map(strip));
      merged.forEach((f, i) => {
        expect(f.faultId).toBe(i + 1);
        if (i > 0) expect(f.atMs).toBeGreaterThanOrEqual(merged[i - 1]!.atMs);
      });
      const cuts = merged.filter((f) => f.kind === HostFaultKind.HOST_PARTITION);
      expect(cuts.length).toBeGreaterThan(0);
      const overlap = (a: FaultInjection, b: FaultInjection) => a.atMs < b.atMs + b.durationMs && b.atMs < a.atMs + a.durationMs;
      for (const c of cuts) {
        expect(c.target).toBe("nats");
        expect(c.hosts!.length === 1 || (c.hosts!.length === 2 && c.hosts![0] !== c.hosts![1])).toBe(true);
        for (const h of c.hosts!) expect(hosts).toContain(h);
        expect(c.atMs + c.durationMs).toBeLessThanOrEqual(55_000);
        expect(cuts.filter((o) => o !== c && overlap(o, c))).toEqual([]);
        expect(base.filter((o) => o.kind === FaultKind.NATS_RESTART && overlap(o, c))).toEqual([]);
      }
    }
  });

  it("records the hosts in its fault marker, and the marker survives the history record", () => {
    const cut = withHostPartitions(3, [], options)[0]!;
    const marker = toFaultMarker(cut);
    expect(marker).toMatchObject({ fault: "host-partition", target: "nats", hosts: cut.hosts });
    const parsed = parseChaosRecord(createChaosRecord("info", marker, { ts: 1 }));
    expect(parsed).toEqual({ kind: "fault", marker });
  });

  it("with the cores on hosts of their own, also cuts a core's host from one server's, as a fault of that core", () => {
    const all = Array.from({ length: 10 }, (_, seed) => withHostPartitions(seed, [], { ...options, coreHosts: ["core-a", "core-b"] })).flat();
    const coreCuts = all.filter((f) => f.target === "ioasid-core");
    expect(coreCuts.length).toBeGreaterThan(0);
    for (const f of coreCuts) {
      expect(f.hosts).toEqual([`core-${f.node!}`, expect.stringMatching(/^n[012]$/)]);
    }
    expect(all.filter((f) => f.target === "nats").length).toBeGreaterThan(0);
    // Without cores, no cut names one.
    expect(
      Array.from({ length: 10 }, (_, seed) => withHostPartitions(seed, [], options))
        .flat()
        .filter((f) => f.target !== "nats"),
    ).toEqual([]);
  });

  it("refuses fewer than two hosts", () => {
    expect(() => withHostPartitions(1, [], { ...options, hosts: ["n0"] })).toThrow(RangeError);
  });
});
