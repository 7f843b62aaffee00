/**
 * The generated contracts of ioasid-fabric (ts-proto output of proto/, never edited by hand), one
 * namespace per proto package: `testing` is ioasid.testing.v1, and so on.
 */
export * as testing from "./gen/ioasid/testing/v1/echo.js";
export * as iommu from "./gen/ioasid/iommu/v1/iommu.js";
export * as vfio from "./gen/ioasid/vfio/v1/vfio.js";
export * as kvm from "./gen/ioasid/kvm/v1/kvm.js";
export * as vdcm from "./gen/ioasid/vdcm/v1/vdcm.js";
export * as core from "./gen/ioasid/core/v1/core.js";
export * as events from "./gen/ioasid/events/v1/events.js";
export * as errors from "./gen/ioasid/errors/v1/errors.js";
export * as bus from "./gen/ioasid/bus/v1/bus.js";
export * as oplog from "./gen/ioasid/oplog/v1/oplog.js";
// The roles' kept state (one entry message per role, beside the role's service contract).
export * as kvmState from "./gen/ioasid/kvm/v1/kvm_state.js";
export * as vdcmState from "./gen/ioasid/vdcm/v1/vdcm_state.js";
export * as iommuState from "./gen/ioasid/iommu/v1/iommu_state.js";
export * as vfioState from "./gen/ioasid/vfio/v1/vfio_state.js";
export * as history from "./gen/ioasid/history/v1/history.js";
export { descriptorSetPath } from "./descriptors.js";
