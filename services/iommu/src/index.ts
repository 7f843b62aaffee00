/**
 * The IOMMU role (the VT-d driver: intel-svm, attach handles) as a library: the modelled hardware,
 * the driver that ties it to the IOASID core, and the IommuService handlers.
 */
export { iommuConfigSchema } from "./config.js";
export * from "./adapters/convert.js";
export { FaultHandlers } from "./domain/fault-handlers.js";
export {
  BIND_PURPOSE,
  IommuDriver,
  MAX_SPID,
  type BindGpasidSpec,
  type IommuDriverOptions,
  type IommuEvent,
  type IommuHistoryAction,
  type IommuHistoryPort,
  type IommuLog,
  type SvaBindSpec,
  type UnbindGpasidSpec,
  type UnbindResult,
} from "./domain/iommu-driver.js";
export { iommuError, invalidField, IommuReason } from "./domain/iommu-errors.js";
export * from "./domain/iommu-hardware.js";
export * from "./domain/viommu.js";
export { createIommuEventHandler, toIommuEvent } from "./adapters/iommu-event-handler.js";
export { iommuHistoryPort, toHistoryAction, type HistorySink } from "./adapters/iommu-history.js";
export { fromIommuStateEntry, IOMMU_STATE_FORMAT, iommuStateCodec, toIommuStateEntry } from "./adapters/iommu-state-codec.js";
export { createIommuHandlers, createIommuServer, startIommuServer, type IommuServerOptions } from "./adapters/server.js";
