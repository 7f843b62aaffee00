/**
 * The IOASID namespace's occupancy: which IDs are taken. A hierarchical bitmap — level 0 has one
 * bit per ID, each level above one bit per word of the level below, set when that word is full —
 * so "lowest free ID at or above `min`" costs one word per level (4 levels for 2^20 IDs), never a
 * scan of the namespace. Lowest-free matches the kernel's xa_alloc, so a freed ID is the next one
 * handed out, which is what makes generations matter.
 *
 * Memory: capacity/8 bytes for level 0, plus 1/32 of that for the levels above (≈ 132 KiB for 2^20).
 */
export class IdBitmap {
  /** Number of IDs, 0..capacity-1. */
  readonly capacity: number;
  private readonly levels: Uint32Array[];
  private readonly bitCounts: number[];
  private used = 0;

  /** @param capacity number of IDs (≥ 1); IDs beyond it can never be returned. */
  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > 0xffffffff) {
      throw new RangeError(`IdBitmap capacity must be an integer in 1..2^32-1, got ${capacity}`);
    }
    this.capacity = capacity;
    this.levels = [];
    this.bitCounts = [];
    let bits = capacity;
    for (;;) {
      const words = Math.ceil(bits / 32);
      const level = new Uint32Array(words);
      // Padding bits past the end read as taken, so no search ever returns them.
      const tail = bits & 31;
      if (tail !== 0) level[words - 1] = (0xffffffff << tail) >>> 0;
      this.levels.push(level);
      this.bitCounts.push(bits);
      if (words === 1) break;
      bits = words;
    }
    // A level-0 word that is all padding is full; propagate that upwards.
    for (let k = 0; k + 1 < this.levels.length; k++) {
      const level = this.levels[k]!;
      for (let w = 0; w < level.length; w++) if (level[w] === 0xffffffff) this.setBit(k + 1, w);
    }
  }

  /** Number of IDs taken. */
  get size(): number {
    return this.used;
  }

  /** Is `id` taken? */
  has(id: number): boolean {
    const word = this.levels[0]![id >>> 5];
    return word !== undefined && id < this.capacity && (word & (1 << (id & 31))) !== 0;
  }

  /**
   * Lowest free ID in `[min, max]` (inclusive), or -1 when the range is full. Does not take it.
   */
  findFree(min: number, max: number): number {
    if (min > max || min >= this.capacity) return -1;
    const id = this.findZero(0, min);
    return id >= 0 && id <= max ? id : -1;
  }

  /** Marks `id` taken. @returns false (and changes nothing) when it already was. */
  take(id: number): boolean {
    if (this.has(id) || id < 0 || id >= this.capacity) return false;
    this.setBit(0, id);
    this.used++;
    return true;
  }

  /** Marks `id` free. @returns false (and changes nothing) when it was not taken. */
  release(id: number): boolean {
    if (!this.has(id)) return false;
    this.clearBit(0, id);
    this.used--;
    return true;
  }

  private setBit(k: number, i: number): void {
    for (;;) {
      const level = this.levels[k]!;
      const w = i >>> 5;
      const next = (level[w]! | (1 << (i & 31))) >>> 0;
      level[w] = next;
      if (next !== 0xffffffff || k + 1 === this.levels.length) return;
      k++;
      i = w;
    }
  }

  private clearBit(k: number, i: number): void {
    for (;;) {
      const level = this.levels[k]!;
      const w = i >>> 5;
      const wasFull = level[w] === 0xffffffff;
      level[w] = (level[w]! & ~(1 << (i & 31))) >>> 0;
      if (!wasFull || k + 1 === this.levels.length) return;
      k++;
      i = w;
    }
  }

  /** First index ≥ i whose bit at level k is 0, or -1. */
  private findZero(k: number, i: number): number {
    if (i >= this.bitCounts[k]!) return -1;
    const level = this.levels[k]!;
    const w = i >>> 5;
    const here = ~level[w]! & ((0xffffffff << (i & 31)) >>> 0);
    if (here !== 0) return (w << 5) + ctz(here);
    let next: number;
    if (k + 1 === this.levels.length) {
      next = -1;
      for (let j = w + 1; j < level.length; j++) {
        if (level[j] !== 0xffffffff) {
          next = j;
          break;
        }
      }
    } else {
      next = this.findZero(k + 1, w + 1);
    }
    if (next < 0) return -1;
    return (next << 5) + ctz(~level[next]!);
  }
}

/** Count of trailing zero bits of a non-zero 32-bit value. */
function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}
