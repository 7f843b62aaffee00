import { invalidField, vfioError } from "./vfio-errors.js";

// The host's physical memory as VFIO gives it to VMs (issue 14 item 3: "MapDma accepts only
// host-physical ranges the VM was given"). In the kernel, VFIO_IOMMU_MAP_DMA takes the VMM's own
// virtual address and pins the pages behind it, so a VMM can only ever map memory it owns. Here the
// VMM names host physical addresses, so VFIO — the host kernel's side of that call — must know
// whose memory is whose: it hands each container ranges of one pool, exclusively, and MapDma maps
// only inside them (vfio-containers.ts).

/** The granule of host memory: ranges start and end on 4 KiB pages (the IOMMU's page size). */
export const HOST_PAGE_SIZE = 4096n;

/** A range of host physical memory: `[paddr, paddr + size)`, both multiples of {@link HOST_PAGE_SIZE}. */
export interface HostRange {
  /** First host physical address. */
  readonly paddr: bigint;
  /** Length in bytes (non-zero). */
  readonly size: bigint;
}

/** Where the host memory VFIO gives out lies. */
export interface HostMemoryOptions {
  /** First host physical address of the pool (4 KiB aligned). */
  readonly base: bigint;
  /** Bytes in the pool (a non-zero multiple of 4 KiB; `base + size` at most 2^64). */
  readonly size: bigint;
}

const U64_LIMIT = 1n << 64n;

/** `0x…` for a host address in a message. */
const hex = (n: bigint): string => `0x${n.toString(16)}`;

/** A size for people: whole GiB/MiB/KiB when it is one, else bytes. */
export function formatBytes(n: bigint): string {
  for (const [unit, shift] of [
    ["GiB", 30n],
    ["MiB", 20n],
    ["KiB", 10n],
  ] as const) {
    if (n >= 1n << shift && n % (1n << shift) === 0n) return `${n >> shift} ${unit}`;
  }
  return `${n} bytes`;
}

/**
 * Why a pool's bounds are unusable, or undefined when they are good (VFIO's configuration check and
 * the pool's constructor share it).
 */
export function hostMemoryProblem(o: HostMemoryOptions): string | undefined {
  if (o.size <= 0n || o.size % HOST_PAGE_SIZE !== 0n) return `a size that is a non-zero multiple of 4 KiB (got ${o.size})`;
  if (o.base < 0n || o.base % HOST_PAGE_SIZE !== 0n) return `a 4 KiB aligned base (got ${hex(o.base)})`;
  if (o.base + o.size > U64_LIMIT) return "a pool that ends at or below 2^64";
  return undefined;
}

/**
 * Refuses a guest memory size VFIO cannot give: not a non-zero multiple of 4 KiB, or larger than
 * the whole pool (it could never be given; a size that fits the pool but not what is free now is
 * {@link HostMemoryPool.take}'s HOST_MEMORY_EXHAUSTED).
 * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (field `guest_memory_size`)
 */
export function assertGuestMemorySize(size: bigint, poolSize: bigint): void {
  if (size <= 0n || size % HOST_PAGE_SIZE !== 0n) {
    throw invalidField("guest_memory_size", `guest_memory_size ${size} is not a non-zero multiple of 4 KiB (0 asks for the service default)`);
  }
  if (size > poolSize) {
    throw invalidField("guest_memory_size", `guest_memory_size ${formatBytes(size)} is larger than the whole host memory pool (${formatBytes(poolSize)})`);
  }
}

/**
 * Refuses a host range that does not lie inside one of `given` (the container's memory): a VMM
 * maps only memory it owns, never another VM's (VFIO_IOMMU_MAP_DMA pins the caller's own pages).
 * A range straddling the end of one given range is refused even when the next one is adjacent: no
 * single mapping spans two grants.
 * @throws DomainError PERMISSION_DENIED `HOST_MEMORY_NOT_GIVEN`
 */
export function assertHostRangeGiven(containerId: number, given: readonly HostRange[], paddr: bigint, size: bigint): void {
  if (given.some((r) => paddr >= r.paddr && paddr + size <= r.paddr + r.size)) return;
  throw vfioError(
    "HOST_MEMORY_NOT_GIVEN",
    `host memory ${hex(paddr)}..${hex(paddr + size - 1n)} is not inside the memory given to container ${containerId} ` +
      "(OpenContainerResponse.guest_memory): a VMM maps only its own VM's memory",
  );
}

/**
 * VFIO's host physical memory: one pool `[base, base + size)` from which each container is given
 * its guest memory exclusively, and to which it returns when the container is released.
 *
 * {@link take} gives the lowest free gap that holds the whole size (first fit: one range); when no
 * single gap does but enough is free in all, it gives the free gaps from the lowest address up (as
 * the kernel gives a VM pages from anywhere), so the pool is exhausted only when less than the size
 * is free. What {@link take} gave is returned with {@link put}. It keeps no owners: the container
 * holds its ranges, and the teardown puts them back once, when the container is released.
 */
export class HostMemoryPool {
  /** First host physical address of the pool. */
  readonly base: bigint;
  /** Bytes in the pool. */
  readonly size: bigint;
  /** The free gaps, ascending, never empty, never adjacent (adjacent gaps are merged). */
  #free: HostRange[];

