import { describe, expect, it } from "vitest";
import { deriveSeed, describeGuestStep, gpasidOf, planGuest, planProbeGuest, PROBE_PASIDS, type GuestPlan } from "./guest-plan.js";

const kinds = (p: GuestPlan) => p.steps.map((s) => describeGuestStep(s.step));

describe("planGuest", () => {
  it("gives the same plan for the same seed and guest, every time", () => {
    for (const [seed, index] of [
      [1, 0],
      [1, 7],
      [42, 3],
      [0xffff_ffff, 12],
    ] as const) {
      expect(planGuest(seed, index, { slots: 4 })).toEqual(planGuest(seed, index, { slots: 4 }));
    }
  });

  it("pins a plan: the op sequence of seed 1, guest 0 does not drift unnoticed", () => {
    const p = planGuest(1, 0);
    expect({ name: p.name, slot: p.slot, quota: p.quota, vcpus: p.vcpus, end: p.end, steps: kinds(p).slice(0, 6) }).toMatchInlineSnapshot(`
      {
        "end": {
          "kind": "close",
        },
        "name": "g0",
        "quota": 8,
        "slot": 0,
        "steps": [
          "assign mdev",
          "assign pf",
          "map-dma",
          "alloc p0",
          "alloc p1",
          "free p1",
        ],
        "vcpus": 2,
      }
    `);
  });

  it("gives different guests and different seeds different plans", () => {
    const a = kinds(planGuest(1, 0));
    expect(kinds(planGuest(1, 1))).not.toEqual(a);
    expect(kinds(planGuest(2, 0))).not.toEqual(a);
  });

  it("plans a plausible life: devices assigned and guest RAM mapped first, a PASID allocated before it is used", () => {
    for (let i = 0; i < 200; i++) {
      const p = planGuest(9, i);
      const setup = p.steps.findIndex((s) => s.step.kind === "map-dma");
      expect(p.steps.slice(0, setup).every((s) => s.step.kind === "assign")).toBe(true);
      const allocated = new Set<number>();
      for (const { step } of p.steps.slice(setup + 1)) {
        expect(step.kind === "assign" || step.kind === "map-dma").toBe(false);
        if (step.kind === "alloc") {
          expect(allocated.has(step.pasid)).toBe(false);
          allocated.add(step.pasid);
        } else if ("pasid" in step) expect(allocated.has(step.pasid), `${p.name}: ${describeGuestStep(step)} before its alloc`).toBe(true);
      }
      expect(p.steps.length - setup - 1).toBeGreaterThanOrEqual(8);
      expect(p.steps.length - setup - 1).toBeLessThanOrEqual(30);
    }
  });

  it("never holds more PASIDs than its quota (the model frees before it allocates again)", () => {
    for (let i = 0; i < 200; i++) {
      const p = planGuest(3, i);
      let live = 0;
      const freed = new Set<number>();
      for (const { step } of p.steps) {
        if (step.kind === "alloc") live++;
        if (step.kind === "free" && !freed.has(step.pasid)) {
          freed.add(step.pasid);
          live--;
        }
        expect(live).toBeLessThanOrEqual(p.quota);
      }
    }
  });

  it("covers the life cycle across guests: every step kind, crashes in flight and between steps, clean closes", () => {
    const all = Array.from({ length: 100 }, (_, i) => planGuest(5, i));
    const seen = new Set(all.flatMap((p) => p.steps.map((s) => s.step.kind)));
    expect([...seen].sort()).toEqual(["alloc", "assign", "bind", "clear", "dma", "enqcmd", "free", "map-dma", "overflow", "program", "replace", "unbind"]);
    const crashes = all.filter((p) => p.end.kind === "crash");
    expect(crashes.length).toBeGreaterThan(20);
    expect(all.length - crashes.length).toBeGreaterThan(20);
    expect(crashes.some((p) => p.end.kind === "crash" && p.end.duringMs !== undefined)).toBe(true);
    expect(crashes.some((p) => p.end.kind === "crash" && p.end.duringMs === undefined)).toBe(true);
    expect(crashes.some((p) => p.end.kind === "crash" && p.end.atStep === 0)).toBe(true);
  });

  it("names guests, slots, tokens and guest PASIDs from the index", () => {
    const p = planGuest(1, 9, { slots: 4 });
    expect(p.name).toBe("g9");
    expect(p.slot).toBe(1);
    expect(p.mmToken).not.toBe(planGuest(1, 10).mmToken);
    expect(gpasidOf(0)).toBe(101);
  });

  it("refuses options that allow no plan", () => {
    expect(() => planGuest(1, 0, { slots: 0 })).toThrow(RangeError);
    expect(() => planGuest(1, 0, { steps: [5, 2] })).toThrow(RangeError);
  });
});

describe("planProbeGuest", () => {
  it("plans a crash holding PASIDs every tier holds: assigned mdev, RAM mapped, each PASID allocated and bound, the first programmed, then SIGKILL", () => {
    const p = planProbeGuest(1, 4);
    expect(kinds(p)).toEqual(["assign mdev", "map-dma", "alloc p0", "bind p0 mdev", "program p0 wq0", "alloc p1", "bind p1 mdev"]);
    expect(p.steps.filter((s) => s.step.kind === "alloc")).toHaveLength(PROBE_PASIDS);
    expect(p.end).toEqual({ kind: "crash", atStep: p.steps.length });
    expect(p.quota).toBeGreaterThanOrEqual(PROBE_PASIDS);
    expect(p.slot).toBe(4);
  });

  it("makes each try a guest of its own, apart from the drawn guests", () => {
    const [a, b] = [planProbeGuest(1, 4), planProbeGuest(2, 4)];
    expect([a.name, b.name]).toEqual(["probe1", "probe2"]);
    expect(a.mmToken).not.toBe(b.mmToken);
    const drawn = new Set(Array.from({ length: 10_000 }, (_, i) => planGuest(1, i).mmToken));
    expect(drawn.has(a.mmToken) || drawn.has(b.mmToken)).toBe(false);
  });
});

describe("deriveSeed", () => {
  it("is a pure function of (seed, stream, index) and separates streams and indices", () => {
    expect(deriveSeed(7, 1, 3)).toBe(deriveSeed(7, 1, 3));
    const seeds = new Set([deriveSeed(7, 1, 3), deriveSeed(7, 2, 3), deriveSeed(7, 1, 4), deriveSeed(8, 1, 3)]);
    expect(seeds.size).toBe(4);
    for (const s of seeds) expect(Number.isInteger(s) && s >= 0 && s < 2 ** 32).toBe(true);
  });
});
