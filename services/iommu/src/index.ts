/**
 * The IOMMU role (the VT-d driver: intel-svm, attach handles) as a library: the modelled hardware,
 * the driver that ties it to the IOASID core, and the IommuService handlers.
 */
export { iommuConfigSchema } from "./config.js";
export * from "./convert.js";
export { FaultHandlers } from "./fault-handlers.js";
export {
  BIND_PURPOSE,
  IommuDriver,
  MAX_SPID,
  type BindGpasidSpec,
  type IommuDriverOptions,
  type IommuHistoryPort,
  type IommuLog,
  type SvaBindSpec,
  type UnbindGpasidSpec,
  type UnbindResult,
} from "./iommu-driver.js";
export { iommuError, invalidField, IommuReason } from "./iommu-errors.js";
export * from "./iommu-hardware.js";
export { fromIommuStateEntry, IOMMU_STATE_FORMAT, iommuStateCodec, toIommuStateEntry } from "./iommu-state-codec.js";
export { createIommuHandlers, createIommuServer, startIommuServer, type IommuServerOptions } from "./server.js";
