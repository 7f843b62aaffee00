import { Code, DomainError } from "@ioasid/errors";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { assertGuestMemorySize, assertHostRangeGiven, HostMemoryPool, hostMemoryProblem, type HostRange } from "./host-memory-pool.js";

const K4 = 0x1000n;
const MiB = 1n << 20n;
const BASE = 1n << 32n;

/** Asserts that no two ranges of `all` overlap. */
function expectDisjoint(all: readonly HostRange[]): void {
  const sorted = [...all].sort((a, b) => (a.paddr < b.paddr ? -1 : 1));
  for (let i = 1; i < sorted.length; i++) expect(sorted[i]!.paddr).toBeGreaterThanOrEqual(sorted[i - 1]!.paddr + sorted[i - 1]!.size);
}

function reasonOf(fn: () => unknown): { code: Code; reason: string } | undefined {
  try {
    fn();
    return undefined;
  } catch (e) {
    expect(e).toBeInstanceOf(DomainError);
    return { code: (e as DomainError).code, reason: (e as DomainError).reason };
  }
}

describe("HostMemoryPool", () => {
  it("gives the lowest free gap that holds the whole size (first fit), one range each, never twice", () => {
    const pool = new HostMemoryPool({ base: BASE, size: 4n * MiB });
    const a = pool.take(MiB);
    const b = pool.take(2n * MiB);
    expect(a).toEqual([{ paddr: BASE, size: MiB }]);
    expect(b).toEqual([{ paddr: BASE + MiB, size: 2n * MiB }]);
    pool.put(a);
    // Two gaps of 1 MiB are free now (a's and the one after b): the lowest is given.
    expect(pool.take(MiB)).toEqual([{ paddr: BASE, size: MiB }]);
    expect(pool.freeBytes).toBe(MiB);
  });

  it("gives the free gaps from the lowest address up when no single gap holds the size, so it runs out only when too little is free", () => {
    const pool = new HostMemoryPool({ base: BASE, size: 4n * MiB });
    const [a, b, c, d] = [pool.take(MiB), pool.take(MiB), pool.take(MiB), pool.take(MiB)];
    pool.put(a!);
    pool.put(c!);
    const scattered = pool.take(2n * MiB);
    expect(scattered).toEqual([
      { paddr: BASE, size: MiB },
      { paddr: BASE + 2n * MiB, size: MiB },
    ]);
    expectDisjoint([...scattered, ...b!, ...d!]);
    expect(pool.freeBytes).toBe(0n);
  });

  it("refuses more than is free with RESOURCE_EXHAUSTED HOST_MEMORY_EXHAUSTED and takes nothing", () => {
    const pool = new HostMemoryPool({ base: BASE, size: 4n * MiB });
    pool.take(3n * MiB);
    const before = pool.freeRanges;
    expect(reasonOf(() => pool.take(2n * MiB))).toEqual({ code: Code.RESOURCE_EXHAUSTED, reason: "HOST_MEMORY_EXHAUSTED" });
    expect(pool.freeRanges).toEqual(before);
  });

  it("merges what is put back with its neighbours, and never frees more than it has", () => {
    const pool = new HostMemoryPool({ base: BASE, size: 3n * MiB });
    const [a, b, c] = [pool.take(MiB), pool.take(MiB), pool.take(MiB)];
    pool.put(a!);
    pool.put(c!);
    pool.put(b!);
    expect(pool.freeRanges).toEqual([{ paddr: BASE, size: 3n * MiB }]);
    pool.put(b!); // twice: nothing more becomes free
    pool.put([{ paddr: 0n, size: BASE * 2n }]); // outside and over the pool: clipped, nothing new
    expect(pool.freeRanges).toEqual([{ paddr: BASE, size: 3n * MiB }]);
  });

  it("reserves kept ranges as they were (a restart), leaving out what is outside the pool or taken already", () => {
    const pool = new HostMemoryPool({ base: BASE, size: 4n * MiB });
    expect(pool.reserve([{ paddr: BASE + MiB, size: MiB }])).toEqual([{ paddr: BASE + MiB, size: MiB }]);
    // Half of it overlaps what is reserved, and it reaches past the pool's end.
    expect(pool.reserve([{ paddr: BASE + MiB, size: 8n * MiB }])).toEqual([{ paddr: BASE + 2n * MiB, size: 2n * MiB }]);
    expect(pool.freeRanges).toEqual([{ paddr: BASE, size: MiB }]);
    expect(pool.take(MiB)).toEqual([{ paddr: BASE, size: MiB }]);
  });

  it("keeps given ranges disjoint from each other and from the free gaps over random take/put sequences", () => {
    const pages = 64n;
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            fc.integer({ min: 1, max: 24 }).map((n) => ({ take: BigInt(n) })),
            fc.nat(20).map((i) => ({ put: i })),
          ),
          { maxLength: 60 },
        ),
        (ops) => {
          const pool = new HostMemoryPool({ base: BASE, size: pages * K4 });
          const held: (readonly HostRange[])[] = [];
          for (const op of ops) {
            if ("take" in op) {
              const want = op.take * K4;
              if (want > pool.freeBytes) {
                expect(reasonOf(() => pool.take(want))?.reason).toBe("HOST_MEMORY_EXHAUSTED");
              } else {
                const got = pool.take(want);
                expect(got.reduce((s, r) => s + r.size, 0n)).toBe(want);
                held.push(got);
              }
            } else if (held.length > 0) {
              pool.put(held.splice(op.put % held.length, 1)[0]!);
            }
            const given = held.flat();
            expectDisjoint([...given, ...pool.freeRanges]);
            for (const r of [...given, ...pool.freeRanges]) {
              expect(r.size).toBeGreaterThan(0n);
              expect(r.paddr >= BASE && r.paddr + r.size <= BASE + pages * K4).toBe(true);
            }
            expect(given.reduce((s, r) => s + r.size, 0n) + pool.freeBytes).toBe(pages * K4);
          }
        },
      ),
      { seed: 14, numRuns: 200 },
    );
  });

  it("refuses unusable bounds", () => {
    expect(hostMemoryProblem({ base: BASE, size: 0n })).toBeDefined();
    expect(hostMemoryProblem({ base: BASE + 1n, size: MiB })).toBeDefined();
    expect(hostMemoryProblem({ base: (1n << 64n) - K4, size: 2n * K4 })).toBeDefined();
    expect(hostMemoryProblem({ base: (1n << 64n) - K4, size: K4 })).toBeUndefined();
    expect(() => new HostMemoryPool({ base: BASE, size: 100n })).toThrow(RangeError);
  });
});

