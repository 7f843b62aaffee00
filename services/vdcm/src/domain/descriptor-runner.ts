import { invalidField } from "./vdcm-errors.js";

/** The operation a work descriptor asks the device to perform. */
export const DescriptorOp = {
  /** No memory access: checks the PASID translation only. */
  NOOP: "NOOP",
  /** Copy `size` bytes from `srcAddress` to `dstAddress` (DMA read, then write). */
  MEMMOVE: "MEMMOVE",
  /** Fill `size` bytes at `dstAddress` (DMA write). */
  FILL: "FILL",
} as const;
export type DescriptorOp = (typeof DescriptorOp)[keyof typeof DescriptorOp];

/** How a descriptor completed (its completion record's status). */
export const CompletionStatus = {
  /** Every DMA translated; the operation completed. */
  SUCCESS: "SUCCESS",
  /** A DMA missed and the IOMMU raised a page request: the operation stopped at `faultAddress`. */
  PAGE_REQUEST: "PAGE_REQUEST",
  /** A DMA hit an unrecoverable translation fault at `faultAddress`: the operation stopped. */
  DMA_FAULT: "DMA_FAULT",
} as const;
export type CompletionStatus = (typeof CompletionStatus)[keyof typeof CompletionStatus];

/** A work descriptor. Addresses are in the PASID's address space. */
export interface Descriptor {
  readonly op: DescriptorOp;
  readonly srcAddress: bigint;
  readonly dstAddress: bigint;
  /** Bytes to process (ignored for NOOP). */
  readonly size: bigint;
}

/** A descriptor's completion record. */
export interface Completion {
  readonly status: CompletionStatus;
  /** Bytes processed before completion or the fault. */
  readonly bytesCompleted: bigint;
  /** PAGE_REQUEST, DMA_FAULT: the address whose translation failed; 0 otherwise. */
  readonly faultAddress: bigint;
  /** PAGE_REQUEST: the IOMMU fault group raised; 0 otherwise. */
  readonly faultGroupId: bigint;
}

/** One DMA translation request the device sends to the IOMMU. */
export interface DmaRequest {
  readonly deviceId: string;
  /** The host PASID tagging the request. */
  readonly pasid: number;
  readonly address: bigint;
  /** Write access (else read). */
  readonly write: boolean;
}

/** What the IOMMU answered a DMA translation request. */
export type DmaResult =
  | { readonly outcome: "TRANSLATED" }
  | { readonly outcome: "PAGE_REQUEST"; readonly faultGroupId: bigint }
  | { readonly outcome: "FAULT"; readonly reason: string };

/** The IOMMU as a device's DMA sees it (IommuService.Translate). */
export interface DmaTranslator {
  /**
   * Translates one DMA request; misses and faults are results, not errors.
   * @throws DomainError when the IOMMU cannot be asked (UNAVAILABLE, DEADLINE_EXCEEDED)
   */
  translate(request: DmaRequest): Promise<DmaResult>;
}

/** DMA page size: each page of a transfer is translated separately. */
export const DMA_PAGE_SIZE = 4096n;
/** Largest transfer one descriptor may ask for (the device's max transfer size): 2 MiB. */
export const MAX_TRANSFER_SIZE = 2n * 1024n * 1024n;

const U64_MAX = (1n << 64n) - 1n;

/**
 * Validates a descriptor before anything is translated.
 * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (no op, a transfer larger than
 *   {@link MAX_TRANSFER_SIZE}, a range past the end of the 64-bit address space)
 */
export function assertDescriptor(d: Descriptor | undefined): asserts d is Descriptor {
  if (d === undefined) throw invalidField("descriptor", "descriptor is required");
  if (d.op !== DescriptorOp.NOOP && d.op !== DescriptorOp.MEMMOVE && d.op !== DescriptorOp.FILL) {
    throw invalidField("descriptor.op", "descriptor.op must be NOOP, MEMMOVE or FILL");
  }
  if (d.op === DescriptorOp.NOOP) return;
  if (d.size > MAX_TRANSFER_SIZE) throw invalidField("descriptor.size", `descriptor.size ${d.size} exceeds the maximum transfer size ${MAX_TRANSFER_SIZE}`);
  if (d.size > 0n && d.dstAddress + d.size - 1n > U64_MAX) throw invalidField("descriptor.dst_address", "the destination range wraps past 2^64");
  if (d.op === DescriptorOp.MEMMOVE && d.size > 0n && d.srcAddress + d.size - 1n > U64_MAX) {
    throw invalidField("descriptor.src_address", "the source range wraps past 2^64");
  }
}

/**
 * Runs a descriptor on a device with a host PASID: every page it touches is translated by the
 * IOMMU (device, host PASID, address), source read before destination write; the first miss or
 * fault stops it with the bytes completed so far. A NOOP touches no memory.
 * The descriptor must have passed {@link assertDescriptor}.
 */
export async function runDescriptor(dma: DmaTranslator, deviceId: string, hpasid: number, d: Descriptor): Promise<Completion> {
  if (d.op === DescriptorOp.NOOP || d.size === 0n) return success(d.op === DescriptorOp.NOOP ? 0n : d.size);
  const reads = d.op === DescriptorOp.MEMMOVE;
  let done = 0n;
  // Bounded: at most 2 translations per page of a transfer of at most MAX_TRANSFER_SIZE.
  while (done < d.size) {
    let chunk = min(d.size - done, pageRemainder(d.dstAddress + done));
    if (reads) chunk = min(chunk, pageRemainder(d.srcAddress + done));
    if (reads) {
      const stop = await translate(dma, deviceId, hpasid, d.srcAddress + done, false, done);
      if (stop !== undefined) return stop;
    }
    const stop = await translate(dma, deviceId, hpasid, d.dstAddress + done, true, done);
    if (stop !== undefined) return stop;
    done += chunk;
  }
  return success(done);
}

async function translate(dma: DmaTranslator, deviceId: string, pasid: number, address: bigint, write: boolean, done: bigint): Promise<Completion | undefined> {
  const r = await dma.translate({ deviceId, pasid, address, write });
  switch (r.outcome) {
    case "TRANSLATED":
      return undefined;
    case "PAGE_REQUEST":
      return { status: CompletionStatus.PAGE_REQUEST, bytesCompleted: done, faultAddress: address, faultGroupId: r.faultGroupId };
    case "FAULT":
      return { status: CompletionStatus.DMA_FAULT, bytesCompleted: done, faultAddress: address, faultGroupId: 0n };
  }
}

function success(bytes: bigint): Completion {
  return { status: CompletionStatus.SUCCESS, bytesCompleted: bytes, faultAddress: 0n, faultGroupId: 0n };
}

function pageRemainder(address: bigint): bigint {
  return DMA_PAGE_SIZE - (address % DMA_PAGE_SIZE);
}

function min(a: bigint, b: bigint): bigint {
  return a < b ? a : b;
}