  /** @throws RangeError when the bounds are unusable ({@link hostMemoryProblem}) */
  constructor(options: HostMemoryOptions) {
    const problem = hostMemoryProblem(options);
    if (problem !== undefined) throw new RangeError(`host memory pool: expected ${problem}`);
    this.base = options.base;
    this.size = options.size;
    this.#free = [{ paddr: options.base, size: options.size }];
  }

  /** Bytes free now. */
  get freeBytes(): bigint {
    return this.#free.reduce((sum, r) => sum + r.size, 0n);
  }

  /** The free gaps, ascending by address (for tests and inspection). */
  get freeRanges(): readonly HostRange[] {
    return [...this.#free];
  }

  /**
   * Takes `size` bytes (a multiple of 4 KiB, validated by {@link assertGuestMemorySize}) out of
   * the pool: one range from the lowest gap that holds it all, else the free gaps from the lowest
   * address up.
   * @returns the ranges given, ascending by address, `size` bytes in all
   * @throws DomainError RESOURCE_EXHAUSTED `HOST_MEMORY_EXHAUSTED` (less than `size` is free; nothing is taken)
   */
  take(size: bigint): readonly HostRange[] {
    const free = this.freeBytes;
    if (free < size) {
      throw vfioError(
        "HOST_MEMORY_EXHAUSTED",
        `the host memory pool has ${formatBytes(free)} free of ${formatBytes(this.size)}, less than the ${formatBytes(size)} asked for ` +
          "(guest_memory_size, else VFIO_GUEST_MEMORY_SIZE); closing a container returns its memory",
      );
    }
    const fit = this.#free.find((r) => r.size >= size);
    const given: HostRange[] = [];
    if (fit !== undefined) {
      given.push({ paddr: fit.paddr, size });
    } else {
      let left = size;
      for (const r of this.#free) {
        if (left === 0n) break;
        const n = r.size < left ? r.size : left;
        given.push({ paddr: r.paddr, size: n });
        left -= n;
      }
    }
    for (const r of given) this.#remove(r);
    return given;
  }

  /**
   * Takes exactly these ranges, or what of them is free and inside the pool: what a VFIO back from a
   * crash does with the ranges its kept containers had, so that nobody else is given them before
   * those containers are released. Parts outside the pool (it was made smaller since) or already
   * taken (a kept state that contradicts itself) are left out of the answer.
   * @returns the parts taken, ascending by address
   */
  reserve(ranges: readonly HostRange[]): readonly HostRange[] {
    const taken: HostRange[] = [];
    for (const want of ranges) {
      const wantEnd = want.paddr + want.size;
      const parts: HostRange[] = [];
      for (const gap of this.#free) {
        const gapEnd = gap.paddr + gap.size;
        const from = want.paddr > gap.paddr ? want.paddr : gap.paddr;
        const to = wantEnd < gapEnd ? wantEnd : gapEnd;
        if (from < to) parts.push({ paddr: from, size: to - from });
      }
      for (const p of parts) this.#remove(p);
      taken.push(...parts);
    }
    return taken.sort(byAddress);
  }

  /**
   * Returns ranges {@link take} or {@link reserve} gave. A part that is free already is skipped
   * rather than counted twice (the pool never holds more than it has).
   */
  put(ranges: readonly HostRange[]): void {
    for (const r of ranges) {
      // Only what is taken now goes back: subtract every free gap from the range first.
      let parts: HostRange[] = [{ paddr: r.paddr, size: r.size }];
      for (const gap of this.#free) parts = parts.flatMap((p) => subtract(p, gap));
      for (const p of parts) this.#insert(p);
    }
  }

  /** Removes `r`, which lies inside one free gap, from the free list. */
  #remove(r: HostRange): void {
    const i = this.#free.findIndex((g) => r.paddr >= g.paddr && r.paddr + r.size <= g.paddr + g.size);
    const g = this.#free[i];
    if (g === undefined) throw new RangeError(`host memory ${hex(r.paddr)} (${r.size} bytes) is not free`);
    const pieces = subtract(g, r);
    this.#free.splice(i, 1, ...pieces);
  }

  /** Adds a range that overlaps no free gap, clipped to the pool, merging it with adjacent gaps. */
  #insert(r: HostRange): void {
    // A part outside the pool (a kept range from a larger pool) never becomes free here.
    const end = r.paddr + r.size < this.base + this.size ? r.paddr + r.size : this.base + this.size;
    const from = r.paddr > this.base ? r.paddr : this.base;
    if (from >= end) return;
    const merged: HostRange[] = [];
    for (const g of [...this.#free, { paddr: from, size: end - from }].sort(byAddress)) {
      const last = merged.at(-1);
      if (last !== undefined && last.paddr + last.size === g.paddr) merged[merged.length - 1] = { paddr: last.paddr, size: last.size + g.size };
      else merged.push(g);
    }
    this.#free = merged;
  }
}

/** Ascending by address. */
function byAddress(a: HostRange, b: HostRange): number {
  return a.paddr < b.paddr ? -1 : a.paddr > b.paddr ? 1 : 0;
}

/** `a` without `b`: zero, one or two ranges. */
function subtract(a: HostRange, b: HostRange): HostRange[] {
  const aEnd = a.paddr + a.size;
  const bEnd = b.paddr + b.size;
  if (bEnd <= a.paddr || b.paddr >= aEnd) return [a];
  const out: HostRange[] = [];
  if (b.paddr > a.paddr) out.push({ paddr: a.paddr, size: b.paddr - a.paddr });
  if (bEnd < aEnd) out.push({ paddr: bEnd, size: aEnd - bEnd });
  return out;
}
