import { createClient, type CreateClientOptions, type PromiseClient } from "@ioasid/grpc-kit";
import { iommu } from "@ioasid/proto";
import type { DmaResult, DmaTranslator } from "../domain/descriptor-runner.js";

/** An IommuService client. */
export type IommuClient = PromiseClient<typeof iommu.IommuServiceService>;

/** Deadline of one DMA translation request, ms: a FREE's drain waits for descriptors in flight. */
export const TRANSLATE_DEADLINE_MS = 1000;

/**
 * An IommuService client for descriptors' DMA, with a {@link TRANSLATE_DEADLINE_MS} deadline; over
 * mTLS with the VDCM instance's credentials when given, to a server that proves it is an IOMMU.
 */
export function createIommuClient(address: string, tls?: CreateClientOptions["tls"]): IommuClient {
  return createClient(iommu.IommuServiceService, address, { deadlineMs: TRANSLATE_DEADLINE_MS, ...(tls === undefined ? {} : { tls, serverRole: "iommu" }) });
}

/**
 * The {@link DmaTranslator} over IommuService.Translate: each DMA request is tagged with the
 * device and the host PASID; a page request raised by a miss forms a group by itself. An IOMMU
 * that does not know the device translates nothing: that is a DMA fault.
 */
export function iommuDmaTranslator(client: IommuClient): DmaTranslator {
  return {
    translate: async (r): Promise<DmaResult> => {
      let res: iommu.TranslateResponse;
      try {
        res = await client.translate(
          iommu.TranslateRequest.fromPartial({ deviceId: r.deviceId, pasid: r.pasid, address: r.address, access: { read: !r.write, write: r.write } }),
        );
      } catch (err) {
        if ((err as { reason?: string }).reason === "DEVICE_NOT_FOUND") return { outcome: "FAULT", reason: "DEVICE_NOT_FOUND" };
        throw err;
      }
      switch (res.outcome) {
        case iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED:
          return { outcome: "TRANSLATED" };
        case iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST:
          return { outcome: "PAGE_REQUEST", faultGroupId: res.faultGroupId };
        default:
          return { outcome: "FAULT", reason: iommu.faultReasonToJSON(res.faultReason) };
      }
    },
  };
}
