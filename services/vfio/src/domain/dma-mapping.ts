import { invalidField, vfioError } from "./vfio-errors.js";
import type { DmaMapping } from "./vfio-ports.js";

// VFIO checks a stage-2 mapping's shape itself, before anything is created for it: a refused
// MapDma created the VM's stage-2 domain at the IOMMU (issue 14; DESIGN §8 "a refused call leaves
// no side effect, not even a lazily created object"). The rules are the IOMMU's (its io-page-table
// `assertRange` and `insertMapping`), with its reasons; the IOMMU still checks them, and what only
// the domain can know (an overlap, IOVA_ALREADY_MAPPED) stays the IOMMU's answer.

/** The IOMMU's page size: IOVAs, addresses and sizes of a stage-2 mapping are multiples of it. */
export const DMA_PAGE_SIZE = 4096n;

const U64_LIMIT = 1n << 64n;

/**
 * Refuses an IOVA range the IOMMU would refuse: empty, not 4 KiB aligned, or wrapping past 2^64.
 * @throws DomainError INVALID_ARGUMENT `INVALID_RANGE`, `ADDRESS_NOT_ALIGNED`
 */
export function assertDmaRange(iova: bigint, size: bigint): void {
  if (size === 0n) throw vfioError("INVALID_RANGE", "size must not be 0");
  if (iova % DMA_PAGE_SIZE !== 0n || size % DMA_PAGE_SIZE !== 0n) {
    throw vfioError("ADDRESS_NOT_ALIGNED", `iova 0x${iova.toString(16)} and size 0x${size.toString(16)} must be 4 KiB aligned`);
  }
  if (iova + size > U64_LIMIT) throw vfioError("INVALID_RANGE", "the IOVA range wraps past 2^64");
}

/**
 * Refuses a mapping the IOMMU would refuse for its shape alone (see {@link assertDmaRange}; the
 * host address aligned and not wrapping; read or write granted).
 * @throws DomainError INVALID_ARGUMENT `INVALID_RANGE`, `ADDRESS_NOT_ALIGNED`, `INVALID_FIELD`
 */
export function assertDmaMapping(m: DmaMapping): void {
  assertDmaRange(m.iova, m.size);
  if (m.paddr % DMA_PAGE_SIZE !== 0n) throw vfioError("ADDRESS_NOT_ALIGNED", `address 0x${m.paddr.toString(16)} is not 4 KiB aligned`);
  if (m.paddr + m.size > U64_LIMIT) throw vfioError("INVALID_RANGE", "the output range wraps past 2^64");
  if (!m.access.read && !m.access.write) throw invalidField("access", "a mapping grants at least read or write access");
}
