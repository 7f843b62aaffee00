import { describe, expect, it } from "vitest";
import { AckMemory } from "./ack-memory.js";

describe("AckMemory", () => {
  it("answers by (sequence, registration): the same sequence for another registration is another entry", () => {
    const m = new AckMemory<string>(10);
    m.set(5, 1, "a");
    m.set(5, 2, "b");
    expect(m.get(5, 1)).toBe("a");
    expect(m.get(5, 2)).toBe("b");
    expect(m.get(5, 3)).toBeUndefined();
    expect(m.get(6, 1)).toBeUndefined();
    expect(m.size).toBe(2);
  });

  it("forgets the oldest first once more than the window are held, across registrations", () => {
    const m = new AckMemory<number>(3);
    m.set(1, 7, 1);
    m.set(1, 8, 2);
    m.set(2, 7, 3);
    m.set(3, 8, 4); // the fourth: (1, 7) goes
    expect(m.get(1, 7)).toBeUndefined();
    expect([m.get(1, 8), m.get(2, 7), m.get(3, 8)]).toEqual([2, 3, 4]);
    m.set(4, 7, 5); // then (1, 8)
    expect(m.get(1, 8)).toBeUndefined();
    expect([m.get(2, 7), m.get(3, 8), m.get(4, 7)]).toEqual([3, 4, 5]);
    expect(m.size).toBe(3);
  });

  it("keeps the order of forgetting while its rings grow, wrapped or not", () => {
    const window = 200; // past the first capacity (64) and two doublings
    const m = new AckMemory<number>(window);
    for (let i = 0; i < 1000; i++) {
      m.set(i, i % 3, i);
      // Exactly the newest `window` are held, after every step (growth and wrap-around included).
      expect(m.size).toBe(Math.min(i + 1, window));
      const oldest = Math.max(0, i + 1 - window);
      expect(m.get(oldest, oldest % 3)).toBe(oldest);
      if (oldest > 0) expect(m.get(oldest - 1, (oldest - 1) % 3)).toBeUndefined();
    }
  });

  it("replaces a remembered value in place: its turn to be forgotten does not move", () => {
    const m = new AckMemory<string>(2);
    m.set(1, 1, "old");
    m.set(2, 1, "x");
    m.set(1, 1, "new");
    expect(m.get(1, 1)).toBe("new");
    expect(m.size).toBe(2);
    m.set(3, 1, "y"); // (1, 1) is still the oldest
    expect(m.get(1, 1)).toBeUndefined();
    expect(m.get(2, 1)).toBe("x");
  });

  it("with a window of 1, keeps the newest of a registration whose only entry it just forgot", () => {
    const m = new AckMemory<string>(1);
    m.set(1, 1, "a");
    m.set(2, 1, "b"); // forgets (1, 1), the registration's last, then remembers (2, 1)
    expect([m.get(1, 1), m.get(2, 1), m.size]).toEqual([undefined, "b", 1]);
  });

  it("remembers every one with a window of Infinity", () => {
    const m = new AckMemory<number>(Infinity);
    for (let i = 0; i < 5_000; i++) m.set(i, 1, i);
    expect([m.size, m.get(0, 1), m.get(4_999, 1)]).toEqual([5_000, 0, 4_999]);
  });

  it("remembers nothing with a window of 0 (a role that re-applies redeliveries: the conformance mutants)", () => {
    const m = new AckMemory<string>(0);
    m.set(1, 1, "a");
    expect(m.get(1, 1)).toBeUndefined();
    expect(m.size).toBe(0);
  });

  it("holds the largest sequences and registration ids exactly", () => {
    const m = new AckMemory<string>(4);
    const seq = Number.MAX_SAFE_INTEGER;
    const registration = 0xffffffff;
    m.set(seq, registration, "edge");
    m.set(seq - 1, registration, "below");
    expect(m.get(seq, registration)).toBe("edge");
    expect(m.get(seq - 1, registration)).toBe("below");
    m.set(1, 1, "c");
    m.set(2, 1, "d");
    m.set(3, 1, "e"); // forgets (seq, registration): the ring held both exactly
    expect(m.get(seq, registration)).toBeUndefined();
    expect(m.get(seq - 1, registration)).toBe("below");
  });

  it("refuses a window that is not a whole number ≥ 0 or Infinity", () => {
    expect(() => new AckMemory(-1)).toThrow(RangeError);
    expect(() => new AckMemory(1.5)).toThrow(RangeError);
    expect(() => new AckMemory(NaN)).toThrow(RangeError);
  });
});
