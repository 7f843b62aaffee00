import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";

/**
 * What VDCM needs from the outside world besides the IOASID core (the roles' one `CorePort`, from
 * @ioasid/role-kit; VDCM's registration calls over it are in core-registrations.ts): the history.
 * main.ts gives the real implementations (gRPC clients, NATS); unit tests give in-memory ones and
 * the testkit's `InProcessCore`. The IOMMU, through which descriptors' DMA is translated, is
 * {@link DmaTranslator} in descriptor-runner.ts.
 */

/** Who holds a reference: VDCM's are role "vdcm", its instance, and a purpose per work queue. */
export type { Holder } from "@ioasid/ioasid";

/** Fields of one history record (the bus's). */
export type { HistoryFields };

/** Why a device PASID entry was drained and cleared (the `vdev_clear` record's cause). */
export const VdevClearCause = {
  /** The guest cleared its work queue's PASID (MMIO write). */
  MDEV_CLEAR: "mdev_clear",
  /** The mdev was unassigned from its VM. */
  UNASSIGN: "unassign",
  /** The IOASID was freed (the FREE delivery, DEVICE priority). */
  FREE: "FREE",
  /** A restored entry whose reference the core no longer records (reconcile after a restart). */
  RECONCILE: "reconcile",
} as const;
export type VdevClearCause = (typeof VdevClearCause)[keyof typeof VdevClearCause];

type CatalogueVdevClear = Extract<HistoryActionInput, { readonly $case: "vdevClear" }>["value"];

/**
 * What VDCM records: a case of the history catalogue, except `vdevClear`, whose cause is the
 * domain's closed set (DESIGN §2: domain code knows no proto; adapters/convert.ts maps it to
 * ioasid.history.v1).
 */
export type VdcmHistoryAction =
  | Exclude<HistoryActionInput, { readonly $case: "vdevClear" }>
  | { readonly $case: "vdevClear"; readonly value: Omit<CatalogueVdevClear, "cause"> & { readonly cause: VdevClearCause } };

/** Where VDCM records each change of its "hardware" (`vdevWrite`, `vdevClear`, `submit`). */
export interface HistorySink {
  record(action: VdcmHistoryAction, fields: HistoryFields): void;
}
