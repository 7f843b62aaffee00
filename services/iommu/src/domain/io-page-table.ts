import { iommuError, invalidField } from "./iommu-errors.js";
import { PAGE_SIZE, type DmaAccess, type Mapping } from "./iommu-hardware-model.js";

// The I/O page tables' arithmetic (a domain's mappings, a guest's first stage): sorted, page-aligned
// ranges, inserted, split and looked up. Pure functions over arrays; the tables own the arrays.

const U64_LIMIT = 1n << 64n;

/** A copy of a mapping (its access too). */
export function copyMapping(m: Mapping): Mapping {
  return { iova: m.iova, paddr: m.paddr, size: m.size, access: { ...m.access } };
}

/** Page-aligned, non-empty, not wrapping past 2^64. */
export function assertRange(iova: bigint, size: bigint): void {
  if (size === 0n) throw iommuError("INVALID_RANGE", "size must not be 0");
  if (iova % PAGE_SIZE !== 0n || size % PAGE_SIZE !== 0n) {
    throw iommuError("ADDRESS_NOT_ALIGNED", `iova 0x${iova.toString(16)} and size 0x${size.toString(16)} must be 4 KiB aligned`);
  }
  if (iova + size > U64_LIMIT) throw iommuError("INVALID_RANGE", "the IOVA range wraps past 2^64");
}

/** Index of the first mapping whose IOVA is ≥ `iova`. */
export function lowerBound(mappings: readonly Mapping[], iova: bigint): number {
  let lo = 0;
  let hi = mappings.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (mappings[mid]!.iova < iova) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Whether `granted` covers every access `asked` for. */
export function allows(granted: DmaAccess, asked: DmaAccess): boolean {
  return !((asked.read && !granted.read) || (asked.write && !granted.write) || (asked.execute && !granted.execute));
}

/**
 * `mappings` with `m` inserted in IOVA order.
 * @throws ADDRESS_NOT_ALIGNED, INVALID_RANGE, INVALID_FIELD (no access), IOVA_ALREADY_MAPPED
 */
export function insertMapping(mappings: Mapping[], m: Mapping, where: string): Mapping[] {
  assertRange(m.iova, m.size);
  if (m.paddr % PAGE_SIZE !== 0n) throw iommuError("ADDRESS_NOT_ALIGNED", `address 0x${m.paddr.toString(16)} is not 4 KiB aligned`);
  if (m.paddr + m.size > U64_LIMIT) throw iommuError("INVALID_RANGE", "the output range wraps past 2^64");
  if (!m.access.read && !m.access.write) throw invalidField("access", "a mapping grants at least read or write access");
  const at = lowerBound(mappings, m.iova);
  const prev = mappings[at - 1];
  const next = mappings[at];
  const end = m.iova + m.size;
  if ((prev !== undefined && prev.iova + prev.size > m.iova) || (next !== undefined && next.iova < end)) {
    throw iommuError("IOVA_ALREADY_MAPPED", `[0x${m.iova.toString(16)}, 0x${end.toString(16)}) overlaps a mapping of ${where}`);
  }
  mappings.splice(at, 0, { iova: m.iova, paddr: m.paddr, size: m.size, access: { ...m.access } });
  return mappings;
}

/**
 * Every page inside a page-aligned range removed (mappings straddling its ends are split).
 * @throws ADDRESS_NOT_ALIGNED, INVALID_RANGE
 */
export function removeMappings(mappings: readonly Mapping[], iova: bigint, size: bigint): { kept: Mapping[]; unmapped: bigint } {
  assertRange(iova, size);
  const end = iova + size;
  const kept: Mapping[] = [];
  let unmapped = 0n;
  for (const m of mappings) {
    const mEnd = m.iova + m.size;
    if (mEnd <= iova || m.iova >= end) {
      kept.push(m);
      continue;
    }
    if (m.iova < iova) kept.push({ ...m, size: iova - m.iova });
    if (mEnd > end) kept.push({ ...m, iova: end, paddr: m.paddr + (end - m.iova), size: mEnd - end });
    unmapped += (mEnd < end ? mEnd : end) - (m.iova > iova ? m.iova : iova);
  }
  return { kept, unmapped };
}

/** The mapping that contains `address`, if any. */
export function findMapping(mappings: readonly Mapping[], address: bigint): Mapping | undefined {
  const at = lowerBound(mappings, address + 1n) - 1;
  const m = mappings[at];
  return m !== undefined && address < m.iova + m.size ? m : undefined;
}