describe("assertGuestMemorySize", () => {
  it("accepts a non-zero multiple of 4 KiB up to the pool's size, and refuses the rest as INVALID_FIELD guest_memory_size", () => {
    expect(() => assertGuestMemorySize(K4, MiB)).not.toThrow();
    expect(() => assertGuestMemorySize(MiB, MiB)).not.toThrow();
    for (const bad of [0n, 1n, K4 + 1n, 2n * MiB]) {
      expect(reasonOf(() => assertGuestMemorySize(bad, MiB))).toEqual({ code: Code.INVALID_ARGUMENT, reason: "INVALID_FIELD" });
    }
  });
});

describe("assertHostRangeGiven", () => {
  const given: HostRange[] = [
    { paddr: BASE, size: MiB },
    { paddr: BASE + MiB, size: MiB }, // adjacent grant
  ];
  it("accepts a range inside one given range, up to its last byte", () => {
    expect(() => assertHostRangeGiven(1, given, BASE, MiB)).not.toThrow();
    expect(() => assertHostRangeGiven(1, given, BASE + MiB - K4, K4)).not.toThrow();
    expect(() => assertHostRangeGiven(1, given, BASE + MiB, K4)).not.toThrow();
  });
  it("refuses one outside, before, straddling an end (even into an adjacent grant) or with nothing given, as PERMISSION_DENIED HOST_MEMORY_NOT_GIVEN", () => {
    const denied = { code: Code.PERMISSION_DENIED, reason: "HOST_MEMORY_NOT_GIVEN" };
    expect(reasonOf(() => assertHostRangeGiven(1, given, BASE - K4, K4))).toEqual(denied);
    expect(reasonOf(() => assertHostRangeGiven(1, given, BASE - K4, 2n * K4))).toEqual(denied);
    expect(reasonOf(() => assertHostRangeGiven(1, given, BASE + MiB - K4, 2n * K4))).toEqual(denied);
    expect(reasonOf(() => assertHostRangeGiven(1, given, BASE + 2n * MiB, K4))).toEqual(denied);
    expect(reasonOf(() => assertHostRangeGiven(1, [], BASE, K4))).toEqual(denied);
  });
});
