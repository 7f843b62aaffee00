import { describe, expect, it } from "vitest";
import { createPrng } from "./prng.js";

describe("createPrng", () => {
  it("is mulberry32: the reference sequence for seeds 1 and 42", () => {
    const one = createPrng(1);
    expect([one.next(), one.next(), one.next()]).toEqual([0.6270739405881613, 0.002735721180215478, 0.5274470399599522]);
    const answer = createPrng(42);
    expect([answer.next(), answer.next()]).toEqual([0.6011037519201636, 0.44829055899754167]);
  });

  it("gives the same sequence for the same seed and another for another seed", () => {
    const draw = (seed: number) => {
      const r = createPrng(seed);
      return Array.from({ length: 100 }, () => r.int(0, 1_000_000));
    };
    expect(draw(7)).toEqual(draw(7));
    expect(draw(7)).not.toEqual(draw(8));
  });

  it("continues from its state", () => {
    const a = createPrng(9);
    a.next();
    const b = createPrng(a.state);
    expect(b.next()).toBe(a.next());
  });

  it("draws integers, ranges, picks and chances within bounds", () => {
    const r = createPrng(3);
    for (let i = 0; i < 1000; i++) {
      const n = r.int(-2, 2);
      expect(Number.isInteger(n) && n >= -2 && n <= 2).toBe(true);
      const x = r.between(5, 6);
      expect(x >= 5 && x < 6).toBe(true);
      expect(["a", "b"]).toContain(r.pick(["a", "b"]));
    }
    expect(r.chance(0)).toBe(false);
    expect(r.chance(1)).toBe(true);
    expect(() => r.int(2, 1)).toThrow(RangeError);
    expect(() => r.int(0.5, 1)).toThrow(RangeError);
    expect(() => r.pick([])).toThrow(RangeError);
  });
});
