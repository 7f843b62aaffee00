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

/** Where VDCM records each change of its "hardware" (`vdevWrite`, `vdevClear`, `submit`). */
export interface HistorySink {
  record(action: HistoryActionInput, fields: HistoryFields): void;
}
