import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import {
  assertDescriptor,
  CompletionStatus,
  DescriptorOp,
  MAX_TRANSFER_SIZE,
  runDescriptor,
  type Descriptor,
  type DmaRequest,
  type DmaResult,
} from "./descriptor-runner.js";

/** An IOMMU answering from a table of page → result (default: translated). */
function iommu(answers: Record<string, DmaResult> = {}) {
  const requests: DmaRequest[] = [];
  return {
    requests,
    translate: async (r: DmaRequest): Promise<DmaResult> => {
      requests.push(r);
      return answers[`${r.write ? "w" : "r"}${r.address / 4096n}`] ?? { outcome: "TRANSLATED" };
    },
  };
}

const d = (over: Partial<Descriptor>): Descriptor => ({ op: DescriptorOp.MEMMOVE, srcAddress: 0n, dstAddress: 0n, size: 0n, ...over });

describe("runDescriptor", () => {
  it("translates each page a transfer touches, source before destination, tagged with the host PASID", async () => {
    const dma = iommu();
    const c = await runDescriptor(dma, "dsa0", 201, d({ srcAddress: 0x1ff0n, dstAddress: 0x8000n, size: 0x20n }));
    expect(c).toEqual({ status: CompletionStatus.SUCCESS, bytesCompleted: 0x20n, faultAddress: 0n, faultGroupId: 0n });
    expect(dma.requests.map((r) => [r.deviceId, r.pasid, r.address, r.write])).toEqual([
      ["dsa0", 201, 0x1ff0n, false],
      ["dsa0", 201, 0x8000n, true],
      ["dsa0", 201, 0x2000n, false],
      ["dsa0", 201, 0x8010n, true],
    ]);
  });

  it("stops at the first page request or fault with the bytes completed before it", async () => {
    const pr = iommu({ w3: { outcome: "PAGE_REQUEST", faultGroupId: 77n } });
    expect(await runDescriptor(pr, "dsa0", 201, d({ op: DescriptorOp.FILL, dstAddress: 0x1000n, size: 0x4000n }))).toEqual({
      status: CompletionStatus.PAGE_REQUEST,
      bytesCompleted: 0x2000n,
      faultAddress: 0x3000n,
      faultGroupId: 77n,
    });
    expect(pr.requests).toHaveLength(3);
    const fault = iommu({ r0: { outcome: "FAULT", reason: "NO_PASID_ENTRY" } });
    expect(await runDescriptor(fault, "dsa0", 201, d({ srcAddress: 0x10n, dstAddress: 0x5000n, size: 8n }))).toEqual({
      status: CompletionStatus.DMA_FAULT,
      bytesCompleted: 0n,
      faultAddress: 0x10n,
      faultGroupId: 0n,
    });
  });

  it("touches no memory for a NOOP", async () => {
    const dma = iommu();
    expect((await runDescriptor(dma, "dsa0", 201, d({ op: DescriptorOp.NOOP, size: 4096n }))).bytesCompleted).toBe(0n);
    expect(dma.requests).toEqual([]);
  });
});

describe("assertDescriptor", () => {
  const field = (fn: () => void): string | undefined => {
    try {
      fn();
    } catch (err) {
      expect(err).toBeInstanceOf(DomainError);
      expect((err as DomainError).code).toBe(Code.INVALID_ARGUMENT);
      return (err as DomainError).metadata.field;
    }
    return undefined;
  };

  it("refuses a missing descriptor or op, an oversize transfer and a range past 2^64", () => {
    expect(field(() => assertDescriptor(undefined))).toBe("descriptor");
    expect(field(() => assertDescriptor(d({ op: undefined as unknown as DescriptorOp })))).toBe("descriptor.op");
    expect(field(() => assertDescriptor(d({ size: MAX_TRANSFER_SIZE + 1n })))).toBe("descriptor.size");
    expect(field(() => assertDescriptor(d({ dstAddress: (1n << 64n) - 4n, size: 8n })))).toBe("descriptor.dst_address");
    expect(field(() => assertDescriptor(d({ srcAddress: (1n << 64n) - 4n, size: 8n })))).toBe("descriptor.src_address");
    expect(field(() => assertDescriptor(d({ size: MAX_TRANSFER_SIZE })))).toBeUndefined();
    expect(field(() => assertDescriptor(d({ op: DescriptorOp.NOOP, size: MAX_TRANSFER_SIZE * 2n })))).toBeUndefined();
  });
});
