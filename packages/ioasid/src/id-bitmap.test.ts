import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { IdBitmap } from "./id-bitmap.js";

describe("IdBitmap", () => {
  it("hands out the lowest free ID at or above min", () => {
    const b = new IdBitmap(100);
    expect(b.findFree(0, 99)).toBe(0);
    b.take(0);
    b.take(1);
    b.take(3);
    expect(b.findFree(0, 99)).toBe(2);
    expect(b.findFree(3, 99)).toBe(4);
    b.release(1);
    expect(b.findFree(0, 99)).toBe(1);
  });

  it("returns -1 when the range is full, and never an ID past capacity", () => {
    const b = new IdBitmap(33);
    for (let i = 0; i < 33; i++) b.take(i);
    expect(b.findFree(0, 32)).toBe(-1);
    expect(b.findFree(0, 1000)).toBe(-1);
    b.release(32);
    expect(b.findFree(0, 31)).toBe(-1);
    expect(b.findFree(0, 32)).toBe(32);
    expect(b.take(33)).toBe(false);
  });

  it("crosses full words and levels (2^20 IDs) without scanning", () => {
    const b = new IdBitmap(1 << 20);
    for (let i = 0; i < 70_000; i++) b.take(i);
    expect(b.findFree(0, (1 << 20) - 1)).toBe(70_000);
    b.release(40_000);
    expect(b.findFree(0, (1 << 20) - 1)).toBe(40_000);
    expect(b.findFree(40_001, (1 << 20) - 1)).toBe(70_000);
    expect(b.findFree(40_001, 69_999)).toBe(-1);
    expect(b.size).toBe(69_999);
  });

  it("take and release are idempotent and report whether they changed anything", () => {
    const b = new IdBitmap(64);
    expect(b.take(5)).toBe(true);
    expect(b.take(5)).toBe(false);
    expect(b.release(5)).toBe(true);
    expect(b.release(5)).toBe(false);
    expect(b.size).toBe(0);
  });

  it("agrees with a plain Set under random operations", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 3000 }), fc.array(fc.tuple(fc.boolean(), fc.nat(), fc.nat()), { maxLength: 300 }), (capacity, ops) => {
        const b = new IdBitmap(capacity);
        const ref = new Set<number>();
        for (const [isTake, x, y] of ops) {
          const min = x % capacity;
          const max = min + (y % capacity);
          const want = (() => {
            for (let i = min; i <= Math.min(max, capacity - 1); i++) if (!ref.has(i)) return i;
            return -1;
          })();
          expect(b.findFree(min, max)).toBe(want);
          if (isTake && want >= 0) {
            b.take(want);
            ref.add(want);
          } else if (!isTake && ref.size > 0) {
            const victim = [...ref][x % ref.size]!;
            b.release(victim);
            ref.delete(victim);
          }
          expect(b.size).toBe(ref.size);
        }
      }),
      { numRuns: 200 },
    );
  });
});
