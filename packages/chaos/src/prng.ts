/**
 * A seeded pseudo-random number generator (mulberry32: 32-bit state, period 2^32): the same seed
 * gives the same sequence on every machine, so a chaos run is reproduced from its seed. Not for
 * anything that needs unpredictability.
 */
export interface Prng {
  /** The next number in [0, 1). */
  next(): number;
  /** An integer in [min, max] (inclusive). @throws RangeError when max < min or either is not an integer */
  int(min: number, max: number): number;
  /** A number in [min, max). */
  between(min: number, max: number): number;
  /** One element of a non-empty list. @throws RangeError on an empty list */
  pick<T>(items: readonly T[]): T;
  /** True with probability `p`. */
  chance(p: number): boolean;
  /** The state now: `createPrng(state)` continues the sequence from here. */
  readonly state: number;
}

/**
 * Creates a mulberry32 generator from a seed (any number; it is taken modulo 2^32).
 * @example
 * const rng = createPrng(42);
 * rng.int(1, 6); // the same roll for seed 42, every time
 */
export function createPrng(seed: number): Prng {
  let a = Math.trunc(seed) >>> 0;
  const next = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int(min, max) {
      if (!Number.isInteger(min) || !Number.isInteger(max) || max < min) throw new RangeError(`no integer in [${min}, ${max}]`);
      return min + Math.floor(next() * (max - min + 1));
    },
    between: (min, max) => min + next() * (max - min),
    pick(items) {
      if (items.length === 0) throw new RangeError("cannot pick from an empty list");
      return items[Math.floor(next() * items.length)]!;
    },
    chance: (p) => next() < p,
    get state() {
      return a;
    },
  };
}
